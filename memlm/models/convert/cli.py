"""``memlm convert SRC DST``: write any checkpoint :func:`from_pretrained` reads (a local directory
or Hub id, memlm or a foreign format) as a memlm checkpoint, with its tokenizer files."""

from __future__ import annotations

import argparse

from memlm.models.convert.loader import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memlm convert", description=__doc__)
    parser.add_argument("source", help="checkpoint directory or Hugging Face Hub id (owner/name)")
    parser.add_argument("target", help="output directory (memlm format)")
    parser.add_argument("--dtype", default=None,
                        help="float32 (default), bfloat16, float16, or 'auto' to keep the stored dtype")
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.source, args.target, dtype=args.dtype)
    kinds = sorted({spec["name"] for spec in model.config.layer_specs()})
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.target}: {model.config.num_hidden_layers} layers ({', '.join(kinds)}), "
          f"{params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}")
    return 0
