"""evaluate: is the routed model's output preserved? The routed model (routers decide) is compared with the
original model (routing off: the same weights in memory, no second copy) on held-out data.

    from .evaluate import evaluate, Thresholds
    result = evaluate(fm)                                    # JSON-ready dict; result["passed"] is the verdict
    result = evaluate(fm, data=[[5, 9, 12, ...]], prompts=[[5, 9]], tasks=[])   # token ids: no tokenizer needed

What is measured, always the routed model against the original:
  kl, top1_agreement    teacher forcing on held-out texts: mean KL(original || routed) per scored token (nats)
                        and the fraction of positions whose most likely next token agrees; perplexity of both
  kl_p99                the 99th percentile of the per-token KL: the tail the mean hides (a few tokens whose
                        prediction changes a lot)
  yardstick             (yardstick=True) the same teacher-forced metrics for int8 and int4 fake-quantised copies
                        of the original, so a KL reads as "closer than int8" .. "further than int4"; with the task
                        suite also their retention and flips, so a retention reads against copies that only round
  greedy_match          greedy generation from held-out prompts: the fraction of prompts whose new tokens are
                        identical, and greedy_first_divergence, the mean index of the first token that differs
                        (an identical continuation counts as new_tokens: no divergence within the budget)
  mean_skipped_layers   skipped routed layers per token in the routed teacher-forced pass, in layer-equivalents
                        (flexicli/core/units.py: a skipped attention or MLP sublayer counts its share of the layer's
                        parameters); per_layer_skip_rate per routed unit ("17", or "17.attn" / "17.mlp")
  retention             the built-in task suite (flexicli.tasks) on both: mean routed score / mean original score;
                        retention_interval, its 5-95% range by a paired bootstrap over the items (the suite's noise)
  task_flips            flips on the task suite (Dutta et al. 2024): the shares of items that went correct -> wrong
                        and wrong -> correct; an item is correct when its score is >= 0.5 (see correct())
  lm_eval               (lm_eval_tasks=[...], the lm-eval extra) lm-evaluation-harness tasks on both, with
                        retention and flips per task (flexicli.lm_eval.compare)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..core.errors import BadInput
from ..data.tokens import pad_id, prompt_ids, scored_sequences, stop_ids
from ..data.tasks import PER_CATEGORY
from .scores import correct, flips, retention, retention_interval

# Defaults chosen so that `flexi eval` on SmolLM2-135M finishes in a few minutes on 2 CPU cores.
# tasks_per_category: the whole built-in suite (336 items; most of the time: 656 of a 706-s eval on 1 thread, at 8
# prompts a batch).
# At 3 per category (21 items) the original SmolLM2 scored 0.27 on average, 0 on all arithmetic (its answers were
# cut off at 8 tokens), so retention hung on ~6 correct items and one flipped item moved it by ~0.15; at 12 (84
# items) one run was good to about +-0.1 (docs/eval.md, The verdict)
# The task suite decodes 12 x batch_size prompts at once (48 by default: one category of the suite). Decoding a
# small model on a CPU is bound by reading the weights, not by the rows: a category at once against 8 at a time
# took addition's 48 items from 47-51 s to 27 s and continuation's from 25-26 s to 20 s, the whole suite 1.24-1.41x
# faster with the same scores (SmolLM2, 1 thread; benchmarks/task_batch.py). The teacher-forced passes keep
# batch_size rows: their logits over the vocabulary grow with the rows.
GENERATE_BATCH = 12
DEFAULTS = dict(max_samples=32, seq_len=256, n_prompts=8, new_tokens=32, tasks_per_category=PER_CATEGORY, batch_size=4)


@dataclass
class Thresholds:
    """The verdict: every threshold that is set (not None) and whose metric was measured must hold.

    Anchor: removing SmolLM2-135M's 4 least influential layers outright gives KL 0.50 and top-1 agreement 0.66
    (DESIGN.md). A routed model that skips about as many layers on average must do far better than that static
    baseline to count as "output preserved". Greedy exact match over 32 tokens is reported but not gated by
    default: one early near-tie flips the rest of the sequence, so it is a noisy pass/fail signal.
    """

    max_kl: float | None = 0.25  # nats per token, KL(original || routed)
    min_top1: float | None = 0.80  # teacher-forced top-1 agreement
    min_retention: float | None = 0.90  # task suite: routed score / original score
    min_greedy_match: float | None = None  # fraction of prompts with identical greedy continuations

    _RULES = (("max_kl", "kl", "<="), ("min_top1", "top1_agreement", ">="), ("min_retention", "retention", ">="),
              ("min_greedy_match", "greedy_match", ">="))

    def checks(self, result: dict) -> list[dict]:
        """One row per set threshold: ok is True/False, or None when the metric could not be measured."""
        rows = []
        for name, key, op in self._RULES:
            limit = getattr(self, name)
            if limit is None:
                continue
            value = result.get(key)
            ok = None if value is None else bool(value <= limit if op == "<=" else value >= limit)  # NaN fails
            rows.append({"metric": key, "value": value, "op": op, "limit": limit, "ok": ok})
        return rows


# ---- metrics on tensors (pure functions; the tests check each against hand-computed answers) -----------------
def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position in nats: sum_v p_t (log p_t - log p_s). [..., V] -> [...]."""
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)


