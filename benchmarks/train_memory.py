"""Peak memory of `flexi train` against running the frozen model alone, at the same batch size.

    python benchmarks/train_memory.py --batch-size 4 --seq-len 256

Each side runs in its own fresh process (peak RSS from getrusage), on the embedded SmolLM2-135M in fp32:
  frozen: the original model's forward (HF, logits returned) under no_grad
  train:  3 training steps of flexicli with its defaults (teacher cache for all rows, gradient checkpointing: each
          routed layer recomputed in backward; routed forward/backward, optimiser step)
  train-nocache: the same, recomputing the teacher each step (--no-cache-teacher: for data too big to cache)
  train-nockpt: without gradient checkpointing (--no-gradient-checkpointing)
  train-nockpt-nocache: neither
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
torch.manual_seed(0)
mode, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from flexicli.core.base_model import load_base
model, tok, info = load_base(None, dtype="float32", device="cpu")
x = torch.randint(100, 40000, (b, t))
if mode == "frozen":
    with torch.no_grad():
        for _ in range(3):
            model(x).logits.sum().item()
else:
    from flexicli.core.flexi_model import FlexiModel
    from flexicli.train.config import TrainConfig
    from flexicli.train.loop import train
    fm = FlexiModel.wrap(model, tok, base_model=info.base_model)
    rows = torch.randint(100, 40000, (int(sys.argv[4]), t))  # as many rows as the real run (the cache grows with them)
    cfg = TrainConfig(skip_target=4, steps=3, batch_size=b, seq_len=t, calibrate=False, eval_every=100,
                      cache_teacher=("nocache" not in mode), gradient_checkpointing=("nockpt" not in mode))
    train(fm, cfg, rows=rows, heldout=None, progress=False, log=lambda m: None)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(mode: str, b: int, t: int, rows: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(b), str(t), str(rows)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=184, help="training rows (the SmolLM2 recipe's data gives 184 x 256)")
    a = ap.parse_args()
    frozen = peak("frozen", a.batch_size, a.seq_len, a.rows)
    result = {"batch_size": a.batch_size, "seq_len": a.seq_len, "rows": a.rows, "frozen_peak_mb": round(frozen)}
    for mode in ("train", "train-nocache", "train-nockpt", "train-nockpt-nocache"):
        p = peak(mode, a.batch_size, a.seq_len, a.rows)
        result[f"{mode}_peak_mb"], result[f"{mode}_ratio"] = round(p), round(p / frozen, 3)
    print(json.dumps(result, indent=2))
