"""The training settings kohya's sd-scripts records in a LoRA file's header (`ss_learning_rate`, …), which
A1111's and ComfyUI's metadata panels and model sites read, taken from an sdtune run's config."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sdtune.optimizers import kohya_optimizer_name

# ss_* key -> the run config key it comes from (absent keys are written as "None", as sd-scripts does).
CONFIG_KEYS = {
    "ss_learning_rate": "method.lr",
    "ss_unet_lr": "method.lr",
    "ss_lr_scheduler": "method.lr_scheduler",
    "ss_lr_warmup_steps": "method.lr_warmup_steps",
    "ss_max_train_steps": "trainer.max_steps",
    "ss_seed": "seed",
    "ss_batch_size_per_device": "data.batch_size",
    "ss_gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "ss_mixed_precision": "trainer.precision",
    "ss_noise_offset": "loss.noise_offset",
    "ss_min_snr_gamma": "loss.snr_gamma",
    "ss_multires_noise_iterations": "loss.multires_noise_iterations",
    "ss_multires_noise_discount": "loss.multires_noise_discount",
    "ss_ip_noise_gamma": "loss.input_perturbation",
    "ss_loss_type": "loss.type",
    "ss_huber_c": "loss.huber_c",
    "ss_huber_schedule": "loss.huber_schedule",
    "ss_debiased_estimation": "loss.debiased_estimation",
    "ss_caption_dropout_rate": "conditioning.text.dropout",
    "ss_shuffle_caption": "data.shuffle_caption",
    "ss_keep_tokens": "data.keep_tokens",
    "ss_caption_tag_dropout_rate": "data.caption_tag_dropout",
    "ss_loraplus_lr_ratio": "method.loraplus_lr_ratio",
}


def training_metadata(cfg: DictConfig, steps: int | None = None) -> dict[str, str]:
    """The `ss_*` training entries of a run's resolved config; `steps` = the optimizer steps it trained."""
    entries = {key: str(OmegaConf.select(cfg, path, default=None)) for key, path in CONFIG_KEYS.items()}
    method = cfg.method
    trains_text = bool(method.get("train_text_encoder", False))
    entries["ss_text_encoder_lr"] = str(method.get("text_encoder_lr") if trains_text else None)
    entries["ss_optimizer"] = kohya_optimizer_name(method)
    base = OmegaConf.select(cfg, "model.pretrained", default=None)
    entries["ss_sd_model_name"] = str(base or "sdtune tiny")
    if steps is not None:
        entries["ss_steps"] = str(int(steps))
    return entries