def top1_match(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Bool per position: both put their highest logit on the same token."""
    return teacher_logits.argmax(-1) == student_logits.argmax(-1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of `labels` per position (nats); exp(mean) is the perplexity."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           reduction="none").reshape(labels.shape)


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's default (linear interpolation between order statistics), without its input-size limit
    (2**24 elements: a long evaluation can score more tokens than that)."""
    v = values.detach().reshape(-1).double().sort().values
    if v.numel() == 0:
        return math.nan
    pos = q * (v.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest quantisation, dequantised again: what the weight becomes in int<bits>.

    weight [out, in]. One scale per output channel (group_size None) or per group of `group_size` consecutive
    input columns; scale = max|w| / qmax with qmax = 2**(bits-1) - 1, so the levels are -qmax..qmax (no zero
    point). A last group shorter than group_size gets its own scale; an all-zero group stays zero."""
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize takes a 2-D weight [out, in], not shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    out_dim, in_dim = w.shape
    g = in_dim if group_size is None else group_size
    pad = (-in_dim) % g
    if pad:
        w = F.pad(w, (0, pad))  # zeros do not change a group's max|w|
    groups = w.reshape(out_dim, -1, g)
    scale = groups.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale
    return q.reshape(out_dim, -1)[:, :in_dim].to(weight.dtype)


# The yardstick: int8 per output channel and int4 in groups of 32, the two common weight-only formats.
YARDSTICK = {"int8": dict(bits=8, group_size=None), "int4": dict(bits=4, group_size=32)}


def _decoder_linears(fm) -> list[tuple[torch.nn.Module, list[tuple[torch.nn.Module, bool]]]]:
    """Per decoder layer: (module, transposed) for every Linear of the base layer (transformers' GPT-2 Conv1D
    too, whose weight is [in, out]). Routers and adapters are flexicli's own and do not run in the original
    model; the embedding and the LM head sit outside the decoder layers and are left alone."""
    from transformers.pytorch_utils import Conv1D

    from ..core.flexi_model import submodule

    out = []
    for layer in submodule(fm.model, fm.config.parts["layers"]):
        base = getattr(layer, "base_layer", layer)  # a FlexiLayer's original layer
        out.append((base, [(m, isinstance(m, Conv1D)) for m in base.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]))
    return out


@contextmanager
def quantised(fm, bits: int, group_size: int | None = None):
    """The original model's decoder Linear weights fake-quantised while the context is open (use it with
    routing "full": the hooks sit on the original layers, which the routed path does not call as a whole).

    Each decoder layer swaps its quantised weights in when its forward starts and the originals back when it
    ends (forward hooks), so at most one layer's quantised copy exists at a time: no second model in memory,
    at the cost of re-quantising each layer on each forward (elementwise work, small next to the matmuls).
    Restoring puts the original tensor objects back (no copy, no arithmetic): the weights stay bit-identical."""
    swapped: dict[torch.nn.Module, torch.Tensor] = {}

    def swap_in(linears):
        def hook(module, args, kwargs=None):
            for lin, transposed in linears:
                w = lin.weight.data
                swapped[lin] = w
                lin.weight.data = (fake_quantize(w.t(), bits, group_size).t().contiguous() if transposed
                                   else fake_quantize(w, bits, group_size))
        return hook

    def swap_out(linears):
        def hook(module, args, output):
            for lin, _ in linears:
                if lin in swapped:
                    lin.weight.data = swapped.pop(lin)
        return hook

    handles = []
    try:
        for base, linears in _decoder_linears(fm):
            if linears:
                handles.append(base.register_forward_pre_hook(swap_in(linears)))
                handles.append(base.register_forward_hook(swap_out(linears)))
        yield fm
    finally:
        for h in handles:
            h.remove()
        for lin, w in swapped.items():  # a forward that raised did not reach its swap_out
            lin.weight.data = w
        swapped.clear()


def place(kl: float | None, yardstick: dict) -> str | None:
    """Where a KL sits against the quantised copies: 'closer than int8', 'between int8 and int4', 'further
    than int4' (None when a KL is missing)."""
    k8, k4 = (yardstick.get(name, {}).get("kl") for name in ("int8", "int4"))
    if kl is None or k8 is None or k4 is None:
        return None
    if kl <= k8:
        return "closer than int8"
    return "between int8 and int4" if kl <= k4 else "further than int4"


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first token where two generations differ; the shorter length when one is a prefix of the
    other (one stopped earlier), the full length when they are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def skip_counts(decisions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """decisions [B, T, n_routed] (True = ran), valid [B, T]: skipped tokens per routed layer, tokens counted."""
    ran = decisions[valid.to(decisions.device)]
    return (~ran).sum(0), ran.shape[0]


# ---- inputs -------------------------------------------------------------------------------------------------
def _default_texts(fm, n: int, progress=None) -> list[str]:
    """The built-in held-out conversations: held-out prompts with the original model's own answers. All of them
    are asked for (then cut to n) so that the cached answers are the ones `flexi train` already generated."""
    from ..data.text import heldout_texts

    return heldout_texts(fm, progress=progress)[:n]


def _default_prompts(n: int) -> list[str]:
    from ..data.text import heldout_prompts

    return heldout_prompts(n)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---- the three comparisons ----------------------------------------------------------------------------------
def _right_padded(fm, seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as one right-padded batch on `device`: ids and a boolean mask of the real tokens."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id(fm.model, fm.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), True
    return ids.to(device), mask.to(device)


class _Agreement:
    """Accumulates KL(original || other) and top-1 agreement over scored positions."""

    def __init__(self):
        self.kls: list[torch.Tensor] = []
        self.agree = 0

    def add(self, t: torch.Tensor, s: torch.Tensor) -> None:
        self.kls.append(token_kl(t, s).cpu())
        self.agree += int(top1_match(t, s).sum())

    def result(self) -> dict:
        kls = torch.cat(self.kls)
        # the mean in float64: summed float32 per-token values would round differently with the batch layout
        return {"kl": float(kls.double().mean()), "kl_p99": quantile(kls, 0.99),
                "top1_agreement": self.agree / kls.numel()}


def compare_teacher_forced(fm, seqs: list[list[int]], routing: dict, batch_size: int, tick=None,
                           variants: dict[str, Callable] | None = None) -> dict:
    """KL (mean and 99th percentile), top-1 agreement, perplexities and skip statistics over token sequences
    (right-padded batches). `variants`: name -> a context-manager factory (e.g. a quantised original), each
    compared with the same original logits (one extra forward pass per batch each) and reported under
    result["yardstick"][name]."""
    device = next(fm.model.parameters()).device
    n_routed = len(fm.unit_keys)  # routed units: one per routed layer for skip unit `layer`
    nll_o = nll_r = 0.0
    routed, others = _Agreement(), {name: _Agreement() for name in (variants or {})}
    scored, skipped, tokens = 0, torch.zeros(n_routed, dtype=torch.long), 0
    seqs = sorted(seqs, key=len, reverse=True)  # similar lengths together: less padding
    for batch in _batches(seqs, batch_size):
        ids, mask = _right_padded(fm, batch, device)
        lengths = [int(mask[row].sum()) - 1 for row in range(len(batch))]  # positions predicting a next token

        def forward():
            return fm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits

        with torch.no_grad():
            with fm.routing("full"):
                t_logits = forward()
            with fm.routing(**routing), fm.record() as rec:
                s_logits = forward()
        d_skipped, d_tokens = skip_counts(rec.decisions(), mask.cpu())
        skipped, tokens = skipped + d_skipped, tokens + d_tokens
        for row, n in enumerate(lengths):  # one row at a time: full-vocabulary temporaries stay small
            t, s, labels = t_logits[row, :n], s_logits[row, :n], ids[row, 1:n + 1]
            routed.add(t, s)
            nll_o += float(token_nll(t, labels).sum())
            nll_r += float(token_nll(s, labels).sum())
            scored += n
        del s_logits
        for name, make in (variants or {}).items():
            with torch.no_grad(), fm.routing("full"), make():
                v_logits = forward()
            for row, n in enumerate(lengths):
                others[name].add(t_logits[row, :n], v_logits[row, :n])
            del v_logits
        del t_logits
        if tick:
            tick(len(batch))
    if scored == 0:
        raise BadInput("no held-out text to score: every sequence is shorter than 2 tokens")
    rates = (skipped.float() / max(1, tokens)).tolist()
    out = {
        **routed.result(), "scored_tokens": scored,
        "perplexity_original": math.exp(nll_o / scored), "perplexity_routed": math.exp(nll_r / scored),
        "mean_skipped_layers": fm.layer_equivalents(skipped) / max(1, tokens),
        "per_layer_skip_rate": dict(zip(fm.unit_labels, rates, strict=True)),
    }
    if fm.config.skip_unit != "layer":  # the most a token can skip, in layer-equivalents (units.py)
        out["skip_capacity"] = fm.capacity
    if variants:
        out["yardstick"] = {name: acc.result() for name, acc in others.items()}
    return out


def generate_ids(fm, prompts: list[list[int]], new_tokens: int, routing: dict) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded), each cut at its first end-of-sequence token."""
    device = next(fm.model.parameters()).device
    width, pad = max(map(len, prompts)), pad_id(fm.model, fm.tokenizer)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    eos = stop_ids(fm.model, fm.tokenizer)
    with torch.no_grad(), fm.routing(**routing):
        out = fm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                min_new_tokens=0, do_sample=False, pad_token_id=pad,
                                eos_token_id=sorted(eos) or None)
    result = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    return result


def compare_greedy(fm, prompts: list[list[int]], new_tokens: int, routing: dict, batch_size: int, tick=None) -> dict:
    matches, divergence = 0, 0
    for batch in _batches(prompts, batch_size):
        original = generate_ids(fm, batch, new_tokens, {"mode": "full"})
        routed = generate_ids(fm, batch, new_tokens, routing)
        for a, b in zip(original, routed):
            matches += a == b
            # identical (both may stop early at end-of-sequence): no divergence within the whole budget
            divergence += new_tokens if a == b else first_divergence(a, b)
        if tick:
            tick(len(batch))
    return {"greedy_match": matches / len(prompts), "greedy_first_divergence": divergence / len(prompts),
            "greedy_prompts": len(prompts), "greedy_new_tokens": new_tokens}


def compare_answers(fm, pairs: list[tuple[list[int], list[int]]], routing: dict, batch_size: int) -> dict:
    """Teacher-forced on (prompt, the original's greedy answer) pairs: KL and top-1 agreement at the positions that
    predict the answer's tokens. The routed greedy answer equals the original's iff top-1 agrees at all of them, so
    this measures what task retention measures, per token instead of per item: far less noise than pass/fail items."""
    device = next(fm.model.parameters()).device
    acc, pairs = _Agreement(), [(p, a) for p, a in pairs if a]
    for batch in _batches(pairs, batch_size):
        ids, mask = _right_padded(fm, [p + a for p, a in batch], device)
        with torch.no_grad():
            with fm.routing("full"):
                t_logits = fm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
            with fm.routing(**routing):
                s_logits = fm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
        for row, (p, a) in enumerate(batch):  # position i predicts token i + 1: the answer from the prompt's last
            span = slice(len(p) - 1, len(p) + len(a) - 1)
            acc.add(t_logits[row, span], s_logits[row, span])
    if not pairs:
        return {}
    r = acc.result()
    return {"task_answer_kl": r["kl"], "task_answer_top1": r["top1_agreement"],
            "task_answer_tokens": sum(len(a) for _, a in pairs)}


def compare_tasks(fm, tasks: list, routing: dict, batch_size: int, tick=None,
                  variants: dict[str, Callable] | None = None, generate_batch: int | None = None) -> dict:
    """The task suite on both models; each category's batches use that category's answer length. Also
    compare_answers on the original's answers (`batch_size` rows a pass). `variants`: name -> a context-manager
    factory (the yardstick's quantised originals), each run on the suite too and compared with the original under
    "yardstick_tasks". `generate_batch`: prompts decoded together (default `batch_size`)."""
    models = {"original": ({"mode": "full"}, nullcontext), "routed": (routing, nullcontext),
              **{name: ({"mode": "full"}, make) for name, make in (variants or {}).items()}}
    scores: dict[str, dict[str, list[float]]] = {}
    answers: list[tuple[list[int], list[int]]] = []
    by_category: dict[str, list] = {}
    for task in tasks:
        by_category.setdefault(task.category, []).append(task)
    for category, items in by_category.items():
        for batch in _batches(items, generate_batch or batch_size):
            prompts = [prompt_ids(fm.tokenizer, t.prompt, chat=True) for t in batch]
            for name, (mode, make) in models.items():
                with make():
                    outs = generate_ids(fm, prompts, batch[0].max_new_tokens, mode)
                if name == "original":
                    answers += zip(prompts, outs)
                texts = fm.tokenizer.batch_decode(outs, skip_special_tokens=True)
                scores.setdefault(category, {k: [] for k in models})[name] += [t.score(x) for t, x in zip(batch, texts)]
            if tick:
                tick(len(batch))
    per_category = {c: {"original": _mean(s["original"]), "routed": _mean(s["routed"]),
                        "retention": retention(s["original"], s["routed"]), "items": len(s["original"]),
                        "flips": _item_flips(s["original"], s["routed"])}
                    for c, s in scores.items()}
    everything = {k: [x for s in scores.values() for x in s[k]] for k in models}
    out = {"retention": retention(everything["original"], everything["routed"]),
           "retention_interval": retention_interval(everything["original"], everything["routed"]),
           "task_score_original": _mean(everything["original"]), "task_score_routed": _mean(everything["routed"]),
           "task_scores": per_category, "task_flips": _item_flips(everything["original"], everything["routed"]),
           **compare_answers(fm, answers, routing, batch_size)}
    if variants:
        out["yardstick_tasks"] = {name: {"retention": retention(everything["original"], everything[name]),
                                         "retention_interval": retention_interval(everything["original"],
                                                                                  everything[name]),
                                         "task_score": _mean(everything[name]),
                                         "task_flips": _item_flips(everything["original"], everything[name])}
                                  for name in variants}
    return out


def _item_flips(original: Sequence[float], routed: Sequence[float]) -> dict:
    """flips() over item scores in the same order for both models; correct() decides each item."""
    return flips({i: correct(x) for i, x in enumerate(original)}, {i: correct(x) for i, x in enumerate(routed)})


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---- the whole evaluation -----------------------------------------------------------------------------------
def _inputs(fm, data, prompts, tasks, max_samples: int, seq_len: int, n_prompts: int, tasks_per_category: int,
            progress) -> tuple[list, list, list]:
    """evaluate()'s three inputs as token ids: teacher-forced sequences, greedy prompts, and the task suite."""
    if data is None:
        answers = (lambda done, total: progress("held-out answers", done, total)) if progress else None
        data = _default_texts(fm, max_samples, answers)
    seqs = scored_sequences(fm.tokenizer, list(data)[:max_samples], seq_len)
    if prompts is None:
        prompts = _default_prompts(n_prompts) if fm.tokenizer is not None else [s[:len(s) // 2] for s in seqs]
    greedy_prompts = [p for p in (prompt_ids(fm.tokenizer, x, chat=True) for x in list(prompts)[:n_prompts]) if p]
    if tasks is None:
        if fm.tokenizer is None or tasks_per_category == 0:
            tasks = []
        else:
            from ..data.tasks import load_tasks

            tasks = load_tasks(per_category=tasks_per_category)
    if tasks and fm.tokenizer is None:
        raise BadInput("the task suite needs a tokenizer and this model has none", "pass tasks=[]")
    return seqs, greedy_prompts, tasks


def evaluate(fm, data=None, prompts=None, tasks=None, max_samples: int = DEFAULTS["max_samples"],
             seq_len: int = DEFAULTS["seq_len"], n_prompts: int = DEFAULTS["n_prompts"],
             new_tokens: int = DEFAULTS["new_tokens"], tasks_per_category: int = DEFAULTS["tasks_per_category"],
             batch_size: int = DEFAULTS["batch_size"], thresholds: Thresholds | None = None,
             routing: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
             yardstick: bool = False, lm_eval: dict | None = None) -> dict:
    """Compare the routed model with the original and give a verdict. Returns a JSON-ready dict.

    data: held-out texts (str) or token-id sequences; default: the built-in held-out conversations.
    prompts: prompts (str, sent through the chat template) or token ids for greedy generation; default:
        built-in held-out prompts when the model has a tokenizer, else the first half of each data sequence.
    tasks: list of flexicli.data.tasks.Task; default: `tasks_per_category` of each category ([] or 0 turns it off).
    routing: how the routed model routes (fm.routing keywords); default {"mode": "routed"}.
    progress: called as progress(stage, done, total) after each batch.
    yardstick: also compare int8 and int4 fake-quantised copies of the original with it under teacher forcing
        (two more forward passes per batch) and, with tasks, on the task suite (two more generations per batch):
        result["yardstick"] = {"int8": {kl, kl_p99, top1_agreement, retention, retention_interval, task_score,
        task_flips}, "int4": {...}} and result["yardstick_place"], e.g. "between int8 and int4" (see place()). The
        copies' retention shows how far the suite moves when only weight rounding changes (on SmolLM2 an int8 copy
        at KL 0.004 keeps 0.86 of the score: docs/eval.md).
    lm_eval: keywords for flexicli.evaluation.lm_eval.compare (tasks, include, limit, num_fewshot): lm-evaluation-harness
        tasks on both models, result["lm_eval"] (needs the lm-eval extra; not part of the verdict).
    """
    for name, value in (("max_samples", max_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1 or (name == "seq_len" and value < 2):
            raise BadInput(f"{name} must be at least {2 if name == 'seq_len' else 1}, not {value}")
    if new_tokens < 1 or n_prompts < 0 or tasks_per_category < 0:
        raise BadInput("new_tokens must be at least 1; n_prompts and tasks_per_category at least 0")
    thresholds = thresholds or Thresholds()
    routing = dict(routing or {"mode": "routed"})
    started = time.monotonic()
    seqs, greedy_prompts, tasks = _inputs(fm, data, prompts, tasks, max_samples, seq_len, n_prompts,
                                          tasks_per_category, progress)

    def ticker(stage, total):
        done = [0]

        def tick(n):
            done[0] += n
            if progress:
                progress(stage, done[0], total)
        if progress:
            progress(stage, 0, total)
        return tick

    result: dict = {"routing": routing, "threshold": fm.state.threshold if "threshold" not in routing
                    else routing["threshold"], "texts": len(seqs), "seq_len": seq_len}
    stage_seconds = {"held-out data": time.monotonic() - started}

    def timed(stage, work):
        t0 = time.monotonic()
        result.update(work())
        stage_seconds[stage] = time.monotonic() - t0

    variants = {name: (lambda q=q: quantised(fm, **q)) for name, q in YARDSTICK.items()} if yardstick else None
    timed("teacher forcing", lambda: compare_teacher_forced(fm, seqs, routing, batch_size,
                                                            ticker("teacher forcing", len(seqs)), variants))
    if yardstick:
        result["yardstick_place"] = place(result["kl"], result["yardstick"])
    result.update(greedy_match=None, greedy_first_divergence=None, greedy_prompts=0, retention=None,
                  retention_interval=None, task_scores={}, task_flips=None)
    if greedy_prompts:
        timed("greedy generation", lambda: compare_greedy(fm, greedy_prompts, new_tokens, routing, 2 * batch_size,
                                                          ticker("greedy generation", len(greedy_prompts))))
    if tasks:
        timed("task suite", lambda: compare_tasks(fm, tasks, routing, 2 * batch_size, ticker("task suite", len(tasks)),
                                                  variants, generate_batch=GENERATE_BATCH * batch_size))
        for name, figures in result.pop("yardstick_tasks", {}).items():
            result["yardstick"][name].update(figures)
    if lm_eval:
        from . import lm_eval as harness

        def run_harness():
            out = harness.compare(fm, routing=routing, batch_size=batch_size, **lm_eval)
            out.pop("raw")
            return {"lm_eval": out}
        timed("lm-eval", run_harness)
    result["stage_seconds"] = {k: round(v, 1) for k, v in stage_seconds.items()}
    checks = thresholds.checks(result)  # before NaN becomes None: a NaN metric fails its check
    result = _finite({**result, "checks": checks})
    result["thresholds"] = asdict(thresholds)
    # Passed: no check failed and at least one held. An unmeasured metric (no tasks, or an original model that
    # scores 0 so retention is undefined) is reported as such and does not decide the verdict.
    result["passed"] = all(row["ok"] is not False for row in checks) and any(row["ok"] for row in checks)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _finite(obj):
    """NaN and infinities become None: JSON has no NaN (a model that produces them has failed its checks)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# What goes into the checkpoint's config (and from there into the model card): the verdict and the headline
# numbers, not the per-check rows or per-item details.
STORED = ("passed", "failed_checks", "kl", "kl_p99", "top1_agreement", "greedy_match", "greedy_first_divergence",
          "perplexity_original", "perplexity_routed", "mean_skipped_layers", "per_layer_skip_rate", "retention",
          "retention_interval", "threshold", "thresholds", "data", "texts", "scored_tokens", "greedy_prompts",
          "yardstick", "yardstick_place", "task_flips", "lm_eval", "seconds")


def failed_checks(result: dict) -> list[str]:
    """The failed checks as short phrases, e.g. 'kl 0.31 > 0.25'; from the check rows of a fresh result, or
    recomputed from the metrics and thresholds of a stored summary (which keeps no rows)."""
    if result.get("failed_checks") is not None:  # a stored summary says it itself
        return list(result["failed_checks"])
    rows = result.get("checks")
    if rows is None:
        rows = Thresholds(**{k: v for k, v in (result.get("thresholds") or {}).items()
                             if k in Thresholds.__dataclass_fields__}).checks(result)
    broken = {"<=": ">", ">=": "<"}  # the relation that holds when the check fails
    out = []
    for r in rows:
        if r["ok"] is False:
            value = "nan" if r["value"] is None else f"{r['value']:.4g}"  # a NaN metric is stored as None
            out.append(f"{r['metric']} {value} {broken[r['op']]} {r['limit']:g}")
    return out


def summary(result: dict) -> dict:
    out = {k: result[k] for k in STORED if k in result}
    out["failed_checks"] = failed_checks(result)
    out["task_retention"] = {c: s["retention"] for c, s in result.get("task_scores", {}).items()}
    return out


def store(folder, result: dict, weights_sha256: str | None = None) -> dict:
    """Write summary(result) into the checkpoint's config as `eval` and refresh its model card (as `fm.save`
    renders it), so the card and `flexi push` show it. Returns what was stored.

    weights_sha256: the digest of the weights file that was evaluated (checkpoint.weights_digest), taken before
    the model was loaded; default: the file as it is now. `flexi push` re-runs the check when the file no
    longer matches it, so a verdict is never trusted for weights it was not given on. A run without lm-eval
    tasks keeps the lm-eval result already stored for the same weights and threshold (it is still about them)."""
    from pathlib import Path

    from ..core.card import render_card
    from ..core.checkpoint import CARD_FILE, read_config, update_config, weights_digest

    stored = summary(result)
    stored["weights_sha256"] = weights_sha256 or weights_digest(Path(folder))
    earlier = read_config(Path(folder)).eval or {}
    if "lm_eval" not in stored and earlier.get("lm_eval") and all(
            earlier.get(k) == stored.get(k) for k in ("weights_sha256", "threshold")):
        stored["lm_eval"] = earlier["lm_eval"]  # a run without --lm-eval-tasks keeps those of the same weights
    config = update_config(Path(folder), eval=stored)
    tmp = Path(folder) / f".{CARD_FILE}.tmp"
    tmp.write_text(render_card(config))
    tmp.replace(Path(folder) / CARD_FILE)
    return stored
