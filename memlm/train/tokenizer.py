"""Tokenizers: load an HF tokenizer (:func:`memlm.models.convert.tokenizer.load_tokenizer`, checked
for training), or train a byte-level BPE on the training text in seconds."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from memlm.models.convert.tokenizer import load_tokenizer
from memlm.train.config import ConfigError

EOS = "<|endoftext|>"


def train_bpe(documents: Iterable[str], vocab_size: int, max_documents: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) with one special token, ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(islice(documents, max_documents), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None)


def load_training_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """``tokenizer.path`` (an HF folder or hub id, no fallback), with a ``ConfigError`` naming the key
    when it cannot be loaded or has no eos token."""
    try:
        tokenizer = load_tokenizer(path, fallback=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer.path={path!r} could not be loaded: {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer.path={path!r} has no eos token; documents need a separator when packed")
    return tokenizer


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer must not emit ids the model's embedding cannot hold."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab_size}: set model.vocab_size "
            f">= {len(tokenizer)} (or null to take the tokenizer's size)"
        )
