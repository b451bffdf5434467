"""The model class that stock transformers runs for an exported folder (`trust_remote_code=True`).

`flexi export` writes `modeling_flexi.py` from flexicli's own source files, so there is one implementation of a routed
layer: core/errors.py, families.py, compat.py, sparse_attention.py, units.py, module_routing.py and routed_layer.py
(export._SOURCES), then this file, each with its relative imports removed, then one generated line naming the base class
of the exported model, e.g.

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

from ..core.routed_layer import FlexiLayer, RoutingState, install_routed_layers, load_trained_state

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
        self.flexi_state = RoutingState(threshold=flexi["threshold"], gate_mode=flexi["gate_mode"])
        layers = self.get_submodule(flexi["parts"]["layers"])
        install_routed_layers(layers, flexi, self.flexi_state)
        load_trained_state([m for m in layers if isinstance(m, FlexiLayer)], tensors)


def _fetch(name_or_path, filename: str, hub: dict) -> str:
    """A file of the exported model: from its folder, or from the Hub (cached) when loaded by id."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, **hub)
