"""The budgets: what makes the mean number of skipped layers (in layer-equivalents, flexicli/core/units.py) hit
its target during training. A PI-controlled penalty (the default), a quantile threshold, per-unit capacities, or
the seed paper's per-unit target density; each also owns the routing threshold it trains under."""

from __future__ import annotations

import torch

from ..core.routed_layer import threshold_of


def unequal_costs(costs) -> torch.Tensor | None:
    """The units' costs as a tensor when they differ (module/mlp units), None when every unit counts 1 (`layer`)."""
    return None if costs is None or all(c == 1.0 for c in costs) else torch.tensor(costs)


def pooled_quantile(logits: torch.Tensor, costs: torch.Tensor | None, share: float) -> float:
    """The logit below which a `share` of the pooled logits lies: of the units' compute when their costs differ
    (weighted_quantile), else of the units themselves."""
    if costs is not None:
        return weighted_quantile(logits, costs, share)
    return float(torch.quantile(logits.flatten()[:2**24].float(), share))


class _Budget:
    """What every budget shares: a threshold in logit space (`logit`, saved with the run), and no extra loss, no
    per-unit capacities, nothing to log and nothing to update unless the budget says otherwise."""

    kind = ""

    @property
    def threshold(self) -> float:
        """The same threshold on the router's gate w = sigmoid(logit)."""
        return threshold_of(self.logit)

    def capacity(self, target: float) -> list[float] | None:
        return None  # the routers' own threshold decides

    def loss(self, target: float, skipped_st: torch.Tensor, density=None) -> torch.Tensor | float:
        return 0.0

    def after_step(self, target: float, skipped: float, logits: list[torch.Tensor]) -> None:
        pass

    def log(self) -> dict:
        return {}

    def state(self) -> dict:
        return {"kind": self.kind, "logit": self.logit}

    def load(self, d: dict) -> None:
        self.logit = d["logit"]


class BudgetPenalty(_Budget):
    """A Lagrange multiplier on `mean skipped layers == target`, updated by a PI rule after every optimiser step.

    The loss gets `lam * (target - skipped)`: while too few layers are skipped lam grows and pushes the routers to
    skip more; when too many are, it turns negative and pushes back. The threshold stays put, so the routers
    themselves learn where the budget lies; calibration after training removes the last few tenths of a layer.
    Measured on SmolLM2 (100 steps): better held-out agreement than BudgetThreshold at the same budget
    (docs/results.md)."""

    kind = "penalty"

    def __init__(self, num_routed: float, logit: float = 0.0, ki: float = 0.1, kp: float = 0.5, limit: float = 1.0,
                 costs=None):
        self.num_routed, self.logit, self.ki, self.kp, self.limit = num_routed, logit, ki, kp, limit
        self.integral = self.lam = 0.0

    def loss(self, target: float, skipped_st: torch.Tensor, density=None) -> torch.Tensor:
        return self.lam * (target - skipped_st.mean())

    def after_step(self, target: float, skipped: float, logits: list[torch.Tensor]) -> None:
        err = (target - skipped) / self.num_routed
        # anti-windup: while the routers are still far from the threshold the integral would grow without bound and
        # then throw every token across it at once; clamping it keeps the approach gradual
        self.integral = max(-self.limit, min(self.limit, self.integral + self.ki * err))
        self.lam = self.integral + self.kp * err

    def log(self) -> dict:
        return {"lambda": self.lam}

    def state(self) -> dict:
        return {"kind": self.kind, "integral": self.integral, "lam": self.lam, "logit": self.logit}

    def load(self, d: dict) -> None:
        self.integral, self.lam, self.logit = d["integral"], d["lam"], d["logit"]


class BudgetThreshold(_Budget):
    """The routing threshold, in logit space, that makes the mean number of skipped layers equal the target.

    After every step it is set to the quantile of that step's router logits, pooled over tokens and routed layers,
    below which a share target / routed layers of them lies (weighted by each unit's cost in layer-equivalents when
    units differ, flexicli/core/units.py): a token skips a layer iff its logit is below it, so the
    budget is met by construction (to a step's lag, while the routers move slowly) and not by a feedback loop. The
    loss only decides which tokens skip, the threshold how many. Measured on SmolLM2 (100 steps): the count is exact,
    but held-out agreement is lower than with BudgetPenalty (docs/results.md), so it is the option, not the default."""

    kind = "threshold"

    def __init__(self, num_routed: float, logit: float = 0.0, momentum: float = 0.5, costs=None):
        self.num_routed, self.logit, self.momentum = num_routed, logit, momentum
        self.costs = unequal_costs(costs)

    def observe(self, logits: torch.Tensor, target: float) -> float:
        """The threshold one micro-batch's logits (all ranks' together) ask for."""
        share = min(max(target / self.num_routed, 0.0), 1.0)
        if share <= 0.0:
            return float(logits.min()) - 1.0
        return pooled_quantile(logits, self.costs, share)

    def after_step(self, target: float, skipped: float, logits: list[torch.Tensor]) -> None:
        observed = sum(self.observe(x, target) for x in logits) / len(logits)
        self.logit = self.momentum * self.logit + (1 - self.momentum) * observed


