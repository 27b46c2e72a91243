"""Mixture-of-Memories (Du et al. 2025, arXiv 2502.13685), fla ``MomAttention`` layout (docs/design.md §4.3).

A router ``softmax(x W_g)`` (float32) picks the top-k of ``E`` memories per token and renormalises
their weights ``g``. Each memory sees only its routed tokens, in time order, with its own keys,
values and gates (``k_proj.{e}``, ``v_proj.{e}``, …; the query ``q_proj`` and the short convolutions
shared); a memory no token picks neither updates nor decays. The shared memory (``shared_mem``)
reads every token. Per token

    o_t = Σ_{e ∈ topk(t)} g_{t,e} · read_e(q_t^{(e)}) + read_shared(q_t),
    y_t = o_proj(RMSNorm(o_t) ⊙ swish(g_proj(x_t))),

where ``q_t^{(e)}`` is the query convolved over memory e's own tokens (as its keys and values are).
The memories (``base``) are Gated DeltaNet (fla's MoM), DeltaNet, GLA or the deep memory of Titans and
Miras (``layers/mom_memories.py``). The training path groups the token copies by (sequence, memory)
(``layers/routing.py``) and runs all buckets in one packed kernel call. The router's logits go into
the Switch load-balancing loss (``memlm.layers.aux_loss.LoadBalance``) × ``aux_loss_scale``.

Where we depart from fla 0.6 (its checkpoints load unchanged; docs/design.md §4.3):
* its routing sort is an unstable ``argsort``: on CPU a memory's tokens leave time order, so a
  token's output depends on later tokens and on the other rows of the batch. Ours is stable;
* in training mode it runs the short convolutions across the concatenated buckets (a memory's
  first token convolves the previous memory's last ones); eval mode does not. Ours convolves each
  bucket on its own in every mode, as decoding must;
* ``capacity`` is accepted and ignored there; here only 1.0 (no token dropped) is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.aux_loss import LoadBalance, report
from memlm.layers.conv import ShortConvolution
from memlm.layers.linear_common import check_positive, divide, heads, integral, l2norm, make_convs, normed_output
from memlm.layers.mixer import Mixer, cat_rows
from memlm.layers.mom_memories import (
    KINDS,
    DeepKind,
    LinearKind,
    add_projections,
    by_memory,
    index_rows,
    make_kind,
    put_rows,
)
from memlm.layers.neural_memory import NeuralMemory
from memlm.layers.norm import GatedRMSNorm
from memlm.layers.registry import MIXERS, parse_spec, register_mixer
from memlm.layers.routing import Buckets, route, segment_conv, sequence_ids


def parse_base(base: Any) -> tuple[type, Any]:
    """Validate ``mom.base``: a linear memory with the options its kind takes, or a deep memory
    (``titans_memory``, ``moneta``, ``yaad``, ``memora``) without the options the MoM layer owns."""
    cls, opts = parse_spec(base, where="mom.base")
    spec = {"name": base} if isinstance(base, str) else dict(base)
    given = sorted(set(spec) - {"name"})
    if issubclass(cls, NeuralMemory):
        owned = sorted(set(given) & set(DeepKind.OWNED))
        if owned:
            raise ValueError(f"mom.base: {owned} are set on the mom layer itself (num_heads, head_dim, "
                             "use_short_conv, conv_size), or have no per-bucket meaning (num_persistent)")
        return cls, opts
    if cls.mixer_name not in KINDS:
        deep = sorted(n for n, c in MIXERS.items() if issubclass(c, NeuralMemory))
        raise ValueError(f"mom.base must be one of {sorted(KINDS) + deep}, got {cls.mixer_name!r}")
    allowed = KINDS[cls.mixer_name][1]
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise ValueError(f"mom.base {cls.mixer_name!r} takes only the options {list(allowed)} (the geometry is "
                         f"the mom layer's: num_heads, head_dim, expand_v, use_short_conv, ...); got {extra}")
    return cls, opts


@register_mixer("mom")
class MixtureOfMemories(Mixer):
    @dataclass
    class Options:
        base: str | dict = "gated_deltanet"  # what each memory is: a mixer spec (layers/mom_memories.py)
        num_memories: int = 4  # E
        topk: int = 2  # memories per token
        capacity: float = 1.0  # fla's option; only 1.0 (no token dropped)
        shared_mem: bool = True  # an always-on memory over every token, added unweighted
        single_kv_proj: bool = False  # every memory uses the shared_* projections
        aux_loss_scale: float = 0.01  # load-balancing loss weight (fla's default; the paper's best is 1e-3)
        use_output_gate: bool = True
        use_short_conv: bool = True
        conv_size: int = 4
        num_heads: int | None = None  # default: config.num_heads
        head_dim: int | None = None  # key head size; default hidden_size // num_heads
        expand_v: float = 1.0  # value head size = head_dim · expand_v
        norm_eps: float | None = None  # default: config.norm_eps

        def validate(self) -> None:
            check_positive(num_memories=self.num_memories, topk=self.topk, conv_size=self.conv_size,
                           num_heads=self.num_heads, head_dim=self.head_dim, expand_v=self.expand_v,
                           norm_eps=self.norm_eps)
            if self.topk > self.num_memories:
                raise ValueError(f"topk={self.topk} must be <= num_memories={self.num_memories}")
            if self.capacity != 1.0:
                raise ValueError(f"capacity must be 1.0 (every routed token is kept), got {self.capacity}: token "
                                 "dropping is not implemented (fla 0.6 accepts capacity and ignores it)")
            if self.aux_loss_scale < 0:
                raise ValueError(f"aux_loss_scale must be >= 0, got {self.aux_loss_scale}")
            cls, _ = parse_base(self.base)
            if issubclass(cls, NeuralMemory) and self.expand_v != 1.0:
                raise ValueError(f"expand_v must be 1.0 with a deep-memory base (the memory maps d to d), "
                                 f"got {self.expand_v}")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.num_memories, self.topk = opts.num_memories, opts.topk
        self.shared_mem, self.single_kv_proj = opts.shared_mem, opts.single_kv_proj
        self.aux_loss_scale = opts.aux_loss_scale
        self.num_slots = self.num_memories + int(self.shared_mem)  # memories with a state, the shared one last
        self.num_heads = opts.num_heads or config.num_heads
        self.head_k_dim = opts.head_dim or divide("mom: hidden_size / num_heads", hidden_size, self.num_heads)
        self.head_v_dim = integral("mom: head_dim * expand_v", self.head_k_dim * opts.expand_v)
        self.key_dim, self.value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.kind = make_kind(parse_base(opts.base))

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.gate = nn.Linear(hidden_size, self.num_memories, bias=False)
        add_projections(self, "k_proj", lambda: nn.Linear(hidden_size, self.key_dim, bias=False))
        add_projections(self, "v_proj", lambda: nn.Linear(hidden_size, self.value_dim, bias=False))
        self.kind.build(self, hidden_size, opts)
        make_convs(self, {"q": self.key_dim, "k": self.key_dim, "v": self.value_dim}, opts.use_short_conv,
                   opts.conv_size, False, {"q": "silu", "k": "silu", "v": "silu"})
        eps = opts.norm_eps or config.norm_eps
        if opts.use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=eps)
        else:
            self.g_proj = None
            self.o_norm = nn.RMSNorm(self.head_v_dim, eps=eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_weights(self, init: Any, std: float) -> None:
        """The memory kind's own initialisation (GDN: decay rates ``A ~ U(0, 16)`` and Mamba2's ``dt``)."""
        self.kind.init_weights(self, init, std)

    def state_size(self, seq_len: int) -> int:
        """Every memory's state for one sequence plus the short convolutions' histories (one per memory);
        a deep memory's pending chunk inputs (fewer than ``chunk_size`` tokens) are not counted."""
        convs = sum((m.kernel_size[0] - 1) * m.in_channels for m in self.modules()
                    if isinstance(m, ShortConvolution))
        return self.num_slots * (self.kind.state_numel(self) + convs)

    def stack_states(self, states: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Matrix memories decode rows at different positions together; a deep memory's chunk does not."""
        return cat_rows(states) if isinstance(self.kind, LinearKind) else None

    def fresh_state(self, batch: int, like: torch.Tensor) -> dict[str, Any]:
        """A decoding state at the start of a sequence: ``[B, num_slots, ...]`` per memory (batch first)."""
        convs = {name: like.new_zeros(batch, self.num_slots, conv.kernel_size[0] - 1, conv.in_channels)
                 for name in ("q", "k", "v") if (conv := getattr(self, f"{name}_conv1d")) is not None}
        return {"memory": self.kind.fresh(self, batch, like), "conv": convs}

    def _conv(self, name: str, t: torch.Tensor, buckets: Buckets, rows: torch.Tensor, state: dict | None,
              new_state: dict) -> torch.Tensor:
        """The short convolution (with SiLU) over each bucket on its own, continuing its cached inputs."""
        conv: ShortConvolution | None = getattr(self, f"{name}_conv1d")
        if conv is None:
            return F.silu(t)
        history = None if state is None else index_rows(state["conv"][name], rows)
        y, last = segment_conv(conv, t, buckets.cu_seqlens, history)
        if state is not None:
            new_state["conv"][name] = put_rows(state["conv"][name], rows, last)
        return y

    def forward(
        self,
        x: torch.Tensor,
        state: dict[str, Any] | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cu_seqlens is not None and (state is not None or use_cache):
            raise ValueError("mom: cu_seqlens (packed documents) cannot be combined with a decoding cache")
        batch, seqlen, _ = x.shape
        routing = route(self.gate, x, self.topk)
        report(LoadBalance("load_balance", self.aux_loss_scale, logits=routing.logits.flatten(0, 1), topk=self.topk))
        selected, weights = routing.selected, routing.weights
        if self.shared_mem:  # the shared memory is one more slot every token takes, with weight 1
            selected = torch.cat([selected, selected.new_full((batch, seqlen, 1), self.num_memories)], -1)
            weights = torch.cat([weights, weights.new_ones(batch, seqlen, 1)], -1)
        sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        buckets = Buckets(selected, sequence_ids(batch, seqlen, cu_seqlens, x.device), self.num_slots, sequences)
        rows = buckets.sequence * self.num_slots + buckets.memory  # each bucket's row of a [B, num_slots] state
        if use_cache and state is None:
            state = self.fresh_state(batch, x)
        new_state: dict[str, Any] = {"conv": {}} if state is not None else {}

        q = self._conv("q", buckets.gather(self.q_proj(x)), buckets, rows, state, new_state)
        k = self._conv("k", by_memory(self, "k_proj", x, buckets), buckets, rows, state, new_state)
        v = self._conv("v", by_memory(self, "v_proj", x, buckets), buckets, rows, state, new_state)
        q, k, v = heads(q, self.head_k_dim), heads(k, self.head_k_dim), heads(v, self.head_v_dim)
        if self.kind.normalize_qk:
            q, k = l2norm(q), l2norm(k)
        out, memory = self.kind.run(self, q, k, v, x, buckets, rows,
                                    None if state is None else state["memory"], state is not None)
        o = buckets.combine(out, weights)
        gate = None if self.g_proj is None else heads(self.g_proj(x), self.head_v_dim)
        y = self.o_proj(normed_output(self.o_norm, o, gate).flatten(-2))
        if not use_cache:
            return y, None
        return y, {"memory": memory, "conv": new_state["conv"]}
