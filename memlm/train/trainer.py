"""The pretraining loop, top to bottom: data → model → optimizer → steps → checkpoints → export.

``accelerate launch -m memlm.train --config configs/runs/<run>.yaml key=value ...`` calls
:func:`train`. Each optimizer step reads ``grad_accum`` micro-batches per process, skips (and
counts) steps whose loss or gradient norm is not finite, clips, steps, and logs.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.train import checkpoint
from memlm.train.config import ConfigError, RunConfig, model_kwargs, to_yaml
from memlm.train.corpus import load_documents
from memlm.train.data import ShuffledLoader, StreamingLoader, pack
from memlm.train.metrics import JSONLTracker, flops_per_token, peak_flops
from memlm.train.optim import build_optimizer, build_scheduler
from memlm.train.report import write_report
from memlm.train.tokenizer import check_vocab, load_tokenizer, train_bpe


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the loader's position travels in ``loader``)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]


def _precision(cfg: RunConfig) -> str:
    wanted = cfg.training.precision
    if wanted == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if wanted == "fp32" else "bf16"


def _tokenizer(cfg: RunConfig, accelerator: Accelerator, train_docs: Any) -> Any:
    """The run's tokenizer: saved in ``<run>/tokenizer`` on first use, reloaded on resume.
    A BPE trained on a stream reads its own pass of the stream, not the training one."""
    saved = cfg.run_dir / "tokenizer"
    with accelerator.main_process_first():
        if saved.exists():
            return load_tokenizer(str(saved))
        tokenizer = (load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path
                     else train_bpe(load_documents(cfg.data, cfg.training.seed)[0] if cfg.data.streaming
                                    else train_docs, cfg.tokenizer.vocab_size, cfg.tokenizer.train_documents))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(saved)
        return tokenizer


def _validate(model: torch.nn.Module, val_rows: torch.Tensor, cfg: RunConfig, accelerator: Accelerator) -> float:
    """Mean held-out loss over ``logging.val_batches`` micro-batches, split across processes."""
    model.eval()
    mb, rank, world = cfg.training.micro_batch_size, accelerator.process_index, accelerator.num_processes
    losses = []
    with torch.no_grad():
        for b in range(cfg.logging.val_batches):
            lo = (b * world + rank) * mb
            rows = val_rows[lo: lo + mb]
            if len(rows) == 0:
                break
            rows = rows.to(accelerator.device)
            with accelerator.autocast():
                losses.append(model(input_ids=rows, labels=rows).loss.float())
    local = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=accelerator.device)
    model.train()
    return accelerator.reduce(local.reshape(1), reduction="mean").item()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) one pretraining run; returns the summary written into the report."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = checkpoint.list_checkpoints(run_dir)
    if existing and not cfg.checkpoint.resume:
        raise ConfigError(
            f"{run_dir} already has checkpoints ({existing[-1].name}); pass --resume (checkpoint.resume=true) "
            "to continue it, or choose another name=... — nothing was overwritten"
        )
    trackers: list[Any] = [JSONLTracker(run_dir / "metrics.jsonl"), *cfg.logging.trackers]
    accelerator = Accelerator(mixed_precision=_precision(cfg), log_with=trackers, project_dir=str(run_dir))
    set_seed(cfg.training.seed)

    # --- data and tokenizer -------------------------------------------------------------------
    train_docs, val_docs = load_documents(cfg.data, cfg.training.seed)
    tokenizer = _tokenizer(cfg, accelerator, train_docs)
    seq_len, mb, world = cfg.data.seq_len, cfg.training.micro_batch_size, accelerator.num_processes
    if cfg.data.streaming:
        loader: Any = StreamingLoader(train_docs, tokenizer, seq_len, mb, accelerator.process_index, world)
    else:
        loader = ShuffledLoader(pack(train_docs, tokenizer, seq_len), mb, accelerator.process_index, world,
                                cfg.training.seed)
    val_rows = pack(val_docs, tokenizer, seq_len).input_ids

    # --- model, optimizer, schedule -------------------------------------------------------------
    kwargs = model_kwargs(cfg.model)
    kwargs.setdefault("vocab_size", len(tokenizer))
    check_vocab(tokenizer, kwargs["vocab_size"])
    kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    try:
        model = MemLMForCausalLM(MemLMConfig(**kwargs))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state, loader)

    if cfg.checkpoint.resume and existing:
        checkpoint.load(accelerator, existing[-1], kwargs)
        accelerator.print(f"resumed from {existing[-1]} at step {state.step}")
    if state.step == 0:
        accelerator.init_trackers(cfg.name, config={"run": to_yaml(cfg), "num_params": num_params})
        if accelerator.is_main_process:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
    else:
        accelerator.init_trackers(cfg.name)

    # --- the loop -------------------------------------------------------------------------------
    flops_tok = flops_per_token(num_params, cfg.model.num_hidden_layers, cfg.model.hidden_size, seq_len)
    peak = peak_flops(accelerator.device)
    stop = cfg.training.stop_at_step or cfg.training.steps
    bar = tqdm(total=cfg.training.steps, initial=state.step, disable=not (cfg.logging.progress_bar
                                                                           and accelerator.is_main_process))
    model.train()
    started, tick, tick_tokens = time.time(), time.time(), state.tokens_seen
    val_loss = None
    while state.step < stop:
        total_loss = torch.zeros((), device=accelerator.device)
        checksum = 0
        for micro in range(cfg.training.grad_accum):
            batch = loader.next_batch()
            checksum += int((batch.input_ids * torch.arange(1, seq_len + 1)).sum())
            if cfg.data.document_masking:
                ids, cu_seqlens, labels = batch.packed()
                extra = {"cu_seqlens": cu_seqlens.to(accelerator.device)}
            else:
                ids, labels, extra = batch.input_ids, batch.input_ids, {}
            ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
            last = micro == cfg.training.grad_accum - 1
            with accelerator.no_sync(model) if not last else nullcontext():
                with accelerator.autocast():
                    loss = model(input_ids=ids, labels=labels, **extra).loss / cfg.training.grad_accum
                accelerator.backward(loss)
            total_loss += loss.detach().float()
        loss_value = accelerator.reduce(total_loss.reshape(1), reduction="mean").item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        else:
            state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        state.tokens_seen += mb * world * cfg.training.grad_accum * seq_len

        if state.step % cfg.logging.every == 0 or state.step == stop or state.step == 1:
            now = time.time()
            tok_s = (state.tokens_seen - tick_tokens) / max(now - tick, 1e-9)
            tick, tick_tokens = now, state.tokens_seen
            record = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tok_s, "tokens_seen": state.tokens_seen,
                      "skipped_steps": state.skipped_steps, "data_position": loader.position,
                      "batch_checksum": checksum}
            if peak:
                record["mfu"] = tok_s * flops_tok / (peak * world)
            accelerator.log(record, step=state.step)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
        if state.step % cfg.logging.val_every == 0 or state.step == cfg.training.steps:
            val_loss = _validate(model, val_rows, cfg, accelerator)
            accelerator.log({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=state.step)
        if state.step % cfg.checkpoint.every == 0 or state.step == stop:
            checkpoint.save(accelerator, run_dir, state.step, kwargs, cfg.checkpoint.keep_last)
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()

    summary = {"name": cfg.name, "num_params": num_params, "steps": state.step, "skipped_steps": state.skipped_steps,
               "tokens_seen": state.tokens_seen, "wall_time_s": time.time() - started, "val_loss": val_loss,
               "finished": state.step >= cfg.training.steps}
    if summary["finished"] and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.checkpoint.export:
            checkpoint.export(unwrapped, tokenizer, run_dir / "hf")
        write_report(cfg, unwrapped, tokenizer, val_docs, summary)
    return summary
