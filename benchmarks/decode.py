"""Decoding speed and memory against context length: memlm's tiny presets and transformers' Llama.

Each (model, context) runs in ``--repeats`` fresh child processes (the table gives their median), one thread,
batch 1: build the model (seeded, eval), prefill ``context`` random tokens with the cache under
``torch.inference_mode``, then time ``--steps`` single-token steps; tokens/s is one over the median step.
Resident memory: the process's RSS after the steps minus its RSS before the prefill (the model and the
interpreter excluded), in MB. ``llama`` is ``LlamaForCausalLM`` holding ``attention_tiny``'s weights (its
logits are checked against memlm's on a 16-token prompt before timing), decoding with transformers' own
cache. The model order alternates between contexts and repeats, so slow drifts of a shared machine fall on
every row alike; the ratio column compares ``attention`` with ``llama`` at the same context.

Usage: ``python benchmarks/decode.py`` (``--quick``: seconds; ``--contexts 256 1024 4096 16384``,
``--models attention llama gated_deltanet titans_memory moneta titans_mac``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memlm import load_preset  # noqa: E402
from memlm.models import MemLMForCausalLM  # noqa: E402

VOCAB = 256
MODELS = ("attention", "llama", "gated_deltanet", "titans_memory", "moneta", "titans_mac")


def rss_mb() -> float:
    """This process's resident set size (Linux ``/proc``), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memlm_model(name: str, max_len: int) -> MemLMForCausalLM:
    torch.manual_seed(0)
    config = load_preset(f"{name}_tiny", vocab_size=VOCAB, max_position_embeddings=max_len)
    return MemLMForCausalLM(config).eval()


def llama_model(max_len: int) -> torch.nn.Module:
    """transformers' Llama with ``attention_tiny``'s weights and shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = memlm_model("attention", max_len)
    c = ours.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads or c.num_heads, rms_norm_eps=c.norm_eps,
                         max_position_embeddings=max_len, tie_word_embeddings=c.tie_word_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    llama = LlamaForCausalLM(config).eval()
    names = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(c.num_hidden_layers):
        ours_p, theirs = f"model.layers.{i}.", f"model.layers.{i}."
        names[ours_p + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours_p + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("q", "k", "v", "o"):
            names[f"{ours_p}attn.{proj}_proj.weight"] = f"{theirs}self_attn.{proj}_proj.weight"
        for proj in ("gate", "up", "down"):
            names[f"{ours_p}mlp.{proj}_proj.weight"] = f"{theirs}mlp.{proj}_proj.weight"
    state = ours.state_dict()
    llama.load_state_dict({theirs: state[mine] for mine, theirs in names.items()}, strict=True)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        gap = (llama(ids).logits - ours(ids).logits).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"llama and memlm attention disagree by {gap:.2e} on the same weights")
    return llama


def child(name: str, context: int, steps: int, device: str = "cpu") -> dict:
    """One (model, context) in this process; on CUDA the model runs in bf16, each step is synchronised and
    the memory figure is the allocator's growth (MB) instead of the RSS's."""
    torch.set_num_threads(1)
    cuda = device == "cuda"
    max_len = context + steps + 1
    model = llama_model(max_len) if name == "llama" else memlm_model(name, max_len)
    model = model.to(device, torch.bfloat16 if cuda else torch.float32)
    ids = torch.randint(0, VOCAB, (1, context + steps), generator=torch.Generator().manual_seed(0)).to(device)

    def memory() -> float:
        return torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()

    with torch.inference_mode():  # warm-up: lazily loaded kernels and libraries are not the cache's memory
        model(ids[:, :2])
    before = memory()
    times = []
    with torch.inference_mode():  # both take and return the decoding cache as ``cache``
        cache = model(ids[:, :context], use_cache=True).cache
        for t in range(context, context + steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            cache = model(ids[:, t:t + 1], cache=cache, use_cache=True).cache
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"tokens_per_s": 1.0 / statistics.median(times), "rss_mb": memory() - before}


def run(name: str, context: int, steps: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(context), str(steps), device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{name} at context {context} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(models: list[str], contexts: list[int], steps: int, repeats: int, device: str = "cpu") -> str:
    runs: dict[tuple[str, int], list[dict]] = {(name, c): [] for name in models for c in contexts}
    for r in range(repeats):
        for i, context in enumerate(contexts):
            order = models if (i + r) % 2 == 0 else models[::-1]
            for name in order:
                runs[(name, context)].append(run(name, context, steps, device))
    results = {key: {field: statistics.median(x[field] for x in got) for field in got[0]} for key, got in runs.items()}
    lines = [
        f"Decoding, batch 1, median of {steps} steps after a prefill of the context, median of {repeats} processes; "
        f"{platform.machine() if device == 'cpu' else torch.cuda.get_device_name() + ' bf16'}, 1 thread, "
        f"torch {torch.__version__}, {datetime.date.today()}" + ("; memory: MB allocated on the GPU" if device != "cpu"
                                                                 else ""),
        "",
        "| model | " + " | ".join(f"{c} tok/s" for c in contexts) + " | " + " | ".join(f"{c} MB" for c in contexts)
        + " |",
        "|---|" + "---:|" * (2 * len(contexts)),
    ]
    for name in models:
        speed = [f"{results[(name, c)]['tokens_per_s']:.0f}" for c in contexts]
        if name == "attention" and "llama" in models:
            speed = [f"{s} ({results[(name, c)]['tokens_per_s'] / results[('llama', c)]['tokens_per_s']:.2f}×)"
                     for s, c in zip(speed, contexts)]
        memory = [f"{results[(name, c)]['rss_mb']:.1f}" for c in contexts]
        lines.append(f"| {name} | " + " | ".join(speed) + " | " + " | ".join(memory) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short contexts, a few steps")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="processes per (model, context), alternating order")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "CONTEXT", "STEPS", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return ""
    contexts, steps, repeats = ([16, 48], 3, 1) if args.quick else (args.contexts, args.steps, args.repeats)
    report = table(args.models, contexts, steps, repeats, args.device)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"table": report}, indent=2))
    return report


if __name__ == "__main__":
    main()