def weighted_quantile(logits: torch.Tensor, costs: torch.Tensor, share: float) -> float:
    """The logit below which units worth `share` of all units' cost lie. logits: gate_logits' flat [B*T*U] (units
    last), costs [U]: a unit's logit weighs its cost, so the threshold skips `share` of the compute, not of units."""
    x = logits.float().reshape(-1, costs.numel())
    weight = costs.float().expand_as(x).reshape(-1)
    values, order = x.reshape(-1).sort()
    cum = weight[order].cumsum(0) / weight.sum()
    k = int(torch.searchsorted(cum, torch.tensor(share)).clamp(max=values.numel() - 1))
    upper = values[k]
    return float(upper if k + 1 >= values.numel() else (upper + values[k + 1]) / 2)


class BudgetCapacity(_Budget):
    """Per-unit capacities: in every training micro-batch, routed unit u (a layer, or an attention/MLP sublayer,
    flexicli/core/units.py) is skipped by exactly a share s_u of the tokens, those with its lowest router logits (picked
    inside the forward pass, layer.capacity_decisions), with sum_u cost_u * s_u = target (layer-equivalents; every
    cost is 1 for skip unit `layer`). The count is exact at every step by construction, with no feedback loop to
    overshoot or lag. Why: the penalty's multiplier acts on every token of a router at once, so tokens cross the
    threshold in crowds (the count cycles, and with cheap fitted adapters a whole router crosses in one step); the
    quantile threshold lags routers that distillation pushes up every step.

    The shares follow the routers: after each step, the logits of all routed units are pooled, the quantile below
    which units worth a share target / capacity of the compute lie is taken (cost-weighted, as BudgetThreshold's),
    and each unit's share moves (momentum) toward the fraction of its own logits below it. So a unit whose logits
    the distillation keeps low is given more of the budget, and the shares keep sum_u cost_u * s_u = target. That
    pooled quantile is also the threshold saved for inference (a global threshold, calibrated after training on
    held-out text), which reproduces the trained allocation on the training distribution."""

    kind = "capacity"

    def __init__(self, num_routed: float, logit: float = 0.0, momentum: float = 0.8, costs=None):
        self.num_routed, self.logit, self.momentum = num_routed, logit, momentum
        self.num_units = len(costs) if costs is not None else round(num_routed)
        self.costs = unequal_costs(costs)
        self.alloc: list[float] | None = None  # cost-weighted mean 1 over units: unit u gets alloc[u] * target / capacity

    def capacity(self, target: float) -> list[float] | None:
        """Per routed unit (in FlexiModel.unit_keys order), the share of tokens to skip; None before the first
        observation (then the threshold decides: fresh routers skip nothing, warm-started ones about the target)."""
        if self.alloc is None:
            return None
        return [min(1.0, max(0.0, a * target / self.num_routed)) for a in self.alloc]

    def after_step(self, target: float, skipped: float, logits: list[torch.Tensor]) -> None:
        x = torch.cat([t.reshape(-1, self.num_units) for t in logits]).float()
        share = min(max(target / self.num_routed, 0.0), 1.0)
        if share <= 0.0 or share >= 1.0:
            return
        tau = pooled_quantile(x, self.costs, share)
        observed = ((x < tau).float().mean(0) / share).tolist()
        m = self.momentum if self.alloc is not None else 0.0
        self.alloc = [m * a + (1 - m) * o for a, o in zip(self.alloc or observed, observed)]
        self.logit = tau

    def state(self) -> dict:
        return {"kind": self.kind, "logit": self.logit, "alloc": self.alloc}

    def load(self, d: dict) -> None:
        self.logit, self.alloc = d["logit"], d.get("alloc")


class BudgetDensity(_Budget):
    """The seed paper's (Learning to Skip) target-density regulariser: every routed unit's share of tokens that run it
    is pulled toward one target density, `weight * sum_u (density_u - rho)^2`, with rho = 1 - target / capacity so
    that units at rho skip `target` layer-equivalents (capacity: the most a token can skip, FlexiModel.capacity).
    The threshold stays put, as with the penalty; calibration after training removes what is left."""

    kind = "density"

    def __init__(self, num_routed: float, logit: float = 0.0, weight: float = 4.0, costs=None):
        self.num_routed, self.logit, self.weight = num_routed, logit, weight

    def density_target(self, target: float) -> float:
        return min(1.0, max(0.0, 1.0 - target / self.num_routed))

    def loss(self, target: float, skipped_st: torch.Tensor, density=None) -> torch.Tensor:
        if density is None:
            raise ValueError("the density budget needs the per-unit densities (objectives.unit_density)")
        return self.weight * (density - self.density_target(target)).pow(2).sum()


BUDGETS = {b.kind: b for b in (BudgetPenalty, BudgetThreshold, BudgetCapacity, BudgetDensity)}
