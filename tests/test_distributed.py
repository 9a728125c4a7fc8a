"""Scaling out, with real processes: CPU DDP (gloo), two "nodes" on localhost, and — on a real SLURM —
`sbatch slurm/train.sbatch`, preemption → checkpoint → requeue → resume, and a submitit sweep.

The SLURM tests need `sbatch` and SLURM_CONF naming a running cluster (`eval "$(scripts/slurm_local.sh
start)"`; `.ci/run` starts one). Without them they skip with the reason, except with SDTUNE_REQUIRE_SLURM=1
(set by `.ci/run`), where a missing cluster fails them.

How equality across process layouts is tested: every rank seeds its RNG the same way, so N ranks × batch b
do not draw the same noise/timesteps as 1 rank × batch N·b, and their data orders differ (DistributedSampler
vs. RandomSampler). Those runs are therefore made comparable by construction: a data set of identical images
(order does not matter) and `tests.probe.Probe(per_sample_seeds=true)`, which seeds each sample's randomness
by (step, position in the global batch). What remains is floating-point summation order: the first step's
gradients (averaged by DDP) agree to ~1e-6 relative, and the weights after a few AdamW steps to a small
fraction of one step's update (Adam divides by the gradient's running RMS, which amplifies rounding where a
gradient is ~0).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sdtune.config  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3
TINY = [
    "+experiment=lora",
    "trainer.accelerator=cpu",
    f"method.lr={LR}",
    "data.resolution=32",
    "data.num_workers=0",
    "sampling.steps=2",
    "sampling.per_prompt=1",
    "sampling.every_n_steps=0",
]
MAX_STEPS = 4


def probe_args(out: Path, **options: object) -> list[str]:
    args = ["+callbacks.probe._target_=tests.probe.Probe", f"+callbacks.probe.out={out}"]
    return args + [
        f"+callbacks.probe.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()
    ]


@pytest.fixture(scope="module")
def same_images(tmp_path_factory) -> Path:
    """Eight captioned images with identical pixels: any split or order of them is the same data.

    Each file carries its index in a PNG text chunk, so the bytes differ and duplicate detection keeps them.
    """
    from PIL.PngImagePlugin import PngInfo

    root = tmp_path_factory.mktemp("same-images")
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=(200, 30, 30))
    for i in range(8):
        info = PngInfo()
        info.add_text("copy", str(i))
        image.save(root / f"img{i}.png", pnginfo=info)
        (root / f"img{i}.txt").write_text("a red square on a gray background")
    return root


def same_data(root: Path) -> list[str]:
    """The comparable-by-construction setup (see the module docstring)."""
    return [
        *TINY,
        f"trainer.max_steps={MAX_STEPS}",
        "data=captions",
        f"data.root={root}",
        "data.random_flip=false",
    ]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a training subprocess: this checkout first on PYTHONPATH, offline W&B."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env.update(extra)
    return env


def train_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 400):
    return subprocess.run(
        [sys.executable, "-m", "sdtune.train", *args],
        cwd=cwd,
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def two_cpu_ranks(
    images: Path, tmp_path: Path, *overrides: str, trainer: str = "ddp", per_sample_seeds: bool = False
) -> tuple[subprocess.CompletedProcess, Path]:
    """Train on `same_data(images)` in two CPU DDP processes (batch 1 each) with the probe on every rank;
    fails the test unless the command succeeds. Returns the command's result and the run directory."""
    run_dir = tmp_path / "run"
    options = {"per_sample_seeds": True} if per_sample_seeds else {}
    result = train_cli(
        *same_data(images),
        *overrides,
        f"trainer={trainer}",
        "trainer.devices=2",
        "data.batch_size=1",
        *probe_args(tmp_path / "probe", **options),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result, run_dir


def ranks(probe_dir: Path, world_size: int) -> list[dict]:
    states = [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    assert [s["world_size"] for s in states] == [world_size] * world_size
    return states


def assert_identical_ranks(states: list[dict]) -> None:
    first = states[0]["params"]
    for other in states[1:]:
        assert other["params"].keys() == first.keys()
        for key, value in first.items():
            assert torch.equal(other["params"][key], value), f"{key} differs between ranks"


def assert_matches_reference(state: dict, reference: dict, first_step: bool = True) -> None:
    """Same first-step gradients (to rounding; if this process ran step 0) and same final weights (to a
    fraction of one AdamW update)."""
    if first_step:
        grads, ref_grads = state["first_grads"], reference["first_grads"]
        assert grads.keys() == ref_grads.keys()
        diff = torch.cat([(grads[k] - ref_grads[k]).flatten() for k in grads]).norm()
        assert diff <= 1e-5 * torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    for key, value in reference["params"].items():
        torch.testing.assert_close(state["params"][key], value, atol=0.2 * LR, rtol=0)
    assert state["global_step"] == reference["global_step"]


def assert_disjoint_shards(states: list[dict], num_images: int) -> None:
    """In every epoch the ranks saw different samples, and together the whole data set."""
    per_rank = [{(b["epoch"], s) for b in state["batches"] for s in b["samples"]} for state in states]
    for i, a in enumerate(per_rank):
        for b in per_rank[i + 1 :]:
            assert not a & b, "two ranks trained on the same sample in the same epoch"
    epoch0 = {s for seen in per_rank for (epoch, s) in seen if epoch == 0}
    assert len(epoch0) == num_images


def exported_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_export_is(run_dir: Path, params: dict[str, torch.Tensor]) -> None:
    exported = exported_lora(run_dir)
    assert exported.keys() == {k.replace(".default", "") for k in params}
    for key, value in params.items():
        assert torch.equal(exported[key.replace(".default", "")], value), key


def printed_run_dirs(stdout: str) -> list[str]:
    """The lines that are only a path (sdtune.train prints the run directory last; logs are prefixed)."""
    return [line for line in stdout.splitlines() if line.startswith("/")]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(same_images, tmp_path_factory, cache_dir) -> dict:
    """One process, batch 2: what 2 ranks × batch 1 must reproduce (trained in this process)."""
    from sdtune.train import train

    from .conftest import compose_config

    base = tmp_path_factory.mktemp("reference")
    overrides = [*same_data(same_images), "data.batch_size=2", "logger=none"]
    train(
        compose_config("train", overrides + probe_args(base / "probe", per_sample_seeds=True), base / "run")
    )
    return ranks(base / "probe", 1)[0]


# ---- configuration (no processes) -----------------------------------------------------------------------

SLURM_JOB_ENV = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2"}


@pytest.fixture
def in_slurm_job(monkeypatch):
    """The environment `srun` gives each task of a 2-node × 2-task job."""
    for key, value in {**SLURM_JOB_ENV, "SLURM_JOB_NAME": "sdtune"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    ("trainer", "strategy"),
    [
        ("ddp", "ddp"),
        ("ddp_spawn", "ddp_spawn"),
        ("ddp_fork", "ddp_fork"),
        ("multinode", "ddp"),
        ("cpu", "auto"),
    ],
)
def test_cpu_trainer_configs_build_their_strategy(train_cfg, trainer: str, strategy: str) -> None:
    from hydra.utils import instantiate

    from sdtune.distributed import strategy_name

    cfg = train_cfg("+experiment=lora", f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2")
    assert strategy_name(cfg.trainer) == strategy
    if trainer == "multinode":
        return  # needs MASTER_ADDR/NODE_RANK (tested below)
    built = instantiate(cfg.trainer, logger=False)
    assert built.world_size == 2 and built.strategy.root_device.type == "cpu"
    if strategy.startswith("ddp"):
        assert built.strategy._start_method == {"ddp": "popen"}.get(strategy, strategy.removeprefix("ddp_"))
        assert built.strategy._ddp_kwargs == {"find_unused_parameters": False}
        assert built.strategy._get_process_group_backend() == "gloo"


def test_layout_problems_are_reported_with_the_fix(train_cfg, monkeypatch) -> None:
    from hydra.utils import instantiate

    from sdtune.config import ConfigError, validate

    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    fsdp_cfg = train_cfg("+experiment=lora", "trainer=fsdp", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError) as fsdp:
        validate(fsdp_cfg)
    assert "FSDP" in str(fsdp.value) and "trainer=ddp" in str(fsdp.value)
    strategy = instantiate(fsdp_cfg.trainer.strategy)  # builds (it only runs on GPUs)
    assert strategy.kwargs["use_orig_params"] and "ResnetBlock2D" in str(strategy.kwargs["auto_wrap_policy"])
    with pytest.raises(ConfigError) as multinode:
        validate(train_cfg("+experiment=lora", "trainer=multinode", "trainer.accelerator=cpu"))
    assert "MASTER_ADDR, MASTER_PORT, NODE_RANK" in str(multinode.value)
    with pytest.raises(ConfigError, match="lr_reference_batch"):
        validate(train_cfg("+experiment=lora", "method.scale_lr=true", "method.lr_reference_batch=0"))


def test_under_slurm_devices_and_nodes_follow_the_job(train_cfg, in_slurm_job) -> None:
    from sdtune.config import ConfigError, validate

    cfg = train_cfg("+experiment=lora", "trainer=ddp", "trainer.accelerator=cpu")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 2)
    validate(cfg)
    with pytest.raises(ConfigError) as error:
        validate(
            train_cfg("+experiment=lora", "trainer=ddp_fork", "trainer.devices=4", "trainer.num_nodes=1")
        )
    message = str(error.value)
    assert "--ntasks-per-node=4" in message and "--nodes=1" in message and "use trainer=ddp" in message


def test_batch_semantics_and_linear_lr_scaling(train_cfg) -> None:
    from types import SimpleNamespace

    from sdtune.distributed import apply_batch_semantics

    trainer = SimpleNamespace(num_devices=4, num_nodes=2, accumulate_grad_batches=3, is_global_zero=True)
    cfg = train_cfg("+experiment=lora", "data.batch_size=2", "method.lr=1e-4")
    assert apply_batch_semantics(cfg, trainer).effective == 48
    assert cfg.method.lr == 1e-4  # no scaling unless asked
    cfg = train_cfg(
        "+experiment=lora",
        "data.batch_size=2",
        "method.lr=1e-4",
        "method.scale_lr=true",
        "method.lr_reference_batch=8",
    )
    semantics = apply_batch_semantics(cfg, trainer)
    assert str(semantics).startswith(
        "effective batch 48 = 2 per device × 4 device(s) × 2 node(s) × 3 accumulation"
    )
    assert cfg.method.lr == pytest.approx(6e-4) and cfg.method.text_encoder_lr == pytest.approx(6e-4)


def test_a_requeued_slurm_job_reuses_its_run_directory(tmp_path, monkeypatch) -> None:
    from sdtune.callbacks.requeue import next_hpc_checkpoint
    from sdtune.run import RunDirError, ensure_fresh_run_dir, requeue_checkpoint

    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"
    for n, age in ((1, 30), (2, 20)):
        path = tmp_path / f"hpc_ckpt_{n}.ckpt"
        path.write_bytes(b"")
        os.utime(path, (time.time() - age, time.time() - age))
    os.utime(last, (time.time() - 25, time.time() - 25))
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_3.ckpt"

    with pytest.raises(RunDirError):
        ensure_fresh_run_dir(tmp_path)  # a new run, not a requeue
    assert requeue_checkpoint(tmp_path) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunDirError):
        ensure_fresh_run_dir(tmp_path)  # first attempt of a job that reuses another run's directory
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    ensure_fresh_run_dir(tmp_path)
    assert requeue_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"  # the newest
    os.utime(last)
    assert requeue_checkpoint(tmp_path) == last  # e.g. a node failed after a periodic checkpoint


# ---- CPU DDP, no SLURM ----------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process_with_the_same_effective_batch(
    reference, same_images, tmp_path, cache_dir
) -> None:
    result, run_dir = two_cpu_ranks(same_images, tmp_path, "logger=wandb", per_sample_seeds=True)
    output = result.stdout + result.stderr
    assert output.count("effective batch 2 = 1 per device × 2 device(s) × 1 node(s) × 1 accumulation") == 1
    assert printed_run_dirs(result.stdout) == [str(run_dir)], "the run directory is printed once, by rank 0"

    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_matches_reference(states[0], reference)
    assert_export_is(run_dir, states[0]["params"])
    assert manifest(run_dir)["world_size"] == 2 and manifest(run_dir)["global_step"] == MAX_STEPS
    assert manifest(run_dir)["effective_batch_size"] == 2

    # Side effects happen once: one export, one sample grid, one W&B run (in the run directory).
    exported = sorted(p.name for p in (run_dir / "lora").iterdir())
    assert exported == ["kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step_{MAX_STEPS:06d}.png"]
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert len(list(wandb_runs[0].glob("files/media/images/samples_*.png"))) == 2  # 2 prompts × 1
    assert not (tmp_path / "wandb").exists()


