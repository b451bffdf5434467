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
    "My brother planted six apple trees behind the old barn.",
    "The library will be closed on Sunday for repairs.",
    "A cold wind blew across the frozen lake all night.",
    "Please bring a pencil, an eraser and a ruler to class.",
    "The baker sold forty loaves of bread before noon.",
    "We watched the boats return to the harbour at sunset.",
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
    ("A storm hit the coast on Tuesday night. Strong winds knocked down trees and power lines, and thousands of "
     "homes were without electricity until Thursday, when repair crews finished their work.",
     "A storm cut power to thousands of coastal homes for two days."),
    ("The school library bought three hundred new books this year. Most of them are novels and science books "
     "chosen by the students, and the library now stays open until six in the evening.",
     "The school library added many new books chosen by students and opens longer."),
    ("Tom forgot his umbrella on the way to work. It started to rain heavily, so he ran into a cafe, ordered a "
     "coffee and waited there for an hour until the rain stopped.",
     "Tom waited out heavy rain in a cafe because he had no umbrella."),
    ("Scientists found a new species of frog in the mountains of Peru. The frog is smaller than a coin, lives "
     "under wet leaves and has bright orange spots on its back.",
     "Scientists found a tiny new frog species with orange spots in Peru."),
    ("The town's only bakery closed after fifty years. The owners said they were too old to keep working, and "
     "no one in the family wanted to take over the business.",
     "The town's old bakery closed because the owners retired and no one took over."),
    ("A local team won the regional football cup on Saturday. They were losing at half time, but scored two "
     "goals in the last ten minutes and celebrated with their fans in the town square.",
     "A local team came from behind to win the regional football cup."),
    ("The new bus line connects the airport with the city centre. Buses run every fifteen minutes from five in "
     "the morning until midnight, and a ticket costs the same as a normal city fare.",
     "A new bus line links the airport and city centre often and cheaply."),
    ("Anna wanted to learn to cook, so she took a class every Wednesday evening. After three months she could "
     "make bread, soup and pasta, and she invited her friends to a dinner.",
     "Anna learned to cook in a weekly class and made dinner for her friends."),
    ("Heavy snow closed the mountain road for three days. Villagers ran out of fresh food, so a helicopter "
     "brought supplies until workers cleared the road on Friday.",
     "Snow closed a mountain road, and a helicopter supplied villagers until it reopened."),
]
# Openings with one natural next word: scored by whether the model's continuation contains it ("|": alternatives).
_CONTINUATIONS = [
    ("The three primary colours are red, yellow and", "blue"),
    ("To make a cup of tea, first boil the", "water"),
    ("The days of the week are Monday, Tuesday, Wednesday,", "Thursday"),
    ("The months of the year begin with January, February, March,", "April"),
    ("The sun rises in the east and sets in the", "west"),
    ("Roses are red, violets are", "blue"),
    ("One, two, three, four,", "five|5"),
    ("Twinkle, twinkle, little star, how I wonder what you", "are"),
    ("Water freezes at zero degrees and boils at one hundred degrees", "Celsius|centigrade"),
    ("The opposite of hot is", "cold"),
    ("Cats say meow and dogs say", "woof|bark"),
    ("Spring, summer, autumn and", "winter"),
]
_FACTS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "7|seven"), ("What planet do we live on?", "Earth"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What colour is the sky on a clear day?", "blue"),
    ("What is frozen water called?", "ice"), ("How many legs does a spider have?", "8|eight"),
    ("What is the capital of Italy?", "Rome"), ("How many months are in a year?", "12|twelve"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What do bees make?", "honey"),
]
_WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "house", "green", "music", "paper", "chair", "light"]
# Tokens to generate per category: room for a good answer, no more (generation is the slow part of eval). A small
# model often works sums out before it gives the number ("To solve this, we need to add 46 and 27: ..."), so the
# arithmetic answers get room for that (measured on SmolLM2-135M: at 8 tokens no answer was complete).
NEW_TOKENS = {"copy": 32, "repetition": 24, "summarisation": 40, "continuation": 12, "addition": 32,
              "multiplication": 32, "factual_qa": 16}
# Items per category (load_tasks builds up to this many; flexi eval takes --tasks-per-category of them).
PER_CATEGORY = 12


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
    items += [Task("continuation", f"Continue this text: {p}", ref, "contains") for p, ref in _CONTINUATIONS]
    for _ in range(PER_CATEGORY):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        items.append(Task("addition", f"What is {a} + {b}? Answer with the number only.", str(a + b), "contains"))
    for _ in range(PER_CATEGORY):
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
