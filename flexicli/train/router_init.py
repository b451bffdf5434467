"""Warm-start the routers from what the original model does, before distillation begins.

A fresh router gives every token almost the same gate (exact at birth), so when the budget first bites, all of a
layer's tokens cross the threshold together and the skip count jumps back and forth. Here each router is first
fitted to rank tokens by how much its unit (flexicli/core/units.py) changes them: the token-level Block Influence

    influence(token, unit) = 1 - cos(h_before, h_after)     (the residual stream around the unit, original model)

around the whole layer (skip unit `layer`), or around its attention or MLP sublayer (`module`, `mlp`: h_mid, the
residual stream between them, is the attention's after and the MLP's before). Influence is pooled over all routed
units (so units that change little get skipped more, tokens that change little get skipped more), each divided by
the unit's cost in layer-equivalents: the budget counts layer-equivalents, so the cheapest skip is the one that
changes the stream least per layer-equivalent saved (every cost is 1 for `layer`: plain influence). The fit target
is a logit that puts at the threshold the pooled quantile below which units worth `skip_target` layer-equivalents
per token lie: at step 0 the routed model already skips about that much, the cheapest units by this measure.
Distillation then corrects the ranking; the budget keeps the count.

`router_init: cost` ranks by what skipping costs the output instead (labels measured on the model itself, as Dr.LLM,
2025, trains its routers on):

    cost(token, unit) = KL(original || the model with that unit alone skipped, its fitted adapter in place)

of the next-token distribution at the token's position, one extra forward pass per routed unit (so it runs after
the adapter fit). Why: influence measures how much a unit moves the residual stream, not what the move is worth to
the output, and on Gemma-3-270M the routers warm-started by it skipped layers 8 and 9 for every token while the
factual answers that need them were lost (docs/results.md).

`router_init: blend` ranks by both: each (token, unit) pair's pooled rank by influence and by cost, averaged, on the
cost's tokens. Why: on SmolLM2 the cost start gives the best top-1 and loses arithmetic and factual answers, the
influence start keeps them at a lower top-1 (docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .budget import unequal_costs, weighted_quantile
from ..core.units import ROUTER_INPUT_NORM, unit_span


def unit_influence(fm, rows: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Router inputs z per routed unit (FlexiModel.unit_keys order; [tokens, hidden] each) and influence [tokens,
    routed units]."""
    from .teacher import around_routed_layers

    def grab(module, h_in, h_mid, h_out):
        out = []
        for unit in module.units:
            before, after = unit_span(unit, h_in, h_mid, h_out)
            norm = module._part(getattr(module.parts, ROUTER_INPUT_NORM[unit]))
            out += [norm(before) if norm is not None else before,
                    1 - nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)]
        return out

    got = around_routed_layers(fm, rows, grab, batch_size)
    per_unit = [(got_layer[j], got_layer[j + 1]) for got_layer in got for j in range(0, len(got_layer), 2)]
    return [z for z, _ in per_unit], torch.stack([s for _, s in per_unit], dim=-1)


