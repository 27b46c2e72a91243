"""``memlm probe <task> ...``: MQAR sweeps, S-NIAH-1/2/3, passkey and perplexity.

Examples::

    memlm probe mqar --config configs/probes/mqar_cpu.yaml epochs=2
    memlm probe passkey --model runs/tiny/hf --lengths 256,512 --depths 0,50,100 --samples 4
    memlm probe s-niah-2 --model fla-hub/gla-340M-15B --tokenizer tokenizer.model.v1 --haystack essays.txt
    memlm probe perplexity --model runs/tiny/hf --files held_out.txt --context-length 512 --stride 256

Each run writes a JSON record and a PNG under ``--out`` (MQAR also a markdown table) and prints
its table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from memlm.eval.needle.task import TASKS as NEEDLE_TASKS

ALL_TASKS = ("mqar", *NEEDLE_TASKS, "perplexity")
PROBE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "probes"


def _require_mqar_config(args: argparse.Namespace) -> None:
    """``--config`` is required: the built-in defaults alone are the full multi-hour sweep."""
    if args.config is not None:
        return
    shipped = sorted(p.name for p in PROBE_CONFIGS.glob("mqar_*.yaml"))
    folder = PROBE_CONFIGS.relative_to(Path.cwd()) if PROBE_CONFIGS.is_relative_to(Path.cwd()) else PROBE_CONFIGS
    where = f"shipped in {folder}/: {', '.join(shipped)}" if shipped else "see configs/probes/mqar_*.yaml"
    raise ValueError(f"--config is required (the built-in defaults are a multi-hour sweep); sweep configs {where}")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _run_name(spec: str) -> str:
    """A file-system-safe name for a model spec (last path components or hub id)."""
    parts = [p for p in re.split(r"[\\/]", spec.rstrip("/")) if p][-2:]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "model"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint folder, hub id, a model config .yaml/.json or a preset name (e.g. attention_tiny)")
    p.add_argument("--tokenizer", help="tokenizer folder, hub id, tokenizer.json or SentencePiece .model "
                                       "(default: the model's own)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="runs/probes", help="output folder (default: runs/probes)")
    p.add_argument("--name", help="file stem of the outputs (default: <task>-<model>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_text_source_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(f"--{what}", dest="files", nargs="+", help="local text file(s) or folder(s)")
    p.add_argument("--dataset", help="Hugging Face dataset name")
    p.add_argument("--dataset-config", help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--text-field", default="text", help="dataset text column (default: text)")
    p.add_argument("--limit-docs", type=int, help="use only the first N dataset rows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlm probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK", help=f"one of {list(ALL_TASKS)}")

    mq = sub.add_parser("mqar", help="MQAR sweep: train small models per mixer, accuracy vs state size")
    mq.add_argument("--config", help="sweep YAML (required; configs/probes/mqar_*.yaml, e.g. mqar_smoke.yaml)")
    mq.add_argument("--out", default="runs/probes")
    mq.add_argument("--no-progress", action="store_true")
    mq.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=2 d_models=[64]")

    for task in NEEDLE_TASKS:
        p = sub.add_parser(task, help=f"{task} grid over context lengths × needle depths")
        _add_model_args(p)
        p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="context lengths in tokens")
        p.add_argument("--depths", type=_floats, default=[0, 25, 50, 75, 100], help="needle depths in %%")
        p.add_argument("--samples", type=int, default=5, help="samples per (length, depth) cell")
        p.add_argument("--max-new-tokens", type=int, help="tokens generated per sample")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (left-padded)")
        if task in ("s-niah-2", "s-niah-3"):
            _add_text_source_args(p, "haystack")

    pp = sub.add_parser("perplexity", help="sliding-window perplexity on a dataset split or local files")
    _add_model_args(pp)
    _add_text_source_args(pp, "files")
    pp.add_argument("--context-length", type=int, default=1024)
    pp.add_argument("--stride", type=int, help="window stride (default: context length - 1)")
    pp.add_argument("--batch-size", type=int, default=1)
    pp.add_argument("--max-tokens", type=int, help="score only the first N tokens of the stream")
    return parser


def _texts(args: argparse.Namespace) -> list[str] | None:
    from memlm.eval.needle.haystack import dataset_texts, read_texts

    if args.files and args.dataset:
        raise ValueError("give either local files or --dataset, not both")
    if args.files:
        return [t for f in args.files for t in read_texts(f)]
    if args.dataset:
        return dataset_texts(args.dataset, args.split, args.text_field, args.dataset_config, args.limit_docs)
    return None


def _load(args: argparse.Namespace) -> tuple[object, object]:
    from memlm.eval.io.loading import is_model_config, load_model
    from memlm.models.convert.tokenizer import load_tokenizer

    if args.tokenizer is None and is_model_config(args.model):
        raise ValueError(f"--model {args.model} is a config (random weights, no tokenizer): pass --tokenizer")
    source = args.tokenizer or args.model
    try:
        tokenizer = load_tokenizer(source, fallback=False)
    except OSError as err:
        kind = "--tokenizer" if args.tokenizer else "--model"
        missing = not Path(source).exists()
        where = "a local path that does not exist, nor a reachable hub id" if missing else "unreadable"
        raise ValueError(f"{kind} {source!r} is {where}: {str(err).splitlines()[0]}") from None
    model = load_model(args.model, args.device, args.dtype, config_defaults={"vocab_size": len(tokenizer)})
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``memlm probe``; returns the process exit status (2 on invalid input)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"memlm probe {args.task}: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.task == "mqar":
        from memlm.eval.mqar.sweep import load_sweep_config, run_mqar_sweep

        cfg = load_sweep_config(args.config, args.overrides)  # a bad override is reported first
        _require_mqar_config(args)
        record = run_mqar_sweep(cfg, args.out, progress)
        print(record["table"])
        print(f"\n{cfg.name}: {record['time_s']:.0f} s; wrote {', '.join(record['files'].values())}")
        return 0

    model, tokenizer = _load(args)
    name = args.name or f"{args.task}-{_run_name(args.model)}"
    if args.task == "perplexity":
        from memlm.eval.needle.haystack import stdlib_prose
        from memlm.eval.perplexity import perplexity_summary, run_perplexity_probe

        texts = _texts(args)
        meta = {"model": args.model, "tokenizer": args.tokenizer,
                "source": "files" if args.files else (args.dataset or "stdlib-docstrings"),
                "split": args.split if args.dataset else None}
        record = run_perplexity_probe(model, tokenizer, texts if texts is not None else [" ".join(stdlib_prose())],
                                      args.out, name, meta, context_length=args.context_length, stride=args.stride,
                                      batch_size=args.batch_size, max_tokens=args.max_tokens, progress=progress)
        print(perplexity_summary(record))
        return 0

    from memlm.eval.needle.probe import needle_table, run_needle_probe

    texts = _texts(args) if args.task in ("s-niah-2", "s-niah-3") else None
    record = run_needle_probe(model, tokenizer, args.task, args.lengths, args.depths, args.samples, texts,
                              args.max_new_tokens, args.seed, args.out, name, progress,
                              meta={"model": args.model, "tokenizer": args.tokenizer}, batch_size=args.batch_size)
    print(needle_table(record))
    print(f"\nmean accuracy {100 * record['mean_accuracy']:.1f}%; wrote {record['files']['json']}, "
          f"{record['files']['png']}")
    return 0
