"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", §3 and App. E.1).

A sequence of length ``T`` starts with ``N`` key-value pairs ``k_1 v_1 … k_N v_N``; keys
are drawn from ``[1, V/2)`` and values from ``[V/2, V)``, both without replacement within a
sequence. The remaining ``T - 2N`` positions form ``(T - 2N) / 2`` two-token slots; key
``k_i`` is repeated as a query at the start of slot ``g_i``, the gaps ``g`` being drawn
without replacement with ``P(g) ∝ (g + 1)^(a - 1)`` (``a = power_a``; ``a = 1`` is
uniform, small ``a`` favours short gaps). Every other position is noise (a uniform random
token when ``random_non_queries``, else 0). The target at a query position is its value
(next-token prediction); every other target is ``IGNORE_INDEX``. Accuracy is the mean over
query positions of ``argmax logits == target``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
_SPLITS = {"train": 0, "test": 1}
_ROWS_PER_CHUNK_ELEMS = 1 << 22  # bound on the Gumbel scratch matrix (rows × candidates)


@dataclass(frozen=True)
class MQARData:
    """``inputs`` and ``targets`` are ``[num_examples, seq_len]`` int64 tensors."""

    inputs: torch.Tensor
    targets: torch.Tensor
    vocab_size: int
    num_kv_pairs: int

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _check_mqar_args(vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float,
                     num_examples: int) -> None:
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                        ("num_kv_pairs", num_kv_pairs), ("num_examples", num_examples)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (query slots are two tokens), got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs must satisfy 4 * num_kv_pairs <= seq_len (one query slot per pair), "
            f"got num_kv_pairs={num_kv_pairs}, seq_len={seq_len}"
        )
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"num_kv_pairs must be <= vocab_size // 2 - 1 (distinct keys in [1, V/2)), "
            f"got num_kv_pairs={num_kv_pairs}, vocab_size={vocab_size}"
        )
    if not np.isfinite(power_a) or power_a <= 0:
        raise ValueError(f"power_a must be a finite number > 0 (1.0 = uniform gaps), got {power_a!r}")


def gap_distribution(num_slots: int, power_a: float) -> np.ndarray:
    """``P(g) ∝ (g + 1)^(power_a - 1)`` over the query slots ``g = 0 … num_slots - 1``."""
    w = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return w / w.sum()


def _sample_without_replacement(rng: np.random.Generator, log_w: np.ndarray, rows: int, k: int) -> np.ndarray:
    """``rows`` independent draws of ``k`` distinct indices, in draw order, with successive
    probabilities ∝ ``exp(log_w)`` (Gumbel top-k: the ``k`` largest ``log_w + Gumbel`` in
    descending order have exactly the law of sequential sampling without replacement)."""
    n = log_w.shape[0]
    out = np.empty((rows, k), dtype=np.int64)
    step = max(1, _ROWS_PER_CHUNK_ELEMS // n)
    for start in range(0, rows, step):
        m = min(step, rows - start)
        score = log_w - np.log(-np.log(rng.random((m, n))))
        top = np.argpartition(-score, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1)
        out[start:start + m] = np.take_along_axis(top, order, axis=1)
    return out


def generate_mqar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    power_a: float = 0.01,
    seed: int = 0,
    split: str = "train",
    random_non_queries: bool = True,
) -> MQARData:
    """Draw ``num_examples`` MQAR sequences (module docstring); deterministic in all arguments.

    The random stream is ``SeedSequence([seed, split, seq_len, num_kv_pairs])``, so the train
    and test splits, and every ``(seq_len, num_kv_pairs)`` setting, use disjoint streams.
    """
    _check_mqar_args(vocab_size, seq_len, num_kv_pairs, power_a, num_examples)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], seq_len, num_kv_pairs]))
    half = vocab_size // 2
    n, ctx = num_examples, 2 * num_kv_pairs
    keys = 1 + _sample_without_replacement(rng, np.zeros(half - 1), n, num_kv_pairs)
    values = half + _sample_without_replacement(rng, np.zeros(vocab_size - half), n, num_kv_pairs)
    num_slots = (seq_len - ctx) // 2
    gaps = _sample_without_replacement(rng, np.log(gap_distribution(num_slots, power_a)), n, num_kv_pairs)

    inputs = np.zeros((n, seq_len), dtype=np.int64)
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    query_pos = ctx + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(targets, query_pos, values, axis=1)
    if random_non_queries:
        noise = np.ones((n, seq_len), dtype=bool)
        noise[:, :ctx] = False
        np.put_along_axis(noise, query_pos, False, axis=1)
        inputs[noise] = rng.integers(0, vocab_size, size=int(noise.sum()))
    return MQARData(torch.from_numpy(inputs), torch.from_numpy(targets), vocab_size, num_kv_pairs)


def drop_overlap(test: MQARData, train: MQARData) -> MQARData:
    """``test`` without the rows that also occur in ``train`` (possible only at tiny vocabularies)."""
    if test.seq_len != train.seq_len:
        return test
    seen = {row.tobytes() for row in train.inputs.numpy()}
    keep = torch.tensor([row.tobytes() not in seen for row in test.inputs.numpy()], dtype=torch.bool)
    if bool(keep.all()):
        return test
    return MQARData(test.inputs[keep], test.targets[keep], test.vocab_size, test.num_kv_pairs)


def mqar_train_test(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_train: int,
    num_test: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> tuple[MQARData, MQARData]:
    """Train and test sets from disjoint streams, test rows that also occur in train dropped."""
    args = (vocab_size, seq_len, num_kv_pairs)
    train = generate_mqar(*args, num_train, power_a, seed, "train", random_non_queries)
    test = generate_mqar(*args, num_test, power_a, seed, "test", random_non_queries)
    return train, drop_overlap(test, train)


def recall_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` over the query positions (``targets != IGNORE_INDEX``)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits must be [B, T, V] with [B, T] = targets.shape {list(targets.shape)}, "
                         f"got {list(logits.shape)}")
    mask = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & mask
    return int(correct.sum()), int(mask.sum())
