"""Parameter counts of the model presets in ``configs/models`` (built on the meta device, no memory).

``python benchmarks/param_counts.py [substring ...]`` prints a Markdown table: preset, layers,
d_model, heads, parameters (tied embeddings counted once) and parameters without the embedding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from memlm.models import MemLMConfig, MemLMForCausalLM

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def count(preset: Path) -> tuple[dict, int, int]:
    """(config dict, all parameters, parameters outside the token embedding)."""
    spec = yaml.safe_load(preset.read_text())
    with torch.device("meta"):
        model = MemLMForCausalLM(MemLMConfig(**spec))
    total = sum(p.numel() for p in model.parameters())
    return spec, total, total - model.get_input_embeddings().weight.numel()


def main(patterns: list[str]) -> None:
    print("| preset | layers | d_model | heads | parameters | non-embedding |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in sorted(CONFIGS.glob("*.yaml")):
        if patterns and not any(p in preset.stem for p in patterns):
            continue
        spec, total, body = count(preset)
        print(f"| {preset.stem} | {spec['num_hidden_layers']} | {spec['hidden_size']} | {spec['num_heads']} "
              f"| {total / 1e6:.1f}M | {body / 1e6:.1f}M |")


if __name__ == "__main__":
    main(sys.argv[1:])
