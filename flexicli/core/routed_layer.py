"""The one wrapper type: a decoder layer with a router and an adapter beside its untouched parts.

Data flow of a routed layer (FlexiDepth, as the released checkpoint computes it):

    z = attn_norm(h)                      # the layer's own pre-attention norm (router input)
    w = sigmoid(router(z))                # per token; the token runs the layer iff w > threshold
    a = attn(z)                           # every token writes its K/V, so the cache stays complete
    h = h + run * attn_out_norm(a)        # a skipped token's attention output is dropped
    x = mlp_norm(h)
    h = h + mlp_out_norm(mlp(x) if run else adapter(x))

With gradients enabled the hard decision `run` enters the forward value as `run + w - stopgrad(w)`: the
forward value is exactly the hard-routed model (so a model whose routers run everything reproduces the
original), and the router learns from the difference between running and skipping (straight-through).

Without gradients (inference) the layer takes the fast path: a skipped token computes only its K/V, the router and the
adapter; queries, attention and MLP run for the gathered running tokens (flexicli/core/sparse_attention.py, same logits
as the reference path, tests/test_fastpath.py). `RoutingState.fast_path = False` forces the reference path.

That is the `layer` skip unit (FlexiDepth). The `module` and `mlp` units (Learning to Skip: a router per attention
and/or MLP sublayer) are flexicli/core/module_routing.py; what each unit saves, in layer-equivalents,
flexicli/core/units.py.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .families import LayerParts
from .sparse_attention import partial_attention, plan_for
from .module_routing import ModuleRouting
from .units import ROUTER_ATTR, SKIP_UNITS, LinearRouter, check_choice, unit_costs, unit_key

# Block arguments that belong to the block, not to its self-attention (GPT-2's cross-attention inputs).
_BLOCK_ONLY_ARGS = ("encoder_hidden_states", "encoder_attention_mask")


def _identity(x):
    return x


def is_threshold(t) -> bool:
    """The one range check of a routing threshold: a number in [0, 1] (0: every token runs, 1: every token skips;
    a gate is sigmoid(logit), so anything outside decides nothing)."""
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1


def threshold_logit(threshold: float) -> float:
    """A gate threshold (on w = sigmoid(logit)) as a logit; 0 and 1 are clamped to finite values."""
    t = min(max(threshold, 1e-7), 1 - 1e-7)
    return math.log(t / (1 - t))


def threshold_of(logit: float) -> float:
    """The inverse of threshold_logit: the gate threshold for a logit."""
    return 1.0 / (1.0 + math.exp(-logit))


def _centred(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """The gate as the straight-through estimator sees it: sigmoid of the logit's distance to the threshold, so
    the gradient a token gets for crossing it does not fade when training moves the threshold away from 0.5."""
    if threshold == 0.5:
        return w
    return torch.sigmoid(torch.logit(w, eps=1e-7) - threshold_logit(threshold))


def capacity_decisions(w: torch.Tensor, share: float) -> tuple[torch.Tensor, float]:
    """Training with per-layer capacities (budget.BudgetCapacity): the round(share * tokens) tokens with the
    lowest gates skip, the rest run. Returns (run mask, the gate between the two groups, which centres the
    straight-through gate as the threshold does otherwise)."""
    k = int(round(share * w.numel()))
    if k <= 0:
        return torch.ones_like(w, dtype=torch.bool), float(w.detach().min()) / 2
    flat = w.detach().flatten()
    if k >= flat.numel():
        return torch.zeros_like(w, dtype=torch.bool), min(1 - 1e-7, (1 + float(flat.max())) / 2)
    order = flat.argsort(stable=True)  # stable: ties (saturated gates) broken by position, so exactly k skip
    run = torch.ones_like(flat, dtype=torch.bool)
    run[order[:k]] = False
    return run.view_as(w), float(flat[order[k - 1]] + flat[order[k]]) / 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Router(nn.Module):
    """logit = head(dec(tanh(norm(enc(z))))) + bias. The scalar bias (absent in the official router, which
    imports with bias 0) starts positive so that a fresh router runs every token: exact at birth."""

    def __init__(self, hidden: int, reduction: int = 16, init_bias: float = 0.1):
        super().__init__()
        r = max(1, hidden // reduction)
        self.enc = nn.Linear(hidden, r, bias=False)
        self.norm = RMSNorm(r)
        self.dec = nn.Linear(r, hidden, bias=False)
        self.head = nn.Linear(hidden, 1, bias=False)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        for lin in (self.enc, self.dec):
            nn.init.normal_(lin.weight, std=hidden**-0.5)
        nn.init.normal_(self.head.weight, std=0.02 * hidden**-0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Gate w in (0, 1), shape z.shape[:-1], in float32."""
        logit = self.head(self.dec(torch.tanh(self.norm(self.enc(z))))).squeeze(-1)
        return torch.sigmoid(logit.float() + self.bias.float())

    def infer(self, z: torch.Tensor) -> torch.Tensor:
        """forward's value (to rounding) in few ops, for inference, where the router runs at every decode step of
        every routed layer: head(dec(.)) is one vector (no nonlinearity between them) that takes the bias along, and
        the RMS norm is normalize(e) * (weight * sqrt(r)) (equal but for eps), one op where CPU rms_norm is ~20."""
        _, vec, bias, gain, views = self._fold()
        if views is not None and z.numel() == z.shape[-1] and z.device.type == "cpu" and z.dtype == torch.float32:
            return self._infer_one(z, views)
        f32 = z.dtype == torch.float32
        e = nn.functional.linear(z, self.enc.weight)
        n = nn.functional.normalize(e if f32 else e.float(), dim=-1)  # other dtypes normalise in float32 as forward
        logit = nn.functional.linear(torch.tanh((n if f32 else n.to(e.dtype)) * gain), vec, bias)
        return torch.sigmoid(logit.squeeze(-1) if f32 else logit.squeeze(-1).float())

    def _fold(self) -> tuple:
        """(key, vec, bias, gain, numpy views for _infer_one or None), recomputed when a weight changed (in place, as an optimiser step does, or moved).
        Plain attribute reads only: this runs at every decode step, where nn.Module's __getattr__ costs add up."""
        m, folded = self._modules, self.__dict__.get("_folded")
        enc, w, head = m["enc"]._parameters["weight"], m["dec"]._parameters["weight"], m["head"]._parameters["weight"]
        bias, g = self._parameters["bias"], m["norm"]._parameters["weight"]
        try:
            key = (enc.data_ptr(), w.data_ptr(), w._version, head._version, bias._version, g._version)
        except RuntimeError:  # weights made under torch.inference_mode have no version counter (nor updates)
            key = (enc.data_ptr(), w.data_ptr())
        if folded is not None and folded[0] == key:
            return folded
        vec = (head.float() @ w.float()).to(w.dtype)
        gain = (g.detach().float() * math.sqrt(g.shape[0])).to(w.dtype)
        views = None
        if w.device.type == "cpu" and w.dtype == torch.float32:  # numpy views (no copies) for _infer_one
            views = (enc.detach().numpy(), vec.reshape(-1).numpy(), float(bias), gain.numpy())
        folded = self.__dict__["_folded"] = (key, vec, bias.detach().reshape(1).to(w.dtype), gain, views)
        return folded

    def _infer_one(self, z: torch.Tensor, views: tuple) -> torch.Tensor:
        """One token on the CPU (a decode step): the same arithmetic in numpy, whose per-call cost is ~1 us against
        torch's ~5-8 us a dispatched op on this 2-core machine; the router's 6 ops were ~15% of a layer's time."""
        enc, vec, bias, gain = views
        e = enc @ z.detach().numpy().reshape(-1)
        t = np.tanh(e * (gain / max(math.sqrt(float(e @ e)), 1e-12)))
        logit = float(t @ vec) + bias
        return torch.full(z.shape[:-1], 0.5 * (1.0 + math.tanh(0.5 * logit)))  # sigmoid, without exp overflow


