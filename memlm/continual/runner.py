"""The continual-pretraining loop, top to bottom: tasks → model → stream schedule → per task (steps with
replay, evaluations) → task end (evaluate every task, fill the replay buffer, checkpoint) → results.

``memlm continual --config configs/continual/<name>.yaml`` (or ``accelerate launch -m memlm.continual``)
calls :func:`run_stream`. The training step, checkpoints, tokenizer and held-out loss are the pretraining
loop's (``memlm.train.trainer``); a checkpoint holds the stream's position (task, the task loader's position,
steps), the replay buffer and mixer, and every result so far, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from memlm.continual.config import ContinualConfig
from memlm.continual.replay import CONTROLLERS, ReplayBuffer, ReplayMixer
from memlm.continual.report import write_results
from memlm.continual.schedule import anneal_steps, cooldown_end, stream_multiplier
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.train import checkpoint
from memlm.train.config import ConfigError, to_yaml
from memlm.train.corpus import load_documents
from memlm.train.data import Batch, ShuffledLoader, pack
from memlm.train.metrics import truncate_after
from memlm.train.optim import build_optimizer
from memlm.train.tokenizer import check_vocab
from memlm.train.trainer import batch_checksum, held_out_loss, run_tokenizer, start_run, train_step


@dataclass
class Task:
    name: str
    rows: Batch  # the packed training rows
    val_ids: torch.Tensor  # the held-out stream (the first ``eval.val_batches`` micro-batches of its rows)
    steps: int  # optimizer steps of its token budget


@dataclass
class StreamState:
    """What a checkpoint carries besides model, optimizer and RNG: the position and every result so far."""

    step: int = 0  # optimizer steps over the whole stream
    task: int = 0  # the task being trained
    task_position: int = 0  # global micro-batches its loader has read
    tokens_seen: int = 0
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    initial: list[float] = field(default_factory=list)  # every task's loss before training
    matrix: list[list[float]] = field(default_factory=list)  # row i: every task's loss after task i
    curve_steps: list[int] = field(default_factory=list)
    curve_losses: list[list[float]] = field(default_factory=list)
    finished_at: list[int] = field(default_factory=list)  # the step each finished task ended

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _interleave(lists: list[list[str]]) -> list[str]:
    """The documents of every task, round-robin (a BPE trained on the first N sees every task)."""
    return [doc for group in zip(*lists) for doc in group] + [d for docs in lists for d in docs[min(map(len, lists)):]]


def load_tasks(cfg: ContinualConfig, accelerator: Accelerator, world: int) -> tuple[list[Task], Any]:
    """Every task's documents, the run's tokenizer, packed rows and step budget."""
    docs = [load_documents(t.data, cfg.training.seed) for t in cfg.tasks]
    tokenizer = run_tokenizer(cfg, accelerator, lambda: _interleave([list(train) for train, _ in docs]))
    per_step = cfg.training.micro_batch_size * world * cfg.training.grad_accum * cfg.seq_len
    tasks = []
    for i, (section, (train_docs, val_docs)) in enumerate(zip(cfg.tasks, docs, strict=True)):
        steps = section.tokens // per_step
        if steps < 1:
            raise ConfigError(f"tasks[{i}] ({section.name}).tokens={section.tokens} is less than one optimizer step "
                              f"({per_step} tokens: micro_batch_size × processes × grad_accum × seq_len)")
        val_rows = pack(val_docs, tokenizer, cfg.seq_len).input_ids
        val_ids = val_rows[: cfg.eval.val_batches * cfg.training.micro_batch_size * world].flatten()
        tasks.append(Task(section.name, pack(train_docs, tokenizer, cfg.seq_len), val_ids, steps))
    return tasks, tokenizer


def evaluate(model: torch.nn.Module, tasks: list[Task], cfg: ContinualConfig, accelerator: Accelerator) -> list[float]:
    """Every task's held-out loss (``memlm.train.trainer.held_out_loss``)."""
    return [held_out_loss(model, t.val_ids, cfg.seq_len, cfg.training.micro_batch_size, accelerator) for t in tasks]


def consumed_rows(loader: ShuffledLoader, data: Batch) -> Batch:
    """The rows a task's loader handed out, in the global order (every process's, batch by batch)."""
    idx = torch.cat([loader.global_indices(p) for p in range(loader.position)])
    return Batch(data.input_ids[idx], data.starts[idx])


