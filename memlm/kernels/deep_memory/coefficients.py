"""The b×b coefficient matrices of one chunk of deep-memory updates (docs/design.md §3).

Inside a chunk (positions 1..b) every gradient ``u_i`` is taken at the chunk-start
weights ``W_0``, so momentum, decay and learning rate reduce to scalars per (t, i):

* ``S_t = m_t S_0 − Σ_{i≤t} n_{t,i} u_i`` with ``m_t = ∏_{j≤t} η_j``,
  ``n_{t,i} = θ_i ∏_{j=i+1..t} η_j``;
* ``W_t = β_t W_0 + d_t S_0 − Σ_{i≤t} G_{t,i} u_i`` with ``β_t = ∏_{j≤t} (1 − α_j)``,
  ``d_t = Σ_{j≤t} R_{t,j} m_j``, ``G = R N`` and ``R_{t,j} = ∏_{l=j+1..t} (1 − α_l)``.

All five follow from one first-order recurrence over the rows t (with ``m_0 = β_0 = 1``,
``d_0 = 0``, ``n_0 = G_0 = 0`` and ``e_t`` the t-th unit row):

* ``n_t = η_t n_{t−1} + θ_t e_t``, ``G_t = (1 − α_t) G_{t−1} + n_t``;
* ``m_t = η_t m_{t−1}``, ``β_t = (1 − α_t) β_{t−1}``, ``d_t = (1 − α_t) d_{t−1} + m_t``.

Only products and sums appear (no logs, no divisions), so η = 0 and α = 1 are exact in value and
gradient. Each step touches one ``[..., b]`` row; only the reads need every row (``β, d, G``), the
chunk-end state needs the closing row of all five. Leading dims are free: with channel-wise gates
they hold a channel axis (``G: [..., C, b, b]``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkCoefficients(NamedTuple):
    """The coefficients of every row t of each chunk (the reads ``W_t``)."""

    beta: torch.Tensor  # [..., b]     β_t
    d: torch.Tensor  # [..., b]        d_t
    G: torch.Tensor  # [..., b, b]     G_{t,i}


class ClosingRows(NamedTuple):
    """The coefficients of the row that closes each chunk (the chunk-end state ``W_b``, ``S_b``)."""

    beta: torch.Tensor  # [...]        β_b
    d: torch.Tensor  # [...]           d_b
    m: torch.Tensor  # [...]           m_b
    G: torch.Tensor  # [..., b]        G_{b,i}
    n: torch.Tensor  # [..., b]        n_{b,i}


def chunk_coefficients(
    theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, live: torch.Tensor
) -> tuple[ChunkCoefficients, ClosingRows]:
    """β, d, G of every row and β, d, m, G, n of the closing row (docs/design.md §3) from the gates
    ``θ, η, α: [..., b]`` of each chunk, by the row recurrence of the module docstring.

    ``live: [..., b]`` (bool) is True for a token and False for padding past the end of its sequence.
    A padding row changes nothing (it is read as θ = α = 0, η = 1 and adds nothing to G and d), so the
    closing row is the sequence's last token, and a chunk without tokens closes with the identity
    β = m = 1, d = G = n = 0."""
    theta, alpha, eta = theta.where(live, 0), alpha.where(live, 0), eta.where(live, 1)
    live = live.to(theta.dtype)
    m = beta = torch.ones_like(theta[..., 0])
    d = torch.zeros_like(m)
    n = G = torch.zeros_like(theta)
    scalars, rows = [], []
    unit = torch.eye(theta.shape[-1], dtype=theta.dtype, device=theta.device)  # e_t
    steps = (unit, theta.unbind(-1), eta.unbind(-1), (1 - alpha).unbind(-1), live.unbind(-1))
    for e_t, theta_t, eta_t, keep_t, live_t in zip(*steps):
        n = torch.addcmul(theta_t[..., None] * e_t, eta_t[..., None], n)
        G = torch.addcmul(live_t[..., None] * n, keep_t[..., None], G)
        m, beta = eta_t * m, keep_t * beta
        d = torch.addcmul(live_t * m, keep_t, d)
        scalars.append((beta, d))
        rows.append(G)
    every = ChunkCoefficients(*(torch.stack(t, -1) for t in zip(*scalars)), G=torch.stack(rows, -2))
    return every, ClosingRows(beta=beta, d=d, m=m, G=G, n=n)
