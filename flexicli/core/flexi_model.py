"""FlexiModel: a Hugging Face causal LM whose chosen decoder layers are wrapped by FlexiLayer.

    fm = FlexiModel.wrap(hf_model, tokenizer, routed_layers=range(2, 30))
    with fm.routing("full"):  ...           # the original model (teacher)
    with fm.record() as rec:  fm.model(ids)  # rec.decisions(): [B, T, n_routed] bool, True = ran
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FlexiConfig, fingerprint, read_config, read_weights, write_checkpoint
from .errors import BadInput, CheckpointError, UnsupportedModel
from .families import LayerParts, parts_for
from .routed_layer import (FlexiLayer, RoutingState, install_routed_layers, is_threshold, load_trained_state,
                           trained_modules, trained_state)
from .units import check_choice, unit_key, unit_label

# Adapter width = the MLP's width / this (FlexiDepth's is 16). Measured on SmolLM2's default run, N = 4
# (docs/results.md, the levers at a glance, "5 adapter width"): 4 gave flexi eval KL 0.068-0.072 and top-1
# 0.900-0.906 on three runs, two seeds (the issue's aim beyond: <= 0.10 and >= 0.90), against 8's 0.080-0.085 and
# 0.889-0.896 (16: 0.100-0.102, 0.864-0.873); convert + train took 52.0 min alone on 2 threads. The price: 1.9x the
# trainable parameters (14.7% of SmolLM2, a 79 MB checkpoint against 42) and about half of the CPU prefill saving at
# 4 layers skipped (1.05x the original against 1.10x). Recipes measured at another width name it in their convert:.
ADAPTER_REDUCTION = 4


def submodule(root: nn.Module, dotted: str):
    obj = root
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return None
        obj = getattr(obj, name)
    return obj


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """None (the default): every layer but the first two, which change the residual stream most (measured on SmolLM2:
    influence 0.99 and 0.18 against 0.03-0.07 for layers 2-28; docs/design.md), or the second half of a model with
    fewer than four layers. Else 'half' (the second half, as FlexiDepth), 'all', '16-31', '2-' (2 to the last),
    '16,18,20' or a mix such as '10-12,20'."""
    from .errors import BadInput

    if spec in (None, ""):
        return list(range(min(2, num_layers // 2), num_layers))
    if spec == "half":
        return list(range(num_layers // 2, num_layers))
    if spec == "all":
        return list(range(num_layers))
    out: set[int] = set()
    try:
        for piece in spec.split(","):
            lo, dash, hi = piece.strip().partition("-")
            out.update(range(int(lo), (int(hi) if hi else num_layers - 1) + 1) if dash else [int(lo)])
    except ValueError:
        raise BadInput(f"bad --layers {spec!r}", "use 'half', 'all', '16-31', '2-' or '16,18,20'") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad or not out:
        raise BadInput(f"--layers {spec!r} names layers {bad or 'none'}; the model has layers 0..{num_layers - 1}")
    return sorted(out)


def _sizes(config) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return hidden, inter


def adapter_dim_for(config, reduction: int) -> int:
    """Adapter width for a base config: its MLP width / reduction (flexi convert --adapter-reduction)."""
    return max(1, _sizes(config)[1] // reduction)


class FlexiModel:
    def __init__(self, model: nn.Module, tokenizer, config: FlexiConfig, state: RoutingState):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.state = state
        self.path: Path | None = None  # the checkpoint folder this model was loaded from, if any

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def wrap(cls, model: nn.Module, tokenizer=None, routed_layers=None, parts: LayerParts | None = None,
             base_model: str = "unknown", base_revision: str | None = None, adapter_reduction: int = ADAPTER_REDUCTION,
             router_reduction: int = 16, router_init_bias: float = 0.1, threshold: float = 0.5,
             gate_mode: str = "ste", skip_unit: str = "layer", router: str = "flexidepth") -> "FlexiModel":
        """Wrap the layers in place. Every check runs before the model is touched."""
        model_type = getattr(model.config, "model_type", "?")
        parts = parts or parts_for(model_type)
        layers = submodule(model, parts.layers)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedModel(f"no ModuleList of decoder layers at {parts.layers!r} in {type(model).__name__}",
                                   "pass LayerParts(layers=...) naming where the layers live")
        if any(isinstance(layer, FlexiLayer) for layer in layers):
            raise UnsupportedModel("this model is already converted")
        routed = sorted(set(parse_layers(None, len(layers)) if routed_layers is None else routed_layers))
        if not routed or routed[0] < 0 or routed[-1] >= len(layers):
            raise UnsupportedModel(f"routed layers {routed} out of range 0..{len(layers) - 1}")
        for name in ("attn", "mlp", "attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm"):
            part = getattr(parts, name)
            if part is not None and not hasattr(layers[routed[0]], part):
                raise UnsupportedModel(
                    f"layer {routed[0]} ({type(layers[routed[0]]).__name__}) has no part {part!r} (looked for {name})",
                    "pass LayerParts(...) with this model's names")
        if gate_mode not in ("ste", "scale"):
            raise UnsupportedModel(f"gate_mode must be 'ste' or 'scale', not {gate_mode!r}")
        check_choice(skip_unit, router)

        hidden = _sizes(model.config)[0]
        ref = next(model.parameters())
        config = FlexiConfig(
            base_model=base_model, base_revision=base_revision, base_fingerprint=fingerprint(model),
            model_type=model_type, parts=parts.to_dict(), num_layers=len(layers), routed_layers=routed,
            hidden_size=hidden, adapter_dim=adapter_dim_for(model.config, adapter_reduction),
            router_reduction=router_reduction, router_init_bias=router_init_bias, threshold=threshold,
            gate_mode=gate_mode, dtype=str(ref.dtype).removeprefix("torch."), skip_unit=skip_unit, router=router)
        return cls._install(model, tokenizer, config)

    @staticmethod
    def check_base(config: FlexiConfig, model: nn.Module) -> None:
        """The checkpoint's config against the base model it names, before any layer is wrapped (FlexiConfig.check
        has already checked what needs no base)."""
        where = f"{config.base_model!r}"
        layers = submodule(model, config.parts["layers"])
        if not isinstance(layers, nn.ModuleList):
            raise CheckpointError(f"the base {where} has no decoder layers at {config.parts['layers']!r} "
                                  "(the checkpoint's parts.layers)", "convert again on this base")
        if len(layers) != config.num_layers:
            raise CheckpointError(f"the checkpoint is for a base with {config.num_layers} layers; {where} has "
                                  f"{len(layers)}", "convert again on this base")
        hidden, _ = _sizes(model.config)
        if hidden != config.hidden_size:
            raise CheckpointError(f"the checkpoint's hidden_size is {config.hidden_size}; {where} has {hidden}",
                                  "convert again on this base")

    @classmethod
    def _install(cls, model, tokenizer, config: FlexiConfig) -> "FlexiModel":
        state = RoutingState(threshold=config.threshold, gate_mode=config.gate_mode)
        model.requires_grad_(False)
        install_routed_layers(submodule(model, config.parts["layers"]), asdict(config), state)
        return cls(model, tokenizer, config, state)

    # ---- parts ----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[FlexiLayer]:
        return [m for m in submodule(self.model, self.config.parts["layers"]) if isinstance(m, FlexiLayer)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for part in trained_modules(layer)
                for p in getattr(layer, part).parameters()]

    def flexi_state_dict(self) -> dict[str, torch.Tensor]:
        return trained_state(self.layers)

    # ---- routed units and their cost (flexicli/core/units.py) ------------------------------------------------------
    @property
    def unit_keys(self) -> list:
        """One key per routed unit, in the order a forward pass decides them: the layer index (skip unit `layer`)
        or (layer index, 'attn' | 'mlp')."""
        return [unit_key(layer.layer_index, u) for layer in self.layers for u in layer.units]

    @property
    def unit_labels(self) -> list[str]:
        """The unit keys as report keys: '17' or '17.attn'."""
        return [unit_label(k) for k in self.unit_keys]

    @property
    def unit_costs(self) -> list[float]:
        """Layer-equivalents a token saves by skipping each unit (1.0 each for skip unit `layer`)."""
        return [layer.costs[u] for layer in self.layers for u in layer.units]

    @property
    def capacity(self) -> float:
        """The most layer-equivalents a token can skip: the routed layers for `layer` and `module`, less for `mlp`
        (its attention always runs)."""
        return round(float(sum(self.unit_costs)), 9)  # module: exactly the routed layers, not 14.999999

    def layer_equivalents(self, skipped_per_unit) -> float:
        """Skip counts (or rates) per unit -> layer-equivalents (unit_costs-weighted sum)."""
        return float(sum(c * float(k) for c, k in zip(self.unit_costs, list(skipped_per_unit), strict=True)))

    def load_flexi_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        load_trained_state(self.layers, tensors, CheckpointError)

    def base_parameter_count(self) -> int:
        trainable = {id(p) for p in self.trainable_parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in trainable)

    # ---- routing knobs ----------------------------------------------------------------------------------------
    def set_threshold(self, threshold: float) -> None:
        """The routing threshold, live (state) and as saved (config) at once: the two never drift apart."""
        if not is_threshold(threshold):
            raise BadInput(f"threshold must be in [0, 1], not {threshold!r}")
        self.state.threshold = self.config.threshold = float(threshold)

    @contextmanager
    def routing(self, mode: str | None = None, threshold: float | None = None, skip_layers=None):
        s = self.state
        saved = (s.mode, s.threshold, s.skip_layers)
        if mode is not None and mode not in s.MODES:
            raise ValueError(f"routing mode must be one of {s.MODES}, not {mode!r}")
        s.mode = mode or s.mode
        s.threshold = s.threshold if threshold is None else float(threshold)
        s.skip_layers = s.skip_layers if skip_layers is None else frozenset(skip_layers)
        try:
            yield self
        finally:
            s.mode, s.threshold, s.skip_layers = saved

    @contextmanager
    def record(self):
        rec = Recording(self.unit_keys, self.unit_costs)
        self.state.records = rec.raw
        try:
            yield rec
        finally:
            self.state.records = None

    # ---- saving and loading ---------------------------------------------------------------------------------
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        from .card import render_card

        return write_checkpoint(Path(folder), self.config, self.flexi_state_dict(), render_card(self.config),
                                overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False) -> "FlexiModel":
        from .base_model import load_base
        from .hub import resolve_checkpoint

        folder = resolve_checkpoint(str(folder))
        config = read_config(folder)
        tensors = read_weights(folder)  # read before the (slow) base load: a damaged file fails fast
        model, tokenizer, _ = load_base(config.base_model, dtype=dtype or config.dtype, device=device,
                                        revision=config.base_revision, trust_remote_code=trust_remote_code)
        found = fingerprint(model)
        if found != config.base_fingerprint:
            raise CheckpointError(
                f"the base model {config.base_model!r} does not match this checkpoint "
                f"(fingerprint {found[:12]} != {config.base_fingerprint[:12]})",
                "its weights changed since `flexi convert`; convert and train again on this base")
        cls.check_base(config, model)
        fm = cls._install(model, tokenizer, config)
        ref = next(model.parameters())
        fm.load_flexi_state_dict({k: v.to(ref.device, ref.dtype) for k, v in tensors.items()})
        fm.path = folder
        return fm


class Recording:
    """Routing decisions collected during forward passes, one entry per (forward, routed unit). `units`: the unit
    keys (FlexiModel.unit_keys; the routed layer indices for skip unit `layer`), `costs`: their layer-equivalents."""

    def __init__(self, units, costs=None):
        self.units = list(units)
        self.routed_layers = self.units  # the name before skip units (unit keys are layer indices for `layer`)
        self.costs = [1.0] * len(self.units) if costs is None else list(costs)
        self.raw: list[tuple[object, torch.Tensor]] = []

    def decisions(self) -> torch.Tensor:
        """[B, T_total, n_units] bool (True = the token ran the unit), concatenating forward calls in time."""
        n = len(self.units)
        if not self.raw:
            return torch.zeros(0, 0, n, dtype=torch.bool)
        steps = [self.raw[i:i + n] for i in range(0, len(self.raw), n)]
        for step in steps:
            if [key for key, _ in step] != self.units:
                raise RuntimeError(f"recorded units {[key for key, _ in step]} are not the model's {self.units}")
        per_step = [torch.stack([mask for _, mask in step], dim=-1) for step in steps]
        return torch.cat(per_step, dim=1).cpu()

    def skipped_layers(self) -> torch.Tensor:
        """[B, T_total] float: layer-equivalents each token skipped (units.py: skipped units weighted by cost)."""
        skipped = (~self.decisions()).float()
        if all(c == 1.0 for c in self.costs):
            return skipped.sum(-1)
        return skipped @ torch.tensor(self.costs, dtype=torch.float32)


def decoder_of(model):
    """The decoder stack (embeddings + layers + final norm, no LM head) of a causal LM."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
