"""convert: load a base model, wrap the chosen decoder layers with routers and adapters, save the checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .core.base_model import load_base
from .core import DEFAULT_DIR
from .core.checkpoint import refuse_existing
from .core.families import LayerParts
from .core.flexi_model import ADAPTER_REDUCTION, FlexiModel, parse_layers
from .core.units import check_choice


def convert(model: str | None = None, output: str | Path = DEFAULT_DIR, layers: str | None = None,
            dtype: str | None = None, device: str | None = None, parts: LayerParts | None = None,
            gate_mode: str = "ste", overwrite: bool = False, trust_remote_code: bool = False,
            skip_unit: str = "layer", router: str = "flexidepth", adapter_reduction: int | None = None,
            seed: int = 0) -> FlexiModel:
    """Returns the converted model, already saved to `output`. `skip_unit`, `router`: flexicli/core/units.py.
    `seed` draws the new routers' and adapters' weights: the same call writes the same checkpoint (and leaves the
    caller's random state as it was)."""
    check_choice(skip_unit, router)  # before the slow load
    output = refuse_existing(output, overwrite)  # checked before the slow load; save() checks again
    hf_model, tokenizer, info = load_base(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    n = hf_model.config.num_hidden_layers if hasattr(hf_model.config, "num_hidden_layers") else hf_model.config.n_layer
    with torch.random.fork_rng(devices=[]):  # the routers are made on the CPU, then moved
        torch.manual_seed(seed)
        fm = FlexiModel.wrap(hf_model, tokenizer, routed_layers=parse_layers(layers, n), parts=parts,
                             base_model=info.base_model, base_revision=info.revision, gate_mode=gate_mode,
                             skip_unit=skip_unit, router=router,
                             adapter_reduction=adapter_reduction or ADAPTER_REDUCTION)
    fm.path = fm.save(output, overwrite=overwrite)
    return fm


def summary(fm: FlexiModel) -> dict:
    trainable = sum(p.numel() for p in fm.trainable_parameters())
    base = fm.base_parameter_count()
    r = fm.config.routed_layers
    return {
        "base_model": fm.config.base_model,
        "family": fm.config.model_type,
        "layers": fm.config.num_layers,
        "routed_layers": f"{r[0]}..{r[-1]} ({len(r)})" if r == list(range(r[0], r[-1] + 1)) else str(r),
        "trainable_parameters": trainable,
        "base_parameters": base,
        "trainable_share": trainable / base,
        "skip_unit": fm.config.skip_unit,
        "router": fm.config.router,
        "skip_capacity": round(fm.capacity, 4),  # the most layer-equivalents a token can skip
        "dtype": fm.config.dtype,
        "output": str(fm.path) if fm.path else None,
    }
