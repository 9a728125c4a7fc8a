"""The EMA callback on a toy module: the update formula, its schedule, state round trip, weight swapping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdtune.callbacks.ema import EMACallback, averaged_weights


class Toy(nn.Module):
    """Two trainable tensors and a frozen one, with the module API the callback uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}


def weights(module: Toy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.trainable_parameters().values()]).clone()


def train_steps(callback: EMACallback, module: Toy, steps: int) -> list[torch.Tensor]:
    """Simulate optimizer steps 1..steps (random weight changes); returns the weights after each step."""
    trainer = SimpleNamespace(global_step=0)
    callback.on_train_start(trainer, module)
    history = []
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in module.trainable_parameters().values():
                p.add_(torch.randn(p.shape, generator=generator))
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module)
        callback.on_train_batch_end(trainer, module)  # an accumulation batch: no optimizer step, no update
        history.append(weights(module))
    return history


def expected_average(history: list[torch.Tensor], decays: list[float]) -> torch.Tensor:
    average = None
    for w, d in zip(history, decays):
        average = w.clone() if average is None else d * average + (1 - d) * w
    return average


def shadow(callback: EMACallback) -> torch.Tensor:
    return torch.cat([t.flatten() for t in callback.ema.shadow_params])


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_the_formula(warmup: bool) -> None:
    module = Toy()
    frozen_before = module.frozen.weight.clone()
    callback = EMACallback(decay=0.6, warmup=warmup, update_every=1)
    callback.start(module)
    history = train_steps(callback, module, 6)
    # u-th update: a copy for u = 1, then min(decay, u/(u+9)) with warmup (all below 0.6 here), else decay.
    decays = [0.0] + [min(0.6, u / (u + 9)) if warmup else 0.6 for u in range(2, 7)]
    torch.testing.assert_close(shadow(callback), expected_average(history, decays))
    assert callback.updates == 6
    assert torch.equal(module.frozen.weight, frozen_before)
    assert len(callback.ema.shadow_params) == 2  # only the trainable tensors are averaged


def test_decay_is_capped_after_warmup() -> None:
    module = Toy()
    callback = EMACallback(decay=0.3, warmup=True, update_every=1)
    callback.start(module)
    history = train_steps(callback, module, 8)
    decays = [0.0] + [min(0.3, u / (u + 9)) for u in range(2, 9)]
    assert decays[-1] == 0.3 and decays[1] < 0.3
    torch.testing.assert_close(shadow(callback), expected_average(history, decays))


def test_update_every_k_steps() -> None:
    module = Toy()
    callback = EMACallback(decay=0.5, warmup=False, update_every=3)
    callback.start(module)
    history = train_steps(callback, module, 7)
    assert callback.updates == 2  # steps 3 and 6
    torch.testing.assert_close(shadow(callback), expected_average([history[2], history[5]], [0.0, 0.5]))


def test_state_round_trip_and_cpu_placement() -> None:
    module = Toy()
    callback = EMACallback(decay=0.5, warmup=False, device="cpu")
    callback.start(module)
    train_steps(callback, module, 3)
    state = callback.state_dict()
    assert state["updates"] == 3 and list(state["shadow"]) == ["a.weight", "a.bias"]

    restored = EMACallback(decay=0.5, warmup=False, device="cpu")
    restored.load_state_dict(state)  # as Lightning does, before the module's weights are in place
    restored.start(module)
    assert restored.updates == 3
    torch.testing.assert_close(shadow(restored), shadow(callback))
    assert all(t.device.type == "cpu" for t in restored.ema.shadow_params)


def test_averaged_weights_swap_in_and_back() -> None:
    module = Toy()
    callback = EMACallback(decay=0.5, warmup=False)
    callback.start(module)
    train_steps(callback, module, 3)
    trained = weights(module)
    trainer = SimpleNamespace(callbacks=[callback])
    with averaged_weights(trainer, module) as swapped:
        assert swapped
        torch.testing.assert_close(weights(module), shadow(callback))
    assert torch.equal(weights(module), trained)
    with averaged_weights(SimpleNamespace(callbacks=[]), module) as swapped:
        assert not swapped and torch.equal(weights(module), trained)


def test_a_lora_ema_given_only_its_decay_validates_with_the_callback_defaults(train_cfg) -> None:
    from sdtune.config import ConfigError, validate

    short = "method.ema={_target_:sdtune.callbacks.ema.EMACallback,decay:0.998}"
    validate(train_cfg("+experiment=lora", short))
    with pytest.raises(ConfigError, match="method.ema.decay"):
        validate(train_cfg("+experiment=lora", short.replace("0.998", "1.5")))
