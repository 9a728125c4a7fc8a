"""`python -m sdtune.evaluate source=<run dir | base model>`: a fixed prompt set, fixed seeds, judged.

Writes `<out>/<name>.json` (accuracies overall and per shape, the drawn distributions, every sample's verdict,
the judge's own accuracy on fresh renders) and `<out>/<name>.png` (the images, one prompt after another).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from sdtune.config import ConfigError
from sdtune.run import MANIFEST


def output_dir(cfg: DictConfig) -> Path:
    if cfg.out is not None:
        return Path(cfg.out).expanduser()
    source = Path(str(cfg.source)).expanduser()
    return source / "eval" if (source / MANIFEST).is_file() else Path("eval")


def check(cfg: DictConfig) -> None:
    """Every problem with the request, before any model loads."""
    from sdtune.evaluation import check_prompts, prompts_from_config, unscorable_inputs
    from sdtune.metrics import metric_problems
    from sdtune.sample import guidance_problems, request_problems, source_configs, source_problems

    source_bad = source_problems(cfg)
    problems = request_problems(cfg) + source_bad + metric_problems(cfg.metrics)
    if not source_bad:
        conditioning = source_configs(cfg)[1]
        problems += guidance_problems(cfg, conditioning)
        problems += [
            f"source: this run is conditioned on {needed} files (conditioning.{name}); sdtune.evaluate "
            f"scores text prompts and semantic maps only — sample it with sdtune.sample {needed}=<file>"
            for name, needed in unscorable_inputs(conditioning)
        ]
    try:
        prompts = prompts_from_config(cfg)
    except (KeyError, TypeError, ValueError) as error:
        problems.append(f"prompts: cannot read the prompt set ({error})")
        prompts = []
    problems += check_prompts(prompts)
    if not prompts and not problems:
        problems.append("prompts: the prompt set is empty")
    target = output_dir(cfg) / f"{cfg.name}.json"
    if target.exists() and not cfg.overwrite:
        problems.append(f"out: {target} already exists; pass overwrite=true or another out/name")
    if problems:
        raise ConfigError(problems)


def run(cfg: DictConfig) -> Path:
    """Evaluate `cfg.source`; returns the JSON report's path."""
    from sdtune.evaluation import evaluate, summary_line, write_report
    from sdtune.judge import Judge, accuracy_on_renders
    from sdtune.metrics import compute_metrics
    from sdtune.sample import load_source

    check(cfg)
    stack, conditioning, native = load_source(cfg)
    judge = Judge.load()
    report, images = evaluate(
        stack.unet,
        stack.vae,
        conditioning,
        stack.scheduler_config,
        cfg,
        cfg.resolution or native,
        judge,
    )
    report["source"] = str(cfg.source)
    measured = compute_metrics(
        cfg.metrics, images, [s["prompt"] for s in report["samples"]], cfg.resolution or native
    )
    if measured:
        report["metrics"] = measured
    if cfg.judge_renders:
        report["judge"] = {"accuracy_on_fresh_renders": accuracy_on_renders(judge, cfg.judge_renders, seed=1)}
    path = write_report(report, images, output_dir(cfg), cfg.name)
    print(summary_line(report), file=sys.stderr)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    try:
        path = run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(path)


if __name__ == "__main__":
    main()
