"""Packing documents into fixed-length rows and handing them out resumably.

Documents are tokenised, each followed by EOS, concatenated and cut into rows of ``seq_len``
tokens. ``starts`` marks the positions where a document begins, so a row (or a batch flattened
into one row) yields ``cu_seqlens`` for document-masked training.

The loader's whole state is one integer, ``position`` = global micro-batches consumed: the order
is a function of (seed, epoch), and rank ``r`` of ``W`` reads its slice of each global batch, so
a resumed run continues with exactly the rows an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from transformers import PreTrainedTokenizerBase

from memlm.train.config import ConfigError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    starts: torch.Tensor  # [B, T] bool: a document begins here

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch as one row with ``cu_seqlens`` and labels that never cross a document boundary."""
        ids = self.input_ids.reshape(1, -1)
        starts = self.starts.reshape(-1).clone()
        starts[:: self.input_ids.shape[1]] = True  # every row starts a new segment
        bounds = torch.nonzero(starts).flatten()
        cu_seqlens = torch.cat([bounds, bounds.new_tensor([ids.shape[1]])]).to(torch.int32)
        labels = ids.clone()
        labels[0, starts] = -100  # the first token of a document is not predicted from the previous one
        return ids, cu_seqlens, labels


def _token_stream(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """``ids + [eos]`` per document, tokenised in batches for speed."""
    eos = tokenizer.eos_token_id
    docs = iter(documents)
    while chunk := list(islice(docs, 256)):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            yield ids + [eos]


def pack_rows(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Iterator[Batch]:
    """Yield single rows ``[1, seq_len]`` of concatenated documents (the tail that does not fill a row is dropped)."""
    buf: list[int] = []
    starts: list[bool] = []
    for ids in _token_stream(documents, tokenizer):
        buf.extend(ids)
        starts.extend([True] + [False] * (len(ids) - 1))
        while len(buf) >= seq_len:
            yield Batch(torch.tensor([buf[:seq_len]]), torch.tensor([starts[:seq_len]]))
            del buf[:seq_len], starts[:seq_len]


def pack(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Batch:
    """All rows at once: ``Batch`` of shape ``[N, seq_len]``."""
    rows = list(pack_rows(documents, tokenizer, seq_len))
    if not rows:
        raise ValueError(f"the corpus is shorter than one row of data.seq_len={seq_len} tokens")
    return Batch(torch.cat([r.input_ids for r in rows]), torch.cat([r.starts for r in rows]))


class ShuffledLoader:
    """Rows of an in-memory ``Batch``, in a fresh seeded permutation every epoch."""

    def __init__(self, data: Batch, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.data, self.mb, self.rank, self.world, self.seed = data, micro_batch_size, rank, world_size, seed
        self.global_batch = micro_batch_size * world_size
        if len(data.input_ids) < self.global_batch:
            raise ValueError(
                f"only {len(data.input_ids)} packed rows but one global micro-batch needs {self.global_batch} "
                "(training.micro_batch_size × processes): use more data or a smaller batch"
            )
        self.per_epoch = len(data.input_ids) // self.global_batch
        self.position = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(len(self.data.input_ids), generator=g)
        return self._perm

    def global_indices(self, position: int) -> torch.Tensor:
        """The rows of global micro-batch ``position`` (every process's, rank 0's first)."""
        epoch, i = divmod(position, self.per_epoch)
        return self._order(epoch)[i * self.global_batch: (i + 1) * self.global_batch]

    def next_batch(self) -> Batch:
        idx = self.global_indices(self.position)[self.rank * self.mb: (self.rank + 1) * self.mb]
        self.position += 1
        return Batch(self.data.input_ids[idx], self.data.starts[idx])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class StreamingLoader:
    """Rows packed on the fly from a document stream, in stream order; resuming skips consumed rows."""

    def __init__(self, documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 micro_batch_size: int, rank: int, world_size: int) -> None:
        self.mb, self.rank, self.world = micro_batch_size, rank, world_size
        self._rows = pack_rows(documents, tokenizer, seq_len)
        self._consumed = 0  # global micro-batches read from the stream
        self.position = 0

    def _advance(self) -> Batch:
        rows = list(islice(self._rows, self.mb * self.world))
        if len(rows) < self.mb * self.world:
            raise ConfigError(
                f"the data stream ended after {self._consumed} global micro-batches, before training.steps was "
                "reached: add data or lower training.steps"
            )
        self._consumed += 1
        mine = rows[self.rank * self.mb: (self.rank + 1) * self.mb]
        return Batch(torch.cat([r.input_ids for r in mine]), torch.cat([r.starts for r in mine]))

    def next_batch(self) -> Batch:
        while self._consumed < self.position:
            self._advance()
        batch = self._advance()
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
