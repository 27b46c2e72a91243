"""Tiny memlm models, one per registered mixer spec: the cases of the model and generation contracts
(tests/test_model_contract.py, tests/test_generation.py). A new mixer joins both by adding its spec
to ``CASES``.

Periods the cases are sized around (the generation tests cross them): Titans/MIRAS chunks of 3–4
tokens, MAC segments of 6, sliding windows of 3–5, 2–3 persistent tokens.
"""

from __future__ import annotations

import torch

from memlm.models import MemLMConfig, MemLMForCausalLM

VOCAB = 61
CASES: dict[str, dict] = {
    "attention": {"mixer": {"name": "attention"}},
    "gqa": {"mixer": {"name": "attention", "num_heads": 4, "num_kv_heads": 2}},
    "window": {"mixer": {"name": "attention", "window_size": 5}},
    "persistent": {"mixer": {"name": "attention", "num_persistent": 3}},
    "window+persistent": {"mixer": {"name": "attention", "window_size": 4, "num_persistent": 2}},
    "hybrid-1:1": {"ratio": "1:1", "mixer": {"name": "attention", "window_size": 3}, "ratio_mixer": "attention"},
    "gated_deltanet": {"mixer": {"name": "gated_deltanet"}},
    "gdn-gva-plain": {"mixer": {"name": "gated_deltanet", "num_v_heads": 8, "use_short_conv": False,
                                "use_gate": False}},
    "delta_net": {"mixer": {"name": "delta_net", "use_gate": True}},
    "gla": {"mixer": {"name": "gla", "num_kv_heads": 2, "use_short_conv": True}},
    "retnet": {"mixer": {"name": "retnet"}},
    "hgrn": {"mixer": {"name": "hgrn", "lower_bound": 0.3, "use_short_conv": True}},
    "hgrn2": {"mixer": {"name": "hgrn2", "lower_bound": 0.3}},
    "mamba2": {"mixer": {"name": "mamba2", "head_dim": 8, "state_size": 8, "n_groups": 2}},
    "hybrid-gdn+swa": {"ratio": "1:1", "mixer": {"name": "gated_deltanet"},
                       "ratio_mixer": {"name": "attention", "window_size": 4, "num_kv_heads": 2}},
    "hybrid-attn+hgrn2": {"layers": [{"name": "attention"}, {"name": "hgrn2", "lower_bound": 0.5}]},
    "titans-lmm": {"mixer": {"name": "titans_memory", "chunk_size": 4, "num_persistent": 2}},
    "titans-mac": {"mixer": {"name": "titans_mac", "segment_size": 6,
                             "memory": {"name": "titans_memory", "chunk_size": 4},
                             "attention": {"name": "attention", "num_persistent": 2}}},
    "titans-mag": {"mixer": {"name": "titans_mag", "memory": {"name": "titans_memory", "chunk_size": 4},
                             "attention": {"name": "attention", "window_size": 5, "num_persistent": 2}}},
    "titans-mal": {"mixer": {"name": "titans_mal", "memory": {"name": "titans_memory", "chunk_size": 3},
                             "attention": {"name": "attention", "window_size": 4}}},
    "titans-lmm-channel": {"mixer": {"name": "titans_memory", "chunk_size": 4, "gates": "channel", "gate_rank": 4}},
    "moneta": {"mixer": {"name": "moneta", "chunk_size": 4, "gate_rank": 4}},
    "yaad": {"mixer": {"name": "yaad", "chunk_size": 3, "gate_rank": 4}},
    "memora": {"mixer": {"name": "memora", "chunk_size": 4, "gate_rank": 4, "num_persistent": 2}},
    "moneta-h": {"ratio": "1:1", "mixer": {"name": "moneta", "chunk_size": 4, "gate_rank": 4},
                 "ratio_mixer": {"name": "attention", "window_size": 4}},
    "mom": {"mixer": {"name": "mom", "num_heads": 2}},
    "mom-gla-single": {"mixer": {"name": "mom", "base": "gla", "num_memories": 3, "topk": 1, "shared_mem": False,
                                 "single_kv_proj": True, "use_output_gate": False, "expand_v": 2.0}},
    "mom-titans": {"mixer": {"name": "mom", "num_heads": 2, "base": {"name": "titans_memory", "chunk_size": 4}}},
    "mc-gdn-grm": {"mixer": {"name": "memory_caching", "base": "gated_deltanet", "segment_size": 4}},
    "mc-deltanet-residual-independent": {"mixer": {"name": "memory_caching", "base": "delta_net", "segment_size": 5,
                                                   "aggregation": "residual", "segment_init": "independent"}},
    "mc-gla-ssc": {"mixer": {"name": "memory_caching", "base": {"name": "gla", "num_kv_heads": 2}, "segment_size": 3,
                             "aggregation": "ssc", "top_k": 1, "gate_input": "query", "pool": "sum"}},
    "mc-retnet-soup": {"mixer": {"name": "memory_caching", "base": "retnet", "segment_size": 4, "aggregation": "soup"}},
    "mc-mamba2-independent": {"mixer": {"name": "memory_caching", "segment_size": 6, "segment_init": "independent",
                                        "base": {"name": "mamba2", "head_dim": 8, "state_size": 8}}},
    "mc-titans-grm": {"mixer": {"name": "memory_caching", "segment_size": 4,
                                "base": {"name": "titans_memory", "chunk_size": 2, "num_persistent": 2}}},
    "mc-moneta-ssc-independent": {"mixer": {"name": "memory_caching", "segment_size": 6, "aggregation": "ssc",
                                            "top_k": 1, "segment_init": "independent",
                                            "base": {"name": "moneta", "chunk_size": 3, "gate_rank": 4}}},
    "mc-yaad-soup": {"mixer": {"name": "memory_caching", "segment_size": 4, "aggregation": "soup",
                               "base": {"name": "yaad", "chunk_size": 2, "gate_rank": 4}}},
    "mc-gdn-log-grm": {"mixer": {"name": "memory_caching", "base": "gated_deltanet", "segment_size": 2,
                                 "segments": "log"}},
    "mc-deltanet-log-independent-ssc": {"mixer": {"name": "memory_caching", "base": "delta_net", "segment_size": 2,
                                                  "segments": "log", "segment_init": "independent",
                                                  "aggregation": "ssc", "top_k": 1}},
    "mc-titans-log-soup": {"mixer": {"name": "memory_caching", "segment_size": 2, "segments": "log",
                                     "aggregation": "soup", "base": {"name": "titans_memory", "chunk_size": 2}}},
    "mac-yaad": {"mixer": {"name": "titans_mac", "segment_size": 6, "memory": {"name": "yaad", "chunk_size": 4},
                           "attention": {"name": "attention", "num_persistent": 2}, "normalize_attention": True}},
    "moe-mlp": {"mixer": {"name": "attention"}, "mlp": {"name": "moe", "num_experts": 4, "topk": 2}},
    "deepseek-moe-mlp": {"ratio": "1:1", "mixer": {"name": "gated_deltanet"},
                         "mlp": {"name": "moe", "num_experts": 8, "topk": 3, "num_shared": 1, "expert_size": 16,
                                 "norm_topk_prob": False}},
}


def build(case: str, **kw: object) -> MemLMForCausalLM:
    """The tiny model of ``case`` (vocab 61, hidden 32, 2 layers, 4 heads) in eval mode, seeded."""
    torch.manual_seed(0)
    cfg = MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4,
                      **{**CASES[case], **kw})
    return MemLMForCausalLM(cfg).eval()
