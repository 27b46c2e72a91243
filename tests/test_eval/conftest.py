"""Tiny offline tokenizer and models shared by the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memlm.eval.needle.haystack import NOISE, stdlib_prose
from memlm.models import MemLMConfig, MemLMForCausalLM

EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 512) trained in a second on the probe templates and some prose."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    templates = [
        "A special magic number is hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the number afterwards. What is the special magic number for mentioned in the "
        "provided text? The special magic number for mentioned in the provided text is One of the "
        "special magic numbers for",
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there. The pass key is. Remember it. What is "
        "the pass key?",
    ]
    texts = [NOISE] * 20 + templates * 20 + list(stdlib_prose(min_chars=20_000)) + ["0123456789 abcdef-"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


@pytest.fixture(scope="session")
def memlm_model(tokenizer: PreTrainedTokenizerFast) -> MemLMForCausalLM:
    torch.manual_seed(0)
    cfg = MemLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_heads=2,
                      max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id)
    return MemLMForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def llama_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A plain transformers decoder: the "any HF causal LM" case."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, memlm_model: MemLMForCausalLM,
                   tokenizer: PreTrainedTokenizerFast) -> Path:
    """The tiny memlm model and its tokenizer saved as an HF checkpoint folder."""
    path = tmp_path_factory.mktemp("ckpt")
    memlm_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
