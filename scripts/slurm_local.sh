#!/usr/bin/env bash
# slurm_local.sh — a real single-node SLURM (with accounting) on one machine,
# for trying the sdtune SLURM templates and for tests.
#
#   scripts/slurm_local.sh start  [STATE_DIR]   # install if needed, start, print `export SLURM_CONF=...`
#   scripts/slurm_local.sh stop   [STATE_DIR]   # cancel jobs, stop every daemon by its pid file
#   scripts/slurm_local.sh status [STATE_DIR]   # what is running
#   scripts/slurm_local.sh env    [STATE_DIR]   # print the export line only
#
# Typical use:  eval "$(scripts/slurm_local.sh start)"
#
# Everything lives in STATE_DIR (default /tmp/sdtune-slurm): configs, logs, pid
# files, the munge key and socket, the MariaDB data directory and the slurm
# state.  Daemons are started and stopped only through their own pid files —
# never by process name — so several instances (different STATE_DIR and
# ports) can coexist with other users of the machine.
#
# Only the export line goes to stdout; all progress messages go to stderr.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_CPUS       CPUs advertised for the node (default 8; more than the
#                          real cores, thanks to SlurmdParameters=config_overrides)
#   SLURM_LOCAL_PORT_BASE  slurmctld port; slurmd=+1, slurmdbd=+2, MariaDB=+3 (default 6817)
#   SLURM_LOCAL_CLUSTER    cluster name (default sdtune)
#   SLURM_LOCAL_PARTITION  partition name (default debug)
#   SLURM_LOCAL_TIMEOUT    seconds to wait for each daemon (default 60)

set -euo pipefail

PROG=${0##*/}
CMD=${1:-}
STATE_DIR=${2:-/tmp/sdtune-slurm}

CPUS=${SLURM_LOCAL_CPUS:-8}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
CLUSTER=${SLURM_LOCAL_CLUSTER:-sdtune}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- paths ---
abs_state_dir() {
  mkdir -p "$STATE_DIR" || die "cannot create state dir $STATE_DIR"
  STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
  CONF=$STATE_DIR/etc/slurm.conf
  DBD_CONF=$STATE_DIR/etc/slurmdbd.conf
  LOG=$STATE_DIR/log
  RUN=$STATE_DIR/run
  MUNGE_DIR=$STATE_DIR/munge
  MUNGE_SOCKET=$MUNGE_DIR/munge.socket
  DB_DIR=$STATE_DIR/mysql
  DB_SOCKET=$RUN/mysqld.sock
  DB_PASS_FILE=$STATE_DIR/etc/db.pass
  # pid files; the daemon's name is checked against /proc/PID/comm
  PID_MUNGED=$MUNGE_DIR/munged.pid
  PID_MARIADB=$RUN/mariadbd.pid
  PID_SLURMDBD=$RUN/slurmdbd.pid
  PID_SLURMCTLD=$RUN/slurmctld.pid
  PID_SLURMD=$RUN/slurmd.pid
}

# ------------------------------------------------------------- helpers ---
# pid_alive PID NAME: PID is a live (non-zombie) process whose command name is
# NAME.  Matches /proc/PID/comm, not the exe path: Debian's /usr/sbin/slurmctld
# is an alternatives link to slurmctld-wlm.
pid_alive() {
  local pid=$1 name=$2 comm state
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "${name:0:15}" ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

# pid_of NAME PIDFILE -> prints the pid if the file names a live NAME process
# (guards against a stale file and a recycled pid).
pid_of() {
  local name=$1 file=$2 pid
  pid=$(tr -dc '0-9' 2>/dev/null <"$file") || return 1
  [[ -n $pid ]] && pid_alive "$pid" "$name" || return 1
  printf '%s\n' "$pid"
}

is_running() { pid_of "$1" "$2" >/dev/null; }

# wait_for SECONDS DESCRIPTION LOGFILE -- COMMAND...
wait_for() {
  local secs=$1 what=$2 logf=$3
  shift 4
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${secs}s waiting for $what"
      if [[ -f $logf ]]; then
        log "last lines of $logf:"
        tail -n 20 "$logf" >&2 || true
      fi
      die "$what did not come up; see $logf"
    fi
    sleep 0.2
  done
}

# stop_daemon NAME PIDFILE: SIGTERM by pid, wait, SIGKILL after $TIMEOUT s.
stop_daemon() {
  local name=$1 file=$2 pid deadline
  if ! pid=$(pid_of "$name" "$file"); then
    rm -f "$file"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + TIMEOUT))
  # poll the pid itself: daemons delete their pid file before they exit
  while pid_alive "$pid" "$name"; do
    if ((SECONDS >= deadline)); then
      log "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  rm -f "$file"
}

