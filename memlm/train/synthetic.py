"""Offline text sources besides the standard library's Python: English prose that ships with the
interpreter (``pydoc_data``, the language reference's topics) and arithmetic word problems generated
with their worked answers (a GSM8K-shaped task: ``Question: … Answer: … #### n``)."""

from __future__ import annotations

import random
import re

NAMES = ("Ada", "Ben", "Chloe", "Dev", "Emil", "Farah", "Goro", "Hana", "Ivan", "Jun", "Kemal", "Lea")
ITEMS = ("apples", "marbles", "books", "stamps", "coins", "pencils", "shells", "cards", "tickets", "beads")


def prose_documents() -> list[str]:
    """The paragraphs of ``pydoc_data.topics`` (the reference manual's prose, about 465k characters)."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]))
    return [p for p in paragraphs if len(p) > 40]


def _problem(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    x, y, z = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    if kind == 0:
        q = f"{a} has {x} {item}. {b} gives {a} {y} more. How many {item} does {a} have now?"
        work, n = f"{a} has {x} + {y} = {x + y} {item}.", x + y
    elif kind == 1:
        x = x + y
        q = f"{a} has {x} {item} and gives {y} of them to {b}. How many {item} does {a} have left?"
        work, n = f"{a} has {x} - {y} = {x - y} {item} left.", x - y
    elif kind == 2:
        q = f"{a} buys {z} boxes of {item} with {y} {item} in each box. How many {item} does {a} buy?"
        work, n = f"{a} buys {z} * {y} = {z * y} {item}.", z * y
    else:
        q = (f"{a} has {x} {item}. {a} buys {z} packs of {y} {item} and then gives {b} half of all of them, "
             f"rounded down. How many {item} does {a} keep?")
        total = x + z * y
        n = total - total // 2
        work = (f"{a} buys {z} * {y} = {z * y} {item}, so {a} has {x} + {z * y} = {total}. {a} gives away "
                f"{total} // 2 = {total // 2} and keeps {total} - {total // 2} = {n}.")
    return f"Question: {q}\nAnswer: {work}\n#### {n}"


def arithmetic_documents(count: int, seed: int) -> list[str]:
    """``count`` word problems with worked answers, the same for one ``seed``."""
    rng = random.Random(f"arithmetic/{seed}")
    return [_problem(rng) for _ in range(count)]
