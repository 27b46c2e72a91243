"""The run report: ``<run>/report.md`` (losses, perplexity, a sample) and ``<run>/summary.json``."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from memlm.train.config import RunConfig
from memlm.train.metrics import read_jsonl


def _sample(model: Any, tokenizer: Any, prompt: str, new_tokens: int, seed: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[:, :32].to(model.device)
    torch.manual_seed(seed)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0])


def write_report(cfg: RunConfig, model: Any, tokenizer: Any, val_docs: list[str], summary: dict[str, Any]) -> None:
    rows = read_jsonl(cfg.run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    summary.update(first_loss=train[0]["loss"], last_loss=train[-1]["loss"],
                   val_loss=val[-1]["val_loss"] if val else None)
    summary["val_ppl"] = math.exp(summary["val_loss"]) if summary["val_loss"] is not None else None
    model.eval()
    sample = _sample(model, tokenizer, val_docs[0], cfg.logging.sample_tokens, cfg.training.seed)
    lines = [
        f"# memlm run `{cfg.name}`", "",
        f"- parameters: {summary['num_params']:,}",
        f"- steps: {summary['steps']} ({summary['skipped_steps']} skipped), tokens: {summary['tokens_seen']:,}",
        f"- wall time of the last session: {summary['wall_time_s']:.1f} s",
        f"- train loss: first {summary['first_loss']:.4f} → last {summary['last_loss']:.4f}",
        f"- validation loss: {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f}"
        if summary["val_loss"] is not None else "- validation: not run",
        "", "## Sample (temperature 0.8, top-k 40)", "", "```", sample, "```", "",
    ]
    if cfg.logging.probes:
        from memlm.eval.default_report import run_default_probes

        lines += [run_default_probes(model, tokenizer, cfg.run_dir, val_docs), ""]
    (cfg.run_dir / "report.md").write_text("\n".join(lines))
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
