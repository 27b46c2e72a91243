"""The pretraining loop, top to bottom: data → model → optimizer → steps → checkpoints → export.

``accelerate launch -m memlm.train --config configs/runs/<run>.yaml key=value ...`` calls
:func:`train`. Each optimizer step reads ``grad_accum`` micro-batches per process, skips (and
counts) steps whose loss or gradient norm is not finite, clips, steps, and logs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from memlm.eval.perplexity import window_nll, window_plan
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.train import checkpoint
from memlm.train.config import ConfigError, RunConfig, check_trackers_installed, model_kwargs, to_yaml
from memlm.train.corpus import load_documents
from memlm.train.data import Batch, ShuffledLoader, StreamingLoader, pack
from memlm.train.metrics import JSONLTracker, flops_per_token, peak_flops, truncate_after
from memlm.train.optim import build_optimizer, build_scheduler
from memlm.train.report import write_report
from memlm.train.tokenizer import check_vocab, load_training_tokenizer, train_bpe


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the loader's position travels in ``loader``)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    wall_time_s: float = 0.0  # training time over every session of the run

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps, self.wall_time_s = int(state["skipped_steps"]), float(state["wall_time_s"])


def precision_of(cfg: Any) -> str:
    wanted = cfg.training.precision
    if wanted == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if wanted == "fp32" else "bf16"


TOKENIZER_SETTINGS = "memlm_tokenizer.json"


def check_saved_tokenizer(cfg: Any) -> None:
    """A run directory's tokenizer is reused only under the settings it was made with."""
    recorded = cfg.run_dir / "tokenizer" / TOKENIZER_SETTINGS
    if not recorded.exists():
        return
    saved, wanted = json.loads(recorded.read_text()), asdict(cfg.tokenizer)
    diff = [f"tokenizer.{k}: saved {saved.get(k)!r} vs config {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if diff:
        raise ConfigError(f"{cfg.run_dir / 'tokenizer'} was made with other settings ({', '.join(diff)}): "
                          "choose another name=... for a new run, or delete that run directory")


def run_tokenizer(cfg: Any, accelerator: Accelerator, documents: Callable[[], Iterable[str]]) -> Any:
    """The run's tokenizer (``cfg.run_dir``, ``cfg.tokenizer``): saved in ``<run>/tokenizer`` (with the settings
    that made it) on first use, reloaded on resume; a BPE is trained on ``documents()``."""
    saved = cfg.run_dir / "tokenizer"
    with accelerator.main_process_first():
        if (saved / TOKENIZER_SETTINGS).exists():
            return load_training_tokenizer(str(saved))
        tokenizer = (load_training_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path
                     else train_bpe(documents(), cfg.tokenizer.vocab_size, cfg.tokenizer.train_documents))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(saved)
            (saved / TOKENIZER_SETTINGS).write_text(json.dumps(asdict(cfg.tokenizer), indent=2))
        return tokenizer


def checked_model_kwargs(cfg: Any) -> dict[str, Any]:
    """``MemLMConfig`` kwargs of the run, the model built once on the meta device (no memory, no
    data read) so that a bad model section stops the run first."""
    kwargs = model_kwargs(cfg.model)
    try:
        with torch.device("meta"):
            MemLMForCausalLM(MemLMConfig(**{"vocab_size": cfg.tokenizer.vocab_size, **kwargs}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    return kwargs


def existing_checkpoints(cfg: Any) -> list[Any]:
    """The run's checkpoints; a ``ConfigError`` if there are some and ``checkpoint.resume`` is off."""
    existing = checkpoint.list_checkpoints(cfg.run_dir)
    if existing and not cfg.checkpoint.resume:
        raise ConfigError(
            f"{cfg.run_dir} already has checkpoints ({existing[-1].name}); pass --resume (checkpoint.resume=true) "
            "to continue it, or choose another name=... — nothing was overwritten"
        )
    return existing


def resume_point(cfg: Any, accelerator: Accelerator, existing: list[Any]) -> Any:
    """The newest checkpoint that verifies (None for a fresh run). Newer ones that fail are named,
    set aside as ``<name>.corrupt`` and never loaded."""
    if not (cfg.checkpoint.resume and existing):
        return None
    path, failures = checkpoint.newest_verified(cfg.run_dir)
    accelerator.wait_for_everyone()  # every process chose ``path`` before any rename
    if accelerator.is_main_process and failures:
        checkpoint.set_aside(cfg.run_dir, path)
        for reason in failures:
            print(f"memlm train: {reason}; set aside as .corrupt, resuming from {path.name}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return path


def start_run(cfg: Any) -> tuple[dict[str, Any], Accelerator, Any]:
    """Everything checked before any work (model, trackers, checkpoints, tokenizer), then the run's
    ``Accelerator``, the checkpoint to resume from (None: a fresh run) and the seed. The schedule is sized in
    optimizer steps: one scheduler step per optimizer step, whatever the number of processes (Accelerate's
    default steps it once per process)."""
    kwargs = checked_model_kwargs(cfg)
    check_trackers_installed(cfg)
    existing = existing_checkpoints(cfg)
    check_saved_tokenizer(cfg)
    trackers: list[Any] = [JSONLTracker(cfg.run_dir / "metrics.jsonl"), *cfg.logging.trackers]
    accelerator = Accelerator(mixed_precision=precision_of(cfg), log_with=trackers, project_dir=str(cfg.run_dir),
                              step_scheduler_with_optimizer=False)
    resume_from = resume_point(cfg, accelerator, existing)
    set_seed(cfg.training.seed)
    return kwargs, accelerator, resume_from


def validation_tokens(val_rows: torch.Tensor, cfg: RunConfig, world: int) -> torch.Tensor:
    """The validation stream ``x_1 … x_N`` that :func:`_validate` scores: the first
    ``logging.val_batches × training.micro_batch_size × processes`` packed rows, end to end."""
    return val_rows[: cfg.logging.val_batches * cfg.training.micro_batch_size * world].flatten()


def _validate(model: torch.nn.Module, val_rows: torch.Tensor, cfg: RunConfig, accelerator: Accelerator) -> float:
    """Held-out loss of :func:`validation_tokens` (:func:`held_out_loss`)."""
    ids = validation_tokens(val_rows, cfg, accelerator.num_processes)
    return held_out_loss(model, ids, val_rows.shape[1], cfg.training.micro_batch_size, accelerator)


def held_out_loss(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, micro_batch_size: int,
                  accelerator: Accelerator) -> float:
    """``-(1 / (N - 1)) Σ_{t=2..N} log p(x_t | its window)`` of the stream ``ids``, in windows of ``seq_len``
    tokens every ``seq_len - 1``: the quantity :func:`memlm.eval.perplexity.perplexity` measures on that
    stream, windows split across processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    plan = window_plan(len(ids), seq_len, seq_len - 1)
    model.eval()
    with accelerator.autocast():
        nll_at, count_at = window_nll(model, ids.to(accelerator.device), plan[rank::world], seq_len, micro_batch_size)
    model.train()
    totals = torch.stack([nll_at.sum(), count_at.sum()]).to(accelerator.device)
    nll, count = accelerator.reduce(totals, reduction="sum").tolist()
    return nll / count


@dataclass
class StepResult:
    loss: float  # language-model loss, mean over processes and micro-batches
    grad_norm: float  # before clipping
    applied: bool  # False when the loss or the gradient norm was not finite: no update
    aux: dict[str, float] = field(default_factory=dict)  # "aux_loss" (scaled, in the objective) and each kind


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batches: list[Batch],
               accelerator: Accelerator, document_masking: bool, grad_clip: float) -> StepResult:
    """One optimizer step over this process's micro-batches: forward and backward each (gradients
    synchronised across processes on the last), clip, update unless the loss or the gradient norm
    is not finite, and advance the schedule by one step either way."""
    total_loss = torch.zeros((), device=accelerator.device)
    aux_totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        if document_masking:
            ids, cu_seqlens, labels = batch.packed()
            extra = {"cu_seqlens": cu_seqlens.to(accelerator.device)}
        else:
            ids, labels, extra = batch.input_ids, batch.input_ids, {}
        ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
        with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext():
            with accelerator.autocast():
                out = model(input_ids=ids, labels=labels, **extra)
            loss = out.loss / len(batches)
            objective = loss if out.aux_loss is None else loss + out.aux_loss / len(batches)
            accelerator.backward(objective)
        total_loss += loss.detach().float()
        if out.aux_loss is not None:  # the mixers' auxiliary losses (memlm.layers.aux_loss), logged apart
            for name, value in {"aux_loss": out.aux_loss, **(out.aux_losses or {})}.items():
                aux_totals[name] = aux_totals.get(name, 0.0) + value.detach().float() / len(batches)
    loss_value = accelerator.reduce(total_loss.reshape(1), reduction="mean").item()
    aux = {name: accelerator.reduce(value.reshape(1), reduction="mean").item() for name, value in aux_totals.items()}
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepResult(loss_value, grad_norm, applied, aux)


def batch_checksum(batches: list[Batch]) -> int:
    """A position-weighted sum of the step's token ids (``logging.batch_checksum``: lets tests see
    that a resumed run reads exactly the batches of an uninterrupted one)."""
    return sum(int((b.input_ids * torch.arange(1, b.input_ids.shape[1] + 1)).sum()) for b in batches)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) one pretraining run; returns the summary written into the report."""
    run_dir = cfg.run_dir
    kwargs, accelerator, resume_from = start_run(cfg)

    # --- data and tokenizer -------------------------------------------------------------------
    train_docs, val_docs = load_documents(cfg.data, cfg.training.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    # a BPE trained on a stream reads its own pass of the stream
    tokenizer = run_tokenizer(cfg, accelerator, lambda: load_documents(cfg.data, cfg.training.seed)[0]
                              if cfg.data.streaming else train_docs)
    seq_len, mb, world = cfg.data.seq_len, cfg.training.micro_batch_size, accelerator.num_processes
    if cfg.data.streaming:
        loader: Any = StreamingLoader(train_docs, tokenizer, seq_len, mb, accelerator.process_index, world)
    else:
        loader = ShuffledLoader(pack(train_docs, tokenizer, seq_len), mb, accelerator.process_index, world,
                                cfg.training.seed)
    val_rows = pack(val_docs, tokenizer, seq_len).input_ids

    # --- model, optimizer, schedule -------------------------------------------------------------
    kwargs.setdefault("vocab_size", len(tokenizer))
    check_vocab(tokenizer, kwargs["vocab_size"])
    kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    setup = {"data.seq_len": seq_len, "training.micro_batch_size": mb, "training.grad_accum": cfg.training.grad_accum,
             "processes": world}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, kwargs, setup)
    model_config = MemLMConfig(**kwargs)
    model = MemLMForCausalLM(model_config)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state, loader)

    if resume_from is not None:
        checkpoint.load(accelerator, resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        if accelerator.is_main_process:  # steps after the checkpoint are replayed and logged again
            truncate_after(run_dir / "metrics.jsonl", state.step)
    start_step = state.step
    if state.step == 0:
        accelerator.init_trackers(cfg.name, config={"run": to_yaml(cfg), "num_params": num_params})
        if accelerator.is_main_process:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
    else:
        accelerator.init_trackers(cfg.name)

    # --- the loop -------------------------------------------------------------------------------
    flops_tok = flops_per_token(num_params, model_config.num_hidden_layers, model_config.hidden_size, seq_len)
    peak = peak_flops(accelerator.device)
    stop = cfg.training.stop_at_step or cfg.training.steps
    bar = tqdm(total=cfg.training.steps, initial=state.step, disable=not (cfg.logging.progress_bar
                                                                           and accelerator.is_main_process))
    model.train()
    started, tick, tick_tokens = time.time(), time.time(), state.tokens_seen
    wall_time_before = state.wall_time_s
    val_loss = None
    while state.step < stop:
        batches = [loader.next_batch() for _ in range(cfg.training.grad_accum)]
        lr = scheduler.get_last_lr()[0]
        result = train_step(model, optimizer, scheduler, batches, accelerator, cfg.data.document_masking,
                            cfg.optimizer.grad_clip)
        state.skipped_steps += not result.applied
        state.step += 1
        state.tokens_seen += mb * world * cfg.training.grad_accum * seq_len

        if state.step % cfg.logging.every == 0 or state.step == stop or state.step == 1:
            now = time.time()
            tok_s = (state.tokens_seen - tick_tokens) / max(now - tick, 1e-9)
            tick, tick_tokens = now, state.tokens_seen
            record = {"loss": result.loss, **result.aux, "lr": lr, "grad_norm": result.grad_norm,
                      "tokens_per_s": tok_s, "tokens_seen": state.tokens_seen,
                      "skipped_steps": state.skipped_steps, "data_position": loader.position}
            if peak:
                record["mfu"] = tok_s * flops_tok / (peak * world)
            if cfg.logging.batch_checksum:
                record["batch_checksum"] = batch_checksum(batches)
            accelerator.log(record, step=state.step)
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if state.step % cfg.logging.val_every == 0 or state.step == cfg.training.steps:
            val_loss = _validate(model, val_rows, cfg, accelerator)
            accelerator.log({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=state.step)
        state.wall_time_s = wall_time_before + time.time() - started
        if state.step % cfg.checkpoint.every == 0 or state.step == stop:
            checkpoint.save(accelerator, run_dir, state.step, kwargs, setup, cfg.checkpoint.keep_last)
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()

    summary = {"name": cfg.name, "num_params": num_params, "steps": state.step, "skipped_steps": state.skipped_steps,
               "tokens_seen": state.tokens_seen, "wall_time_s": state.wall_time_s, "val_loss": val_loss,
               "finished": state.step >= cfg.training.steps}
    # a session that trained no step (resuming a finished run) keeps the export and report it finds
    outputs_missing = not (run_dir / "summary.json").exists() or (cfg.checkpoint.export
                                                                  and not (run_dir / "hf").exists())
    if summary["finished"] and (state.step > start_step or outputs_missing) and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.checkpoint.export:
            checkpoint.export(unwrapped, tokenizer, run_dir / "hf")
        write_report(cfg, unwrapped, tokenizer, val_docs, summary, len(validation_tokens(val_rows, cfg, world)))
    return summary
