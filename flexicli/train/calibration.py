"""After training: move the one inference threshold so the held-out mean skipped count equals the target (the
budget is then exact on the text it was calibrated on)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.flexi_model import decoder_of
from ..core.routed_layer import threshold_logit, threshold_of


@torch.no_grad()
def mean_skipped(fm, rows: torch.Tensor, batch_size: int = 8, prefix: torch.Tensor | None = None) -> float:
    """Mean routed layers skipped per token, in layer-equivalents (routed pass only: what threshold calibration
    needs), text.PAD positions left out (right padding: the tokens before them are computed as without it).
    `prefix`: the hidden states entering the first routed layer (TeacherCache.prefix), so the layers before it are
    not rerun."""
    from ..data.text import PAD
    from .teacher import start_at_first_routed

    decoder, device = decoder_of(fm.model), next(fm.model.parameters()).device
    skipped = 0.0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i:i + batch_size]
        start = start_at_first_routed(fm, prefix[i:i + batch_size].to(device)) if prefix is not None else nullcontext()
        with fm.routing("routed"), fm.record() as rec, start:
            decoder(input_ids=batch.clamp(min=0).to(device))
        skipped += rec.skipped_layers()[(batch != PAD).to(device)].sum().item()
    return skipped / int((rows != PAD).sum())


def calibrate_threshold(fm, rows: torch.Tensor, target: float, iters: int = 16, tol: float = 0.02,
                        start: float = 0.5, min_width: float = 1e-3) -> float:
    """The threshold at which held-out mean skipped layers == target within `tol` (more threshold = more skipping).
    Searched in logit space (trained thresholds can sit close to 0 or 1, where w itself runs out of resolution):
    from `start` (the trained threshold, usually near the answer) outward until the target is bracketed (by the
    secant through the last two probes, 1.2x past the target, at most a step that doubles from 0.25), then by
    interpolation between the bracket's ends (the Illinois rule: regula falsi, with the end that stays put weighed
    down by half each time it stays put again, so a curved count does not leave the search creeping along one end).
    Each probe is one routed pass over `rows`, at most `iters` of them; the search stops at the first probe within
    `tol`, or once the bracket is narrower than `min_width` logits (where gates tie, as after a few training steps,
    no threshold gets within `tol`). The unrouted layers before the first routed one run once, not per probe."""
    from .teacher import first_routed_inputs

    prefix = first_routed_inputs(fm, rows)
    lo, hi = -16.0, 16.0  # logits; the count is monotone in the threshold
    at_lo = at_hi = None  # the counts probed at lo / hi (None: only the search's bounds)
    x, step, last_side, last = min(max(threshold_logit(start), lo), hi), 0.25, None, None
    for _ in range(iters):
        with fm.routing(threshold=threshold_of(x)):
            skipped = mean_skipped(fm, rows, prefix=prefix)
        if abs(skipped - target) <= tol:
            return threshold_of(x)
        side = skipped < target
        if side:
            lo, at_lo = x, skipped
        else:
            hi, at_hi = x, skipped
        if lo >= hi or (at_lo is not None and at_hi is not None and hi - lo < min_width):  # no closer to get
            break
        if at_lo is not None and at_hi is not None:
            if side == last_side:  # the other end stayed put again: halve its residual
                if side:
                    at_hi = target + (at_hi - target) / 2
                else:
                    at_lo = target - (target - at_lo) / 2
            x = lo + (target - at_lo) / (at_hi - at_lo) * (hi - lo)  # at_lo < target < at_hi
        else:  # not bracketed yet: towards the target, by the secant through the last two probes a little past it
            move = step if side else -step  # (or, without two probes or a usable secant, a step that doubles)
            if last is not None and skipped != last[1]:
                secant = 1.2 * (target - skipped) * (x - last[0]) / (skipped - last[1])
                if 0 < secant / move < 1:
                    move = secant
            last, x = (x, skipped), min(max(x + move, lo), hi)
            step *= 2
        last_side = side
    return threshold_of((lo + hi) / 2)
