"""Where a checkpoint loses the task suite (docs/results.md, "Task retention"). Two probes on the 84 task items:

    python benchmarks/task_probe.py phases CKPT   # task score with routing in both phases, prompt only, answer only
    python benchmarks/task_probe.py skips CKPT    # layers skipped per token on task prompts and on routed answers

`phases` switches routing per forward pass: a pass over more than one token is the prompt (prefill), a one-token
pass is an answer token (decode). "prompt_full" computes the prompt with the original layers and routes the answer.
"""

import argparse
import math

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.data.tasks import load_tasks
from flexicli.data.tokens import prompt_ids
from flexicli.evaluation.evaluate import generate_ids

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


ap = argparse.ArgumentParser()
ap.add_argument("probe", choices=["phases", "skips"])
ap.add_argument("checkpoint")
args = ap.parse_args()
model = FlexiModel.load(args.checkpoint, device="cpu")
{"phases": phases, "skips": skips}[args.probe](model)