def make_router(kind: str, hidden: int, reduction: int, init_bias: float) -> nn.Module:
    """`flexidepth` (Router) or `linear` (units.LinearRouter, the seed paper's)."""
    check_choice("layer", kind)
    return Router(hidden, reduction, init_bias) if kind == "flexidepth" else LinearRouter(hidden, init_bias)


class Adapter(nn.Module):
    """SwiGLU MLP with a small intermediate size; what a skipped token gets instead of the layer's MLP.
    down_proj starts at zero: a fresh adapter adds nothing, training grows it."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingState:
    """Shared by all wrapped layers of one model; the knobs that change how they route.

    mode: "routed" (router decides, w > threshold), "full" (the original layers, untouched: the teacher),
    "run" (every token runs, through the wrapper's own path), "skip" (every token skips every routed layer),
    "fixed" (units in `skip_layers` skip every token, the others run every token: a layer index skips all of its
    units, a unit key such as (17, "mlp") that unit alone).
    """

    mode: str = "routed"
    threshold: float = 0.5
    gate_mode: str = "ste"  # "ste": hard decisions, straight-through gradient; "scale": official w-scaling
    skip_layers: frozenset = frozenset()
    records: list | None = None  # when a list: each routed unit appends (unit key, run mask [B, T]); the key is the
    #                              layer index for skip unit `layer`, else (layer index, "attn" | "mlp") (units.py)
    gates: list | None = None  # when a list: each unit appends (unit key, w, run, cost in layer-equivalents)
    checkpointing: bool = False  # training: recompute each routed layer in backward instead of storing activations
    fast_path: bool = True  # without gradients, skipped tokens compute only K/V (False: the reference path)
    capacity: dict | None = None  # training with budget "capacity": {unit key (as in records): share of tokens that skip}
    MODES: tuple = field(default=("routed", "full", "run", "skip", "fixed"), repr=False)


class FlexiLayer(ModuleRouting, nn.Module):
    """Wraps one decoder layer. The original layer stays as `base_layer`, its weights untouched. `skip_unit`
    (flexicli/core/units.py): `layer` routes the whole layer (this module's docstring), `module` and `mlp` route its
    sublayers (flexicli/core/module_routing.py)."""

    def __init__(self, base_layer: nn.Module, parts: LayerParts, layer_index: int, state: RoutingState,
                 hidden: int, adapter_dim: int, router_reduction: int = 16, router_init_bias: float = 0.1,
                 skip_unit: str = "layer", router: str = "flexidepth"):
        super().__init__()
        self.base_layer = base_layer
        self.parts = parts
        self.layer_index = layer_index
        self.state = state
        self.skip_unit = skip_unit
        self.units = SKIP_UNITS[skip_unit]  # ("layer",) | ("attn", "mlp") | ("mlp",): what the routers decide over
        ref = next(base_layer.parameters())
        for unit in self.units:  # `router` (layer) | `attn_router`, `mlp_router` (module) | `mlp_router` (mlp)
            setattr(self, ROUTER_ATTR[unit], make_router(router, hidden, router_reduction, router_init_bias).to(
                ref.device, ref.dtype))
        self.adapter = Adapter(hidden, adapter_dim).to(ref.device, ref.dtype)
        self.costs = unit_costs(base_layer, parts.attn, parts.mlp, skip_unit)  # layer-equivalents saved per unit
        self._signature = inspect.signature(base_layer.forward)

    @property
    def routers(self) -> dict[str, nn.Module]:
        """{unit: its router}, in the order the layer consults them."""
        return {u: getattr(self, ROUTER_ATTR[u]) for u in self.units}

    def _part(self, name: str | None):
        return getattr(self.base_layer, name) if name else None

    def _decisions(self, w: torch.Tensor, key) -> torch.Tensor:
        mode, skip = self.state.mode, self.state.skip_layers
        if mode == "routed":
            return w > self.state.threshold
        if mode == "run" or (mode == "fixed" and self.layer_index not in skip and key not in skip):
            return torch.ones_like(w, dtype=torch.bool)
        return torch.zeros_like(w, dtype=torch.bool)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state = self.state
        if state.mode == "full":
            return self.base_layer(hidden_states, *args, **kwargs)
        if state.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(self._routed_forward, hidden_states, *args, use_reentrant=False, **kwargs)
        else:
            out = self._routed_forward(hidden_states, *args, **kwargs)
        return self._replay_base_hooks(hidden_states, args, kwargs, out) if self.base_layer._forward_hooks else out

    def _replay_base_hooks(self, hidden_states, args, kwargs, out):
        """transformers records `output_hidden_states` (and other outputs) with forward hooks on the decoder-layer
        class, so on `base_layer`, which the routed path never calls: without this the routed layers' entries would
        silently be missing from the tuple. Their hooks see this layer's input and output instead."""
        base = self.base_layer
        for key, hook in list(base._forward_hooks.items()):
            if key in base._forward_hooks_with_kwargs:
                res = hook(base, (hidden_states, *args), kwargs, out)
            else:
                res = hook(base, (hidden_states, *args), out)
            out = out if res is None else res
        return out

    def _routed_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state = self.state
        if args:  # positional extras: name them by the base layer's signature
            bound = self._signature.bind(hidden_states, *args, **kwargs)
            call = dict(bound.arguments)
            call.update(call.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {})
            call.pop("hidden_states", None)
        else:  # how HF models call their layers (all keywords): no binding cost on every decode step
            call = dict(kwargs)
        for name in _BLOCK_ONLY_ARGS:
            call.pop(name, None)

        attn_norm = self._part(self.parts.attn_norm)
        z = attn_norm(hidden_states) if attn_norm is not None else hidden_states
        if self.skip_unit != "layer":
            return self._unit_forward(hidden_states, z, call)
        w, run, centre = self._gate("layer", z)
        if state.fast_path and state.gates is None and not torch.is_grad_enabled():
            return self._fast_forward(hidden_states, z, w, run, call)
        return self._reference_forward(hidden_states, z, w, run, call, centre)

    def _gate(self, unit: str, z: torch.Tensor):
        """The unit's router on its input: (gate w, decisions run, the gate the straight-through estimator centres
        on), recorded for RoutingState's collectors. Under training capacities (RoutingState.capacity) the unit's
        share of tokens with the lowest gates skips, and the centre is the gate between the two groups."""
        state, router = self.state, getattr(self, ROUTER_ATTR[unit])
        w = router(z) if torch.is_grad_enabled() else router.infer(z)
        key = unit_key(self.layer_index, unit)
        centre = state.threshold
        if state.capacity is not None and state.mode == "routed" and key in state.capacity:
            run, centre = capacity_decisions(w, state.capacity[key])
        else:
            run = self._decisions(w, key)
        if state.records is not None:
            state.records.append((key, run.detach()))
        if state.gates is not None:
            state.gates.append((key, w, run, self.costs[unit]))
        return w, run, centre

    def _st_gate(self, w, run, dtype, soft, centre: float | None = None):
        """The hard decisions as the forward value, with the straight-through gradient while training."""
        gate = run.to(dtype)
        if soft and self.state.gate_mode == "ste":
            g = _centred(w, self.state.threshold if centre is None else centre)
            gate = gate + (g - g.detach()).to(dtype)
        return gate

    def _reference_forward(self, hidden_states, z, w, run, call, centre: float | None = None):
        """Every token computes attention; a skipped token's output is dropped. Used for training (the
        straight-through gate needs both branches) and for families the fast path does not cover."""
        p = self.parts
        attn_out_norm = self._part(p.attn_out_norm)
        mlp_norm, mlp_out_norm = self._part(p.mlp_norm), self._part(p.mlp_out_norm)
        a = self._part(p.attn)(hidden_states=z, **call)[0]
        if attn_out_norm is not None:
            a = attn_out_norm(a)
        soft = torch.is_grad_enabled()
        gate = self._st_gate(w, run, a.dtype, soft, centre)
        h = hidden_states + gate.unsqueeze(-1) * a

        x = mlp_norm(h) if mlp_norm is not None else h
        return h + self._ffn(x, run, w, gate, soft, mlp_out_norm)

    def _fast_forward(self, h, z, w, run, call):
        """Inference: a skipped token computes only its K/V and the adapter (flexicli/core/sparse_attention.py)."""
        p, scale = self.parts, self.state.gate_mode == "scale"
        attn_out_norm, mlp_norm, post = (self._part(n) if n else _identity
                                         for n in (p.attn_out_norm, p.mlp_norm, p.mlp_out_norm))
        mlp = self._part(p.mlp)
        if bool(run) if run.numel() == 1 else bool(run.all()):  # nothing to skip: the layer as written
            h = h + attn_out_norm(self._part(p.attn)(hidden_states=z, **call)[0])
            y = post(mlp(mlp_norm(h)))
            return h + (y * w.to(y.dtype).unsqueeze(-1) if scale else y)
        plan = plan_for(self._part(p.attn))
        if plan is None:
            return self._reference_forward(h, z, w, run, call)

        b, t, d = h.shape
        idx, valid, a = partial_attention(plan, z, run, call)
        flat, wf = h.reshape(b * t, d), w.reshape(b * t)
        out = flat.clone()
        skipped = (~run).reshape(-1).nonzero().squeeze(1)
        if skipped.numel():
            hs = flat.index_select(0, skipped)
            ys = post(self.adapter(mlp_norm(hs)))
            if scale:
                ys = ys * (1 - wf.index_select(0, skipped)).to(ys.dtype).unsqueeze(-1)
            out.index_copy_(0, skipped, hs + ys)
        if idx is not None:
            rows = idx + t * torch.arange(b, device=idx.device)[:, None]
            rows, a = (rows[valid], a[valid]) if valid is not None else (rows.reshape(-1), a.reshape(-1, d))
            hr = flat.index_select(0, rows) + attn_out_norm(a)
            yr = post(mlp(mlp_norm(hr)))
            if scale:
                yr = yr * wf.index_select(0, rows).to(yr.dtype).unsqueeze(-1)
            out.index_copy_(0, rows, hr + yr)
        return out.view(b, t, d)

    def _ffn(self, x, run, w, gate, soft, out_norm):
        mlp = self._part(self.parts.mlp)
        post = out_norm if out_norm is not None else (lambda t: t)
        if self.state.gate_mode == "scale":  # official FlexiDepth: branch scaled by w (run) or 1 - w (skip)
            wf = w.to(x.dtype).unsqueeze(-1)
            return torch.where(run.unsqueeze(-1), wf * post(mlp(x)), (1 - wf) * post(self.adapter(x)))
        if soft:  # both branches for every token: the router's gradient is their difference
            g = gate.unsqueeze(-1)
            return g * post(mlp(x)) + (1 - g) * post(self.adapter(x))
        if bool(run.all()):
            return post(mlp(x))
        if not bool(run.any()):
            return post(self.adapter(x))
        out = torch.empty_like(x)
        out[run] = post(mlp(x[run]))
        out[~run] = post(self.adapter(x[~run]))
        return out


# ---- installing routed layers and their trained weights: FlexiModel and the exported remote code share these ----
def install_routed_layers(layers: nn.ModuleList, flexi: dict, state: RoutingState) -> None:
    """Wrap the routed layers of `layers` in place, as a checkpoint's config (flexi_config.json, as a dict) says."""
    parts = LayerParts.from_dict(flexi["parts"])
    unit, router = flexi.get("skip_unit", "layer"), flexi.get("router", "flexidepth")  # absent: from before units
    check_choice(unit, router)
    for i in flexi["routed_layers"]:
        layers[i] = FlexiLayer(layers[i], parts, i, state, flexi["hidden_size"], flexi["adapter_dim"],
                               flexi["router_reduction"], flexi["router_init_bias"], unit, router)


def trained_modules(layer: FlexiLayer) -> list[str]:
    """Attribute names of a routed layer's trained modules: its routers (units.ROUTER_ATTR), then the adapter."""
    return [name for name, _ in layer.named_children() if name.endswith("router")] + ["adapter"]


def trained_state(layers) -> dict[str, torch.Tensor]:
    """The routers' and adapters' tensors of the routed layers, as flexi_weights.safetensors names them."""
    return {f"layers.{layer.layer_index}.{part}.{k}": v for layer in layers for part in trained_modules(layer)
            for k, v in getattr(layer, part).state_dict().items()}


def load_trained_state(layers, tensors: dict[str, torch.Tensor], error=ValueError) -> None:
    """Copy `tensors` into the routed layers; `error(message)` if a name is missing or unexpected or a shape
    differs (nothing is copied then)."""
    own = trained_state(layers)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise error(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise error(f"weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
