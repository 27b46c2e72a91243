"""The run report: ``<run>/report.md`` (losses, perplexity, a sample) and ``<run>/summary.json``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
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


def _loss_curve(cfg: RunConfig, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> Path | None:
    """``<run>/loss_curve.png``: train and validation loss against tokens seen (None without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from memlm.eval.io.plots import plot_loss_curves

    tokens_per_step = train[-1]["tokens_seen"] / train[-1]["step"]
    return plot_loss_curves([(r["tokens_seen"], r["loss"]) for r in train],
                            [(r["step"] * tokens_per_step, r["val_loss"]) for r in val],
                            f"memlm run {cfg.name}", cfg.run_dir / "loss_curve.png")


def write_report(cfg: RunConfig, model: Any, tokenizer: Any, val_docs: list[str], summary: dict[str, Any],
                 val_tokens: int) -> None:
    """Write the report; the validation loss is the trainer's last, on the first ``val_tokens``
    tokens of ``val_docs`` (joined by EOS), and the probes' held-out perplexity is measured on the
    same tokens with the same windows, so it equals ``exp(validation loss)`` (to bf16 precision
    where the validation ran under bf16 autocast)."""
    rows = read_jsonl(cfg.run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    summary.update(first_loss=train[0]["loss"], last_loss=train[-1]["loss"],
                   val_loss=val[-1]["val_loss"] if val else None)
    summary["val_ppl"] = math.exp(summary["val_loss"]) if summary["val_loss"] is not None else None
    summary["val_tokens"] = val_tokens
    curve = _loss_curve(cfg, train, val)
    model.eval()
    sample = _sample(model, tokenizer, val_docs[0], cfg.logging.sample_tokens, cfg.training.seed)
    lines = [
        f"# memlm run `{cfg.name}`", "",
        f"- parameters: {summary['num_params']:,}",
        f"- steps: {summary['steps']} ({summary['skipped_steps']} skipped), tokens: {summary['tokens_seen']:,}",
        f"- wall time: {summary['wall_time_s']:.1f} s (training, over every session of the run)",
        f"- train loss: first {summary['first_loss']:.4f} → last {summary['last_loss']:.4f}",
        f"- validation loss: {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} on the first "
        f"{val_tokens:,} validation tokens (context {cfg.data.seq_len}, stride {cfg.data.seq_len - 1})"
        if summary["val_loss"] is not None else "- validation: not run",
        f"- loss curve: `{curve.name}`" if curve else "- loss curve: not drawn (matplotlib is not installed)",
        "", "## Sample (temperature 0.8, top-k 40)", "", "```", sample, "```", "",
    ]
    if cfg.logging.probes:
        from memlm.eval.default_report import run_default_probes

        lines += [run_default_probes(model, tokenizer, cfg.run_dir, val_docs, context_length=cfg.data.seq_len,
                                     max_tokens=val_tokens), ""]
    (cfg.run_dir / "report.md").write_text("\n".join(lines))
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