def test_ddp_trains_an_adapter_variant_in_step_on_every_rank(same_images, tmp_path, cache_dir) -> None:
    """LoHa (a peft variant, as DoRA and LoKr) under two-process DDP: its own weights train, identically on
    both ranks, and rank 0 exports them (LyCORIS keys in the kohya file)."""
    overrides = ("trainer.max_steps=2", "method.variant=loha", "export.formats=[kohya]", "logger=none")
    _, run_dir = two_cpu_ranks(same_images, tmp_path, *overrides)
    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    params = states[0]["params"]
    assert params and all("hada_" in key for key in params), sorted(params)[:4]
    with safe_open(str(run_dir / "lora" / "kohya.safetensors"), "pt") as kohya:
        assert any(key.endswith("hada_w1_a") for key in kohya.keys())
    assert manifest(run_dir)["world_size"] == 2 and manifest(run_dir)["global_step"] == 2


def test_ddp_fork_trains_in_children_and_keeps_a_resumable_checkpoint(
    reference, same_images, tmp_path, cache_dir
) -> None:
    """ddp_fork (and ddp_spawn) train in child processes: step count and optimizer state stay there."""
    _, run_dir = two_cpu_ranks(
        same_images, tmp_path, "logger=none", trainer="ddp_fork", per_sample_seeds=True
    )
    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_matches_reference(states[0], reference)
    assert_export_is(run_dir, states[0]["params"])  # the parent exports the weights the children trained
    assert manifest(run_dir)["global_step"] == MAX_STEPS
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS
    assert int(last["optimizer_states"][0]["state"][0]["step"]) == MAX_STEPS


