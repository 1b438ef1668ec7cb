"""The built-in offline task (`data.source=arithmetic`): arithmetic questions generated from a seed, each with its
answer, scored by the verifiable reward. A mix that starts low for a 135 M instruct model and leaves room to learn:
one-digit addition and multiplication, two-digit addition and subtraction (negative answers too), and one-step word
problems. Rows: {"prompt": the question, "answer": the integer, "kind": which of the five forms}.
"""

from __future__ import annotations

import random

KINDS = ("add1", "mul1", "add2", "sub2", "word")
SUFFIX = " Answer with the number only."
_NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Ivy", "Max", "Zoe")
_THINGS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles")


def question(kind: str, rng: random.Random) -> tuple[str, int]:
    """One question of `kind` and its answer."""
    if kind == "add1":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", a + b
    if kind == "mul1":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} * {b}?", a * b
    if kind == "add2":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", a + b
    if kind == "sub2":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} - {b}?", a - b
    if kind == "word":
        who, what = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        if rng.random() < 0.5:
            return f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        a = max(a, b + 1)
        return f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have left?", a - b
    raise ValueError(f"unknown arithmetic kind {kind!r}: allowed {' | '.join(KINDS)}")


def generate(n: int, seed: int) -> list[dict]:
    """n distinct questions (kinds in turn, a fixed order for a seed); the same n and seed give the same rows, and a
    larger n extends a smaller one's list."""
    rng = random.Random(f"arithmetic-{seed}")
    rows, seen = [], set()
    tries = 0
    while len(rows) < n:
        kind = KINDS[tries % len(KINDS)]
        tries += 1
        q, answer = question(kind, rng)
        if q in seen:
            if tries > 50 * (n + 10):
                raise ValueError(f"only {len(rows)} distinct arithmetic questions for {n}")
            continue
        seen.add(q)
        rows.append({"prompt": q + SUFFIX, "answer": answer, "kind": kind})
    return rows