def unit_skip_cost(fm, rows: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """[tokens, routed units] (FlexiModel.unit_keys order): per position, KL(original || the routed model with that
    unit alone skipped for every token) of the next-token distribution, in nats. `rows`: [n, T] token ids."""
    from ..evaluation.evaluate import token_kl

    device = next(fm.model.parameters()).device
    keys = fm.unit_keys
    if batch_size is None:  # a [rows, T, vocab] float32 logits tensor of ~512 MB (Gemma's 262k vocabulary: 2 rows)
        vocab = fm.model.get_output_embeddings().weight.shape[0]
        batch_size = max(1, 2 ** 27 // (rows.shape[1] * vocab))
    cost = torch.empty(rows.numel(), len(keys))
    done = 0
    with torch.no_grad():
        for i in range(0, rows.shape[0], batch_size):
            ids = rows[i:i + batch_size].to(device)
            with fm.routing("full"):
                original = fm.model(input_ids=ids, use_cache=False).logits
            for j, key in enumerate(keys):
                with fm.routing("fixed", skip_layers=[key]):
                    cost[done:done + ids.numel(), j] = token_kl(original, fm.model(input_ids=ids,
                                                                                   use_cache=False).logits).flatten()
            done += ids.numel()
    return cost


MEASURES = ("influence", "cost", "blend")  # what warm_start_routers ranks (token, unit) pairs by


def pooled_rank(score: torch.Tensor) -> torch.Tensor:
    """Each entry's rank among all entries (every token and unit pooled), as the midpoint of its 1/numel share of
    (0, 1)."""
    return ((score.flatten().argsort().argsort().float() + 0.5) / score.numel()).view_as(score)


def target_logits(influence: torch.Tensor, skip_target: float, costs=None, spread: float = 1.0,
                  max_share: float = 1.0) -> torch.Tensor:
    """Pooled rank of influence per layer-equivalent -> normal quantile, shifted so that the (token, unit) pairs
    below 0 are worth skip_target layer-equivalents per token (a share skip_target / units of them when every unit
    costs 1). costs: per unit (FlexiModel.unit_costs), None for all 1. max_share < 1: no unit is asked to skip more
    than that share of the tokens (its other tokens rank above every pair within the cap, in their own order), so
    the budget goes to the next-cheapest pairs of other units instead."""
    cost = unequal_costs(costs)
    score = influence if cost is None else influence / cost.to(influence.dtype)
    if max_share < 1:
        within = score.argsort(0).argsort(0)  # each token's rank inside its own unit
        score = score + (within >= int(max_share * score.shape[0])).to(score.dtype) * (score.max() - score.min() + 1)
    flat = score.flatten()
    u = pooled_rank(flat)
    if cost is None:
        share = skip_target / influence.shape[1]
    else:  # the pairs below the cost-weighted quantile: the cheapest ones, worth skip_target / capacity of the cost
        tau = weighted_quantile(flat, cost, min(max(skip_target / float(cost.sum()), 0.0), 1.0))
        share = float((flat < tau).float().mean())
    normal = torch.distributions.Normal(0.0, 1.0)
    share = min(max(share, 1e-3), 1 - 1e-3)
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


def warm_start_routers(fm, rows: torch.Tensor, skip_target: float, max_tokens: int = 4096, progress=None,
                       max_share: float = 1.0, measure: str = "influence", cost_tokens: int = 1024) -> dict:
    """Fit every routed unit's router as described above on about `max_tokens` tokens of training rows (measure
    `influence`), or on `cost_tokens` of them ranked by unit_skip_cost (measure `cost`: a forward pass per unit over
    them), or on `cost_tokens` ranked by both (measure `blend`: pooled_rank of each, averaged). Returns per unit
    (keys as FlexiModel.unit_labels: '17', '17.attn') held-out fit quality (Spearman) and the skip rates the targets
    ask for. max_share: target_logits'."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
    rows = rows[:max(1, (max_tokens if measure == "influence" else cost_tokens) // rows.shape[1])]
    zs, score = unit_influence(fm, rows)
    if measure == "cost":
        score = unit_skip_cost(fm, rows)
    elif measure == "blend":
        score = (pooled_rank(score) + pooled_rank(unit_skip_cost(fm, rows))) / 2
    targets = target_logits(score, skip_target, fm.unit_costs, max_share=max_share)
    routers = [layer.routers[unit] for layer in fm.layers for unit in layer.units]
    fits = {}
    for i, (label, router) in enumerate(zip(fm.unit_labels, routers, strict=True)):
        fits[label] = round(fit_router(router, zs[i], targets[:, i]), 3)
        if progress:
            progress(i + 1, len(routers))
    asked = (targets < 0).float().mean(0).tolist()
    return {"spearman_heldout": fits, "target_skip_rate": {k: round(r, 3) for k, r in zip(fm.unit_labels, asked)}}
