"""Run records: one JSON file per probe run, with the environment it ran in."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device and time stamp stored with every record."""
    import transformers

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cpu = platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON, creating parent folders; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return p


def pct(x: float) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal."""
    return f"{100 * x:.1f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (floats with 4 significant digits; format percentages with ``pct``)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