def test_two_nodes_on_localhost_form_one_world(tmp_path) -> None:
    """NODE_RANK/MASTER_ADDR/MASTER_PORT, 1 device each: one world of 2 with disjoint data shards. Both
    start at once from an empty cache: the tiny stack and the shapes world must be built once."""
    run_dir, port, cache = tmp_path / "run", free_port(), tmp_path / "fresh-cache"
    args = [
        *TINY,
        "trainer=multinode",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.max_steps=2",
        "data.num_images=8",
        "data.batch_size=2",
        "logger=none",
        *probe_args(tmp_path / "probe"),
        f"hydra.run.dir={run_dir}",
    ]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "sdtune.train", *args],
            cwd=tmp_path,
            env=child_env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                NODE_RANK=str(rank),
                SDTUNE_CACHE_DIR=str(cache),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    assert printed_run_dirs(outputs[0][0]) == [str(run_dir)] and printed_run_dirs(outputs[1][0]) == []
    assert manifest(run_dir)["world_size"] == 2
    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_disjoint_shards(states, num_images=8)
    built = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len([n for n in built if n.startswith("tiny-sd-")]) == 1 and not [
        n for n in built if ".tmp" in n
    ], built


# ---- SLURM ----------------------------------------------------------------------------------------------


def _slurm_missing() -> str | None:
    tools = [t for t in ("sbatch", "squeue", "scancel", "scontrol", "sacct", "sinfo") if not shutil.which(t)]
    if tools:
        return f"SLURM client tools not on PATH: {', '.join(tools)}"
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        return 'SLURM_CONF names no slurm.conf; start a local cluster: eval "$(scripts/slurm_local.sh start)"'
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if state.returncode != 0 or not {"idle", "mixed", "allocated"} & set(state.stdout.split()):
        return f"no SLURM node is up (sinfo: {(state.stdout + state.stderr).strip()!r})"
    return None


