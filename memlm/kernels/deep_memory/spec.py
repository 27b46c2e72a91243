"""What a deep memory is and how it learns: the options every path of the op takes, in one record.

The memory's shape (depth ``L`` and the widths ``d_l``) is not part of it: the weights carry it
(``weights[l]: [..., d_{l−1}, d_l]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .objectives import Bias, Retention, bias_hook, retention_hook


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    """The deep memory of Titans (arXiv 2501.00663) with the Miras hooks (arXiv 2504.13173).

    * ``chunk_size``: tokens whose gradients are all taken at the chunk-start weights (1: online GD);
    * ``activation`` (φ, a key of ``ACTIVATIONS``), ``residual``, ``norm``: the memory
      ``M(x) = x + LN(h_L)`` with ``h_l = φ(h_{l−1} W_l)`` and no φ after ``W_L``, the residual and the
      affine-free LayerNorm each optional;
    * ``bias`` (a key of ``BIASES``) and its scalar ``bias_params``: the attentional bias ψ;
    * ``retention`` (a key of ``RETENTIONS``) and its scalar ``retention_params``: the map ``W = R(A)``;
    * ``lag_token``: where a chunk takes the map exactly. False: gradients at the chunk-start weights and
      the exact ``R(A)`` read at the chunk's last token; True (Miras §5, Memora's "lag token"): the
      chunk's first token takes an exact step from the chunk start and is read through ``R(A)``, the
      others take their gradients at the weights after it and are read linearised (see ``naive``).

    The public op checks the values (names, parameter ranges); the paths take them as checked.
    """

    chunk_size: int = 16
    activation: str = "gelu"
    residual: bool = True
    norm: bool = True
    bias: str = "l2"
    bias_params: Mapping[str, float] | None = None
    retention: str = "none"
    retention_params: Mapping[str, float] | None = None
    lag_token: bool = False

    def psi(self) -> Bias:
        """ψ of the bias with its parameters bound (:func:`.objectives.bias_hook`)."""
        return bias_hook(self.bias, self.bias_params)

    def mirror(self) -> Retention:
        """The retention map ``W = R(A)`` with its parameters bound (:func:`.objectives.retention_hook`)."""
        return retention_hook(self.retention, self.retention_params)
