"""Where a checkpoint loses the task suite (docs/results.md, "Task retention"). Probes on the task items (336; 84
before the suite grew):

    python benchmarks/task_probe.py phases CKPT   # task score with routing in both phases, prompt only, answer only
    python benchmarks/task_probe.py skips CKPT    # layers skipped per token on task prompts and on routed answers
    python benchmarks/task_probe.py flips CKPT    # agreement on the original's answers per category, token kind and
                                                  # position; then with each often-skipped layer restored alone

`phases` switches routing per forward pass: a pass over more than one token is the prompt (prefill), a one-token
pass is an answer token (decode). "prompt_full" computes the prompt with the original layers and routes the answer.
"""

import argparse
import math

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.data.tasks import load_tasks
from flexicli.data.tokens import prompt_ids
from flexicli.evaluation.evaluate import generate_ids, token_kl, top1_match

POLICIES = {"full": ("full", "full"), "routed": ("routed", "routed"),
            "prompt_full": ("full", "routed"), "answer_full": ("routed", "full")}  # (prompt, answer)


def phases(fm) -> None:
    policy = {"now": "routed"}

    def set_mode(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        prompt_mode, answer_mode = POLICIES[policy["now"]]
        fm.state.mode = prompt_mode if ids.shape[1] > 1 else answer_mode

    fm.model.register_forward_pre_hook(set_mode, with_kwargs=True)
    for name in POLICIES:
        policy["now"] = name
        by: dict[str, list[float]] = {}
        for t in load_tasks():
            ids = prompt_ids(fm.tokenizer, t.prompt, chat=True)
            out = generate_ids(fm, [ids], t.max_new_tokens, {"mode": "routed"})[0]  # the hook overrides the mode
            by.setdefault(t.category, []).append(t.score(fm.tokenizer.decode(out, skip_special_tokens=True)))
        every = [x for v in by.values() for x in v]
        print(name, f"all {sum(every) / len(every):.3f}",
              " ".join(f"{c} {sum(v) / len(v):.3f}" for c, v in by.items()), flush=True)


def skips(fm) -> None:
    by: dict[str, list[tuple[float, float]]] = {}
    for t in load_tasks():
        p = prompt_ids(fm.tokenizer, t.prompt, chat=True)
        a = generate_ids(fm, [p], t.max_new_tokens, {"mode": "routed"})[0]
        with torch.no_grad(), fm.routing(mode="routed"), fm.record() as rec:
            fm.model(input_ids=torch.tensor([p + a]))
        s = rec.skipped_layers()[0]
        by.setdefault(t.category, []).append((s[:len(p)].mean().item(), s[len(p):].mean().item() if a else math.nan))
    for c, v in by.items():
        answers = [y for _, y in v if not math.isnan(y)]
        print(f"{c:15s} prompt {sum(x for x, _ in v) / len(v):.2f} "
              f"answer {sum(answers) / max(1, len(answers)):.2f} (layer-equivalents per token)")


def _kind(text: str) -> str:
    t = text.strip()
    if not t:
        return "space"
    if any(c.isdigit() for c in t):
        return "digit"
    if t.isalpha():
        return "word"
    return "punct"


@torch.no_grad()
def _answer_positions(fm, pairs):
    """Per answer token of the original's greedy answers (teacher-forced): (category, kind, position, agrees, kl)."""
    out = []
    for cat, p, a in pairs:
        ids = torch.tensor([p + a])
        span = slice(len(p) - 1, len(p) + len(a) - 1)  # position i predicts token i + 1
        with fm.routing("full"):
            t = fm.model(input_ids=ids, use_cache=False).logits[0, span]
        with fm.routing("routed"):
            s = fm.model(input_ids=ids, use_cache=False).logits[0, span]
        kl, agree = token_kl(t, s), top1_match(t, s)  # flexi eval's own per-token measures
        for i, tok in enumerate(a):
            out.append((cat, _kind(fm.tokenizer.decode([tok])), i, bool(agree[i]), float(kl[i])))
    return out


def _summary(rows, key) -> str:
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return "  ".join(f"{k} {sum(r[3] for r in v) / len(v):.3f}/{sum(r[4] for r in v) / len(v):.2f} (n={len(v)})"
                     for k, v in sorted(groups.items()))


def flips(fm) -> None:
    """Top-1 agreement / mean KL on the original's own answers, by category, token kind and position; then the
    same with each routed layer that task answers skip often forced to run (router bias + 50), one at a time:
    which layer's skipping does the damage."""
    pairs = []
    for t in load_tasks():
        p = prompt_ids(fm.tokenizer, t.prompt, chat=True)
        pairs.append((t.category, p, generate_ids(fm, [p], t.max_new_tokens, {"mode": "full"})[0]))
    base = _answer_positions(fm, pairs)
    agree = sum(r[3] for r in base) / len(base)
    print(f"answers: {len(base)} tokens, top-1 {agree:.3f}, KL {sum(r[4] for r in base) / len(base):.3f}")
    print("by category:", _summary(base, lambda r: r[0]))
    print("by kind:    ", _summary(base, lambda r: r[1]))
    print("by position:", _summary(base, lambda r: "first" if r[2] == 0 else "1-3" if r[2] < 4 else "4+"))
    with torch.no_grad(), fm.routing("routed"), fm.record() as rec:
        for _, p, a in pairs:
            fm.model(input_ids=torch.tensor([p + a]), use_cache=False)
    share = (~rec.decisions()).float().mean(dim=(0, 1))  # per routed unit: the share of task tokens skipping it
    print("skip share on task prompts + answers:", " ".join(f"{k}:{x:.2f}" for k, x in zip(fm.unit_keys, share)))
    for layer in fm.model.modules():
        router = getattr(layer, "router", None)  # skip unit `layer` only (module/mlp have attn_/mlp_router)
        if router is None or not hasattr(layer, "layer_index") or layer.layer_index not in fm.unit_keys:
            continue
        if share[fm.unit_keys.index(layer.layer_index)] < 0.10:
            continue
        with torch.no_grad():
            router.bias += 50.0
        try:
            rows = _answer_positions(fm, pairs)
        finally:
            with torch.no_grad():
                router.bias -= 50.0
        print(f"layer {layer.layer_index} restored: top-1 {sum(r[3] for r in rows) / len(rows):.3f} "
              f"KL {sum(r[4] for r in rows) / len(rows):.3f}", flush=True)


ap = argparse.ArgumentParser()
ap.add_argument("probe", choices=["phases", "skips", "flips"])
ap.add_argument("checkpoint")
args = ap.parse_args()
model = FlexiModel.load(args.checkpoint, device="cpu")
{"phases": phases, "skips": skips, "flips": flips}[args.probe](model)
