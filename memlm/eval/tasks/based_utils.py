"""Prompts and the ``contains`` score of the Based / JRT recall tasks (Arora et al. 2024,
"Simple linear attention language models balance the recall-throughput tradeoff", §6.2; and
"Just read twice", 2024): zero-shot, the document followed by the question, greedy generation
up to a newline or 48 tokens; score 1 when any gold answer occurs in the output
(case-insensitive)."""

from __future__ import annotations

import re
from typing import Any

from memlm.eval.scoring import contains_answer

_TRIVIAQA_MARKERS = re.compile(r"\[PAR\]|\[DOC\]|\[TLE\]")


def _document_then_question(context: str, question: str) -> str:
    """The context with any trailing copy of the question removed, then the question."""
    context, question = context.strip(), question.strip()
    while question and context.lower().endswith(question.lower()):
        context = context[: -len(question)].rstrip()
    return context.strip(".") + ". " + question


def doc_to_text(doc: dict[str, Any]) -> str:
    return _document_then_question(doc["context"], doc["question"])


def triviaqa_doc_to_text(doc: dict[str, Any]) -> str:
    return _document_then_question(_TRIVIAQA_MARKERS.sub("", doc["context"]), doc["question"])


def doc_to_target(doc: dict[str, Any]) -> str:
    answers = doc["answers"]
    return " " + (answers[0] if answers else "unanswerable")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"contains": float(any(contains_answer(results[0], a) for a in doc["answers"]))}
