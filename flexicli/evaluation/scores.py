"""How two models' scores on the same items compare: retention and flips. Shared by the verdict (evaluate.py) and
the lm-evaluation-harness bridge (lm_eval.py)."""

from __future__ import annotations

from collections.abc import Sequence


def retention(original: Sequence[float], routed: Sequence[float]) -> float | None:
    """Mean routed score / mean original score; None when the original scores nothing (undefined)."""
    base = sum(original) / max(1, len(original))
    return None if base == 0 else (sum(routed) / max(1, len(routed))) / base


def retention_interval(original: Sequence[float], routed: Sequence[float], draws: int = 2000,
                       seed: int = 0) -> list[float] | None:
    """The 5th and 95th percentiles of retention over the items resampled with replacement (paired: a drawn item
    brings both scores), from a fixed seed: how far one run of the suite may sit from what its items measure on
    average. None without items or when the original scores nothing."""
    import torch

    if not original or retention(original, routed) is None:
        return None
    o, r = torch.tensor(original, dtype=torch.float64), torch.tensor(routed, dtype=torch.float64)
    idx = torch.randint(len(o), (draws, len(o)), generator=torch.Generator().manual_seed(seed))
    base = o[idx].sum(1)
    ratios = (r[idx].sum(1)[base > 0] / base[base > 0]).sort().values
    return [ratios[int(0.05 * (len(ratios) - 1))].item(), ratios[int(0.95 * (len(ratios) - 1))].item()]


def flips(original: dict, routed: dict) -> dict:
    """Flips (Dutta et al. 2024): item -> correct (bool) for both models, over the items both scored. Shares of
    those items that went correct -> wrong and wrong -> correct, and their sum `flips`; None without items."""
    common = [k for k in original if k in routed]
    lost = sum(original[k] and not routed[k] for k in common)
    gained = sum(routed[k] and not original[k] for k in common)
    n = len(common)
    share = (lambda x: x / n) if n else (lambda x: None)
    return {"items": n, "correct_to_wrong": share(lost), "wrong_to_correct": share(gained),
            "flips": share(lost + gained)}


def correct(score: float) -> bool:
    """An item of the task suite counts as correct when its score is >= 0.5: the score itself for the 0/1
    categories (copy, repetition, arithmetic, factual QA), unigram F1 >= 0.5 for summarisation and continuation."""
    return score >= 0.5
