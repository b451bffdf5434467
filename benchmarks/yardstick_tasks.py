"""What retention a given KL buys: `flexi eval`'s figures (teacher-forced KL, p99, top-1 on its held-out text; the
task suite's retention with its 5-95% bootstrap range; agreement on the original's own task answers) for
fake-quantised copies of the original model instead of a routed one. The yardstick of `flexi eval --yardstick`
stops at teacher forcing; this adds the task suite, so the verdict's thresholds (KL <= 0.25, top-1 >= 0.80,
retention >= 0.90) can be read against copies whose only change is weight rounding.

    python benchmarks/yardstick_tasks.py CKPT [--variants int8,int6,int5,int4] [--json OUT]

CKPT: any flexi checkpoint of the base model (only the original, routing off, is used).
"""

import argparse
import json
from contextlib import contextmanager

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.data.tokens import prompt_ids
from flexicli.evaluation.evaluate import (DEFAULTS, _Agreement, _batches, _decoder_linears, _inputs, _right_padded,
                                          fake_quantize, generate_ids)
from flexicli.evaluation.scores import correct, flips, retention, retention_interval

# name -> (bits, group size): int8 per output channel, the rest in groups of 32 (the table); int8g32 and int7
# are further near-lossless copies, each one more draw of how much retention moves when almost nothing changes
VARIANTS = {"int8": (8, None), "int8g32": (8, 32), "int7": (7, 32), "int6": (6, 32), "int5": (5, 32), "int4": (4, 32)}


@contextmanager
def rounded(fm, bits: int, group_size: int | None):
    """The decoder's Linear weights fake-quantised in place while open (once, not per forward: generation runs many
    forwards); the original tensors are put back afterwards."""
    saved = []
    try:
        for _, linears in _decoder_linears(fm):
            for lin, transposed in linears:
                w = lin.weight.data
                saved.append((lin, w))
                lin.weight.data = (fake_quantize(w.t(), bits, group_size).t().contiguous() if transposed
                                   else fake_quantize(w, bits, group_size))
        yield
    finally:
        for lin, w in saved:
            lin.weight.data = w


def logits(fm, ids, mask):
    with torch.no_grad(), fm.routing("full"):
        return fm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--variants", default="int8,int6,int5,int4")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    fm = FlexiModel.load(args.ckpt)
    d = DEFAULTS
    seqs, _, tasks = _inputs(fm, None, None, None, d["max_samples"], d["seq_len"], d["n_prompts"],
                             d["tasks_per_category"], None)
    bs = d["batch_size"]
    text_batches = [_right_padded(fm, b, "cpu") for b in _batches(sorted(seqs, key=len, reverse=True), bs)]
    reference = [logits(fm, ids, mask) for ids, mask in text_batches]
    by_category: dict[str, list] = {}
    for t in tasks:
        by_category.setdefault(t.category, []).append(t)
    jobs = [(c, [prompt_ids(fm.tokenizer, t.prompt, chat=True) for t in b], b)
            for c, items in by_category.items() for b in _batches(items, bs)]

    categories = [c for c, _, batch in jobs for _ in batch]  # each score's category, in run_tasks' order

    def run_tasks():
        scores, answers = [], []
        for _, prompts, batch in jobs:
            outs = generate_ids(fm, prompts, batch[0].max_new_tokens, {"mode": "full"})
            scores += [t.score(x) for t, x in zip(batch, fm.tokenizer.batch_decode(outs, skip_special_tokens=True))]
            answers += zip(prompts, outs)
        return scores, answers

    def per_category(original, scores):
        out = {}
        for c in dict.fromkeys(categories):
            idx = [i for i, k in enumerate(categories) if k == c]
            o, r = [original[i] for i in idx], [scores[i] for i in idx]
            out[c] = {"retention": retention(o, r), "original": sum(o) / len(o), "score": sum(r) / len(r)}
        return out

    original_scores, answers = run_tasks()
    answers = [(p, a) for p, a in answers if a]
    answer_batches = [(_right_padded(fm, [p + a for p, a in b], "cpu"), b) for b in _batches(answers, bs)]
    answer_reference = [logits(fm, ids, mask) for (ids, mask), _ in answer_batches]
    rows = {"original": {"task_score": sum(original_scores) / len(original_scores), "items": len(original_scores),
                         "scores": original_scores, "categories": categories}}
    print(f"original: task score {rows['original']['task_score']:.3f} on {len(original_scores)} items", flush=True)
    for name in args.variants.split(","):
        bits, group = VARIANTS[name]
        text, ans = _Agreement(), _Agreement()
        with rounded(fm, bits, group):
            for (ids, mask), ref in zip(text_batches, reference):
                out = logits(fm, ids, mask)
                for row in range(ids.shape[0]):
                    n = int(mask[row].sum()) - 1
                    text.add(ref[row, :n], out[row, :n])
            for ((ids, mask), batch), ref in zip(answer_batches, answer_reference):
                out = logits(fm, ids, mask)
                for row, (p, a) in enumerate(batch):
                    span = slice(len(p) - 1, len(p) + len(a) - 1)
                    ans.add(ref[row, span], out[row, span])
            scores, _ = run_tasks()
        t, a = text.result(), ans.result()
        rows[name] = {"kl": t["kl"], "kl_p99": t["kl_p99"], "top1_agreement": t["top1_agreement"],
                      "task_score": sum(scores) / len(scores), "retention": retention(original_scores, scores),
                      "retention_interval": retention_interval(original_scores, scores),
                      "task_answer_kl": a["kl"], "task_answer_top1": a["top1_agreement"],
                      "flips": flips({i: correct(x) for i, x in enumerate(original_scores)},
                                     {i: correct(x) for i, x in enumerate(scores)}),
                      "categories": per_category(original_scores, scores), "scores": scores}
        r = rows[name]
        print(f"{name}: KL {r['kl']:.3f} p99 {r['kl_p99']:.2f} top-1 {r['top1_agreement']:.3f} | retention "
              f"{r['retention']:.3f} (5-95% {r['retention_interval'][0]:.3f}-{r['retention_interval'][1]:.3f}; score "
              f"{r['task_score']:.3f}) | answers KL {r['task_answer_kl']:.3f} top-1 "
              f"{r['task_answer_top1']:.3f} | flips {r['flips']['correct_to_wrong']:.3f} lost, "
              f"{r['flips']['wrong_to_correct']:.3f} gained", flush=True)
        print("   " + ", ".join(f"{c} {v['retention']:.2f}" if v["retention"] is not None else f"{c} -"
                                for c, v in r["categories"].items()), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
