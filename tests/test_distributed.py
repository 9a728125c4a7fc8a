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
    """Eight identical captioned images: any split or order of them is the same data."""
    root = tmp_path_factory.mktemp("same-images")
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=(200, 30, 30))
    for i in range(8):
        image.save(root / f"img{i}.png")
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


# ---- CPU DDP, no SLURM ----------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process_with_the_same_effective_batch(
    reference, same_images, tmp_path, cache_dir
) -> None:
    run_dir = tmp_path / "run"
    result = train_cli(
        *same_data(same_images),
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=1",
        "logger=wandb",
        *probe_args(tmp_path / "probe", per_sample_seeds=True),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert output.count("effective batch 2 = 1 per device × 2 device(s) × 1 node(s) × 1 accumulation") == 1
    assert printed_run_dirs(result.stdout) == [str(run_dir)], "the run directory is printed once, by rank 0"

    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_matches_reference(states[0], reference)
    assert_export_is(run_dir, states[0]["params"])
    assert manifest(run_dir)["world_size"] == 2 and manifest(run_dir)["global_step"] == MAX_STEPS

    # Side effects happen once: one export, one sample grid, one W&B run (in the run directory).
    assert sorted(p.name for p in (run_dir / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step_{MAX_STEPS:06d}.png"]
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert len(list(wandb_runs[0].glob("files/media/images/samples_*.png"))) == 2  # 2 prompts × 1
    assert not (tmp_path / "wandb").exists()


def test_ddp_fork_trains_in_children_and_keeps_a_resumable_checkpoint(
    reference, same_images, tmp_path, cache_dir
) -> None:
    """ddp_fork (and ddp_spawn) train in child processes: step count and optimizer state stay there."""
    run_dir = tmp_path / "run"
    result = train_cli(
        *same_data(same_images),
        "trainer=ddp_fork",
        "trainer.devices=2",
        "data.batch_size=1",
        "logger=none",
        *probe_args(tmp_path / "probe", per_sample_seeds=True),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_matches_reference(states[0], reference)
    assert_export_is(run_dir, states[0]["params"])  # the parent exports the weights the children trained
    assert manifest(run_dir)["global_step"] == MAX_STEPS
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS
    assert int(last["optimizer_states"][0]["state"][0]["step"]) == MAX_STEPS


def test_two_nodes_on_localhost_form_one_world(tmp_path, cache_dir) -> None:
    run_dir, port = tmp_path / "run", free_port()
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
            env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank)),
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
        return out.stdout.strip()

    return wait_until(state, 30, f"job {job_id} in sacct")


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


def test_sbatch_template_trains_on_two_tasks_and_exports(slurm, tmp_path) -> None:
    """Also builds the caches from scratch: both tasks start at once and must build them once."""
    cache = tmp_path / "fresh-cache"
    env = child_env(PYTHON=sys.executable, SDTUNE_CACHE_DIR=str(cache))
    job = sbatch(
        *TINY,
        "trainer.max_steps=2",
        "data.num_images=8",
        "data.batch_size=2",
        "logger=csv",
        *probe_args(tmp_path / "probe"),
        cwd=tmp_path,
        env=env,
        jobs=slurm,
    )
    assert accounted_state(job) == "COMPLETED", slurm_log(tmp_path, job)[-4000:]
    run_dir = tmp_path / "outputs" / "slurm" / f"sdtune-{job}"
    assert manifest(run_dir)["world_size"] == 2 and manifest(run_dir)["global_step"] == 2
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / f"slurm-{job}.out").resolve() == (tmp_path / "slurm" / "logs" / f"sdtune-{job}.out")
    assert "effective batch 4 = 2 per device × 2 device(s)" in slurm_log(tmp_path, job)
    states = ranks(tmp_path / "probe", 2)
    assert_identical_ranks(states)
    assert_disjoint_shards(states, num_images=8)
    built = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len([n for n in built if n.startswith("tiny-sd-")]) == 1, built
    assert not [n for n in built if ".tmp-" in n], built


def test_preempted_job_checkpoints_requeues_and_ends_at_max_steps(
    slurm, reference, same_images, tmp_path
) -> None:
    probe = tmp_path / "probe"
    env = child_env(PYTHON=sys.executable)
    job = sbatch(
        *same_data(same_images),
        "data.batch_size=1",
        "logger=none",
        *probe_args(probe, per_sample_seeds=True, step_delay=2.0),
        cwd=tmp_path,
        env=env,
        jobs=slurm,
    )
    progress = probe / "progress"
    wait_until(lambda: progress.is_file() and int(progress.read_text()) >= 1, 300, "the first training step")
    # The signal --signal=SIGUSR1@90 sends before the time limit; only job steps get it, not the batch shell.
    subprocess.run(["scancel", "-s", "USR1", job], check=True, timeout=30)
    wait_until(lambda: job_state(job) == "PENDING", 120, "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)
    assert accounted_state(job) == "COMPLETED", slurm_log(tmp_path, job)[-4000:]

    run_dir = tmp_path / "outputs" / "slurm" / f"sdtune-{job}"
    log = slurm_log(tmp_path, job)
    assert f"job {job} (attempt 2)" in log
    restored = [line for line in log.splitlines() if "Restored all states from the checkpoint" in line]
    assert len(restored) == 1 and restored[0].endswith(f"sdtune-{job}/hpc_ckpt_1.ckpt"), restored
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert 2 <= hpc["global_step"] < MAX_STEPS  # saved at a step boundary, mid-run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS == manifest(run_dir)["global_step"]
    assert int(last["optimizer_states"][0]["state"][0]["step"]) == MAX_STEPS
    assert last["lr_schedulers"][0]["last_epoch"] == MAX_STEPS
    states = ranks(probe, 2)
    assert_identical_ranks(states)
    # As if it had never been interrupted (the probe's states come from the second attempt, which began at the
    # checkpoint's step: no first-step gradients to compare).
    assert_matches_reference(states[0], reference, first_step=False)
    assert_export_is(run_dir, states[0]["params"])


def test_submitit_sweep_runs_one_job_per_point(slurm, tmp_path, cache_dir) -> None:
    sweep_dir = tmp_path / f"sweep-{uuid.uuid4().hex[:8]}"
    name = f"sdtune-test-{sweep_dir.name}"
    try:
        result = train_cli(
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
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
        assert manifest(run_dir)["world_size"] == 2  # trainer.devices followed the launcher's tasks_per_node
        with safe_open(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == rank
        (wandb_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        assert sweep_dir.name.encode() in wandb_run.read_bytes(), "W&B group is not the sweep"
    jobs = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())
    assert [job.split("_")[1] for job in jobs] == ["0", "1"], jobs  # one SLURM array element per point
