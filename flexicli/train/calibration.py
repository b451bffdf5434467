"""After training: move the one inference threshold so the held-out mean skipped count equals the target (the
budget is then exact on the text it was calibrated on)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.flexi_model import decoder_of
from ..core.routed_layer import threshold_of


@torch.no_grad()
def mean_skipped(fm, rows: torch.Tensor, batch_size: int = 8, prefix: torch.Tensor | None = None) -> float:
    """Mean routed layers skipped per token, in layer-equivalents (routed pass only: what threshold calibration
    needs). `prefix`: the hidden states entering the first routed layer (TeacherCache.prefix), so the layers before
    it are not rerun."""
    from .teacher import start_at_first_routed

    decoder, device = decoder_of(fm.model), next(fm.model.parameters()).device
    skipped = 0.0
    for i in range(0, rows.shape[0], batch_size):
        start = start_at_first_routed(fm, prefix[i:i + batch_size].to(device)) if prefix is not None else nullcontext()
        with fm.routing("routed"), fm.record() as rec, start:
            decoder(input_ids=rows[i:i + batch_size].to(device))
        skipped += rec.skipped_layers().sum().item()
    return skipped / rows.numel()


def calibrate_threshold(fm, rows: torch.Tensor, target: float, iters: int = 16) -> float:
    """Bisect the threshold so that held-out mean skipped layers == target (more threshold = more skipping). In logit
    space: trained thresholds can sit close to 0 or 1, where bisecting w itself runs out of resolution. The unrouted
    layers before the first routed one run once, not once per iteration."""
    from .teacher import TeacherCache

    prefix = TeacherCache(fm, rows).prefix
    lo, hi = -16.0, 16.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        with fm.routing(threshold=threshold_of(mid)):
            skipped = mean_skipped(fm, rows, prefix=prefix)
        lo, hi = (mid, hi) if skipped < target else (lo, mid)
    return threshold_of((lo + hi) / 2)
