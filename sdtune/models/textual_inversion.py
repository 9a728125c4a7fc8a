"""Textual inversion: new placeholder tokens whose embedding rows are the only weights that train."""

from __future__ import annotations

import re
from typing import Any

import torch
from omegaconf import DictConfig

from sdtune.config import ConfigError


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of a placeholder, named as diffusers' `load_textual_inversion` names multi-vector ones."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def apply_textual_inversion(stack: Any, method: DictConfig) -> None:
    """Add the placeholder tokens, initialised from `method.initializer_token`; only their rows train."""
    tokenizer, text_encoder = stack.tokenizer, stack.text_encoder
    init_ids = tokenizer.encode(method.initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(
            [
                f"method.initializer_token: {method.initializer_token!r} is {len(init_ids)} tokens "
                "for this tokenizer; choose a word that is a single token"
            ]
        )
    tokens = placeholder_tokens(method.placeholder_token, method.num_vectors)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ConfigError(
            [
                f"method.placeholder_token: {method.placeholder_token!r} is already in the "
                "vocabulary; choose a new string such as <my-concept>"
            ]
        )
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    mask = torch.zeros(weight.shape[0], 1)
    mask[ids] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    for word, replacement in (method.caption_replace or {}).items():
        stack.caption_rewrites[rf"\b{re.escape(word)}\b"] = replacement
    register_placeholder(stack, method.placeholder_token, tokens)


def register_placeholder(stack: Any, placeholder: str, tokens: list[str]) -> None:
    """Record the placeholder's tokens; captions are rewritten to use all of them."""
    stack.placeholders[placeholder] = tokens
    if len(tokens) > 1:
        stack.caption_rewrites[re.escape(placeholder) + r"(?!_\d)"] = " ".join(tokens)


def learned_embeddings(stack: Any) -> dict[str, torch.Tensor]:
    """placeholder -> (num_vectors, dim) embedding rows, for every placeholder of the stack."""
    weight = stack.text_encoder.get_input_embeddings().weight.detach().cpu()
    return {
        placeholder: weight[stack.tokenizer.convert_tokens_to_ids(tokens)].clone()
        for placeholder, tokens in stack.placeholders.items()
    }


def load_embedding(stack: Any, path: str, token: str | None = None) -> str:
    """Add an embedding file (diffusers `learned_embeds` or A1111 `emb_params`); returns its token.

    Uses diffusers' own textual-inversion loader, then records the placeholder expansion for our sampler.
    """
    from safetensors.torch import load_file

    state = load_file(path)
    if len(state) != 1:
        raise ValueError(f"{path}: an embedding file holds one tensor, found {len(state)}")
    key, tensor = next(iter(state.items()))
    token = token or (key if key != "emb_params" else None)
    if token is None:
        raise ValueError(f"{path}: an A1111 embedding is named by its file; pass token=<word> to use it")
    from sdtune.models.loading import stack_pipeline

    stack_pipeline(stack).load_textual_inversion(path, token=token)
    register_placeholder(
        stack, token, placeholder_tokens(token, tensor.reshape(-1, tensor.shape[-1]).shape[0])
    )
    return token
