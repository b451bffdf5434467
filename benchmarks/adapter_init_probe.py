"""Adapter initialisation without any training: static skipping of the K least influential routed layers of SmolLM2
(or of --base, e.g. Gemma-3-270M's GGUF), with fresh adapters (down_proj = 0), ridge least squares only, and least
squares plus the local MSE phase.

    python benchmarks/adapter_init_probe.py --skip 4 [--adapter-reduction 8] [--layers all] [--base model.gguf]
        [--local-steps 200 50]   # one "least squares + local" row per length of the local phase (default: 200)
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--heldout-rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--adapter-reduction", type=int, default=16, help="adapter width = the MLP's width / this")
    ap.add_argument("--layers", default="half", help="layers to route, as flexi convert --layers")
    ap.add_argument("--base", default=None, help="base model as flexi convert takes it (default: the embedded one)")
    ap.add_argument("--local-steps", type=int, nargs="+", default=[200],
                    help="lengths of the local MSE phase to measure, each from the least-squares start")
    args = ap.parse_args()

    from flexicli.train.adapter_init import fit_adapters
    from flexicli.core.base_model import load_base
    from flexicli.data.text import unpadded
    from flexicli.evaluation.evaluate import compare_teacher_forced
    from flexicli.core.flexi_model import FlexiModel, parse_layers
    from flexicli.train.router_init import unit_influence
    from flexicli.train.config import TrainConfig
    from flexicli.train.loop import heldout_rows, training_rows

    model, tok, info = load_base(args.base, dtype="float32", device="cpu")
    n = model.config.num_hidden_layers
    fm = FlexiModel.wrap(model, tok, routed_layers=parse_layers(args.layers, n), base_model=info.base_model,
                        adapter_reduction=args.adapter_reduction)
    cfg = TrainConfig(skip_target=args.skip, seq_len=args.seq_len)
    rows, held = training_rows(fm, cfg), heldout_rows(fm, args.seq_len)[: args.heldout_rows]
    _, infl = unit_influence(fm, rows[:16])
    order = infl.mean(0).argsort().tolist()
    skip = frozenset(fm.config.routed_layers[i] for i in order[: args.skip])
    routing = {"mode": "fixed", "skip_layers": skip}
    out = {"layers": args.layers, "mean_influence": [round(x, 4) for x in infl.mean(0).tolist()],
           "skip_layers": sorted(skip), "train_rows": rows.shape[0], "heldout_rows": held.shape[0]}

    def measure(name):
        r = compare_teacher_forced(fm, unpadded(held), routing, 4)
        out[name] = {k: round(r[k], 4) for k in ("kl", "top1_agreement")}
        print(name, out[name], flush=True)

    measure("fresh")
    t = time.perf_counter()
    out["ls_report"] = fit_adapters(fm, rows, local_steps=0)
    out["ls_seconds"] = round(time.perf_counter() - t, 1)
    measure("least_squares")
    for steps in args.local_steps:  # each fit starts afresh: neurons copied, down_proj solved, then the local phase
        name = f"least_squares_local_{steps}"
        t = time.perf_counter()
        out[name + "_report"] = fit_adapters(fm, rows, local_steps=steps)
        out[name + "_seconds"] = round(time.perf_counter() - t, 1)
        measure(name)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
