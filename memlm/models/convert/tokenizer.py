"""The tokenizer of a checkpoint: the one saved beside it, else the Mistral-7B v1 SentencePiece
tokenizer (32k) that fla-hub and the m-a-p models use, shipped by the ``mistral_common`` package
and wrapped by transformers' ``MistralCommonBackend`` (so no network is needed)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from memlm.models.convert.files import resolve

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def mistral_v1_tokenizer() -> PreTrainedTokenizerBase:
    """Mistral-7B v1's tokenizer (BOS id 1, EOS id 2) from ``mistral_common/data/tokenizer.model.v1``."""
    import mistral_common
    from transformers.tokenization_mistral_common import MistralCommonBackend

    return MistralCommonBackend(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


def load_tokenizer(
    path_or_id: str | Path | None = None, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer files in the checkpoint ``path_or_id`` (directory or Hub id), or — when it has
    none, or no checkpoint is given — the offline Mistral v1 tokenizer."""
    if path_or_id is not None:
        root = resolve(path_or_id, revision)
        if any((root / name).is_file() for name in TOKENIZER_MARKERS):
            return AutoTokenizer.from_pretrained(root)
    return mistral_v1_tokenizer()
