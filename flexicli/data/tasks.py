"""A small built-in task suite in FlexiDepth's categories, used by `flexi eval` (scores, retention) and
`flexi patterns` (which tokens need depth). Deterministic: the same items every run, no network.

    load_tasks() -> list[Task]; Task.score(output_text) -> float in [0, 1]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CATEGORIES = ("copy", "repetition", "summarisation", "continuation", "addition", "multiplication", "factual_qa")

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected in the northern valleys tomorrow morning.",
    "She packed two books, a lamp and a small green notebook.",
    "Every student must hand in the report before Friday.",
    "The museum opens at nine and closes at five.",
    "Our train left the station twenty minutes late.",
]
_PASSAGES = [
    ("The city council met on Monday to discuss the new park. After a long debate, members voted to build it "
     "next to the river, with a playground, a small lake and walking paths. Work will start in spring.",
     "The council voted to build a new park by the river, starting in spring."),
    ("Maria trained for months to run her first marathon. On race day it was hot, but she kept a steady pace, "
     "drank water at every station and finished in just under four hours.",
     "Maria ran her first marathon in under four hours despite the heat."),
    ("The company released a phone with a larger battery and a better camera. Early reviews praise the battery "
     "life but say the price is too high for most buyers.",
     "A new phone has a better battery and camera, but reviewers find it expensive."),
]
_CONTINUATIONS = [
    ("Once upon a time, in a small village by the sea, there lived", "an old fisherman who"),
    ("The three primary colours are red, yellow and", "blue"),
    ("To make a cup of tea, first boil the", "water"),
    ("The days of the week are Monday, Tuesday, Wednesday,", "Thursday, Friday"),
]
_FACTS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "7|seven"), ("What planet do we live on?", "Earth"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What colour is the sky on a clear day?", "blue"),
    ("What is frozen water called?", "ice"), ("How many legs does a spider have?", "8|eight"),
]
_WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger"]
# Tokens to generate per category: room for a good answer, no more (generation is the slow part of eval).
NEW_TOKENS = {"copy": 32, "repetition": 24, "summarisation": 40, "continuation": 16, "addition": 8,
              "multiplication": 8, "factual_qa": 16}


@dataclass(frozen=True)
class Task:
    category: str
    prompt: str  # the user's message (goes through the chat template)
    answer: str  # reference; for "contains" scoring, alternatives separated by "|"
    scoring: str  # "contains" | "exact_start" | "f1"

    @property
    def max_new_tokens(self) -> int:
        return NEW_TOKENS[self.category]

    def score(self, output: str) -> float:
        out = output.strip()
        if self.scoring == "contains":
            return float(any(re.search(rf"\b{re.escape(a)}\b", out, re.IGNORECASE) for a in self.answer.split("|")))
        if self.scoring == "exact_start":
            return float(_norm(out).startswith(_norm(self.answer)))
        return unigram_f1(out, self.answer)


def _norm(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.lower()))


def unigram_f1(prediction: str, reference: str) -> float:
    p, r = _norm(prediction).split(), _norm(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(r))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def load_tasks(categories=None, per_category: int | None = None, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    items: list[Task] = []
    items += [Task("copy", f"Repeat this sentence exactly, and nothing else: {s}", s, "exact_start") for s in _SENTENCES]
    for w in _WORDS:
        n = rng.randint(3, 5)
        items.append(Task("repetition", f"Write the word '{w}' {n} times, separated by spaces, and nothing else.",
                          " ".join([w] * n), "exact_start"))
    items += [Task("summarisation", f"Summarise in one sentence: {p}", ref, "f1") for p, ref in _PASSAGES]
    items += [Task("continuation", f"Continue this text: {p}", ref, "f1") for p, ref in _CONTINUATIONS]
    for _ in range(6):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        items.append(Task("addition", f"What is {a} + {b}? Answer with the number only.", str(a + b), "contains"))
    for _ in range(6):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        items.append(Task("multiplication", f"What is {a} * {b}? Answer with the number only.", str(a * b), "contains"))
    items += [Task("factual_qa", q + " Answer in a few words.", a, "contains") for q, a in _FACTS]
    if categories:
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown task categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        items = [t for t in items if t.category in categories]
    if per_category:
        seen: dict[str, int] = {}
        items = [t for t in items if seen.setdefault(t.category, 0) < per_category and not seen.update(
            {t.category: seen[t.category] + 1})]
    return items
