"""Warm-start the routers from what the original model does, before distillation begins.

A fresh router gives every token almost the same gate (exact at birth), so when the budget first bites, all of a
layer's tokens cross the threshold together and the skip count jumps back and forth. Here each router is first
fitted to rank tokens by how much its layer changes them: the token-level Block Influence

    influence(token, layer) = 1 - cos(h_in, h_out)     (h: the residual stream around the layer, original model)

pooled over all routed layers (so layers that change little get skipped more, tokens that change little get
skipped more). The fit target is a logit that puts the pooled quantile `skip_target / routed layers` at the
threshold: at step 0 the routed model already skips about N layers per token, the cheapest ones by this measure.
Distillation then corrects the ranking; the budget threshold (objectives.BudgetThreshold) keeps the count.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_influence(fm, rows: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Router inputs z per routed layer ([tokens, hidden] each) and influence [tokens, routed layers]."""
    from .teacher import around_routed_layers

    def grab(module, h_in, h_out):
        norm = module._part(module.parts.attn_norm)
        z = norm(h_in) if norm is not None else h_in
        return z, 1 - nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)

    got = around_routed_layers(fm, rows, grab, batch_size)
    return [z for z, _ in got], torch.stack([s for _, s in got], dim=-1)


def target_logits(influence: torch.Tensor, skip_target: float, spread: float = 1.0) -> torch.Tensor:
    """Pooled rank -> normal quantile, shifted so that a share skip_target / L of (token, layer) pairs is below 0."""
    flat = influence.flatten()
    u = (flat.argsort().argsort().float() + 0.5) / flat.numel()
    normal = torch.distributions.Normal(0.0, 1.0)
    share = min(max(skip_target / influence.shape[1], 1e-3), 1 - 1e-3)
    return (spread * (normal.icdf(u) - normal.icdf(torch.tensor(share)))).view_as(influence)


def fit_router(router: nn.Module, z: torch.Tensor, target: torch.Tensor, steps: int = 150, lr: float = 2e-2) -> float:
    """Least squares of the router's logit on `target`, fitted on 3/4 of the tokens; returns the Spearman
    correlation on the other quarter (how well the fitted router ranks tokens it has not seen)."""
    ref = next(router.parameters())
    z, target = z.to(ref.device, ref.dtype), target.to(ref.device)
    cut = z.shape[0] * 3 // 4
    params = list(router.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            w = router(z[:cut]).clamp(1e-6, 1 - 1e-6)
            loss = (torch.logit(w) - target[:cut]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p, r in zip(params, was):
        p.requires_grad_(r)
    with torch.no_grad():
        pred = router(z[cut:])
    ranks = lambda x: x.argsort().argsort().float()  # noqa: E731
    return float(torch.corrcoef(torch.stack([ranks(pred.cpu()), ranks(target[cut:].cpu())]))[0, 1])


def warm_start_routers(fm, rows: torch.Tensor, skip_target: float, max_tokens: int = 4096, progress=None) -> dict:
    """Fit every routed layer's router as described above on about `max_tokens` tokens of training rows. Returns
    per-layer held-out fit quality (Spearman) and the skip rates the targets ask for."""
    zs, influence = layer_influence(fm, rows[:max(1, max_tokens // rows.shape[1])])
    targets = target_logits(influence, skip_target)
    fits = {}
    for i, layer in enumerate(fm.layers):
        fits[str(layer.layer_index)] = round(fit_router(layer.router, zs[i], targets[:, i]), 3)
        if progress:
            progress(i + 1, len(fm.layers))
    asked = (targets < 0).float().mean(0).tolist()
    return {"spearman_heldout": fits,
            "target_skip_rate": {str(layer.layer_index): round(r, 3) for layer, r in zip(fm.layers, asked)}}
