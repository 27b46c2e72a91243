"""The b×b coefficient matrices of one chunk of deep-memory updates (DESIGN.md §3).

Inside a chunk (positions 1..b) every gradient ``u_i`` is taken at the chunk-start
weights ``W_0``, so momentum, decay and learning rate reduce to scalars per (t, i):

* ``S_t = m_t S_0 − Σ_{i≤t} n_{t,i} u_i`` with ``m_t = ∏_{j≤t} η_j``,
  ``n_{t,i} = θ_i ∏_{j=i+1..t} η_j``;
* ``W_t = β_t W_0 + d_t S_0 − Σ_{i≤t} G_{t,i} u_i`` with ``β_t = ∏_{j≤t} (1 − α_j)``,
  ``d_t = Σ_{j≤t} R_{t,j} m_j``, ``G = R N`` and ``R_{t,j} = ∏_{l=j+1..t} (1 − α_l)``.

Products are taken directly (cumulative products, not differences of cumulative logs), so
η = 0 and α = 1 are exact in value and gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkCoefficients(NamedTuple):
    """Per-chunk coefficients, leading dims ``[..., n_chunks]``."""

    beta: torch.Tensor  # [..., b]     β_t
    d: torch.Tensor  # [..., b]        d_t
    G: torch.Tensor  # [..., b, b]     G_{t,i}
    m: torch.Tensor  # [..., b]        m_t
    n: torch.Tensor  # [..., b, b]     n_{t,i}


def segment_products(a: torch.Tensor) -> torch.Tensor:
    """``P[..., t, i] = ∏_{j=i+1..t} a_j`` for ``i ≤ t`` (1 on the diagonal), 0 above it.

    ``a: [..., b]``. A reversed cumulative product over the row ``A[t, j] = a_j (j ≤ t), 1
    (j > t)``; its backward is exact when some ``a_j = 0``.
    """
    b = a.shape[-1]
    lower = torch.ones(b, b, dtype=torch.bool, device=a.device).tril()
    rows = torch.where(lower, a.unsqueeze(-2), torch.ones((), dtype=a.dtype, device=a.device))
    from_i = rows.flip(-1).cumprod(-1).flip(-1)  # ∏_{j=i..t} a_j
    ones = torch.ones_like(from_i[..., :1])
    return torch.cat([from_i[..., 1:], ones], dim=-1).masked_fill(~lower, 0)


def chunk_coefficients(theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor) -> ChunkCoefficients:
    """β, d, G, m, n of DESIGN.md §3 from the gates ``θ, η, α: [..., b]`` of each chunk."""
    N = theta.unsqueeze(-2) * segment_products(eta)
    R = segment_products(1 - alpha)
    m = eta.cumprod(-1)
    beta = (1 - alpha).cumprod(-1)
    d = (R @ m.unsqueeze(-1)).squeeze(-1)
    return ChunkCoefficients(beta=beta, d=d, G=R @ N, m=m, n=N)
