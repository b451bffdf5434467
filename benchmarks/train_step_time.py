"""Seconds per training step on the embedded SmolLM2-135M (fp32, CPU), by how the loss and the routed layers are
computed, interleaved in one process so that a busy machine slows every configuration alike:

    python benchmarks/train_step_time.py --threads 1 --repeats 4

  fused:         the defaults (distillation loss fused with its gradient, objectives._FusedKL; teacher cache;
                 gradient checkpointing of the routed layers; top1_weight 0.5 since 2026-12-06), with FlexiDepth's
                 adapters / 16
  top1-off:      fused, without the top-1 term (top1_weight: 0, the default before 2026-12-06)
  checkpointed:  the loss through autograd with checkpointed chunks (what the fused loss replaced)
  no-ckpt:       fused, without gradient checkpointing (--no-gradient-checkpointing: more memory, train_memory.py)
  adapter/8:     fused, adapters twice as wide (flexi convert's default until / 4, both 2026-12-06)
  hidden:        fused, with the per-layer hidden-state term (config hidden_weight; its teacher cache holds each
                 routed layer's output)
Each step is one train_step on random tokens (4 x 256, every routed layer routed, teacher hidden states cached as in
a run); the first repeat of each warms up and is not counted. Prints JSON: the median seconds of each.
"""

import argparse
import json
import statistics
import time

import torch

from flexicli.core.base_model import load_base
from flexicli.core.flexi_model import FlexiModel
from flexicli.train.budget import BudgetPenalty
from flexicli.train.config import TrainConfig
from flexicli.train.loop import train_step
from flexicli.train.objectives import logits_fn
from flexicli.train.teacher import TeacherCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = torch.randint(100, 40000, (a.batch_size, a.seq_len))
    cfg = TrainConfig(skip_target=4, batch_size=a.batch_size, seq_len=a.seq_len)
    hidden_cfg = TrainConfig(skip_target=4, batch_size=a.batch_size, seq_len=a.seq_len, hidden_weight=1.0)
    top1_off = TrainConfig(skip_target=4, batch_size=a.batch_size, seq_len=a.seq_len, top1_weight=0.0)

    def routed(reduction: int):
        model, tok, info = load_base(None, dtype="float32", device="cpu")
        fm = FlexiModel.wrap(model, tok, base_model=info.base_model, adapter_reduction=reduction)
        for p in fm.trainable_parameters():
            p.requires_grad_(True)
        with torch.no_grad():  # routers that skip some tokens, so both branches of every routed layer do work
            torch.manual_seed(0)
            for layer in fm.layers:
                torch.nn.init.normal_(layer.router.head.weight, std=0.05)
        fm.model.train(False)
        return fm, TeacherCache(fm, rows).lookup(torch.arange(a.batch_size), "cpu")

    (fm, cached), (fm8, cached8) = routed(16), routed(8)
    hidden_cached = TeacherCache(fm, rows, layers=True).lookup(torch.arange(a.batch_size), "cpu")
    fused, checkpointed, fused8 = logits_fn(fm.model), logits_fn(fm.model), logits_fn(fm8.model)
    checkpointed.linear = None  # objectives.distill_loss then takes the checkpointed autograd path
    configs = {"fused": (fm, fused, True, cfg, cached), "checkpointed": (fm, checkpointed, True, cfg, cached),
               "no-ckpt": (fm, fused, False, cfg, cached), "top1-off": (fm, fused, True, top1_off, cached),
               "adapter/8": (fm8, fused8, True, cfg, cached8),
               "hidden": (fm, fused, True, hidden_cfg, hidden_cached)}
    times = {name: [] for name in configs}
    for _ in range(a.repeats):
        for name, (model, head, ckpt, step_cfg, step_cached) in configs.items():
            model.state.checkpointing = ckpt
            t0 = time.perf_counter()
            train_step(model, rows, step_cfg, head, 4.0, BudgetPenalty(4), cached=step_cached)
            times[name].append(time.perf_counter() - t0)
            model.model.zero_grad(set_to_none=True)
    out = {name: round(statistics.median(t[1:] or t), 2) for name, t in times.items()}
    print(json.dumps({"seconds_per_step": out, "threads": a.threads, "batch": [a.batch_size, a.seq_len],
                      "checkpointed_over_fused": round(out["checkpointed"] / out["fused"], 3),
                      "fused_over_no_ckpt": round(out["fused"] / out["no-ckpt"], 3),
                      "adapter8_over_fused": round(out["adapter/8"] / out["fused"], 3),
                      "hidden_over_fused": round(out["hidden"] / out["fused"], 3),
                      "fused_over_top1_off": round(out["fused"] / out["top1-off"], 3)}))


if __name__ == "__main__":
    main()
