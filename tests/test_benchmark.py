"""The benchmark's sides run and report steady-state figures; the CLI prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtune.benchmark import Spec, run_side, summarise
from sdtune.benchmark_workloads import SDXL_UNSUPPORTED, WORKLOADS, ensure_data, ensure_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_thread_count():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_summarise_skips_the_warmup() -> None:
    wall = [0.0, 5.0, 6.0, 7.5, 8.5]  # first step 5 s (warm-up), then 1, 1.5, 1
    cpu = [0.0, 4.0, 4.5, 5.0, 5.5]
    figures = summarise(list(zip(wall, cpu)), warmup=1, batch_size=4)
    assert figures["s_per_step"] == 1.0 and figures["images_per_s"] == 4.0 and figures["steps_timed"] == 3
    assert figures["cpu_s_per_step"] == 0.5


@pytest.mark.parametrize("side", ["sdtune", "plain", "unet_only"])
def test_each_side_runs_the_tiny_workload(side: str, cache_dir: Path) -> None:
    workload = WORKLOADS["tiny-cpu"]
    spec = Spec(
        workload="tiny-cpu",
        side=side,
        steps=2,
        warmup=1,
        threads=1,
        cache=side == "sdtune",
        cache_dir=str(cache_dir),
        model_dir=str(ensure_model(workload, cache_dir)),
        data_dir=str(ensure_data(workload, 3 * workload.batch_size, cache_dir)),
    )
    result = run_side(spec)
    assert result["steps_timed"] == 2
    assert result["s_per_step"] > 0 and result["images_per_s"] == pytest.approx(8 / result["s_per_step"])
    assert result["peak_rss_mib"] > 100


def test_cli_prints_json_and_refuses_what_cannot_run(cache_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--workload", "sdxl-lora-1024"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["error"] == SDXL_UNSUPPORTED
    assert result["workload"]["resolution"] == 1024
