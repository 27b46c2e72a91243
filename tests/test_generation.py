"""Generation is part of the model contract: transformers' own ``generate()`` (greedy, sampling, beam
search, stopping, streaming, returned scores) computes what full forwards without any cache compute,
for every mixer spec in ``memlm.testing.models.CASES`` and for the models ``memlm.from_pretrained``
builds from flash-linear-attention checkpoints (``memlm.testing.fla_models.CASES``).

Lengths cross the periods the cases are sized around: Titans/MIRAS chunks of 3–4 tokens, MAC segments
of 6 (15 tokens in all span more than two), sliding windows of 3–5. Checks of a transformers feature
that does not depend on the mixer run on three representative cases (softmax attention, a linear
recurrence, a Titans memory).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextStreamer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

import memlm
from memlm.layers.mixer import RowStates
from memlm.models import MemLMForCausalLM
from memlm.testing import fla_models
from memlm.testing.models import CASES, VOCAB, build

REPRESENTATIVE = ["attention", "gated_deltanet", "titans-lmm"]
DTYPE = torch.float64
PAD = 0
TOTAL = 15  # prompt + new tokens: > 2 MAC segments (6), several chunks (3–4) and windows (3–5)


def model_for(case: str, dtype: torch.dtype = DTYPE) -> MemLMForCausalLM:
    """``build(case)`` with an untied head at ``initializer_range=0.1``: with the tiny default init and
    a tied head every greedy step repeats the last prompt token, which would make the greedy checks
    nearly vacuous. float64 by default: the deep memories amplify float32 rounding (batch vs single
    rows differ by up to ~1e-4 in yaad's logits), which could flip a near-tie between tokens or
    beams; in float64 generate's logits (which it casts to float32) match a full forward's to float32
    rounding, and every reference below casts the same way."""
    return build(case, tie_word_embeddings=False, initializer_range=0.1).to(dtype)


def prompts(batch: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model: MemLMForCausalLM, prompt: torch.Tensor, **kwargs: object):
    """``model.generate`` with an all-ones attention mask and an explicit pad id (without a mask
    transformers would infer one from the pad id)."""
    kwargs.setdefault("pad_token_id", PAD)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)


@torch.no_grad()
def greedy_reference(model: MemLMForCausalLM, prompt: torch.Tensor, new_tokens: int,
                     eos: int | None = None, pad: int = PAD) -> torch.Tensor:
    """Greedy decoding by a full forward (no cache) per step; with ``eos``, a finished row is
    continued with ``pad`` and decoding stops once every row has finished."""
    seq, done = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        nxt = model(seq).logits[:, -1].float().argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if done.all():
            break
    return seq


@torch.no_grad()
def beam_reference(model: MemLMForCausalLM, prompt: torch.Tensor, num_beams: int,
                   new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search by full forwards: per prompt, keep the ``num_beams`` best of every beam × token
    extension by summed log-probability. Returns the beams (best first, ``num_beams`` rows per prompt)
    and their summed log-probabilities."""
    sequences, scores = [], []
    for row in prompt:
        seq, score = row[None], torch.zeros(1)
        for _ in range(new_tokens):
            logp = F.log_softmax(model(seq).logits[:, -1].float(), dim=-1)
            vocab = logp.shape[-1]
            top = (score[:, None] + logp).flatten().topk(num_beams)
            seq = torch.cat([seq[top.indices // vocab], (top.indices % vocab)[:, None]], dim=1)
            score = top.values
        sequences.append(seq)
        scores.append(score)
    return torch.cat(sequences), torch.cat(scores)


@torch.no_grad()
def sequence_log_prob(model: MemLMForCausalLM, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Summed log-probability of the tokens after the prompt, from one full forward."""
    logp = F.log_softmax(model(sequences).logits.float(), dim=-1)[:, prompt_len - 1:-1]
    return logp.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1).sum(-1)


# ---- greedy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [1, 5, 7])
@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_equals_argmax_of_full_forward(case: str, prompt_len: int) -> None:
    """Greedy ``generate`` (prefill, then one token at a time through ``MemLMCache``) picks the argmax
    of a full forward at every step; prompts end before, inside and after the first period."""
    model = model_for(case)
    prompt = prompts(2, prompt_len)
    generated = generate(model, prompt, max_new_tokens=TOTAL - prompt_len, do_sample=False)
    assert generated.shape == (2, TOTAL)
    assert torch.equal(generated, greedy_reference(model, prompt, TOTAL - prompt_len))
    assert len(set(generated[:, prompt_len:].flatten().tolist())) > 4, "degenerate (repeating) continuation"


# ---- sampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_seeded_sampling_equals_multinomial_over_full_forward(case: str) -> None:
    """``do_sample`` draws ``torch.multinomial(softmax(logits / T), 1)`` from the global generator:
    the same seed replayed over full-forward logits draws the same tokens."""
    model, temperature, new_tokens = model_for(case), 0.7, 10
    prompt = prompts(2, 5)
    torch.manual_seed(1234)
    sampled = generate(model, prompt, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                       max_new_tokens=new_tokens)
    torch.manual_seed(1234)
    seq, off_argmax = prompt, 0
    with torch.no_grad():
        for _ in range(new_tokens):
            probs = F.softmax(model(seq).logits[:, -1].float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)
            off_argmax += int((nxt[:, 0] != probs.argmax(-1)).sum())
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(sampled, seq)
    assert off_argmax > 0, "every draw was the argmax: the sampling path was not exercised"


# ---- beam search ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [2, 7])
@pytest.mark.parametrize("case", CASES)
def test_beam_search_equals_full_forward_beam_search(case: str, prompt_len: int) -> None:
    """``num_beams=3`` reorders every layer's state with ``MemLMCache.reorder_cache`` after each step;
    the beams and scores equal a beam search over full forwards, and each returned score is the
    length-normalised log-probability of its sequence under one full forward. A 2-token prompt ends
    inside the first chunk/segment of every memory, so the first reorders act on start-of-sequence
    states; 7 tokens end past it."""
    model, beams, new_tokens = model_for(case), 3, 13 - prompt_len
    prompt = prompts(2, prompt_len)
    out = generate(model, prompt, num_beams=beams, num_return_sequences=beams, do_sample=False,
                   max_new_tokens=new_tokens, return_dict_in_generate=True, output_scores=True)
    expected, expected_scores = beam_reference(model, prompt, beams, new_tokens)
    assert torch.equal(out.sequences, expected)
    # length_penalty=1.0 (the default): a score is the summed log-probability / generated length
    torch.testing.assert_close(out.sequences_scores, expected_scores / new_tokens, rtol=1e-6, atol=1e-6)
    rescored = sequence_log_prob(model, out.sequences, prompt_len) / new_tokens
    torch.testing.assert_close(out.sequences_scores, rescored, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_generate_without_cache_equals_with_cache(case: str) -> None:
    """``use_cache=False`` (a full forward per step, no reordering) gives the same beams and greedy tokens."""
    model = model_for(case)
    prompt = prompts(2, 5)
    for kwargs in ({"num_beams": 3, "num_return_sequences": 3}, {}):
        runs = [generate(model, prompt, do_sample=False, max_new_tokens=8, use_cache=use_cache,
                         return_dict_in_generate=True, output_scores=True, **kwargs)
                for use_cache in (True, False)]
        assert torch.equal(runs[0].sequences, runs[1].sequences), kwargs
        if kwargs:
            torch.testing.assert_close(runs[0].sequences_scores, runs[1].sequences_scores, rtol=1e-6, atol=1e-6)
        assert runs[1].cache is None and runs[0].cache.get_seq_length() == 12, kwargs


# ---- lengths and stopping -------------------------------------------------------------------------

@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_max_length_and_max_new_tokens(case: str) -> None:
    model = model_for(case)
    prompt = prompts(2, 4)
    longest = generate(model, prompt, max_new_tokens=9, do_sample=False)
    assert longest.shape == (2, 13) and torch.equal(longest[:, :4], prompt)
    assert torch.equal(generate(model, prompt, max_length=9, do_sample=False), longest[:, :9])
    assert torch.equal(generate(model, prompt, max_new_tokens=1, do_sample=False), longest[:, :5])
    assert torch.equal(generate(model, prompt[:1], max_length=6, do_sample=False), longest[:1, :6])


@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_stops_at_eos_and_pads_finished_rows(case: str) -> None:
    """eos = a token greedy decoding produces mid-way: each row ends at its first eos and, in a
    batch, a row that finished first is continued with ``pad_token_id`` up to the longest row."""
    model, new_tokens, prompt_len = model_for(case), 12, 4
    prompt = prompts(2, prompt_len)
    free = greedy_reference(model, prompt, new_tokens)[:, prompt_len:].tolist()

    def first(row: list[int], token: int) -> int | None:
        return row.index(token) if token in row else None

    # the first token of row 0 (from step 2 on, new there) whose first use in row 1 is elsewhere
    eos = next(t for s, t in enumerate(free[0][:-1]) if s >= 2 and first(free[0], t) == s and first(free[1], t) != s)
    pad = 1 if eos == PAD else PAD
    stops = [first(row, eos) for row in free]
    out = generate(model, prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(out, greedy_reference(model, prompt, new_tokens, eos=eos, pad=pad))
    width = prompt_len + max(new_tokens - 1 if s is None else s for s in stops) + 1
    assert out.shape == (2, width)
    padded = 0
    for r, s in enumerate(stops):
        if s is not None:
            assert out[r, prompt_len + s] == eos and (out[r, prompt_len + s + 1:] == pad).all()
            padded += prompt_len + s + 1 < width
    assert padded == 1, "one row finishes first and is padded"
    alone = generate(model, prompt[:1], max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                     pad_token_id=pad)
    assert torch.equal(alone[0], out[0, : prompt_len + stops[0] + 1])


# ---- batching and returned scores -----------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_batch_equals_each_prompt_alone(case: str) -> None:
    """A batch of equal-length prompts generates what each prompt generates alone (tokens and logits)."""
    model = model_for(case)
    prompt = prompts(3, 5)
    kwargs = {"max_new_tokens": 9, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    batch = generate(model, prompt, **kwargs)
    for i in range(3):
        alone = generate(model, prompt[i: i + 1], **kwargs)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), f"row {i}"
        torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(batch.logits)[:, i],
                                   rtol=1e-6, atol=1e-6)


def left_padded(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of ``lengths`` tokens, left-padded with ``PAD`` to the longest, and their attention mask."""
    width = max(lengths)
    ids = prompts(len(lengths), width, seed=seed).clamp(min=1)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


PADDED_LENGTHS = [3, 7, 1, 5]  # unpadded, shorter than a chunk (3–4), a window (3–5) and a MAC segment (6)


@pytest.mark.parametrize("case", CASES)
def test_padded_batch_equals_each_prompt_alone(case: str) -> None:
    """Left-padded prompts of different lengths generate what each generates alone, tokens and logits:
    padding leaves every state as if it were absent."""
    model = model_for(case)
    ids, mask = left_padded(PADDED_LENGTHS)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, "return_dict_in_generate": True,
              "output_logits": True}
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    width = ids.shape[1]
    for i, n in enumerate(PADDED_LENGTHS):
        alone = generate(model, ids[i:i + 1, width - n:], **kwargs)
        assert torch.equal(alone.sequences[0, n:], batch.sequences[i, width:]), f"row {i} ({n} tokens)"
        torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(batch.logits)[:, i],
                                   rtol=1e-6, atol=1e-6)


PER_ROW = {"titans-mac", "mac-yaad", "mom-titans"} | {c for c in CASES if c.startswith("mc-")}


@pytest.mark.parametrize("case", CASES)
def test_padded_prefill_stacks_the_rows(case: str) -> None:
    """After a padded prefill the rows decode in one call per layer (attention right-aligned behind masked
    slots, recurrent states with a position per row) except where a period's place is more than a position:
    MAC's segments, Memory Caching's segments, MoM's deep-memory buckets, which decode row by row."""
    model = model_for(case)
    ids, mask = left_padded(PADDED_LENGTHS)
    states = model(ids, attention_mask=mask, use_cache=True).cache.states
    per_row = [isinstance(s, RowStates) for s in states]
    assert per_row == [case in PER_ROW] * len(states)


@pytest.mark.parametrize("case", CASES)
def test_padded_forward_equals_each_row_alone(case: str) -> None:
    """A padded batch without a cache (scoring) gives each row's logits alone at its tokens, and the loss
    counts only next-token pairs inside a row."""
    model = model_for(case)
    ids, mask = left_padded(PADDED_LENGTHS)
    width = ids.shape[1]
    out = model(ids, attention_mask=mask, labels=ids)
    losses, count = [], 0
    for i, n in enumerate(PADDED_LENGTHS):
        alone = model(ids[i:i + 1, width - n:], labels=ids[i:i + 1, width - n:])
        torch.testing.assert_close(out.logits[i, width - n:], alone.logits[0], rtol=1e-6, atol=1e-6)
        if n > 1:
            losses.append(alone.loss * (n - 1))
            count += n - 1
    torch.testing.assert_close(out.loss, sum(losses) / count)


@pytest.mark.parametrize("case", REPRESENTATIVE + ["titans-mac", "mc-titans-log-soup"])
def test_padded_beam_search_equals_each_prompt_alone(case: str) -> None:
    """Beam search reorders padded rows' states (stacked or kept per row) as it does unpadded ones."""
    model = model_for(case)
    ids, mask = left_padded([2, 6, 4])
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 3, "do_sample": False,
              "pad_token_id": PAD, "eos_token_id": None}
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    width = ids.shape[1]
    for i, n in enumerate([2, 6, 4]):
        alone = generate(model, ids[i:i + 1, width - n:], **kwargs)
        assert torch.equal(alone[:, n:], batch[3 * i:3 * i + 3, width:]), f"row {i}"


@pytest.mark.parametrize("case", CASES)
def test_returned_scores_and_logits_equal_full_forward(case: str) -> None:
    """``output_logits`` returns the raw logits of every step and ``output_scores`` the processed
    ones (here divided by the temperature): both equal a full forward over the returned sequence."""
    model, temperature, prompt_len, new_tokens = model_for(case), 0.5, 5, 10
    prompt = prompts(2, prompt_len)
    torch.manual_seed(7)
    out = generate(model, prompt, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                   max_new_tokens=new_tokens, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert out.sequences.shape == (2, prompt_len + new_tokens)
    assert len(out.scores) == len(out.logits) == new_tokens
    with torch.no_grad():
        full = model(out.sequences).logits[:, prompt_len - 1: -1].float()
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full / temperature, rtol=1e-6, atol=1e-6)


# ---- streaming ------------------------------------------------------------------------------------

def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the 61 model ids: words, punctuation and a newline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", *(f"w{i}" for i in range(1, VOCAB - 6)), ".", ",", "!", "?", "\n", "é"]
    assert len(words) == VOCAB
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended += 1


@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_streamers_see_the_generated_tokens(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A streamer gets the prompt, then each new token once, then ``end``; ``TextStreamer`` prints
    the decoded continuation."""
    model, tokenizer = model_for(case), word_tokenizer()
    prompt = prompts(1, 4)
    recorder = RecordingStreamer()
    out = generate(model, prompt, max_new_tokens=12, do_sample=False, streamer=recorder)
    assert recorder.chunks[0] == prompt[0].tolist() and all(len(c) == 1 for c in recorder.chunks[1:])
    assert sum(recorder.chunks, []) == out[0].tolist() and recorder.ended == 1
    capsys.readouterr()
    streamed = generate(model, prompt, max_new_tokens=12, do_sample=False,
                        streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert torch.equal(streamed, out)
    text = tokenizer.decode(out[0, 4:])
    assert text.strip()
    assert capsys.readouterr().out == text + "\n"


# ---- no warnings on the supported path ------------------------------------------------------------

@contextmanager
def transformers_warnings() -> Iterator[tuple[list[logging.LogRecord], list[warnings.WarningMessage]]]:
    """Collects the warnings transformers logs and every Python warning raised inside. The logger
    gets its own handler (transformers' root logger does not propagate, so caplog would miss it),
    at WARNING whatever verbosity was set, and ``warning_once``'s cache is cleared so a warning an
    earlier test already triggered shows up again."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    hf_logging.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0, "temperature": 0.8},
    "beam": {"do_sample": False, "num_beams": 3},
    "dict-scores": {"do_sample": False, "return_dict_in_generate": True, "output_scores": True,
                    "output_logits": True},
    "eos": {"do_sample": False, "eos_token_id": 3},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_generate_emits_no_warning(case: str, mode: str) -> None:
    """No deprecation (or any other) warning from transformers, logged or raised, on the supported path."""
    model = model_for(case)
    prompt = prompts(2, 5)
    with transformers_warnings() as (records, caught):
        generate(model, prompt, max_new_tokens=6, **MODES[mode])
    assert not [r.getMessage() for r in records]
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("attempt", [1, 2])
def test_warning_check_sees_transformers_deprecations(attempt: int) -> None:
    """The check above is live: a deprecated call (``generation_config`` together with generation
    kwargs, reported through ``warning_once``) is caught, also the second time."""
    model = model_for("attention")
    prompt = prompts(1, 3)
    with transformers_warnings() as (records, _):
        generate(model, prompt, generation_config=GenerationConfig(max_new_tokens=2), do_sample=False)
    assert any("deprecated" in r.getMessage() for r in records), attempt


# ---- models converted from flash-linear-attention checkpoints -------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """``converted(case)``: the memlm model ``memlm.from_pretrained`` builds from fla's checkpoint of
    ``case`` (written by fla's own classes; building them needs no kernel)."""
    models: dict[str, MemLMForCausalLM] = {}

    def load(case: str) -> MemLMForCausalLM:
        if case not in models:
            path: Path = tmp_path_factory.mktemp(f"fla-{case}")
            fla_models.fla_model(case).save_pretrained(path)
            models[case] = memlm.from_pretrained(path)
        return models[case]

    return load


fla_quiet = pytest.mark.filterwarnings("ignore:Triton is not supported")


@fla_quiet
@pytest.mark.parametrize("case", fla_models.CASES)
def test_converted_fla_greedy_equals_argmax_of_full_forward(case: str, converted) -> None:
    model = converted(case)
    eos = model.generation_config.eos_token_id
    prompt = prompts(2, 5, vocab=fla_models.VOCAB)
    generated = generate(model, prompt, max_new_tokens=10, do_sample=False, pad_token_id=eos)
    assert generated.shape[1] > 6
    assert torch.equal(generated, greedy_reference(model, prompt, 10, eos=eos, pad=eos))


@fla_quiet
@pytest.mark.parametrize("case", fla_models.CASES)
def test_converted_fla_batch_equals_each_prompt_alone(case: str, converted) -> None:
    model = converted(case)
    prompt = prompts(3, 5, vocab=fla_models.VOCAB, seed=2)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "return_dict_in_generate": True,
              "output_logits": True}
    batch = generate(model, prompt, **kwargs)
    assert batch.sequences.shape == (3, 13)
    for i in range(3):
        alone = generate(model, prompt[i: i + 1], **kwargs)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), f"row {i}"
        torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(batch.logits)[:, i],
                                   rtol=1e-5, atol=1e-5)
