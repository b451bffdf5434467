"""A copy of a trained checkpoint that holds other weights of the same run from its training state: the last
step's (`--weights last`, default; a run with `ema`) or the final average (`--weights ema`; a run whose checkpoint
holds the average of an earlier step, picked on validation by `select`), with its threshold calibrated to the run's
target the way `flexi train` calibrates, so that the two are compared on the same run at the same count (train's
held-out rows printed here; `flexi eval` on the copy):

    python benchmarks/last_step_copy.py runs/e0/ckpt runs/e0/ckpt_last
    python benchmarks/last_step_copy.py runs/v0/ckpt runs/v0/ckpt_final --weights ema
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
ap.add_argument("--weights", choices=["last", "ema"], default="last")
args = ap.parse_args()

fm = FlexiModel.load(args.ckpt)
last = saved_weights(Path(args.ckpt)).get(args.weights)
if last is None:
    raise SystemExit(f"{args.ckpt} has no {args.weights!r} weights in its training state")
with torch.no_grad():
    torch._foreach_copy_(fm.trainable_parameters(), last)
training = fm.config.training
rows = heldout_rows(fm, 256)  # the default seq_len, which these runs trained with
fm.set_threshold(calibrate_threshold(fm, rows, training["skip_target"]))
fm.config.training = {k: v for k, v in training.items()
                      if k not in ("ema", "last_step", "selected_step", "selected_validation_kl")}
fm.save(args.out, overwrite=True)
m = heldout_metrics(fm, rows)
print(json.dumps({"threshold": fm.config.threshold, **{k: m[k] for k in ("kl", "kl_p99", "top1_agreement",
                                                                          "mean_skipped_layers")}}))
