"""Peak memory of `flexi train` against running the frozen model alone, at the same batch size.

    python benchmarks/train_memory.py --batch-size 4 --seq-len 256

Each side runs in its own fresh process (peak RSS from getrusage), on the embedded SmolLM2-135M in fp32:
  frozen: the original model's forward (HF, logits returned) under no_grad
  train:  3 training steps of flexicli (teacher forward + routed forward/backward, optimiser step)
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
torch.manual_seed(0)
mode, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from flexicli.base import load_base
model, tok, info = load_base(None, dtype="float32", device="cpu")
x = torch.randint(100, 40000, (b, t))
if mode == "frozen":
    with torch.no_grad():
        for _ in range(3):
            model(x).logits.sum().item()
else:
    from flexicli.model import FlexiModel
    from flexicli.train import TrainConfig, train
    fm = FlexiModel.wrap(model, tok, base_model=info.base_model)
    rows = torch.randint(100, 40000, (4 * b, t))
    cfg = TrainConfig(skip_target=4, steps=3, batch_size=b, seq_len=t, calibrate=False, eval_every=100,
                      gradient_checkpointing=(mode == "train-ckpt"))
    train(fm, cfg, rows=rows, heldout=None, progress=False, log=lambda m: None)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(mode: str, b: int, t: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(b), str(t)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    frozen = peak("frozen", a.batch_size, a.seq_len)
    result = {"batch_size": a.batch_size, "seq_len": a.seq_len, "frozen_peak_mb": round(frozen)}
    for mode in ("train", "train-ckpt"):
        p = peak(mode, a.batch_size, a.seq_len)
        result[f"{mode}_peak_mb"], result[f"{mode}_ratio"] = round(p), round(p / frozen, 3)
    print(json.dumps(result, indent=2))
