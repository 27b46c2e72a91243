"""Parameter counts of every model preset (``memlm.presets``; built on the meta device, no memory).

``python benchmarks/param_counts.py [substring ...]`` prints a Markdown table: preset, layers,
d_model, heads, parameters (tied embeddings counted once) and parameters without the embedding.
The ``tiny`` presets set no vocabulary (a run takes its tokenizer's); they are counted at
``MemLMConfig``'s default, 32000.
"""

from __future__ import annotations

import sys

import torch

from memlm import load_preset
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.presets import preset_names


def count(preset: str) -> tuple[MemLMConfig, int, int]:
    """(config, all parameters, parameters outside the token embedding)."""
    config = load_preset(preset)
    with torch.device("meta"):
        model = MemLMForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    return config, total, total - model.get_input_embeddings().weight.numel()


def main(patterns: list[str]) -> None:
    print("| preset | layers | d_model | heads | parameters | non-embedding |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in preset_names():
        if patterns and not any(p in preset for p in patterns):
            continue
        config, total, body = count(preset)
        print(f"| {preset} | {config.num_hidden_layers} | {config.hidden_size} | {config.num_heads} "
              f"| {total / 1e6:.1f}M | {body / 1e6:.1f}M |")


if __name__ == "__main__":
    main(sys.argv[1:])
