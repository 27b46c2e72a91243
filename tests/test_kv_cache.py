"""Attention's growing key/value buffer (``memlm/layers/kv_cache.py``): decoding appends in place, and a state
decoded from twice (a branch) never sees the other branch's keys."""

from __future__ import annotations

import torch

from memlm.testing.models import VOCAB, build


def _cache_buffer(cache) -> torch.Tensor:
    return cache.states[0][0]


def test_steps_append_in_place_and_equal_the_parallel_pass() -> None:
    model = build("attention")
    ids = torch.randint(0, VOCAB, (2, 12))
    full = model(ids).logits
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        buffer, steps = _cache_buffer(out.cache), [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
            assert _cache_buffer(out.cache).data_ptr() == buffer.data_ptr()  # no copy of the cache
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_two_branches_from_one_state_are_independent() -> None:
    model = build("attention")
    prefix = torch.randint(0, VOCAB, (1, 6))
    a, b = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        shared = model(prefix, use_cache=True).cache
        states = {"a": shared, "b": shared}
        got = {"a": [], "b": []}
        for t in range(3):  # interleaved: a then b from the same buffer
            for name, ids in (("a", a), ("b", b)):
                cache = states[name] if t else _copy_refs(shared)
                out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
                got[name].append(out.logits)
                states[name] = out.cache
    for name, ids in (("a", a), ("b", b)):
        full = model(torch.cat([prefix, ids], 1)).logits[:, 6:]
        torch.testing.assert_close(torch.cat(got[name], 1), full, rtol=1e-5, atol=1e-5)


def _copy_refs(cache):
    """A second cache object holding the same layer states (the same buffers), as a user branching would."""
    import copy

    other = copy.copy(cache)
    other.states = list(cache.states)
    return other
