"""Pieces shared by the recurrent mixers (GDN, DeltaNet, GLA, RetNet, HGRN, HGRN2, Mamba2).

Each such mixer carries the decoding state ``(memory, conv_states, seen)``: the recurrent
memory (``[B, H, K, V]`` for a matrix memory, ``[B, D]`` for HGRN), a dict of the short
convolutions' last inputs and the number of tokens consumed (RetNet's rotary offset).
Names, shapes and defaults of the parameters follow flash-linear-attention 0.6, so its
checkpoints load unchanged (see ``memlm/models/convert``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.kernels import linear_memory
from memlm.layers.conv import ShortConvolution
from memlm.layers.mixer import Mixer, cat_rows
from memlm.layers.norm import GatedRMSNorm

LinearState = tuple[Any, dict[str, torch.Tensor], int]


def _elu_p1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _sqrelu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# Feature maps / gate activations by fla's names ("elu" is DeltaNet's elu + 1).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "sigmoid": torch.sigmoid,
    "sqrelu": _sqrelu, "elu": _elu_p1, "identity": _identity,
}


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive(**values: float | None) -> None:
    """Raise ``ValueError`` for any given value that is not None and not > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive (or null for the default), got {value!r}")


def check_lower_bound(value: float | None) -> None:
    """HGRN's ``lower_bound`` option (the initial γ) must be null or in (0, 1)."""
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"lower_bound must lie in (0, 1) or be null (no lower bound), got {value}")


def integral(name: str, value: float) -> int:
    """``value`` as an int, or ``ValueError`` when a width like ``hidden_size · expand_k`` is fractional."""
    if not math.isclose(value, round(value)) or round(value) < 1:
        raise ValueError(f"{name} must come out a positive integer, got {value}")
    return round(value)


