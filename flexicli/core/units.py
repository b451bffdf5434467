"""What a router decides over (the skip unit), the router kinds, and what skipping a unit saves.

Skip units (`flexi convert --skip-unit`):

    layer   one router per routed layer (FlexiDepth): a skipped token drops its attention output and takes the
            adapter instead of the MLP (flexicli/core/routed_layer.py; the default, and what checkpoints without the key hold)
    module  two routers per routed layer (Learning to Skip, Zeng et al. 2023), each deciding on its own:
              attention router  reads attn_norm(h); a skipping token still writes its K/V (the cache stays
                                complete) and adds no attention output
              MLP router        reads mlp_norm(h) after attention; a skipping token takes the adapter
    mlp     attention always runs; only the MLP is routed (the MLP router above)

Router kinds (`--router`): `flexidepth` (routed_layer.Router, the bottleneck) or `linear` (the seed paper's: one
Linear(hidden, 1) with a bias; its weight starts at zero and its bias positive, so it starts by running every token).

The unit of budget is the layer-equivalent: skipping a unit saves the parameters a token no longer reads, as a share
of what skipping its whole layer saves. Skipping attention saves the query and output projections (K/V are still
computed: k_proj/v_proj are read either way); skipping the MLP saves the MLP. Per layer

    cost(attn) = P_q_o / (P_q_o + P_mlp),   cost(mlp) = P_mlp / (P_q_o + P_mlp),   cost(layer) = 1

so `--skip-target N` means N layers' worth of per-token compute skipped whatever the unit (routers and adapters,
the price of routing, are not counted; they are the same for every unit).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import BadInput, CheckpointError

SKIP_UNITS: dict[str, tuple[str, ...]] = {"layer": ("layer",), "module": ("attn", "mlp"), "mlp": ("mlp",)}
ROUTER_KINDS = ("flexidepth", "linear")
ROUTER_ATTR = {"layer": "router", "attn": "attn_router", "mlp": "mlp_router"}  # the attribute on FlexiLayer


def check_choice(skip_unit: str, router: str, error=BadInput) -> None:
    """One clear error for an unknown skip unit or router kind (BadInput for flags, CheckpointError for a config)."""
    if not isinstance(skip_unit, str) or skip_unit not in SKIP_UNITS:
        raise error(f"unknown skip unit {skip_unit!r}: this flexicli runs {', '.join(SKIP_UNITS)}",
                    "a checkpoint from a newer flexicli needs that version" if error is CheckpointError else None)
    if not isinstance(router, str) or router not in ROUTER_KINDS:
        raise error(f"unknown router {router!r}: this flexicli has {', '.join(ROUTER_KINDS)}",
                    "a checkpoint from a newer flexicli needs that version" if error is CheckpointError else None)


class LinearRouter(nn.Module):
    """The seed paper's router: w = sigmoid(proj(z)), proj = Linear(hidden, 1) with a bias. The weight starts at
    zero and the bias at `init_bias` > 0, so a fresh router runs every token (exact at birth) whatever the scale of
    z; training moves the weight away from zero (its gradient is the token's input times the gate's)."""

    def __init__(self, hidden: int, init_bias: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, float(init_bias))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Gate w in (0, 1), shape z.shape[:-1], in float32."""
        return torch.sigmoid(self.proj(z).squeeze(-1).float())

    infer = forward


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _kv_params(attn: nn.Module) -> int:
    """Parameters a token reads for its K/V (read whether it skips attention or not)."""
    if hasattr(attn, "k_proj") and hasattr(attn, "v_proj"):
        return _count(attn.k_proj) + _count(attn.v_proj) + _count(getattr(attn, "k_norm", None))
    cfg = getattr(attn, "config", None)
    fused = getattr(attn, "qkv_proj", None) or getattr(attn, "c_attn", None)  # phi3 / gpt2: one fused projection
    if fused is not None and cfg is not None:
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return _count(fused) * 2 * kv // (heads + 2 * kv)
    return 0  # an attention we cannot take apart: count all of it as saved when skipped


def unit_costs(base_layer: nn.Module, attn_name: str, mlp_name: str, skip_unit: str) -> dict[str, float]:
    """{unit: layer-equivalents one token saves by skipping it} for one decoder layer (module docstring)."""
    if skip_unit == "layer":
        return {"layer": 1.0}
    attn = getattr(base_layer, attn_name)
    a = _count(attn) - _kv_params(attn)
    m = _count(getattr(base_layer, mlp_name))
    costs = {"attn": a / (a + m), "mlp": m / (a + m)}
    return {u: costs[u] for u in SKIP_UNITS[skip_unit]}


def unit_span(unit: str, h_in, h_mid, h_out) -> tuple:
    """(residual stream before, after) what `unit` computes: the whole layer, its attention or its MLP. h_mid: the
    residual stream between the layer's attention and its MLP."""
    return {"layer": (h_in, h_out), "attn": (h_in, h_mid), "mlp": (h_mid, h_out)}[unit]


# The LayerParts field of the norm a unit's router reads, applied to the residual stream before the unit.
ROUTER_INPUT_NORM = {"layer": "attn_norm", "attn": "attn_norm", "mlp": "mlp_norm"}


def adapter_unit(skip_unit: str) -> str:
    """The unit a skipping token's adapter stands in for: the whole layer (`layer`) or the MLP (`module`, `mlp`)."""
    return "layer" if skip_unit == "layer" else "mlp"


def unit_key(layer_index: int, unit: str):
    """How records and gates name a unit: the layer index for `layer` (as before units), else (index, unit)."""
    return layer_index if unit == "layer" else (layer_index, unit)


def unit_label(key) -> str:
    """'17' or '17.attn': report keys (per_layer_skip_rate, per-unit usage)."""
    return str(key) if isinstance(key, int) else f"{key[0]}.{key[1]}"
