"""`python -m tests.faults MODE [overrides]`: `sdtune.train` with a fault injected, for the reliability tests.

Modes (`none` runs it as is):
- `slow`: steps from step 2 on first sleep 2 s (a window to send a signal in); the math is unchanged.
- `kill-in-checkpoint-N`: the process SIGKILLs itself part-way through writing its N-th checkpoint file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def slow_steps() -> None:
    from sdtune.module import DiffusionModule

    step = DiffusionModule.training_step

    def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.global_step >= 2:
            time.sleep(2.0)
        return step(self, *args, **kwargs)

    DiffusionModule.training_step = slow


def kill_in_checkpoint(n: int) -> None:
    import sdtune.checkpoint as checkpoint

    write_atomically = checkpoint.write_atomically
    calls = 0

    def dying(target: Any, write: Any) -> None:
        nonlocal calls
        calls += 1
        if calls < n:
            return write_atomically(target, write)

        class DyingFile:
            def __init__(self, f: Any) -> None:
                self.f, self.written = f, 0

            def write(self, data: Any) -> int:
                self.written += self.f.write(data)
                if self.written > 4096:  # well into the file: kill -9, no cleanup of any kind
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return len(data)

            def flush(self) -> None:
                self.f.flush()

        return write_atomically(target, lambda f: write(DyingFile(f)))

    checkpoint.write_atomically = dying


def start(mode: str, overrides: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start `python -m tests.faults MODE overrides…` (this checkout first on the path).

    Its output goes to `cwd/stdout.txt` and `cwd/stderr.txt` (read them with `output`).
    """
    repo = Path(__file__).resolve().parents[1]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    environ["PYTHONPATH"] = os.pathsep.join([str(repo), environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        command = [sys.executable, "-m", "tests.faults", mode, *overrides]
        return subprocess.Popen(command, cwd=cwd, env=environ, stdout=out, stderr=err)


def output(cwd: Path) -> tuple[str, str]:
    """(stdout, stderr) of the process `start` ran in `cwd`."""
    return (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode == "slow":
        slow_steps()
    elif mode.startswith("kill-in-checkpoint-"):
        kill_in_checkpoint(int(mode.rsplit("-", 1)[1]))
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode}")
    import runpy

    runpy.run_module("sdtune.train", run_name="__main__")  # as `python -m sdtune.train` (Hydra's paths)
