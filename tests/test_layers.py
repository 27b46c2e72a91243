"""Shared layer pieces: short convolution (parallel == conv1d == step-by-step, packed documents),
gated RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.layers.conv import ShortConvolution
from memlm.layers.norm import GatedRMSNorm


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_short_conv_equals_conv1d_and_decoding(bias: bool, activation: str | None) -> None:
    conv = ShortConvolution(6, 4, bias=bias, activation=activation)
    x = torch.randn(2, 11, 6)
    y, _ = conv(x)
    ref = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=6)[..., :11].transpose(1, 2)
    ref = F.silu(ref) if activation else ref
    torch.testing.assert_close(y, ref)
    state, steps = None, []
    for t in range(11):
        out, state = conv(x[:, t: t + 1], state, use_cache=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), ref)
    head, state = conv(x[:, :5], use_cache=True)
    tail, _ = conv(x[:, 5:], state)
    torch.testing.assert_close(torch.cat([head, tail], 1), ref)


def test_short_conv_packed_documents_do_not_mix() -> None:
    conv = ShortConvolution(4, 4)
    x = torch.randn(1, 10, 4)
    packed, _ = conv(x, cu_seqlens=torch.tensor([0, 2, 7, 10]))
    separate = torch.cat([conv(x[:, a:b])[0] for a, b in ((0, 2), (2, 7), (7, 10))], dim=1)
    torch.testing.assert_close(packed, separate)


def test_short_conv_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(4, 4, activation="relu")


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_gated_rmsnorm(activation: str) -> None:
    norm = GatedRMSNorm(8, eps=1e-6, activation=activation)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    gate = torch.sigmoid(g) if activation == "sigmoid" else g * torch.sigmoid(g)
    torch.testing.assert_close(norm(x, g), rms * norm.weight * gate)


def test_rotary_table_made_while_decoding_serves_training() -> None:
    """The cached cos/sin table is a normal tensor even when first made under ``torch.inference_mode``
    (decoding): a later training pass that saves it for the backward works."""
    from memlm.layers import rotary

    with torch.inference_mode():
        rotary.rotation(3, None, 0, 6, 1234.5, torch.device("cpu"))
    x = torch.randn(1, 3, 2, 6, requires_grad=True)
    y = rotary.apply_rotary(x, rotary.rotation(3, None, 0, 6, 1234.5, torch.device("cpu")))
    y.sum().backward()
    assert x.grad is not None and not rotary._table(3, 6, 1234.5, torch.device("cpu")).is_inference()
