"""Training and held-out data, offline by default.

Built in: `flexicli/data/prompts.jsonl`, 415 user prompts in three splits: 336 train, 37 validation (every 10th of
the rest: `flexi train` picks its checkpoint on them) and 42 held out (every 10th: `flexi eval`'s text and
calibration's), and the documentation of installed packages. The sources:
  - "selfgen" (default): each prompt plus the original model's own greedy answer, through the chat template.
    Generated once per base model (by its fingerprint) and cached in $FLEXI_CACHE/selfgen/.
  - "prompts": the chat-templated prompts alone.
  - "docs": documentation that ships with installed packages flexicli depends on (docstrings of torch, transformers,
    numpy, ...), read offline, in a fixed order: technical prose and code of another kind than the conversations.
  - "mix": selfgen and docs together.
Or `--data PATH` (.jsonl with `messages`, `text` or `input_ids` per line, or .txt: paragraphs split by blank lines),
or a Hub dataset id when online. `input_ids` rows are token ids packed as they are (no EOS added between rows): the
way to train a model that has no tokenizer. Held-out data is always the held-out prompts with the original model's
answers, so runs with different training data are compared on the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.errors import BadInput
from .tokens import pad_id

PROMPTS_FILE = Path(__file__).parent / "prompts.jsonl"


def builtin_prompts(*splits: str) -> list[str]:
    """The built-in prompts of these splits ("train", "validation", "heldout"), in file order."""
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] in splits]


def heldout_prompts(n: int | None = None) -> list[str]:
    return builtin_prompts("heldout")[:n]


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as text, tokenised later with add_special_tokens=False. A chat template writes the BOS token
    itself; without one (a base model such as Gemma-3-270m) the text gets the BOS token here if the tokenizer adds
    one to plain text, as a model trained with BOS degenerates without it ("<h2><h2><h2>...")."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return bos_text(tokenizer) + "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")


def bos_text(tokenizer) -> str:
    """The BOS token as text if the tokenizer puts it before plain text (Llama, Gemma), else "" (GPT-2, SmolLM2)."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def teacher_answers(fm, prompts: list[str], max_new_tokens: int = 96, batch_size: int = 64,
                    progress=None) -> list[str]:
    """The original model's greedy answers (routing off), cached by base fingerprint, the prompts as the model reads
    them (so a change in how a prompt is rendered, such as its BOS, never reuses answers to the old text) and
    length. batch_size 64: decoding is matrix products of batch x hidden, faster per token in bigger batches (SmolLM2
    on 2 CPU threads, 64 prompts x 96 tokens: 128 tokens/s against 108 at 32)."""
    from ..core.base_model import cache_dir

    tok = fm.tokenizer
    if tok is None:
        raise BadInput("this base model has no tokenizer: pass --data with token text, or a model with a tokenizer")
    rendered = [chat_text(tok, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    key = hashlib.sha256(json.dumps([fm.config.base_fingerprint, rendered, max_new_tokens]).encode()).hexdigest()[:16]
    path = cache_dir() / "selfgen" / f"{key}.jsonl"
    if path.is_file():
        return [json.loads(line)["answer"] for line in path.read_text().splitlines()]
    side, tok.padding_side = tok.padding_side, "left"
    pad = pad_id(fm.model, tok)
    answers = []
    device = next(fm.model.parameters()).device
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(rendered[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            with torch.no_grad(), fm.routing("full"):
                out = fm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if progress:
                progress(len(answers), len(prompts))
    finally:
        tok.padding_side = side
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one distributed run may write it together
    tmp.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    tmp.replace(path)
    return answers


def conversations(fm, prompts: list[str], answers: list[str] | None) -> list[str]:
    if answers is None:
        return [chat_text(fm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return [chat_text(fm.tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
            for p, a in zip(prompts, answers)]


# Third-party packages flexicli installs (never the standard library: held-out text of that kind judges the
# budget and quality on text not trained on). Their versions are pinned by the lock, so the corpus is reproducible.
DOC_PACKAGES = ("transformers", "torch", "numpy", "huggingface_hub", "accelerate", "click", "rich", "safetensors",
                "yaml", "gguf", "networkx", "sympy", "jinja2", "tokenizers")


def package_docs(max_chars: int = 1_500_000, min_chars: int = 200) -> list[str]:
    """Docstrings of at least `min_chars` from DOC_PACKAGES (those installed), files in sorted order, at most
    max_chars / len(packages) characters from each package (so no single package dominates), read with `ast`."""
    import ast
    import importlib.util

    texts, per_package = [], max_chars // len(DOC_PACKAGES)
    for name in DOC_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        got = 0
        for root in spec.submodule_search_locations:
            for f in sorted(Path(root).rglob("*.py")):
                try:
                    tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
                except (SyntaxError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) >= min_chars:
                            texts.append(doc)
                            got += len(doc)
                if got >= per_package:
                    break
            if got >= per_package:
                break
    return texts


def task_prompts(n: int, seed: int = 0, docs: list[str] | None = None) -> list[str]:
    """n instructions in the formats of the task suite (flexicli/data/tasks.py: copy, repetition, summarisation,
    continuation, sums, products), their text taken from package documentation (package_docs) and their numbers
    outside the suite's ranges, so no suite item is trained on. The original model answers them (selfgen), so the
    routed model is distilled on following exact instructions, which the template prompts rarely ask for."""
    import random
    import re

    if n <= 0:
        return []
    docs = package_docs(400_000) if docs is None else docs
    sentences, paragraphs = [], []
    for doc in docs:
        first = " ".join(doc.split("\n\n")[0].split())
        if 30 <= len(first.split()) <= 90 and _is_prose(first):
            paragraphs.append(first)
        for sent in re.split(r"(?<=[.!?])\s+", first):
            if 6 <= len(sent.split()) <= 24 and _is_prose(sent) and sent.endswith("."):
                sentences.append(sent)
    words = sorted({w.lower() for s in sentences for w in s.split() if w.isalpha() and 4 <= len(w) <= 9})
    if not sentences or not paragraphs or not words:
        raise BadInput("no package documentation to build task prompts from", "set task_prompts: 0")
    rng = random.Random(seed)
    makers = (
        lambda: f"Repeat this sentence exactly, and nothing else: {rng.choice(sentences)}",
        lambda: f"Write the word '{rng.choice(words)}' {rng.randint(2, 6)} times, separated by spaces, and nothing else.",
        lambda: f"Summarise in one sentence: {rng.choice(paragraphs)}",
        lambda: "Continue this text: " + " ".join(rng.choice(sentences).split()[:rng.randint(3, 6)]),
        lambda: f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer with the number only.",
        lambda: f"What is {rng.randint(13, 30)} * {rng.randint(2, 9)}? Answer with the number only.",
    )
    out: list[str] = []
    for i in range(50 * n):  # distinct prompts (a short word list repeats): give up long before this on tiny docs
        prompt = makers[i % len(makers)]()
        if prompt not in out:
            out.append(prompt)
        if len(out) == n:
            break
    return out


# Short factual questions for fact_prompts: templates over entities that the task suite's factual items
# (flexicli/data/tasks.py, _FACTS) never ask about, so no suite item is trained on (a test checks it).
_FACT_COUNTRIES = (
    "Peru", "Brazil", "Argentina", "Chile", "Mexico", "Portugal", "Norway", "Sweden", "Finland", "Poland", "Austria",
    "Hungary", "Ireland", "Turkey", "India", "Kenya", "Nigeria", "Australia", "Thailand", "Vietnam", "Cuba",
    "Belgium", "the Netherlands", "Denmark", "Switzerland", "South Korea", "Indonesia", "Iran", "Colombia",
    "Morocco", "Ethiopia", "Ukraine", "Romania", "Pakistan", "the Philippines", "New Zealand", "Iceland",
    "Saudi Arabia", "Israel", "Venezuela", "Ghana", "Bolivia", "Ecuador", "Bulgaria", "Scotland", "Wales")
_FACT_ANIMALS = ("cat", "horse", "cow", "bird", "ant", "octopus", "chicken", "duck", "snake", "sheep", "elephant",
                 "frog", "beetle", "crab", "kangaroo", "goat")
_FACT_YOUNG = ("sheep", "horse", "goat", "duck", "kangaroo", "deer", "bear", "frog", "owl", "goose", "pig",
               "lion", "swan", "hen")
_FACT_THINGS = ("a lemon", "coal", "a ripe tomato", "milk", "a carrot", "chocolate", "a strawberry", "an orange",
                "the Moon", "a cherry", "a fire truck", "a polar bear", "a crow", "gold")
_FACT_QUESTIONS = (
    "How many hours are in a day?", "How many minutes are in an hour?", "How many seconds are in a minute?",
    "How many days are in a year?", "How many weeks are in a year?", "How many sides does a hexagon have?",
    "How many sides does a pentagon have?", "How many sides does an octagon have?", "How many players are on a "
    "football team?", "How many strings does a guitar usually have?", "How many planets are in the solar system?",
    "How many hearts does an octopus have?", "How many teeth does an adult human have?",
    "Which planet is closest to the Sun?", "Which planet is famous for its rings?", "What is the hottest planet?",
    "What is the smallest planet in our solar system?", "What is the largest desert in the world?",
    "What is the longest river in Africa?", "What is the highest mountain in the world?",
    "What is the chemical symbol for gold?", "What is the chemical symbol for iron?",
    "What is the chemical symbol for oxygen?", "What is the chemical symbol for sodium?",
    "What gas do plants take in from the air?", "What do caterpillars turn into?", "What do cows eat?",
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "Who discovered gravity?",
    "Who was the first person to walk on the Moon?", "What is the freezing point of water in Celsius?",
    "What is the boiling point of water in Fahrenheit?", "What is the opposite of east?",
    "What is the opposite of up?", "What is the biggest bird?", "What is the fastest land animal?",
    "What do spiders spin?", "What is the main language of Brazil?", "What is the currency of Japan?",
    "What is the currency of the United States?", "Which ocean lies between Europe and America?",
    "What is the capital of the United States?", "What shape has three sides?", "What is H2O?",
    "Which organ do we use to think?", "Which organ do we use to breathe?", "What is a baby dog's mother called?",
    "What season comes after winter?", "What season comes after summer?", "What month comes after June?",
    "What day comes after Friday?", "What is ten times ten?", "What is half of one hundred?")


def fact_prompts(n: int, seed: int = 0) -> list[str]:
    """n short factual questions (capitals, languages, continents of countries; animals' legs and young; colours;
    counts, science and general knowledge), each asking for a few words as the task suite's factual items do, none
    of them a suite item. The original model answers them (selfgen), so distillation sees the answers that rest on
    recall: on Gemma-3-270M the layer that KL on conversations and documentation ranks cheapest to skip (layer 8)
    is the one its factual answers need (docs/results.md)."""
    import random

    if n <= 0:
        return []
    asked = [f"What is the capital of {c}?" for c in _FACT_COUNTRIES]
    asked += [f"What language is spoken in {c}?" for c in _FACT_COUNTRIES]
    asked += [f"On which continent is {c}?" for c in _FACT_COUNTRIES]
    asked += [f"How many legs does a {a} have?" for a in _FACT_ANIMALS]
    asked += [f"What is a baby {a} called?" for a in _FACT_YOUNG]
    asked += [f"What colour is {t}?" for t in _FACT_THINGS]
    asked += list(_FACT_QUESTIONS)
    random.Random(seed).shuffle(asked)
    if n > len(asked):
        raise BadInput(f"fact_prompts {n} is more than the {len(asked)} built-in factual questions",
                       f"set fact_prompts to at most {len(asked)}")
    return [q + " Answer in a few words." for q in asked[:n]]


def _is_prose(text: str) -> bool:
    """Words, not code or markup: mostly letters, no REPL prompts, backticks, braces or argument lists."""
    if any(mark in text for mark in (">>>", "`", "{", "}", "::", "=", "_", "(", "[", "http")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.92 * len(text)


def heldout_texts(fm, n: int | None = None, progress=None) -> list[str]:
    prompts = heldout_prompts(n)
    return conversations(fm, prompts, teacher_answers(fm, prompts, progress=progress))


def read_data(path: str, tokenizer) -> list[str | list[int]]:
    """Texts from a local .jsonl (`messages` through the chat template, or `text`) or .txt file, or a Hub dataset;
    a .jsonl row of `input_ids` gives its token ids as a list instead (pack takes them as they are)."""
    p = Path(path).expanduser()
    if p.suffix == ".txt" and p.is_file():
        return [t.strip() for t in p.read_text().split("\n\n") if t.strip()]
    if p.suffix == ".jsonl" and p.is_file():
        texts = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInput(f"{path}:{i} is not valid JSON") from None
            if "messages" in row:
                texts.append(chat_text(tokenizer, row["messages"]))
            elif "text" in row:
                texts.append(row["text"])
            elif "input_ids" in row:
                ids = row["input_ids"]
                if not (isinstance(ids, list) and all(type(t) is int and t >= 0 for t in ids)):
                    raise BadInput(f"{path}:{i}: input_ids must be a list of token ids (integers >= 0)")
                texts.append(ids)
            else:
                raise BadInput(f"{path}:{i} has none of 'messages', 'text', 'input_ids'")
        return texts
    if p.exists():
        raise BadInput(f"unsupported data file {path}", "use .jsonl (messages, text or input_ids per line) or .txt")
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return _hub_dataset(path, tokenizer)
    raise BadInput(f"no such data file: {path}")


def _hub_dataset(dataset_id: str, tokenizer, limit: int = 20000) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise BadInput("reading a Hub dataset needs the `datasets` package", "pip install datasets, "
                       "or pass a local .jsonl/.txt file") from None
    try:
        ds = load_dataset(dataset_id, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - offline or a missing dataset
        raise BadInput(f"could not load dataset {dataset_id!r} ({type(e).__name__})") from e
    texts = []
    for row in ds:
        if "messages" in row:
            texts.append(chat_text(tokenizer, row["messages"]))
        elif "text" in row:
            texts.append(row["text"])
        if len(texts) >= limit:
            break
    return texts


PAD = -1  # fills the rows of one_per_row after a text's end; never a token id (calibration and metrics skip it)


def one_per_row(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """One text per row, right-padded with PAD: the held-out and validation texts as `flexi eval` reads them
    (tokens.scored_sequences: each from position 0, alone, cut at seq_len), so that the threshold calibrated on them
    and the figures `flexi train` reports are the ones the verdict sees."""
    from .tokens import scored_sequences

    seqs = scored_sequences(tokenizer, texts, seq_len)
    if not seqs:
        raise BadInput("no text of at least 2 tokens to evaluate on")
    rows = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        rows[i, :len(s)] = torch.tensor(s)
    return rows


def unpadded(rows: torch.Tensor) -> list[list[int]]:
    """Rows as token lists without their PAD."""
    return [[t for t in row if t != PAD] for row in rows.tolist()]


def pack(tokenizer, texts: list[str | list[int]], seq_len: int) -> torch.Tensor:
    """Tokenised texts (each ended by EOS) as [n, seq_len] rows in which every text begins a row or follows a
    whole text: a text longer than a row fills rows of its own and its last part goes on like a text; the parts
    shorter than a row go, in order, into the first row with room for them (first fit), and the tokens a row still
    lacks are the first tokens of the next row's first text (seen twice: on SmolLM2, 36% of the conversation rows'
    tokens, as a conversation of ~127 tokens seldom leaves room for another; 3% of the documentation rows'). Fewer
    than seq_len tokens in all: BadInput. Items that are already token ids (lists, from `input_ids` rows) go in as
    they are; only they need no tokenizer.

    Why: a model reads a prompt from position 0, where a decoder parks its attention (the "sink"). Packed end to
    end, rows began mid-text, and routers trained on such rows skipped otherwise on whole conversations: SmolLM2,
    N = 4, cost start, 160 steps: 4.09 layers on the held-out conversations packed end to end, 3.33 on the same
    conversations one at a time, as `flexi eval` reads them (docs/results.md)."""
    items: list[list[int]] = []
    for t in texts:
        if isinstance(t, list):
            items.append(list(t))
            continue
        if tokenizer is None:
            raise BadInput("this model has no tokenizer, so text data cannot be tokenised",
                           'pass --data FILE.jsonl with token ids: {"input_ids": [...]} per line')
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        items.append(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])
    total = sum(map(len, items))
    if total < seq_len:
        raise BadInput(f"not enough text for one sequence of {seq_len} tokens ({total} tokens)",
                       "pass more data or a smaller --seq-len")
    rows: list[list[int]] = []
    for item in items:
        while len(item) >= seq_len:
            rows.append(item[:seq_len])
            item = item[seq_len:]
        if item:
            room = next((r for r in rows if len(r) + len(item) <= seq_len), None)
            if room is None:
                rows.append(list(item))
            else:
                room += item
    for i, row in enumerate(rows):  # the gaps: from the next row's start (the first row's, for the last)
        row += rows[(i + 1) % len(rows)][:seq_len - len(row)]
    return torch.tensor(rows)
