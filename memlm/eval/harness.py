"""lm-evaluation-harness adapter: the ``memlm`` model type and ``memlm eval-harness``.

Importing this module registers ``memlm`` with lm-eval's model registry, so
``lm_eval.simple_evaluate(model="memlm", model_args={"pretrained": ...})`` works.
``memlm eval-harness --model CKPT --tasks memlm_recall`` is the shortcut, and
``memlm eval-harness lm-eval --model memlm --model_args pretrained=CKPT --tasks ...`` is lm-eval's
own command line with the type registered (lm-eval 0.4 has no plugin entry points, so the
plain ``lm_eval`` executable cannot see a model type defined outside it).

The adapter is lm-eval's ``HFLM`` loading memlm (importing it registers ``MemLMConfig`` with the
transformers Auto classes); ``pretrained`` may be a memlm model config file (random weights) and
``tokenizer`` a ``tokenizer.json`` or SentencePiece ``.model`` file. Batches run as lm-eval builds them:
generation left-padded with an attention mask (memlm states skip the padding), log-likelihoods
right-padded (which a causal model ignores).

Task groups (``memlm/eval/tasks``): ``memlm_commonsense`` (wikitext, lambada_openai, piqa,
hellaswag, winogrande, arc_easy, arc_challenge, social_iqa, boolq) and ``memlm_recall`` (the
Based / JRT recall suite: swde, fda, squad_completion, based_triviaqa, based_nq_1024,
based_drop; metric ``contains``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

TASKS_DIR = Path(__file__).with_name("tasks")
COMMONSENSE_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy",
                     "arc_challenge", "social_iqa", "boolq")
RECALL_TASKS = ("swde", "fda", "squad_completion", "based_triviaqa", "based_nq_1024", "based_drop")


@register_model("memlm")
class MemLMLM(HFLM):
    """``HFLM`` for memlm checkpoints and any other causal LM (see module docstring)."""

    def __init__(self, pretrained: Any, tokenizer: Any = None, backend: str = "causal",
                 device: str | None = None, **kwargs: Any) -> None:
        from memlm.eval.io.loading import is_model_config, load_model, resolve_device
        from memlm.models.convert.tokenizer import load_tokenizer

        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer, fallback=False)
        if isinstance(pretrained, str) and is_model_config(pretrained):
            if tokenizer is None:
                raise ValueError(f"pretrained={pretrained} is a model config (random weights): "
                                 "pass a tokenizer")
            pretrained = load_model(pretrained, device or "auto",
                                    config_defaults={"vocab_size": len(tokenizer)})
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend=backend,
                         device=str(resolve_device(device)), **kwargs)


def task_manager(include_paths: list[str] | None = None) -> Any:
    """An lm-eval ``TaskManager`` that also knows memlm's task groups and Based recall tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *(include_paths or [])])


def check_tasks(manager: Any, tasks: list[str]) -> list[str]:
    """``tasks`` with glob patterns (``arc_*``) expanded, as lm-eval's own command line does, or a
    one-line ``ValueError`` naming every unknown task and its closest registered names.

    A task is a name ``manager`` indexed (task, group or tag), a glob matching some, or a YAML file path.
    """
    import difflib

    known = set(manager.all_tasks)
    resolved: list[str] = []
    unknown: list[str] = []
    for name in tasks:
        if name in known or Path(name).is_file():
            matches = [name]
        else:
            matches = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if not matches:
            unknown.append(name)
        resolved += [m for m in matches if m not in resolved]
    if unknown:
        def hint(name: str) -> str:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            return f"{name!r} (close matches: {', '.join(map(repr, close))})" if close else f"{name!r} (no close match)"

        raise ValueError(f"unknown lm-eval task(s): {', '.join(map(hint, unknown))}; "
                         "`memlm eval-harness lm-eval ls tasks` lists them all")
    return resolved


def evaluate(
    pretrained: Any,
    tasks: list[str],
    tokenizer: Any = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "auto",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_paths: list[str] | None = None,
    max_length: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the ``memlm`` model type; returns lm-eval's results dict."""
    import lm_eval

    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task or group")
    manager = task_manager(include_paths)
    tasks = check_tasks(manager, tasks)  # before the model is loaded
    lm = MemLMLM(pretrained=pretrained, tokenizer=tokenizer, device=device, dtype=dtype,
                 batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples)
    if results is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank of a distributed run)")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memlm eval-harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or memlm model config .yaml")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks or groups (memlm_commonsense, memlm_recall, ...)")
    p.add_argument("--tokenizer", help="tokenizer folder, hub id, tokenizer.json or SentencePiece .model")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--max-length", type=int, help="context window given to lm-eval")
    p.add_argument("--include-path", action="append", default=[], help="extra lm-eval task folder")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs in the JSON")
    return p


def lm_eval_cli(args: list[str]) -> int:
    """lm-eval's own command line (``lm-eval [run] --model memlm ...``) with the ``memlm`` type
    registered; an evaluation run or ``ls`` without ``--include_path`` gets memlm's task folder."""
    from lm_eval.__main__ import cli_evaluate

    if ("--model" in args or args[:1] == ["ls"]) and "--include_path" not in args:
        args = [*args, "--include_path", str(TASKS_DIR)]
    saved, sys.argv = sys.argv, ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``memlm eval-harness``; returns the process exit status (2 on invalid input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return lm_eval_cli(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:
        print(f"memlm eval-harness: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from lm_eval.utils import make_table

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(args.model, [t for t in args.tasks.split(",") if t], args.tokenizer, args.batch_size,
                       args.device, args.dtype, limit, args.num_fewshot, args.include_path, args.max_length,
                       args.log_samples)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0
