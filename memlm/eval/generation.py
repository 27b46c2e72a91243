"""Greedy decoding of one unpadded prompt (recurrent models do not skip padding, so the
probes never batch prompts of different lengths)."""

from __future__ import annotations

from typing import Any

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The text of ``max_new_tokens`` greedily decoded tokens after ``prompt`` (stops at EOS)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad if pad is not None else 0,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