def run_stream(cfg: ContinualConfig) -> dict[str, Any]:
    """Train (or resume) the stream; returns the results (``<run>/results.json`` when finished)."""
    run_dir = cfg.run_dir
    kwargs, accelerator, resume_from = start_run(cfg)
    mb, world, rank = cfg.training.micro_batch_size, accelerator.num_processes, accelerator.process_index

    # --- tasks, model, optimizer, the stream's schedule ----------------------------------------------------
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks, tokenizer = load_tasks(cfg, accelerator, world)
    task_steps = [t.steps for t in tasks]
    boundaries = [sum(task_steps[:i + 1]) for i in range(len(tasks))]
    first_anneal = task_steps[0] - anneal_steps(task_steps[0], cfg.schedule)
    if cfg.schedule.name == "infinite" and not (
            cfg.schedule.warmup_steps <= cooldown_end(task_steps, cfg.schedule) <= first_anneal):
        raise ConfigError(f"schedule.cooldown_steps={cfg.schedule.cooldown_steps} must lie between "
                          f"schedule.warmup_steps and the start of the first task's anneal ({task_steps[0]} steps)")
    kwargs.setdefault("vocab_size", len(tokenizer))
    check_vocab(tokenizer, kwargs["vocab_size"])
    kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    setup = {"seq_len": cfg.seq_len, "training.micro_batch_size": mb, "training.grad_accum": cfg.training.grad_accum,
             "processes": world, "task_steps": task_steps}
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, kwargs, setup)
    model = MemLMForCausalLM(MemLMConfig(**kwargs))
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: stream_multiplier(s, task_steps, cfg.schedule))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = StreamState()
    buffer = ReplayBuffer(cfg.replay.buffer_rows, cfg.seq_len, cfg.training.seed)
    mixer = ReplayMixer(buffer, CONTROLLERS[cfg.replay.controller](cfg.replay.fraction), mb, rank, world,
                        cfg.training.seed)
    accelerator.register_for_checkpointing(state, buffer, mixer)
    if resume_from is not None:
        checkpoint.load(accelerator, resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step} (task {state.task})")
        if accelerator.is_main_process:
            truncate_after(run_dir / "metrics.jsonl", state.step)
        accelerator.init_trackers(cfg.name)
    else:
        accelerator.init_trackers(cfg.name, config={"run": to_yaml(cfg), "num_params": num_params})
        if accelerator.is_main_process:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if not state.initial:  # before any training: forward transfer's reference
        state.initial = evaluate(model, tasks, cfg, accelerator)
        state.curve_steps, state.curve_losses = [0], [list(state.initial)]

    # --- the stream ----------------------------------------------------------------------------------------
    stop = min(cfg.training.stop_at_step or boundaries[-1], boundaries[-1])
    saved_at = state.step if resume_from is not None else -1
    bar = tqdm(total=boundaries[-1], initial=state.step,
               disable=not (cfg.logging.progress_bar and accelerator.is_main_process))
    started, wall_before = time.time(), state.wall_time_s

    def save() -> None:
        nonlocal saved_at
        state.wall_time_s = wall_before + time.time() - started
        checkpoint.save(accelerator, run_dir, state.step, kwargs, setup, cfg.checkpoint.keep_last)
        saved_at = state.step

    while state.task < len(tasks) and state.step < stop:
        task, end = tasks[state.task], boundaries[state.task]
        loader = ShuffledLoader(task.rows, mb, rank, world, cfg.training.seed + state.task)
        loader.position = state.task_position
        while state.step < min(end, stop):
            batches = [mixer.mix(loader.next_batch(), state.task, state.step, loader.position - 1)
                       for _ in range(cfg.training.grad_accum)]
            lr = scheduler.get_last_lr()[0]
            result = train_step(model, optimizer, scheduler, batches, accelerator, False, cfg.optimizer.grad_clip)
            state.step += 1
            state.task_position = loader.position
            state.skipped_steps += not result.applied
            state.tokens_seen += mb * world * cfg.training.grad_accum * cfg.seq_len
            if state.step % cfg.logging.every == 0 or state.step in (1, end):
                record = {"loss": result.loss, **result.aux, "lr": lr, "grad_norm": result.grad_norm,
                          "task": state.task, "tokens_seen": state.tokens_seen, "replayed_rows": mixer.replayed}
                if cfg.logging.batch_checksum:
                    record["batch_checksum"] = batch_checksum(batches)
                accelerator.log(record, step=state.step)
                bar.set_postfix(task=task.name, loss=f"{result.loss:.3f}")
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step != end:
                state.curve_steps.append(state.step)
                state.curve_losses.append(evaluate(model, tasks, cfg, accelerator))
                mixer.controller.observe(state.step, state.curve_losses[-1])
            if state.step % cfg.checkpoint.every == 0 and state.step not in (end, stop):
                save()
            bar.update(1)
        if state.step < end:
            break
        # --- the task ends: every task evaluated, its rows offered to the replay buffer ----------------------
        losses = evaluate(model, tasks, cfg, accelerator)
        state.matrix.append(losses)
        state.curve_steps.append(state.step)
        state.curve_losses.append(losses)
        state.finished_at.append(state.step)
        mixer.controller.observe(state.step, losses)
        accelerator.log({f"val_loss/{t.name}": v for t, v in zip(tasks, losses, strict=True)}, step=state.step)
        buffer.offer(consumed_rows(loader, task.rows))
        state.task, state.task_position = state.task + 1, 0
        save()
    if saved_at != state.step:
        save()
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()

    finished = state.task == len(tasks)
    results = {"name": cfg.name, "finished": finished, "steps": state.step, "tokens_seen": state.tokens_seen,
               "num_params": num_params, "skipped_steps": state.skipped_steps, "wall_time_s": state.wall_time_s,
               "replayed_rows": mixer.replayed}
    if finished and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.checkpoint.export:
            checkpoint.export(unwrapped, tokenizer, run_dir / "hf")
        results = write_results(cfg, [t.name for t in tasks], task_steps, state, results)
    return results

