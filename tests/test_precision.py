"""Pure-bf16 training (`trainer.precision=bf16-true`) with fp32 master weights (`runtime.master_weights`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.config import ConfigError, validate
from sdtune.precision import MasterWeights, over_masters
from sdtune.train import train

from .conftest import compose_config

QUICK = [
    "+experiment=lora",
    "data.num_images=6",
    "data.resolution=32",
    "data.batch_size=2",
    "sampling.prompts=[]",
    "export.formats=[]",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.precision=bf16-true",
    "runtime.threads=1",
    "callbacks.checkpoint.every_n_train_steps=2",
]
EMA = "method.ema={_target_:sdtune.callbacks.ema.EMACallback,decay:0.9}"


def _sgd_steps(weight: torch.nn.Parameter, masters: MasterWeights | None, steps: int) -> None:
    groups = [{"params": [weight]}]
    optimizer = torch.optim.SGD(over_masters(groups, masters) if masters else groups, lr=1e-3)
    if masters:
        optimizer.register_step_post_hook(masters.write_back)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        if masters:
            masters.take_grads()
        optimizer.step()
        optimizer.zero_grad()


def test_master_weights_keep_the_updates_bf16_rounds_away() -> None:
    # bf16 holds 1.0 and 0.9961 but nothing between: a 1e-3 step from 1.0 rounds back to 1.0 every time.
    pure = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    _sgd_steps(pure, None, 5)
    assert torch.equal(pure.detach(), torch.ones(4, dtype=torch.bfloat16))

    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masters = MasterWeights({"w": weight})
    _sgd_steps(weight, masters, 5)
    torch.testing.assert_close(masters.masters[0], torch.full((4,), 0.995), rtol=0, atol=1e-6)
    assert masters.masters[0].dtype == torch.float32 and weight.dtype == torch.bfloat16
    assert torch.equal(weight.detach(), masters.masters[0].to(torch.bfloat16))  # written back, rounded
    assert weight.grad is None and masters.masters[0].grad is None


def test_bf16_true_steps_fp32_masters_and_computes_with_their_bf16_rounding(tmp_path: Path) -> None:
    run = train(compose_config("train", [*QUICK, "trainer.max_steps=3", EMA], tmp_path / "run"))
    module = run.module
    assert module.masters is not None
    params, masters = module.trainable_parameters(), module.masters.named()
    assert params.keys() == masters.keys()
    optimized = {id(p) for group in run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(m) for m in masters.values()}  # the optimizer steps the masters, not the model
    for name, param in params.items():
        assert param.dtype == torch.bfloat16 and masters[name].dtype == torch.float32
        assert torch.equal(param.detach(), masters[name].to(torch.bfloat16)), name
    # The masters start on the bf16 grid (copies of the cast weights); stepped in fp32, they leave it.
    off_grid = sum(int((m != m.to(torch.bfloat16).float()).sum()) for m in masters.values())
    assert off_grid > 0
    # An EMA averages the masters: in bf16 its (1 - decay) steps would round away the same way.
    ema = next(c for c in run.trainer.callbacks if type(c).__name__ == "EMACallback")
    assert all(shadow.dtype == torch.float32 for shadow in ema.ema.shadow_params)

    # Checkpoints hold the fp32 masters, so a resumed run continues from them exactly.
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(saved[name].dtype == torch.float32 for name in masters)


def test_pure_bf16_without_masters_keeps_bf16_weights(tmp_path: Path) -> None:
    run = train(
        compose_config("train", [*QUICK, "trainer.max_steps=2", "runtime.master_weights=false"], tmp_path)
    )
    assert run.module.masters is None
    assert all(p.dtype == torch.bfloat16 for p in run.module.trainable_parameters().values())


def test_bf16_true_resume_is_exact(tmp_path: Path) -> None:
    reference = train(compose_config("train", [*QUICK, "trainer.max_steps=4"], tmp_path / "reference"))
    train(compose_config("train", [*QUICK, "trainer.max_steps=2"], tmp_path / "half"))
    again = [*QUICK, "trainer.max_steps=4", f"resume={tmp_path / 'half'}"]
    resumed = train(compose_config("train", again, tmp_path / "resumed"))
    expected, got = reference.module.masters.named(), resumed.module.masters.named()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} master tensors differ after resume, e.g. {different[0]}"


def test_bf16_true_validation(train_cfg) -> None:
    base = ["+experiment=lora", "trainer.precision=bf16-true"]
    validate(train_cfg(*base, "runtime.weight_dtype=bfloat16"))  # the base is bf16 under bf16-true anyway
    with pytest.raises(ConfigError, match="runtime.vae_dtype: trainer.precision=bf16-true"):
        validate(train_cfg(*base, "runtime.vae_dtype=float32"))
    with pytest.raises(ConfigError, match="method=vae"):
        validate(train_cfg("+experiment=pretrain_vae", "trainer.precision=bf16-true"))
    with pytest.raises(ConfigError, match="runtime.master_weights: must be true or false"):
        validate(train_cfg(*base, "runtime.master_weights=sometimes"))


def test_master_gradients_skip_weights_without_one() -> None:
    used, unused = (torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)) for _ in range(2))
    masters = MasterWeights({"used": used, "unused": unused})
    used.grad = torch.full_like(used, 0.5)
    masters.take_grads()
    assert torch.equal(masters.masters[0].grad, torch.full((3,), 0.5))
    assert masters.masters[1].grad is None and used.grad is None
    MasterWeights({}).take_grads()  # nothing trainable: nothing to copy