port_in_use() {
  # true if a TCP socket listens on port $1 (any address), read from /proc/net/tcp{,6}
  local hex
  hex=$(printf '%04X' "$1")
  awk -v p=":$hex" 'NR>1 && $4=="0A" && substr($2, length($2)-4)==p {found=1} END{exit !found}' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# ------------------------------------------------------------- install ---
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]} (log: $LOG/apt.log)"
  # Keep the packages' init scripts from starting system-wide daemons during
  # the install (no-op where a policy-rc.d already exists, e.g. containers).
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" ||
      { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
  } >>"$LOG/apt.log" 2>&1 || rc=$?
  ((made_policy)) && rm -f "$policy"
  ((rc == 0)) || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install failed (rc=$rc); see $LOG/apt.log"; }
}

# -------------------------------------------------------------- config ---
write_configs() {
  local host mem
  host=$(hostname -s)
  mem=$(awk '/^MemTotal:/ {printf "%d", $2/1024 * 0.9}' /proc/meminfo)
  mkdir -p "$STATE_DIR/etc" "$STATE_DIR/state" "$STATE_DIR/spool" "$LOG" "$RUN"
  chmod 755 "$STATE_DIR" "$STATE_DIR/etc" "$RUN"

  if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
  fi
  local dbpass
  dbpass=$(cat "$DB_PASS_FILE")

  cat >"$CONF.tmp" <<EOF
# generated by scripts/slurm_local.sh — single-node SLURM for sdtune
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# no cgroups (no systemd here): plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
DebugFlags=NO_CONF_HASH
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for auth/munge, the munge socket used towards slurmdbd comes from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
# advertise more CPUs than the machine has so several small jobs fit at once
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  chmod 644 "$CONF"

  (
    umask 077
    cat >"$DBD_CONF.tmp" <<EOF
# generated by scripts/slurm_local.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$PID_SLURMDBD
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
  )
  mv "$DBD_CONF.tmp" "$DBD_CONF"
  chmod 600 "$DBD_CONF"
}

# -------------------------------------------------------------- daemons ---
start_munge() {
  if is_running munged "$PID_MUNGED"; then return 0; fi
  log "starting munged (socket $MUNGE_SOCKET, log $LOG/munged.log)"
  mkdir -p "$MUNGE_DIR"
  if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    # own key: this instance does not depend on /etc/munge
    (umask 077 && dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none)
  fi
  touch "$LOG/munged.log"
  chown -R munge:munge "$MUNGE_DIR" "$LOG/munged.log"
  chmod 700 "$MUNGE_DIR"
  chmod 400 "$MUNGE_DIR/munge.key"
  # munged refuses a socket dir that others can't traverse to; clients run as
  # root here, so 0700 owned by munge is fine for root, but make it 0755 so
  # that non-root job users could authenticate too.
  chmod 755 "$MUNGE_DIR"
  chmod 640 "$LOG/munged.log"
  runuser -u munge -- /usr/sbin/munged --force \
    --key-file="$MUNGE_DIR/munge.key" \
    --socket="$MUNGE_SOCKET" \
    --pid-file="$PID_MUNGED" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    --log-file="$LOG/munged.log" >>"$LOG/munged.log" 2>&1 ||
    { tail -n 20 "$LOG/munged.log" >&2; die "munged failed to start; see $LOG/munged.log"; }
  wait_for "$TIMEOUT" munged "$LOG/munged.log" -- is_running munged "$PID_MUNGED"
  wait_for "$TIMEOUT" "munge socket" "$LOG/munged.log" -- \
    bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'"
}

db_client() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCKET" -uroot "$@"; }