@pytest.fixture(scope="session")
def slurm():
    """The running SLURM named by SLURM_CONF; yields a list in which tests record their job ids (cancelled at
    the end if still there)."""
    reason = _slurm_missing()
    if reason:
        if os.environ.get("SDTUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SDTUNE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)


def job_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def accounted_state(job_id: str) -> str:
    """The job's final state in SLURM accounting (sacct), once the job has left the queue."""
    wait_until(lambda: not job_state(job_id), 400, f"job {job_id} to finish", poll=1)

    def state() -> str:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        # slurmdbd records the end a moment after the job leaves the queue: until then sacct says RUNNING
        recorded = out.stdout.strip()
        return recorded if recorded.startswith(FINAL_JOB_STATES) else ""

    return wait_until(state, 60, f"job {job_id}'s final state in sacct")


FINAL_JOB_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "PREEMPTED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)


def sbatch(*args: str, cwd: Path, env: dict[str, str], jobs: list[str]) -> str:
    (cwd / "slurm" / "logs").mkdir(parents=True, exist_ok=True)  # the template's --output folder
    result = subprocess.run(
        ["sbatch", "--parsable", str(REPO / "slurm" / "train.sbatch"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    jobs.append(job_id)
    return job_id


def slurm_log(cwd: Path, job_id: str) -> str:
    return (cwd / "slurm" / "logs" / f"sdtune-{job_id}.out").read_text(errors="replace")


def test_sbatch_job_is_preempted_requeued_and_ends_as_if_uninterrupted(
    slurm, reference, same_images, tmp_path
) -> None:
    """`sbatch slurm/train.sbatch` on 2 tasks; `scancel -s USR1` mid-run (what `--signal=SIGUSR1@90` sends
    before the time limit: to the job steps, not the batch shell) → checkpoint at the next step → requeue →
    the same job id resumes in the same run directory, ends at max_steps, exports."""
    probe = tmp_path / "probe"
    env = child_env(PYTHON=sys.executable)
    job = sbatch(
        *same_data(same_images),
        "data.batch_size=1",
        "logger=wandb",
        *probe_args(probe, per_sample_seeds=True, step_delay=2.0),
        cwd=tmp_path,
        env=env,
        jobs=slurm,
    )
    progress = probe / "progress"
    wait_until(lambda: progress.is_file() and int(progress.read_text()) >= 1, 300, "the first training step")
    subprocess.run(["scancel", "-s", "USR1", job], check=True, timeout=30)
    wait_until(lambda: job_state(job) == "PENDING", 120, "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)
    assert accounted_state(job) == "COMPLETED", slurm_log(tmp_path, job)[-4000:]

    run_dir = tmp_path / "outputs" / "slurm" / f"sdtune-{job}"
    log = slurm_log(tmp_path, job)
    assert f"job {job} (attempt 2)" in log
    assert log.count("effective batch 2 = 1 per device × 2 device(s) × 1 node(s)") == 2  # rank 0, per attempt
    assert (run_dir / f"slurm-{job}.out").resolve() == (tmp_path / "slurm" / "logs" / f"sdtune-{job}.out")
    restored = [line for line in log.splitlines() if "Restored all states from the checkpoint" in line]
    assert len(restored) == 1 and restored[0].endswith(f"sdtune-{job}/hpc_ckpt_1.ckpt"), restored
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert 2 <= hpc["global_step"] < MAX_STEPS  # saved at a step boundary, mid-run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS == manifest(run_dir)["global_step"]
    assert manifest(run_dir)["world_size"] == 2
    assert int(last["optimizer_states"][0]["state"][0]["step"]) == MAX_STEPS
    assert last["lr_schedulers"][0]["last_epoch"] == MAX_STEPS
    states = ranks(probe, 2)
    assert_identical_ranks(states)
    # As if it had never been interrupted (the probe's states come from the second attempt, which began at the
    # checkpoint's step: no first-step gradients to compare).
    assert_matches_reference(states[0], reference, first_step=False)
    assert_export_is(run_dir, states[0]["params"])
    # One W&B run across both attempts (offline: one folder per attempt, with the same run id).
    attempts = sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and attempts[0] == attempts[1], attempts


def test_submitit_sweep_runs_one_job_per_point(slurm, tmp_path, cache_dir) -> None:
    sweep_dir = tmp_path / f"sweep-{uuid.uuid4().hex[:8]}"
    name = f"sdtune-test-{sweep_dir.name}"
    try:
        result = train_cli(
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={sweep_dir}",
            *TINY,
            "trainer.max_steps=2",
            "data.num_images=8",
            "data.batch_size=2",
            "logger=wandb",
            "method.rank=2,4",
            cwd=tmp_path,
            timeout=500,
        )
    finally:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for num, rank in ((0, 2), (1, 4)):
        run_dir = sweep_dir / str(num)
        assert manifest(run_dir)["world_size"] == 1
        with safe_open(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == rank
        (wandb_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        assert sweep_dir.name.encode() in wandb_run.read_bytes(), "W&B group is not the sweep"
    elements = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert [e.split("_")[1] for e in elements] == ["0", "1"], elements  # one SLURM array element per point
