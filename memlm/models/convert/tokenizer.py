"""The one tokenizer loader of memlm: a checkpoint's own tokenizer (folder or Hub id), a
``tokenizer.json`` or SentencePiece ``.model`` file, else the Mistral-7B v1 SentencePiece tokenizer
(32k) that fla-hub and the m-a-p models use, shipped by the ``mistral_common`` package and wrapped
by transformers' ``MistralCommonBackend`` (so no network is needed)."""

from __future__ import annotations

import shutil
import tempfile
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
    path_or_id: str | Path | None = None, revision: str | None = None, *, fallback: bool = True
) -> PreTrainedTokenizerBase:
    """A tokenizer from

    - a ``tokenizer.json`` file (``PreTrainedTokenizerFast``);
    - a SentencePiece ``.model`` file, e.g. the Mistral v1 tokenizer of the released fla models
      (loaded as a Llama tokenizer that prepends BOS, as those models expect);
    - a checkpoint folder or Hub id: with ``fallback`` (the default) its tokenizer files when it
      has any, else — and when no checkpoint is given — the offline Mistral v1 tokenizer; without
      ``fallback`` ``AutoTokenizer`` (an ``OSError`` when there is no tokenizer there).
    """
    if path_or_id is None:
        if not fallback:
            raise ValueError("no tokenizer given, and fallback=False")
        return mistral_v1_tokenizer()
    path = Path(path_or_id)
    if path.is_file() and path.suffix == ".json":
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_file() and (path.suffix == ".model" or path.name.startswith("tokenizer.model")):
        from transformers import LlamaTokenizer

        # transformers reads a bare SentencePiece model only as ``tokenizer.model`` inside a folder
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, Path(tmp) / "tokenizer.model")
            return LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, legacy=False)
    if not fallback:
        return AutoTokenizer.from_pretrained(str(path_or_id), revision=revision)
    root = resolve(path_or_id, revision)
    if any((root / name).is_file() for name in TOKENIZER_MARKERS):
        return AutoTokenizer.from_pretrained(root)
    return mistral_v1_tokenizer()
