"""Speed and memory levers (`runtime.*`): CPU threads, and a few training steps with each lever on."""

from __future__ import annotations

import logging
import platform
import sys
from types import SimpleNamespace

import pytest
import torch

from sdtune.config import ConfigError, validate
from sdtune.perf import configure_threads, default_threads, physical_cores, tune_malloc

CUDA = torch.cuda.is_available()
# 1 thread: these tests run beside others on a small shared machine, where OpenMP threads that spin-wait on
# busy cores make a step many times slower. The `threads` test checks the default itself.
QUICK = [
    "+experiment=lora",
    "trainer.max_steps=2",
    "data.num_images=8",
    "data.batch_size=4",
    "sampling.prompts=[]",
    "export.formats=[]",
    "logger=none",
    "runtime.threads=1",
]


@pytest.fixture(autouse=True)
def keep_thread_count():
    before, cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    yield
    torch.set_num_threads(before)
    torch.backends.cudnn.benchmark = cudnn


def test_threads_default_to_physical_cores_and_are_logged(caplog) -> None:
    caplog.set_level(logging.INFO, logger="sdtune.perf")
    chosen = configure_threads(None)
    assert chosen == torch.get_num_threads() == default_threads() >= 1
    assert physical_cores() is None or chosen <= physical_cores()
    assert "torch CPU threads" in caplog.text
    assert configure_threads(1) == torch.get_num_threads() == 1
    assert default_threads(local_processes=64) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_tuning_applies_on_glibc() -> None:
    assert tune_malloc() == (platform.libc_ver()[0] == "glibc")


def test_gpu_only_levers_are_refused_on_cpu_with_the_fix(train_cfg) -> None:
    if CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as error:
        validate(train_cfg(*QUICK, "runtime.quantize=nf4", "runtime.weight_dtype=float16"))
    message = str(error.value)
    assert "runtime.quantize: a bitsandbytes 8/4-bit frozen base needs a CUDA GPU" in message
    assert "runtime.weight_dtype/vae_dtype: float16 needs a GPU" in message
    with pytest.raises(ConfigError, match="set trainer.precision=bf16-mixed"):
        validate(train_cfg(*QUICK, "runtime.weight_dtype=bfloat16"))
    with pytest.raises(ConfigError, match="runtime.attention"):
        validate(train_cfg(*QUICK, "runtime.attention=flash3"))


def _checks() -> dict[str, tuple[list[str], object]]:
    def checkpointing(m):
        assert m.unet.is_gradient_checkpointing

    def adamw8bit(m):
        import bitsandbytes as bnb

        assert isinstance(m.trainer.optimizers[0], bnb.optim.AdamW8bit)

    def bf16_base(m):
        assert m.unet.conv_in.weight.dtype == torch.bfloat16
        assert m.stack.text_encoder.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in m.trainable_parameters().values())

    def fp32_vae(m):
        bf16_base(m)
        assert m.vae.dtype == torch.float32 and m.vae_full_precision

    def eager_attention(m):
        from diffusers.models.attention_processor import AttnProcessor

        assert all(isinstance(p, AttnProcessor) for p in m.unet.attn_processors.values())

    def channels_last(m):
        assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def compiled(m):
        assert m.unet._compiled_call_impl is not None

    def cudnn_benchmark(m):
        assert torch.backends.cudnn.benchmark
        # runtime.fused_optimizer is on by default but fuses only CUDA parameters (the module itself is back
        # on the CPU once fit ends: ask the strategy where it trained)
        trained_on = m.trainer.strategy.root_device.type
        assert bool(m.trainer.optimizers[0].defaults.get("fused")) == (trained_on == "cuda")

    bf16 = ["runtime.weight_dtype=bfloat16", "trainer.precision=bf16-mixed"]
    return {
        "gradient_checkpointing": (["runtime.gradient_checkpointing=true"], checkpointing),
        "adamw8bit": (["method.optimizer=adamw8bit"], adamw8bit),
        "bf16_base": (bf16, bf16_base),
        "fp32_vae": ([*bf16, "runtime.vae_dtype=float32"], fp32_vae),
        "eager_attention": (["runtime.attention=eager"], eager_attention),
        "channels_last": (["runtime.channels_last=true"], channels_last),
        "compile": (["runtime.compile=true", "runtime.compile_backend=eager"], compiled),
        "cudnn_benchmark": (["runtime.cudnn_benchmark=true"], cudnn_benchmark),
    }


