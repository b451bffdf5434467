"""A copy of a checkpoint trained with `ema` (a weight average) that holds the last step's weights instead, with its
threshold calibrated to the run's target the way `flexi train` calibrates the average, so that the two are compared
on the same run at the same count (train's held-out rows printed here; `flexi eval` on the copy):

    python benchmarks/last_step_copy.py runs/e0/ckpt runs/e0/ckpt_last
    flexi eval -m runs/e0/ckpt_last --json
"""

import argparse
import json
from pathlib import Path

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.train.calibration import calibrate_threshold
from flexicli.train.loop import heldout_metrics, heldout_rows
from flexicli.train.resume import saved_weights

ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("out")
args = ap.parse_args()

fm = FlexiModel.load(args.ckpt)
last = saved_weights(Path(args.ckpt)).get("last")
if last is None:
    raise SystemExit(f"{args.ckpt} has no last-step weights: it was not trained with ema > 0")
with torch.no_grad():
    torch._foreach_copy_(fm.trainable_parameters(), last)
training = fm.config.training
rows = heldout_rows(fm, 256)  # the default seq_len, which these runs trained with
fm.set_threshold(calibrate_threshold(fm, rows, training["skip_target"]))
fm.config.training = {k: v for k, v in training.items() if k not in ("ema", "last_step")}
fm.save(args.out, overwrite=True)
m = heldout_metrics(fm, rows)
print(json.dumps({"threshold": fm.config.threshold, **{k: m[k] for k in ("kl", "kl_p99", "top1_agreement",
                                                                          "mean_skipped_layers")}}))