launch_mariadb() {
  if [[ ! -d $DB_DIR/mysql ]]; then
    log "initialising MariaDB data dir $DB_DIR (log $LOG/mariadb-install.log)"
    mkdir -p "$DB_DIR"
    chown mysql:mysql "$DB_DIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
      --auth-root-authentication-method=socket --skip-test-db \
      >"$LOG/mariadb-install.log" 2>&1 ||
      { tail -n 20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed; see $LOG/mariadb-install.log"; }
  fi
  log "starting mariadbd on 127.0.0.1:$DB_PORT (log $LOG/mariadb.log)"
  touch "$LOG/mariadb.log"
  chown mysql:mysql "$LOG/mariadb.log"
  chown mysql:mysql "$RUN" 2>/dev/null || true
  chmod 755 "$RUN"
  # mariadbd does not daemonise: start it in its own session, detached from
  # our stdout (so `eval "$(... start)"` returns) and drop to the mysql user.
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql \
    --datadir="$DB_DIR" --socket="$DB_SOCKET" --pid-file="$PID_MARIADB" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --log-error="$LOG/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 --max-allowed-packet=16M \
    </dev/null >>"$LOG/mariadb.log" 2>&1 &
  # mariadbd writes its pid file only once it is initialised; write it now
  # (same pid: setsid execs when not a process-group leader) so that a `stop`
  # right after a failed start still finds it.
  echo "$!" >"$PID_MARIADB"
  chown mysql:mysql "$PID_MARIADB"   # mariadbd (as mysql) rewrites it
  wait_for "$TIMEOUT" mariadbd "$LOG/mariadb.log" -- db_client -e 'SELECT 1'
  wait_for 5 "mariadbd pid file" "$LOG/mariadb.log" -- is_running mariadbd "$PID_MARIADB"
}

start_mariadb() {
  is_running mariadbd "$PID_MARIADB" || launch_mariadb
  # always (idempotent): a start that failed after launching mariadbd may not have got here
  local dbpass
  dbpass=$(cat "$DB_PASS_FILE")
  db_client --batch >>"$LOG/mariadb.log" 2>&1 <<EOF || die "creating the DB user slurm@127.0.0.1 failed; see $LOG/mariadb.log"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

launch_slurmdbd() {
  log "starting slurmdbd on port $DBD_PORT (log $LOG/slurmdbd.log)"
  # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF
  slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 ||
    { tail -n 20 "$LOG/slurmdbd.log" >&2; die "slurmdbd failed to start; see $LOG/slurmdbd.log"; }
  wait_for "$TIMEOUT" slurmdbd "$LOG/slurmdbd.log" -- is_running slurmdbd "$PID_SLURMDBD"
  # ready once it answers sacctmgr
  wait_for "$TIMEOUT" "slurmdbd (sacctmgr)" "$LOG/slurmdbd.log" -- sacctmgr -n -P list cluster
}

start_slurmdbd() {
  is_running slurmdbd "$PID_SLURMDBD" || launch_slurmdbd
  # always (idempotent)
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER in slurmdbd"
    sacctmgr -i add cluster "$CLUSTER" >>"$LOG/slurmdbd.log" 2>&1 ||
      die "sacctmgr add cluster $CLUSTER failed; see $LOG/slurmdbd.log"
  fi
}

start_slurmctld() {
  if is_running slurmctld "$PID_SLURMCTLD"; then return 0; fi
  log "starting slurmctld on port $CTLD_PORT (log $LOG/slurmctld.log)"
  # no -c: keep job state (and job ids) across stop/start, so ids stay unique in sacct
  slurmctld </dev/null >>"$LOG/slurmctld.log" 2>&1 ||
    { tail -n 20 "$LOG/slurmctld.log" >&2; die "slurmctld failed to start; see $LOG/slurmctld.log"; }
  wait_for "$TIMEOUT" slurmctld "$LOG/slurmctld.log" -- is_running slurmctld "$PID_SLURMCTLD"
  wait_for "$TIMEOUT" "slurmctld (scontrol ping)" "$LOG/slurmctld.log" -- \
    bash -c 'scontrol ping | grep -q UP'
}

start_slurmd() {
  if is_running slurmd "$PID_SLURMD"; then return 0; fi
  log "starting slurmd on port $SLURMD_PORT (log $LOG/slurmd.log)"
  slurmd </dev/null >>"$LOG/slurmd.log" 2>&1 ||
    { tail -n 20 "$LOG/slurmd.log" >&2; die "slurmd failed to start; see $LOG/slurmd.log"; }
  wait_for "$TIMEOUT" slurmd "$LOG/slurmd.log" -- is_running slurmd "$PID_SLURMD"
}

node_idle() {
  local state
  state=$(sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null) || return 1
  [[ $state == idle || $state == mixed || $state == allocated ]]
}

print_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

# ------------------------------------------------------------ commands ---
# Before starting anything: every daemon that is not already ours and running
# needs its port free (another instance, or another user's service).
preflight_ports() {
  local busy=() spec name file port
  for spec in "mariadbd:$PID_MARIADB:$DB_PORT:MariaDB" "slurmdbd:$PID_SLURMDBD:$DBD_PORT:slurmdbd" \
    "slurmctld:$PID_SLURMCTLD:$CTLD_PORT:slurmctld" "slurmd:$PID_SLURMD:$SLURMD_PORT:slurmd"; do
    IFS=: read -r name file port _ <<<"$spec"
    if ! is_running "$name" "$file" && port_in_use "$port"; then
      busy+=("$port (${spec##*:})")
    fi
  done
  ((${#busy[@]} == 0)) ||
    die "port(s) already in use: ${busy[*]}; another instance? use another STATE_DIR and SLURM_LOCAL_PORT_BASE (now $PORT_BASE)"
}

on_start_error() {
  log "start failed part-way; what did start keeps running: rerun \`$PROG start $STATE_DIR\` after fixing, or \`$PROG stop $STATE_DIR\`"
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "must run as root (installs packages, runs munged/mariadbd as their users)"
  abs_state_dir
  mkdir -p "$LOG"
  export SLURM_CONF=$CONF
  if [[ -f $CONF ]] && all_running; then
    log "already running (state $STATE_DIR)"
    print_env
    return 0
  fi
  local t0=$SECONDS
  install_packages
  preflight_ports
  trap on_start_error EXIT
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_for "$TIMEOUT" "node $(hostname -s) idle in sinfo" "$LOG/slurmd.log" -- node_idle
  trap - EXIT
  log "SLURM up in $((SECONDS - t0))s: cluster $CLUSTER, partition $PARTITION, $CPUS CPUs, logs in $LOG"
  print_env
}

all_running() {
  is_running munged "$PID_MUNGED" && is_running mariadbd "$PID_MARIADB" &&
    is_running slurmdbd "$PID_SLURMDBD" && is_running slurmctld "$PID_SLURMCTLD" &&
    is_running slurmd "$PID_SLURMD"
}

cancel_jobs() {
  is_running slurmctld "$PID_SLURMCTLD" || return 0
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  [[ -n $jobs ]] || return 0
  log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
  # shellcheck disable=SC2086  # word splitting of job ids is intended
  scancel $jobs 2>/dev/null || true
  local deadline=$((SECONDS + TIMEOUT))
  while [[ -n $(squeue -h -o %i 2>/dev/null || true) ]]; do
    if ((SECONDS >= deadline)); then
      log "jobs still listed after ${TIMEOUT}s; stopping the daemons anyway"
      break
    fi
    sleep 0.5
  done
}

cmd_stop() {
  if [[ ! -d $STATE_DIR ]]; then
    log "no state dir $STATE_DIR: nothing to stop"
    return 0
  fi
  abs_state_dir
  export SLURM_CONF=$CONF
  local t0=$SECONDS
  cancel_jobs
  # each live job step (slurmstepd) has a socket <host>_<jobid>.<stepid> in the spool dir
  local deadline=$((SECONDS + TIMEOUT))
  while compgen -G "$STATE_DIR/spool/$(hostname -s)_[0-9]*" >/dev/null; do
    ((SECONDS < deadline)) || { log "job steps still present in $STATE_DIR/spool"; break; }
    sleep 0.2
  done
  stop_daemon slurmd "$PID_SLURMD"
  stop_daemon slurmctld "$PID_SLURMCTLD"
  stop_daemon slurmdbd "$PID_SLURMDBD"
  stop_daemon mariadbd "$PID_MARIADB"
  stop_daemon munged "$PID_MUNGED"
  local left=() f
  for f in "$PID_SLURMD" "$PID_SLURMCTLD" "$PID_SLURMDBD" "$PID_MARIADB" "$PID_MUNGED"; do
    [[ -e $f ]] && left+=("$f")
  done
  ((${#left[@]} == 0)) || die "pid files left behind: ${left[*]}"
  log "stopped in $((SECONDS - t0))s (state kept in $STATE_DIR; rm -rf it for a fresh cluster)"
}

cmd_status() {
  if [[ ! -d $STATE_DIR ]]; then
    log "no state dir $STATE_DIR: not running"
    return 3
  fi
  abs_state_dir
  local rc=0 pid name file
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    case $name in
      munged) file=$PID_MUNGED ;;
      mariadbd) file=$PID_MARIADB ;;
      slurmdbd) file=$PID_SLURMDBD ;;
      slurmctld) file=$PID_SLURMCTLD ;;
      slurmd) file=$PID_SLURMD ;;
    esac
    if pid=$(pid_of "$name" "$file"); then
      printf '%-10s running  pid %s\n' "$name" "$pid"
    else
      printf '%-10s stopped\n' "$name"
      rc=3
    fi
  done
  if ((rc == 0)); then
    export SLURM_CONF=$CONF
    printf 'SLURM_CONF=%s\n' "$CONF"
    sinfo 2>&1 || true
    squeue 2>&1 || true
  fi
  return "$rc"
}

case $CMD in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) abs_state_dir && print_env ;;
  -h | --help | help | "") usage ;;
  *) log "unknown command: $CMD"; usage ;;
esac