@pytest.mark.parametrize("lever", list(_checks()))
def test_each_lever_trains_a_few_steps(lever: str, train_cfg) -> None:
    from sdtune.train import train

    overrides, check = _checks()[lever]
    run = train(train_cfg(*QUICK, *overrides))
    assert run.trainer.global_step == 2
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    # The tiny mid block's self-attention sees one token (1×1): its softmax has no gradient wrt q and k.
    single_token = (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    )
    lora_b = {n: p for n, p in run.module.trainable_parameters().items() if "lora_B" in n}
    still = [n for n, p in lora_b.items() if p.abs().sum() == 0 and not any(s in n for s in single_token)]
    assert lora_b and not still, f"LoRA weights that did not train: {still}"
    check(run.module)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: fp16 weights and bitsandbytes-quantised bases")
@pytest.mark.parametrize(
    "overrides",
    [
        ["runtime.weight_dtype=float16", "trainer.precision=16-mixed", "runtime.vae_dtype=float32"],
        ["runtime.quantize=nf4", "runtime.weight_dtype=bfloat16", "trainer.precision=bf16-mixed"],
        ["runtime.quantize=int8", "runtime.weight_dtype=bfloat16", "trainer.precision=bf16-mixed"],
    ],
)
def test_gpu_levers_train_a_few_steps(overrides: list[str], train_cfg) -> None:
    from sdtune.train import train

    run = train(train_cfg(*QUICK, "trainer.accelerator=gpu", "data.cache_latents=true", *overrides))
    assert run.trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in run.module.trainable_parameters().values())
    # runtime.fused_optimizer (default on) fuses, except under fp16 loss scaling (clipping needs unscaled
    # gradients)
    fused = bool(run.trainer.optimizers[0].defaults.get("fused"))
    assert fused == ("trainer.precision=bf16-mixed" in overrides)


def test_fused_optimizer_trains_under_bf16_autocast_with_clipping(train_cfg, monkeypatch) -> None:
    """Lightning's mixed-precision plugin refuses to clip gradients for a fused AdamW; sdtune clips them
    itself (bf16 has no loss scaling). torch also fuses AdamW on the CPU, which lets this run here."""
    import sdtune.module
    from sdtune.train import train

    monkeypatch.setattr(sdtune.module, "_fusable", lambda name, params: name == "adamw")
    bf16 = ["runtime.weight_dtype=bfloat16", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"]
    run = train(train_cfg(*QUICK, *bf16))
    assert run.trainer.optimizers[0].defaults["fused"]
    assert run.trainer.global_step == 2 and torch.isfinite(run.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_optimizer_gradients_are_clipped(algorithm: str) -> None:
    from sdtune.module import DiffusionModule

    weights = [torch.nn.Parameter(torch.zeros(64)) for _ in range(3)]
    for w in weights:
        w.grad = torch.full_like(w, 10.0)
    optimizer = torch.optim.AdamW(weights, fused=True)
    module = SimpleNamespace(trainer=SimpleNamespace(model=torch.nn.Linear(1, 1)))
    DiffusionModule.configure_gradient_clipping(module, optimizer, 0.5, algorithm)  # type: ignore[arg-type]
    grads = torch.cat([w.grad for w in weights])
    if algorithm == "norm":
        assert torch.linalg.vector_norm(grads) == pytest.approx(0.5, rel=1e-3)
    else:
        assert grads.abs().max() == pytest.approx(0.5)


def test_fsdp_gradients_are_clipped_by_the_root_module() -> None:
    """Lightning's FSDP precision plugin refuses norm clipping (the norm of sharded gradients needs every
    shard); the root FSDP module's own `clip_grad_norm_` does it, on every rank."""
    from sdtune.module import DiffusionModule

    class Root(torch.nn.Module):  # stands in for FullyShardedDataParallel, which needs CUDA GPUs here
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[float] = []

        def clip_grad_norm_(self, max_norm: float) -> None:
            self.calls.append(max_norm)

    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.full_like(weight, 10.0)
    root = Root()
    module = SimpleNamespace(trainer=SimpleNamespace(model=root))
    optimizer = torch.optim.AdamW([weight])
    DiffusionModule.configure_gradient_clipping(module, optimizer, 0.5, "norm")  # type: ignore[arg-type]
    assert root.calls == [0.5]
    DiffusionModule.configure_gradient_clipping(module, optimizer, 0.5, "value")  # type: ignore[arg-type]
    assert root.calls == [0.5] and weight.grad.max() == 0.5  # value clipping is per element: no root needed
