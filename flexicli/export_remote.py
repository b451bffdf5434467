"""The model class that stock transformers runs for an exported folder (`trust_remote_code=True`).

`flexi export` writes `modeling_flexi.py` from flexicli's own source files, so there is one implementation
of a routed layer: errors.py, families.py, units.py, module_routing.py and layer.py (export._SOURCES), then this
file, each with its relative imports
removed, then one generated line naming the base class of the exported model, e.g.

    class FlexiForCausalLM(FlexiMixin, LlamaForCausalLM):
        pass

The base class loads the base weights as usual (they are saved under their original names, so without
trust_remote_code the folder loads as the plain base model); FlexiMixin then wraps the routed layers and
loads the routers and adapters from flexi_weights.safetensors, as FlexiModel.load does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .families import LayerParts
from .layer import FlexiLayer, RoutingState
from .units import check_choice

FLEXI_CONFIG_FILE = "flexi_config.json"
FLEXI_WEIGHTS_FILE = "flexi_weights.safetensors"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download", "proxies")


class FlexiMixin:
    """Routing knobs after loading: `model.flexi_state.threshold` (τ), `.mode` ("routed", or "full" for the
    original model), `.records = []` to collect (layer_index, ran-mask) pairs during forward passes."""

    flexi_state: RoutingState | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        flexi = json.loads(Path(_fetch(pretrained_model_name_or_path, FLEXI_CONFIG_FILE, hub)).read_text())
        from safetensors.torch import load_file

        model.install_flexi(flexi, load_file(_fetch(pretrained_model_name_or_path, FLEXI_WEIGHTS_FILE, hub)))
        return model

    def install_flexi(self, flexi: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Wrap the routed layers in place and load their routers and adapters (names and shapes checked)."""
        parts = LayerParts.from_dict(flexi["parts"])
        layers = self.get_submodule(parts.layers)
        self.flexi_state = RoutingState(threshold=flexi["threshold"], gate_mode=flexi["gate_mode"])
        unit, router = flexi.get("skip_unit", "layer"), flexi.get("router", "flexidepth")  # absent: from before units
        check_choice(unit, router)
        own = {}
        for i in flexi["routed_layers"]:
            layers[i] = FlexiLayer(layers[i], parts, i, self.flexi_state, flexi["hidden_size"], flexi["adapter_dim"],
                                   flexi["router_reduction"], flexi["router_init_bias"], unit, router)
            for part in [*(name for name, _ in layers[i].named_children() if name.endswith("router")), "adapter"]:
                own.update({f"layers.{i}.{part}.{k}": v for k, v in getattr(layers[i], part).state_dict().items()})
        if set(own) != set(tensors):
            raise ValueError(f"{FLEXI_WEIGHTS_FILE} does not match {FLEXI_CONFIG_FILE}: missing "
                             f"{sorted(set(own) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(own))[:3]}")
        with torch.no_grad():
            for k, v in tensors.items():
                if v.shape != own[k].shape:
                    raise ValueError(f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
                own[k].copy_(v)


def _fetch(name_or_path, filename: str, hub: dict) -> str:
    """A file of the exported model: from its folder, or from the Hub (cached) when loaded by id."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, **hub)
