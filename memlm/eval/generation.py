"""Greedy decoding of a batch of prompts, left-padded with an attention mask (padding leaves every
memlm state as if absent, so each prompt decodes as it would alone)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """The text of ``max_new_tokens`` greedily decoded tokens after each prompt (each stops at EOS)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    pad = next((t for t in (tokenizer.pad_token_id, eos) if t is not None), 0)
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model_device(model))
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=ids.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    texts = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
