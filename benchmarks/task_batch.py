"""The task suite decoded 8 prompts at a time (flexi eval before GENERATE_BATCH) and 48 (one category, today's
default), on one checkpoint in one process: seconds, and whether every score is the same (docs/eval.md).

    python benchmarks/task_batch.py CKPT [--order 48,8] [--threads 1]
"""

import argparse
import json
import time

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.data.tasks import load_tasks
from flexicli.evaluation.evaluate import compare_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--order", default="8,48", help="prompts decoded at once, in the order run (run both orders: "
                    "the machine's load drifts)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fm, tasks, out = FlexiModel.load(args.checkpoint), load_tasks(), {}
    for size in map(int, args.order.split(",")):
        t0 = time.perf_counter()
        r = compare_tasks(fm, tasks, {"mode": "routed"}, batch_size=8, generate_batch=size)
        out[size] = {"seconds": round(time.perf_counter() - t0, 1), "retention": r["retention"],
                     "retention_interval": r["retention_interval"], "task_answer_kl": r["task_answer_kl"],
                     "task_answer_top1": r["task_answer_top1"],
                     "per_category": {c: [s["original"], s["routed"]] for c, s in r["task_scores"].items()}}
        print(size, json.dumps(out[size]), flush=True)
    first, *rest = out.values()
    print("same scores:", all(o == {**first, "seconds": o["seconds"]} for o in rest),
          "seconds:", {k: v["seconds"] for k, v in out.items()})


if __name__ == "__main__":
    main()
