"""Titans neural long-term memory as a token mixer (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663 §3).

Per head, an MLP memory ``M(x) = x + LN(W_L φ(… W_1 x))`` (depth ``L_M``, expansion, GELU) is
written online: ``S_t = η_t S_{t−1} − θ_t ∇‖M_{t−1}(k_t) − v_t‖²``, ``M_t = (1 − α_t) M_{t−1} + S_t``
(eqs. 13–14, chunked gradients: docs/design.md §3), and read ``y_t = M_t(q_t)`` (eq. 15).
``q, k, v`` are linear projections with a depthwise causal conv and SiLU, ``q, k`` ℓ2-normalised
per head; ``θ_t = max_lr · σ(x W_θ)``, ``η_t = σ(x W_η)``, ``α_t = σ(x W_α)`` per head and token, or
channel-wise (``gates: channel``: one per memory output unit, from rank-``gate_rank`` projections).
The values are RMS-normalised per head (``value_norm``, ours): the memory's output ``x + LN(·)``
has unit-scale entries whatever the input, so values at the projections' initial scale (entries
≈ 0.01) are targets the memory cannot fit; the inner error then stays at the size of the LayerNorm
output, and the tiny LMM's training gradients spiked (BENCHMARKS.md §5, "Training stability"). The
read goes through a gated RMSNorm and the output projection. ``num_persistent`` learned tokens are
written into the memory before each sequence (persistent memory, §3.3).

Stability safeguards (off by default): ``grad_clip`` clamps each token's error gradient, and
``max_state_norm`` caps the norm of every memory weight matrix (kernel hooks ``l2_clip`` and
``max_norm``; they run on the PyTorch path).

Ablations (Titans Table 5): ``momentum: false``, ``forget: false`` (no weight decay),
``depth: 1, residual: false, memory_norm: false`` (linear memory), ``short_conv: false``,
``num_persistent: 0``.

Miras (Behrouz et al. 2025, arXiv 2504.13173) choices are options of the same mixer: the attentional
bias (``bias``: l2, lp, huber, dot; Huber's threshold ``δ_t = softplus(x W_δ)``, one per token and head
switching on ‖e‖ as the paper's, or per coordinate with ``huber_switch: coordinate``), the retention
(``retention``: none, lq (the ℓq mirror map), lq_norm (the printed ℓq formula), softmax — with
the per-token decay α_t when ``forget``; ``lag_token`` for the paper's chunking), the learning algorithm
(``momentum``: GD with or without momentum; ``max_lr`` caps θ_t) and the memory structure (``depth``,
``expansion``; ``depth: 1`` is a matrix memory). ``moneta``, ``yaad`` and ``memora`` (``layers/miras.py``)
are presets of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import step
from memlm.kernels.deep_memory.mlp import ACTIVATIONS, memory_apply, weight_linear
from memlm.kernels.deep_memory.objectives import (
    BIASES,
    INVERSES,
    RETENTIONS,
    WEIGHT_STATE,
    check_hook_parameters,
    per_token_arguments,
)
from memlm.kernels.deep_memory.spec import MemorySpec
from memlm.layers.conv import ShortConvolution
from memlm.layers.gates import GateProjection
from memlm.layers.mixer import Mixer, cat_rows
from memlm.layers.norm import GatedRMSNorm
from memlm.layers.registry import register_mixer

Gates = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # θ, η, α, δ
# safeguard option: (kernel hook it sets, the plain choice it replaces, hook name, hook parameter)
SAFEGUARDS = {
    "grad_clip": ("bias", "l2", "l2_clip", "max_norm"),
    "max_state_norm": ("retention", "none", "max_norm", "c"),
}


class MemoryParameters:
    """What one deep memory owns besides its q/k/v projections: the gate projections θ, η, α (δ), the
    memory's start weights, their initialisation and the kernel call. Mixed into :class:`NeuralMemory`
    and into each memory of a Mixture-of-Memories over the deep memory (``layers/mom_memories.py``);
    the owner sets ``opts``, ``spec``, ``num_heads`` and ``head_dim`` first."""

    opts: Any
    spec: MemorySpec
    num_heads: int
    head_dim: int

    def build_memory(self, hidden_size: int) -> None:
        """``lr_proj``, ``momentum_proj``, ``forget_proj``, ``delta_proj`` (absent ones None) and
        ``memory_weights``, one ``[H, d_in, d_out]`` per memory layer."""
        opts = self.opts
        dims = [self.head_dim] + [opts.expansion * self.head_dim] * (opts.depth - 1) + [self.head_dim]
        channel = opts.gates == "channel"

        def gate(channels: int) -> GateProjection:
            return GateProjection(hidden_size, self.num_heads, channels if channel else None, opts.gate_rank)

        self.lr_proj = gate(sum(dims[1:]))
        self.momentum_proj = gate(sum(dims[1:])) if opts.momentum else None
        self.forget_proj = gate(sum(dims[1:])) if opts.forget else None
        uses_delta = "delta" in per_token_arguments(BIASES[self.spec.bias])
        coordinate = opts.huber_switch == "coordinate"
        self.delta_proj = (
            GateProjection(hidden_size, self.num_heads, self.head_dim if coordinate else None, opts.gate_rank)
            if uses_delta else None
        )
        self.memory_weights = nn.ParameterList(
            nn.Parameter(torch.zeros(self.num_heads, a, b)) for a, b in zip(dims, dims[1:])
        )

    def init_memory(self, init: Any) -> None:
        """Memory weights ``W = R(A)`` ~ N(0, 1/d_in), the first layer ~ N(0, 1) with ``unit_key_init`` (the keys
        are unit vectors, so that its pre-activations have unit variance and the memory's LayerNorm does not
        amplify the inner gradient tenfold: docs/design.md §4.2); the state ``A`` drawn so (the identity, or
        ``A = R⁻¹(W)`` for the ℓq mirror map); softmax logits ~ N(0, 1) so that the hidden units differ; θ starts at
        max_lr/2, η ≈ 0.88, α ≈ 0.018; Huber's δ on the norm at 2√d, above a fresh memory's error norm (≈ √(2d)
        for unit-RMS values and outputs), so that tokens start in the ℓ2 branch and the ℓ1 branch takes the
        outliers (at √d most tokens took the ℓ1 branch, whose Sign(e) passes no gradient to the values, and
        Yaad did not learn MQAR: docs/design.md §4.2); 1 per coordinate."""
        simplex = self.spec.retention in WEIGHT_STATE  # logits A of W = c·Softmax(A): spread them
        for layer, w in enumerate(self.memory_weights):
            unit = simplex or (layer == 0 and self.opts.unit_key_init)
            init.normal_(w, mean=0.0, std=1.0 if unit else 1.0 / math.sqrt(w.shape[1]))
            if self.spec.retention in INVERSES:  # transformers' copy_ skips a loaded tensor, like its normal_
                state = INVERSES[self.spec.retention](w.detach(), **(self.spec.retention_params or {}))
                with torch.no_grad():
                    getattr(init, "copy_", torch.Tensor.copy_)(w, state)
        init.zeros_(self.lr_proj.bias)
        if self.momentum_proj is not None:
            init.constant_(self.momentum_proj.bias, 2.0)
        if self.forget_proj is not None:
            init.constant_(self.forget_proj.bias, -4.0)
        if self.delta_proj is not None:
            target = 1.0 if self.opts.huber_switch == "coordinate" else 2 * math.sqrt(self.head_dim)
            init.constant_(self.delta_proj.bias, math.log(math.expm1(target)))  # softplus⁻¹(target)

    def gates(self, x: torch.Tensor) -> Gates:
        """``θ = max_lr · σ(x W_θ)``, ``η = σ(x W_η)``, ``α = σ(x W_α)``, ``δ = softplus(x W_δ)`` (absent ones
        None), ``[B, T, H]`` or channel-wise ``[B, T, H, C]`` (δ ``[B, T, H, d]`` per coordinate)."""
        lr = self.opts.max_lr * torch.sigmoid(self.lr_proj(x))
        eta = torch.sigmoid(self.momentum_proj(x)) if self.momentum_proj is not None else None
        alpha = torch.sigmoid(self.forget_proj(x)) if self.forget_proj is not None else None
        delta = F.softplus(self.delta_proj(x)) if self.delta_proj is not None else None
        return lr, eta, alpha, delta

    def start_weights(self) -> list[torch.Tensor]:
        """The weights a fresh memory starts from: the parameters, or ``R(A)`` for retentions whose state is
        the weights (Memora's simplex), so they stay on the simplex whatever the optimiser does."""
        weights = list(self.memory_weights)
        if self.spec.retention in WEIGHT_STATE:
            weights = [self.spec.mirror()(w) for w in weights]
        return weights

    def write_read(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: Gates,
        memory: tuple[list[torch.Tensor], list[torch.Tensor] | None],
        want_state: bool,
        cu_seqlens: torch.Tensor | None = None,
        states_every: int | None = None,
    ) -> Any:
        """The memory recurrence over ``[B, T, H, d]`` from ``memory = (W, S)``: reads after writes. Returns
        ``(o, final state or None)``, and with ``states_every`` also the states at those segment ends
        (``deep_memory``'s ``output_states_every``)."""
        dtype = q.dtype
        weights = [w.to(dtype) for w in memory[0]]
        momentum = [s.to(dtype) for s in memory[1]] if memory[1] is not None else None
        lr, eta, alpha, delta = (g.to(dtype) if g is not None else None for g in gates)
        return deep_memory(
            q, k, v, lr, eta, alpha, weights, self.spec, delta=delta, initial_momentum=momentum,
            output_final_state=want_state, cu_seqlens=cu_seqlens, output_states_every=states_every,
            backend=self.opts.backend,
        )


def per_document(memory: tuple[list[torch.Tensor], list[torch.Tensor] | None], cu_seqlens: torch.Tensor | None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """With packed documents, one copy of the (shared) start state ``(W, S)`` per document."""
    if cu_seqlens is None:
        return memory
    n = cu_seqlens.numel() - 1
    return ([w[:1].expand(n, *w.shape[1:]) for w in memory[0]],
            None if memory[1] is None else [s[:1].expand(n, *s.shape[1:]) for s in memory[1]])


@register_mixer("titans_memory")
class NeuralMemory(MemoryParameters, Mixer):
    @dataclass
    class Options:
        num_heads: int | None = None  # default: config.num_heads
        head_dim: int | None = None  # default: hidden_size // num_heads
        depth: int = 2  # L_M: layers of the memory MLP
        expansion: int = 4  # hidden width = expansion × head_dim
        activation: str = "gelu"
        residual: bool = True  # M(x) = x + ...
        memory_norm: bool = True  # LayerNorm (no affine) on the MLP output
        value_norm: bool = True  # RMS-normalise v per head: targets on the scale of the LayerNorm output
        unit_key_init: bool = False  # first memory layer ~ N(0, 1), not N(0, 1/d): the keys are unit vectors
        chunk_size: int = 16  # b: tokens whose gradients share the chunk-start weights
        max_lr: float = 1.0  # θ_t = max_lr · σ(·)
        momentum: bool = True  # surprise momentum η_t (false: η = 0)
        forget: bool = True  # weight decay α_t (false: α = 0)
        short_conv: bool = True
        conv_size: int = 4
        num_persistent: int = 0  # learned tokens written into the memory before each sequence
        grad_clip: float | None = None  # safeguard: clamp each token's ‖∂ℓ/∂M(k)‖ (bias "l2_clip")
        max_state_norm: float | None = None  # safeguard: cap each weight matrix's norm (retention "max_norm")
        bias: str = "l2"  # attentional bias (Miras): l2 | lp | huber | dot
        bias_params: dict | None = None  # e.g. {p: 3} for lp
        retention: str = "none"  # retention map (Miras): none | lq_norm | softmax
        retention_params: dict | None = None  # e.g. {q: 4} for lq_norm, {c: 1} for softmax
        gates: str = "head"  # θ, η, α: one per head ("head") or per memory output unit ("channel")
        huber_switch: str = "norm"  # Huber's δ_t: one per token and head on ‖e‖ ("norm"), or per coordinate
        lag_token: bool = False  # Miras' chunking: the exact step at a chunk's first token (MemorySpec.lag_token)
        gate_rank: int = 32  # rank of the channel-wise gate projections
        backend: str = "auto"  # kernel backend: auto | naive | torch | triton

        def validate(self) -> None:
            for name in ("depth", "expansion", "chunk_size", "conv_size"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
            if self.max_lr <= 0:
                raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
            if self.num_persistent < 0:
                raise ValueError(f"num_persistent must be >= 0, got {self.num_persistent}")
            for name in ("grad_clip", "max_state_norm"):
                if getattr(self, name) is not None and getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)}")
            self._validate_miras()
            if self.backend not in ("auto", "naive", "torch", "triton"):
                raise ValueError(f"backend must be one of ['auto', 'naive', 'torch', 'triton'], got {self.backend!r}")

        def _validate_miras(self) -> None:
            """Known choices with valid parameters, and no two options claiming the same kernel hook."""
            choices = {"bias": (self.bias, BIASES), "retention": (self.retention, RETENTIONS)}
            for kind, (name, table) in choices.items():
                public = sorted(n for n in table if n not in {hook for _, _, hook, _ in SAFEGUARDS.values()})
                if name not in public:
                    raise ValueError(f"{kind} must be one of {public}, got {name!r}")
                check_hook_parameters(kind, name, getattr(self, f"{kind}_params"))
            for safeguard, (kind, plain, _, _) in SAFEGUARDS.items():
                if getattr(self, safeguard) is not None and getattr(self, kind) != plain:
                    raise ValueError(
                        f"{safeguard} is the {kind} {SAFEGUARDS[safeguard][2]!r} and replaces {kind}={plain!r}; "
                        f"it cannot be combined with {kind}={getattr(self, kind)!r} (set one of them)"
                    )
            if self.gates not in ("head", "channel"):
                raise ValueError(f"gates must be one of ['channel', 'head'], got {self.gates!r}")
            if self.huber_switch not in ("norm", "coordinate"):
                raise ValueError(f"huber_switch must be one of ['coordinate', 'norm'], got {self.huber_switch!r}")
            if self.gate_rank < 1:
                raise ValueError(f"gate_rank must be >= 1, got {self.gate_rank}")

        def hooks(self) -> dict[str, Any]:
            """The kernel's (bias, retention) hooks and parameters these options select."""
            hooks = {"bias": self.bias, "bias_params": self.bias_params,
                     "retention": self.retention, "retention_params": self.retention_params}
            for safeguard, (kind, _, name, param) in SAFEGUARDS.items():
                if getattr(self, safeguard) is not None:
                    hooks.update({kind: name, f"{kind}_params": {param: getattr(self, safeguard)}})
            return hooks

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.opts = opts
        self.hooks = opts.hooks()
        self.spec = MemorySpec(chunk_size=opts.chunk_size, activation=opts.activation, residual=opts.residual,
                               norm=opts.memory_norm, lag_token=opts.lag_token, **self.hooks)  # as the kernels take it
        self.num_heads = opts.num_heads or config.num_heads
        if opts.head_dim is None and hidden_size % self.num_heads:
            raise ValueError(f"titans_memory: hidden_size={hidden_size} is not divisible by num_heads={self.num_heads}")
        self.head_dim = opts.head_dim or hidden_size // self.num_heads
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        if opts.short_conv:
            self.q_conv1d = ShortConvolution(inner, opts.conv_size)
            self.k_conv1d = ShortConvolution(inner, opts.conv_size)
            self.v_conv1d = ShortConvolution(inner, opts.conv_size)
        self.build_memory(hidden_size)
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        if opts.num_persistent:
            self.persistent_tokens = nn.Parameter(torch.zeros(opts.num_persistent, hidden_size))

    def init_weights(self, init: Any, std: float) -> None:
        """The memory's parameters (:meth:`MemoryParameters.init_memory`); persistent tokens ~ N(0, std²)."""
        self.init_memory(init)
        if self.opts.num_persistent:
            init.normal_(self.persistent_tokens, mean=0.0, std=std)

    def memory_state_size(self) -> int:
        """The memory ``(W, S)`` and the convolution tails: what a period-start state holds (MAC's)."""
        per_layer = sum(w[0].numel() for w in self.memory_weights)
        momentum = per_layer if self.opts.momentum else 0
        conv = 3 * (self.opts.conv_size - 1) * self.num_heads * self.head_dim if self.opts.short_conv else 0
        return self.num_heads * (per_layer + momentum) + conv

    def state_size(self, seq_len: int) -> int:
        """The decoding carry: the memory, and the weights the last token read with and the chunk's gradients
        are taken at (``kernels/deep_memory/step.py``)."""
        return self.memory_state_size() + 2 * self.num_heads * sum(w[0].numel() for w in self.memory_weights)

    # --- the pieces (MAC reuses them on two streams) ------------------------------------------
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.num_heads, self.head_dim)

    def project_queries(
        self, x: torch.Tensor, conv: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q_t = ℓ2norm(SiLU(conv(x W_Q)))`` per head, and the conv history after ``x``."""
        q, conv = self._conv("q", self.q_proj(x), conv, cu_seqlens)
        return F.normalize(self._heads(q), dim=-1), conv

    def project(
        self, x: torch.Tensor, convs: tuple[torch.Tensor | None, ...], cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Gates, tuple[torch.Tensor | None, ...]]:
        """``q, k, v`` ``[B, T, H, d]`` (q, k ℓ2-normalised), gates ``(θ, η, α, δ)`` ``[B, T, H]`` (or
        channel-wise ``[B, T, H, C]``, δ ``[B, T, H, d]``; absent ones None), conv histories."""
        q, cq = self.project_queries(x, convs[0], cu_seqlens)
        k, ck = self._conv("k", self.k_proj(x), convs[1], cu_seqlens)
        v, cv = self._conv("v", self.v_proj(x), convs[2], cu_seqlens)
        v = self._heads(v)
        if self.opts.value_norm:
            v = F.rms_norm(v, (self.head_dim,), eps=1e-6)
        return q, F.normalize(self._heads(k), dim=-1), v, self.gates(x), (cq, ck, cv)

    def _conv(
        self, name: str, t: torch.Tensor, history: torch.Tensor | None, cu_seqlens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.opts.short_conv:
            return F.silu(t), None
        return getattr(self, f"{name}_conv1d")(t, history, use_cache=cu_seqlens is None, cu_seqlens=cu_seqlens)

    def read(self, q: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """``M_W(q)`` without writing (``q`` ``[B, T, H, d]``, the exchanged state shared or per batch; read
        through the retention map like the kernel: ``R(A)``, or the weights themselves for retentions
        whose state is exchanged as the weights)."""
        qh = q.transpose(1, 2)  # [B, H, T, d]
        weights = [w.to(q.dtype) for w in weights]
        if self.spec.retention not in WEIGHT_STATE:  # the state handed around is A, the memory computes with R(A)
            weights = [self.spec.mirror()(w) for w in weights]
        out, _ = memory_apply(qh, weight_linear(weights), len(weights), self.spec)
        return out.transpose(1, 2)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm per head (gate from ``x``), then the output projection."""
        o = self.o_norm(o, self._heads(self.g_proj(x)))
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def initial_memory(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``(W, S)`` a fresh sequence starts from, one per batch row (a decoding state is batch-first:
        beam search reorders its rows): the learned weights, after the persistent tokens. For
        retentions whose state is the weights (Memora's simplex) the parameters are ``A`` and the
        weights ``R(A)``, so they stay on the simplex whatever the optimiser does."""
        weights = self.start_weights()
        if not self.opts.num_persistent:
            return [w.expand(batch, *w.shape) for w in weights], None
        p = self.persistent_tokens[None]
        q, k, v, gates, _ = self.project(p, (None, None, None))
        _, (w, s) = self.write_read(q, k, v, gates, (weights, None), want_state=True)
        return [t.expand(batch, *t.shape[1:]) for t in w], [t.expand(batch, *t.shape[1:]) for t in s]

    # --- the mixer --------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, base: dict[str, Any], want_state: bool, cu_seqlens=None):
        q, k, v, gates, convs = self.project(x, base["conv"], cu_seqlens)
        memory = per_document((base["weights"], base["momentum"]), cu_seqlens)
        o, final = self.write_read(q, k, v, gates, memory, want_state, cu_seqlens)
        new_base = {"conv": convs, "weights": final[0], "momentum": final[1]} if want_state else None
        return self.output(o, x), new_base

    def _initial_base(self, batch: int) -> dict[str, Any]:
        weights, momentum = self.initial_memory(batch)
        return {"conv": (None, None, None), "weights": weights, "momentum": momentum}

    def forward(
        self,
        x: torch.Tensor,
        state: dict[str, Any] | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cu_seqlens is not None:
            if state is not None or use_cache:
                raise ValueError("titans_memory: cu_seqlens (packed documents) cannot be combined with a cache")
            return self._run(x, self._initial_base(1), False, cu_seqlens)[0], None
        if state is None and not use_cache:
            return self._run(x, self._initial_base(x.shape[0]), False)[0], None
        y, state = self._decode(x, state)
        return y, state if use_cache else None

    def stack_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows at their own places in their chunks: one carry with a position per row (``step.stack``)."""
        carry = step.stack([step.Carry(**s["carry"]) for s in states], self.spec)
        return {"conv": cat_rows([s["conv"] for s in states]), "carry": dict(vars(carry))}

    def _decode(self, x: torch.Tensor, state: dict[str, Any] | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """With a decoding state ``{"conv", "carry"}``: the tokens that finish the current chunk and those after the
        last whole chunk advance the carry one at a time (``deep_memory_step``, O(1) each); whole chunks from a
        chunk start run through the chunked op. The same outputs as one parallel pass (docs/design.md §3)."""
        B, T = x.shape[:2]
        chunk = self.opts.chunk_size
        if state is None:
            weights, momentum = self.initial_memory(B)
            state = {"conv": (None, None, None), "carry": dict(vars(step.start(weights, momentum, self.spec, B)))}
        conv, carry = state["conv"], step.Carry(**state["carry"])
        if isinstance(carry.position, torch.Tensor):  # rows at their own places: every token steps
            head, full = T, 0
        else:
            head = min(T, (chunk - carry.position) % chunk)
            full = (T - head) // chunk * chunk
        outputs = []
        for lo, hi in ((0, head), (head, head + full), (head + full, T)):
            if lo == hi:
                continue
            xs = x[:, lo:hi]
            q, k, v, gates, conv = self.project(xs, conv)
            lr, eta, alpha, delta = (g.to(q.dtype) if g is not None else None for g in gates)
            if full and lo == head:  # whole chunks from a chunk start: the chunked op
                weights, momentum = step.exchanged(carry, self.spec)
                o, (weights, momentum) = self.write_read(q, k, v, gates, (weights, momentum), True)
                carry = step.start(weights, momentum, self.spec, B)
            else:
                if carry.A[0].dtype != q.dtype:
                    carry = step.Carry(*([t.to(q.dtype) for t in part] if isinstance(part, list) else part
                                         for part in vars(carry).values()))
                o = step.deep_memory_step(q, k, v, lr, eta, alpha, carry, self.spec, delta=delta)
            outputs.append(self.output(o, xs))
        return torch.cat(outputs, dim=1), {"conv": conv, "carry": dict(vars(carry))}
