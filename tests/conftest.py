"""Shared fixtures: an isolated cache with the tiny stack, Hydra composition of the real configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session (the tiny stack and the shapes world are built once)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SDTUNE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    """The folder `model=tiny` loads (the shipped pretrained weights)."""
    from sdtune.models.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(cache_dir, "pretrained")


@pytest.fixture(scope="module")
def stack(tiny_dir: Path):
    """The tiny SD1 stack, loaded once per test module (tests that change it load their own)."""
    from omegaconf import OmegaConf

    from sdtune.models import load_stack

    model = OmegaConf.create({"family": "sd1", "pretrained": str(tiny_dir), "config": None})
    return load_stack(model, tiny_dir.parent)


def compose_config(config_name: str, overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """Compose a config from conf/ as the CLI would; with `run_dir`, as if Hydra had created it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=run_dir is not None)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def train_cfg(tmp_path: Path, cache_dir: Path):
    """Factory: a composed train config with a fresh run directory under tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config("train", list(overrides), run_dir or tmp_path / "run")

    return make