def divide(name: str, total: int, parts: int) -> int:
    """``total / parts`` when exact, else ``ValueError`` naming the quantity."""
    if parts < 1 or total % parts:
        raise ValueError(f"{name}: {total} is not divisible by {parts}")
    return total // parts


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(‖x‖² + eps)`` over the last dim (fla's in-kernel q/k normalisation)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H·d]`` → ``[B, T, H, d]``."""
    return x.unflatten(-1, (-1, head_dim))


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped heads ``[B, T, H, d]`` → ``[B, T, H·groups, d]``, head h serving heads h·g … h·g+g−1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


class LowerBound(nn.Module):
    """HGRN's lower bound γ ∈ (0, 1) of the forget gate, learned per channel as ``γ = σ(logit)``.

    The forget gate becomes ``f_t = γ + (1 − γ) σ(f̃_t)`` (Qin et al. 2023, eq. 5), computed in log space.
    """

    def __init__(self, width: int, initial: float) -> None:
        super().__init__()
        check_lower_bound(initial)
        self.initial = initial
        self.logit = nn.Parameter(torch.full((width,), math.log(initial) - math.log1p(-initial)))

    def init_weights(self, init: Any, std: float) -> None:
        init.constant_(self.logit, math.log(self.initial) - math.log1p(-self.initial))

    def forward(self, log_f: torch.Tensor) -> torch.Tensor:
        """``log(γ + (1 − γ) exp(log_f))`` from the unbounded log-forget ``log_f``."""
        b = self.logit.float()
        return torch.logaddexp(F.logsigmoid(b), F.logsigmoid(-b) + log_f)


def log_forget(f: torch.Tensor, bound: LowerBound | None) -> torch.Tensor:
    """HGRN / HGRN2 forget gate in log space: ``log σ(f)``, lower-bounded when ``bound`` is set."""
    log_f = F.logsigmoid(f.float())
    return log_f if bound is None else bound(log_f)


def normed_output(norm: nn.Module, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Per-head output norm: gated (``RMSNorm(o) ⊙ w ⊙ act(gate)``) or plain RMSNorm."""
    return norm(o, gate) if isinstance(norm, GatedRMSNorm) else norm(o)


def init_decay_rates(init: Any, A_log: torch.Tensor, dt_bias: torch.Tensor, A_low: float, A_high: float,
                     dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """Mamba2's init of the decay ``exp(−exp(A_log) · softplus(· + dt_bias))``: ``A ~ U(A_low, A_high)``,
    ``dt_bias = softplus⁻¹(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` (floored)."""
    init.copy_(A_log, torch.empty_like(A_log).uniform_(A_low, A_high).log())
    log_dt = torch.empty_like(dt_bias).uniform_(math.log(dt_min), math.log(dt_max))
    dt = log_dt.exp().clamp(min=floor)
    init.copy_(dt_bias, dt + torch.log(-torch.expm1(-dt)))


@dataclass
class GateRecurrenceOptions:
    """Options shared by HGRN and HGRN2 (fla ``HGRNAttention`` / ``HGRN2Attention``)."""

    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    norm_eps: float | None = None  # default: config.norm_eps
    lower_bound: float | None = None  # initial forget-gate lower bound γ in (0, 1); null: none

    def validate(self) -> None:
        check_positive(conv_size=self.conv_size, norm_eps=self.norm_eps)
        check_lower_bound(self.lower_bound)


def make_convs(owner: nn.Module, widths: dict[str, int], use_conv: bool, size: int, bias: bool,
               activations: dict[str, str | None]) -> None:
    """Attach ``{name}_conv1d`` short convolutions (or None) to ``owner``."""
    for name, width in widths.items():
        conv = ShortConvolution(width, size, bias=bias, activation=activations[name]) if use_conv else None
        setattr(owner, f"{name}_conv1d", conv)


class MixerCall:
    """One call of a recurrent mixer: the incoming memory, the short convolutions (continuing from
    their cached inputs and collecting new ones), the position offset and the packing."""

    def __init__(self, state: LinearState | None, use_cache: bool, cu_seqlens: torch.Tensor | None) -> None:
        self.memory, self.conv_states, self.seen = state if state is not None else (None, {}, 0)
        self.use_cache, self.cu_seqlens = use_cache, cu_seqlens
        self.new_conv_states: dict[str, torch.Tensor] = {}

    def conv(self, name: str, conv: ShortConvolution | None, x: torch.Tensor,
             fallback: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
        """``conv(x)`` continuing from the cached inputs, or ``fallback(x)`` without a convolution."""
        if conv is None:
            return fallback(x)
        y, state = conv(x, self.conv_states.get(name), self.use_cache, self.cu_seqlens)
        if self.use_cache:
            self.new_conv_states[name] = state
        return y

    def linear_memory(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **decay: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear memory (``memlm.kernels.linear_memory``) from this call's memory, over its packing."""
        return linear_memory(q, k, v, **decay, initial_state=self.memory, output_final_state=self.use_cache,
                             cu_seqlens=self.cu_seqlens)


class LinearMixer(Mixer):
    """Base of the recurrent mixers: the state ``(memory, conv_states, seen)``, packed-document checks
    and ``state_size``. Subclasses implement :meth:`mix` and set ``memory_numel`` (memory elements
    per sequence) in ``__init__``.
    """

    memory_numel: int = 0

    @abstractmethod
    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, Any]:
        """``y`` ``[B, T, D]`` for ``x`` ``[B, T, D]`` and the memory after the last token (for the cache)."""

    def forward(
        self,
        x: torch.Tensor,
        state: LinearState | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LinearState | None]:
        if cu_seqlens is not None and (state is not None or use_cache):
            raise ValueError(f"{self.mixer_name}: cu_seqlens (packed documents) cannot be combined with a "
                             "decoding cache")
        call = MixerCall(state, use_cache, cu_seqlens)
        y, memory = self.mix(x, call)
        return y, ((memory, call.new_conv_states, call.seen + x.shape[1]) if use_cache else None)

    def stack_states(self, states: list[LinearState]) -> LinearState:
        """The rows concatenated; rows of different lengths keep their own ``seen`` (a ``[B]`` tensor)."""
        seen = [s[2] for s in states]
        counts = seen[0] if len(set(seen)) == 1 else torch.tensor(seen)
        return cat_rows([s[0] for s in states]), cat_rows([s[1] for s in states]), counts

    def state_size(self, seq_len: int) -> int:
        convs = sum((m.kernel_size[0] - 1) * m.in_channels for m in self.modules()
                    if isinstance(m, ShortConvolution))
        return self.memory_numel + convs


@dataclass
class MultiHeadOptions:
    """Options shared by GLA and RetNet (fla ``GatedLinearAttention`` / ``MultiScaleRetention``)."""

    num_heads: int | None = None  # default: config.num_heads
    num_kv_heads: int | None = None  # grouped key/value heads; default num_heads
    expand_k: float = 1.0  # key width = hidden_size · expand_k
    expand_v: float = 1.0  # value width = hidden_size · expand_v
    feature_map: str | None = None  # activation on q and k: relu | sigmoid | silu | swish | sqrelu
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = True
    gate_fn: str = "swish"  # output gate activation
    norm_eps: float | None = None  # default: config.norm_eps

    def validate(self) -> None:
        check_positive(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, expand_k=self.expand_k,
                       expand_v=self.expand_v, conv_size=self.conv_size, norm_eps=self.norm_eps)
        check_choice("feature_map", self.feature_map, (None, "relu", "sigmoid", "silu", "swish", "sqrelu"))
        check_choice("gate_fn", self.gate_fn, ("swish", "silu", "sigmoid", "relu"))


class MultiHeadLinearAttention(LinearMixer):
    """The GLA / RetNet skeleton: grouped q/k/v projections (optional short conv + SiLU), a
    feature map, a decay supplied by the subclass (:meth:`decay`), the linear memory

        S_t = D_t S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t / √d_k,

    and the output gate ``o_proj(RMSNorm(o_t) ⊙ gate_fn(g_proj(x_t)))`` per head.
    """

    def __init__(self, hidden_size: int, config: Any, opts: MultiHeadOptions) -> None:
        super().__init__()
        name = self.mixer_name
        self.num_heads = opts.num_heads or config.num_heads
        self.num_kv_heads = opts.num_kv_heads or self.num_heads
        self.groups = divide(f"{name}: num_heads / num_kv_heads", self.num_heads, self.num_kv_heads)
        key_dim = integral(f"{name}: hidden_size * expand_k", hidden_size * opts.expand_k)
        value_dim = integral(f"{name}: hidden_size * expand_v", hidden_size * opts.expand_v)
        self.head_k_dim = divide(f"{name}: key dim / num_heads", key_dim, self.num_heads)
        self.head_v_dim = divide(f"{name}: value dim / num_heads", value_dim, self.num_heads)
        self.feature_map, self.gate_fn = opts.feature_map, opts.gate_fn
        self.memory_numel = self.num_heads * self.head_k_dim * self.head_v_dim
        kv_key, kv_value = key_dim // self.groups, value_dim // self.groups

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_key, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_value, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if opts.use_output_gate else None
        make_convs(self, {"q": key_dim, "k": kv_key, "v": kv_value}, opts.use_short_conv, opts.conv_size,
                   opts.conv_bias, {"q": "silu", "k": "silu", "v": "silu"})
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        eps = opts.norm_eps or config.norm_eps
        if opts.use_output_gate and opts.gate_fn == "swish":
            self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=eps)
        else:
            self.g_norm = nn.RMSNorm(self.head_v_dim, eps=eps)

    @abstractmethod
    def decay(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, call: MixerCall
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(q, k, decay)``: q, k ``[B, T, H(kv), K]`` possibly transformed, and ``{"g": ...}``
        (``[B, T, H]``) or ``{"gk": ...}`` (``[B, T, H, K]``) log-decays for the memory."""

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, Any]:
        q = heads(call.conv("q", self.q_conv1d, self.q_proj(x)), self.head_k_dim)
        k = heads(call.conv("k", self.k_conv1d, self.k_proj(x)), self.head_k_dim)
        v = heads(call.conv("v", self.v_conv1d, self.v_proj(x)), self.head_v_dim)
        if self.feature_map is not None:
            q, k = ACTIVATIONS[self.feature_map](q), ACTIVATIONS[self.feature_map](k)
        q, k, decay = self.decay(x, q, k, call)
        o, memory = call.linear_memory(q, repeat_heads(k, self.groups), repeat_heads(v, self.groups), **decay)
        if self.g_proj is not None and self.gate_fn == "swish":
            o = self.g_norm_swish_gate(o, heads(self.g_proj(x), self.head_v_dim)).flatten(-2)
        else:
            o = self.g_norm(o).flatten(-2)
            if self.g_proj is not None:
                o = o * ACTIVATIONS[self.gate_fn](self.g_proj(x))
        return self.o_proj(o), memory
