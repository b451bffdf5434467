"""Training settings against each other on several seeds at once: each job trains a copy of one converted checkpoint
with the defaults plus its overrides, on the same rows, then measures it as `flexi eval` does (default verdict) and
on standard-library text. One JSON line per job, written as it finishes. Made for a lent GPU (one process per job,
several at once), runs on CPU too.

    # on the machine that made the data cache: the rows every job trains on, once
    python benchmarks/seed_sweep.py rows CKPT rows.safetensors
    # anywhere the same base model loads (same FLEXI_CACHE selfgen answers for `flexi eval`'s held-out text)
    python benchmarks/seed_sweep.py run CKPT rows.safetensors sweep.json --stdlib stdlib.txt --seeds 0,1,2 \
        --workers 6 --device cuda --out results.jsonl

sweep.json: {"name": {config overrides}, ...}, e.g. {"default": {}, "beta2": {"adam_beta2": 0.95}}. Jobs run
seed-major (every setting at seed 0 first), so a run cut short still compares the settings on the same seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

KEEP = ("kl", "kl_p99", "top1_agreement", "mean_skipped_layers")


def make_rows(ckpt: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file

    from flexicli.core.flexi_model import FlexiModel
    from flexicli.train.config import TrainConfig
    from flexicli.train.loop import heldout_rows, training_rows

    fm = FlexiModel.load(ckpt)
    cfg = TrainConfig(skip_target=0)  # the rows depend on the data settings only, not on the budget
    rows, held = training_rows(fm, cfg), heldout_rows(fm, cfg.seq_len)
    save_file({"rows": rows.to(torch.int32).contiguous(), "heldout": held.to(torch.int32).contiguous()}, out)
    print(f"{out}: {tuple(rows.shape)} training rows, {tuple(held.shape)} held-out rows")


def job(name: str, overrides: dict, seed: int, a: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from flexicli.core.flexi_model import FlexiModel
    from flexicli.data.text import read_data
    from flexicli.evaluation.evaluate import evaluate
    from flexicli.train.config import TrainConfig
    from flexicli.train.loop import train

    torch.set_num_threads(a["threads"])
    folder = Path(a["workdir"]) / f"{name}-s{seed}"
    shutil.copytree(a["ckpt"], folder, dirs_exist_ok=True)
    t0 = time.perf_counter()
    fm = FlexiModel.load(folder, device=a["device"], dtype="float32")  # as the CPU default trains, also on a GPU
    data = load_file(a["rows"])
    cfg = TrainConfig.from_dict({"skip_target": a["skip_target"], **overrides, "seed": seed})
    summary = train(fm, cfg, rows=data["rows"].long(), heldout=data["heldout"].long(), log=lambda m: None)
    t_train = time.perf_counter() - t0
    out = {"name": name, "seed": seed, "overrides": overrides, "train_s": round(t_train, 1),
           "train": {k: summary[k] for k in KEEP if k in summary},
           "last_step": summary.get("last_step"), "metrics": str(folder / "metrics.jsonl")}
    res = evaluate(fm)  # flexi eval's defaults: built-in held-out conversations, task suite, verdict
    out["eval"] = {k: res.get(k) for k in (*KEEP, "retention", "greedy_first_divergence", "passed", "seconds")}
    if a["stdlib"]:
        res = evaluate(fm, data=read_data(a["stdlib"], fm.tokenizer), tasks_per_category=0, n_prompts=0)
        out["stdlib"] = {k: res.get(k) for k in KEEP}
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def _safe_job(*args) -> dict:
    try:
        return job(*args)
    except Exception:  # one broken job must not end the sweep: its traceback is its result line
        return {"name": args[0], "seed": args[2], "error": traceback.format_exc()}


def run(a: argparse.Namespace) -> None:
    sweep = json.loads(Path(a.sweep).read_text())
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = [(name, overrides, seed) for seed in seeds for name, overrides in sweep.items()]
    shared = dict(ckpt=a.ckpt, rows=a.rows, stdlib=a.stdlib, device=a.device, threads=a.threads,
                  skip_target=a.skip_target, workdir=a.workdir or tempfile.mkdtemp(prefix="sweep-"))
    out = Path(a.out)
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(_safe_job, name, overrides, seed, shared) for name, overrides, seed in jobs]
        for f in as_completed(futures):
            r = f.result()
            with out.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            brief = r.get("error", "").strip().splitlines()[-1:] or [json.dumps(r.get("eval"))]
            print(f"{r['name']} seed {r['seed']}: {brief[0]}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("rows")
    r.add_argument("ckpt")
    r.add_argument("out")
    s = sub.add_parser("run")
    s.add_argument("ckpt")
    s.add_argument("rows")
    s.add_argument("sweep")
    s.add_argument("--out", default="sweep.jsonl")
    s.add_argument("--stdlib", default=None)
    s.add_argument("--seeds", default="0,1")
    s.add_argument("--skip-target", type=float, default=4)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", default=None)
    s.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    if a.verb == "rows":
        make_rows(a.ckpt, a.out)
    else:
        run(a)


if __name__ == "__main__":
    sys.exit(main())
