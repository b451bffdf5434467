"""Import a checkpoint in the official FlexiDepth format (xuan-luo/FlexiDepth-Llama-3-8B-Instruct) as a
flexicli checkpoint, so its users get flexi generate / eval / patterns / export on it.

The official model is a whole model: the base weights plus, for each routed layer i,

    model.layers.{i}.router.router_enc.weight       [d/16, d]  -> router.enc.weight
    model.layers.{i}.router.router_norm.weight      [d/16]     -> router.norm.weight   (RMSNorm)
    model.layers.{i}.router.router_dec.weight       [d, d/16]  -> router.dec.weight
    model.layers.{i}.router.router_head.weight      [1, d]     -> router.head.weight
    model.layers.{i}.router_proj.gate_proj.weight   [a, d]     -> adapter.gate_proj.weight
    model.layers.{i}.router_proj.down_proj.weight   [a, d]     -> adapter.up_proj.weight    (hidden -> a)
    model.layers.{i}.router_proj.up_proj.weight     [d, a]     -> adapter.down_proj.weight  (a -> hidden)

Their down/up names are swapped relative to Llama's MLP; which is which is decided by shape, so a file that
uses Llama's convention imports too. Their gate is w = sigmoid(head(dec(tanh(norm(enc(z)))))) with no bias
(our Router.bias = 0), a token runs the layer iff w > 0.5, and the FFN branch is scaled by w (run) or 1 - w
(skip): gate_mode "scale". The base weights stay where they are (the source, or --base after a check that
they are the same weights): the checkpoint holds only routers and adapters, like every flexicli checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..core.checkpoint import refuse_existing
from ..core.errors import BadInput, CheckpointError
from ..core.families import FAMILIES
from ..core.flexi_model import FlexiModel

_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(router|router_proj)\.(\w+)\.(\w+)$")
_ROUTER = {"router_enc": "enc", "router_norm": "norm", "router_dec": "dec", "router_head": "head"}
_ADAPTER = ("gate_proj", "down_proj", "up_proj")


def source_folder(source: str) -> Path:
    """A local folder, or a Hub id downloaded into the Hugging Face cache (config, weights, tokenizer)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from ..core.hub import looks_like_hub_id

    if not looks_like_hub_id(source):
        raise BadInput(f"no such folder: {source}", "pass a local folder or the Hub id of a FlexiDepth model")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "cannot get it"
        raise BadInput(f"could not fetch {source} from the Hub ({type(e).__name__})",
                       "check the id and your network, or pass a local folder") from e


def read_official(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The router and adapter tensors of each routed layer, by their official names ("router.router_enc", ...).
    Reads only those tensors (safetensors is memory-mapped: the base weights are not loaded here)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no .safetensors files", "the official checkpoint ships safetensors")
    found: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                m = _KEY.match(key)
                if not m:
                    continue
                layer, block, name, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
                known = _ROUTER if block == "router" else _ADAPTER
                if name not in known or kind != "weight":
                    unknown.append(key)
                    continue
                found.setdefault(layer, {})[f"{block}.{name}"] = st.get_tensor(key)
    if unknown:
        raise CheckpointError(f"unexpected FlexiDepth tensors {unknown[:3]} ({len(unknown)} in all)",
                              "this importer knows routers without biases and SwiGLU adapters only")
    if not found:
        raise CheckpointError(f"{folder} holds no FlexiDepth routers (no 'layers.N.router.router_enc.weight' keys)",
                              "for a plain model use `flexi convert`")
    need = {f"router.{n}" for n in _ROUTER} | {f"router_proj.{n}" for n in _ADAPTER}
    for layer, tensors in sorted(found.items()):
        if set(tensors) != need:
            raise CheckpointError(f"layer {layer} lacks FlexiDepth tensors {sorted(need - set(tensors))}")
    return found


def to_flexicli(official: dict[str, torch.Tensor], hidden: int, layer: int) -> dict[str, torch.Tensor]:
    """One layer's tensors renamed to ours, every shape checked (their down/up told apart by shape)."""
    enc, norm, dec, head = (official[f"router.{n}"] for n in _ROUTER)
    gate, down, up = (official[f"router_proj.{n}"] for n in _ADAPTER)
    r, a = enc.shape[0], gate.shape[0]
    expect = {"router.router_enc": (r, hidden), "router.router_norm": (r,), "router.router_dec": (hidden, r),
              "router.router_head": (1, hidden), "router_proj.gate_proj": (a, hidden)}
    for name, shape in expect.items():
        if tuple(official[name].shape) != shape:
            raise CheckpointError(f"layers.{layer}.{name} has shape {tuple(official[name].shape)}, expected {shape} "
                                  f"(hidden size {hidden})")
    into, out = (down, up) if tuple(down.shape) == (a, hidden) else (up, down)  # theirs: down = hidden -> a
    if tuple(into.shape) != (a, hidden) or tuple(out.shape) != (hidden, a):
        raise CheckpointError(f"layers.{layer}.router_proj down/up have shapes {tuple(down.shape)}/{tuple(up.shape)}; "
                              f"expected one {(a, hidden)} (hidden -> {a}) and one {(hidden, a)}")
    return {"router.enc.weight": enc, "router.norm.weight": norm, "router.dec.weight": dec,
            "router.head.weight": head, "router.bias": torch.zeros(()),
            "adapter.gate_proj.weight": gate, "adapter.up_proj.weight": into, "adapter.down_proj.weight": out}


def _reduction(full: int, small: int, what: str) -> int:
    red = max(1, full // small)
    if max(1, full // red) != small:
        raise CheckpointError(f"the official {what} size {small} is not {full} // n for any n",
                              "flexicli sizes routers and adapters as a fraction of the model's sizes")
    return red


def _check_same_base(model: torch.nn.Module, folder: Path) -> None:
    """With --base: the source's own copy of the base weights must equal the base's (sampled, every tensor)."""
    from safetensors import safe_open

    ours = dict(model.named_parameters())
    compared = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key not in ours:
                    continue
                theirs, mine = st.get_tensor(key), ours[key].detach()
                step = max(1, theirs.numel() // 4096)
                same = theirs.shape == mine.shape and torch.equal(
                    theirs.reshape(-1)[::step].to(torch.bfloat16), mine.reshape(-1)[::step].to(torch.bfloat16).cpu())
                if not same:
                    raise CheckpointError(f"the base weights in {folder} differ from --base at {key}",
                                          "pass the model the FlexiDepth checkpoint was trained from")
                compared += 1
    if compared == 0:
        raise CheckpointError(f"no tensor of {folder} matches a parameter name of --base",
                              "pass the model the FlexiDepth checkpoint was trained from")


def import_flexidepth(source: str, output: str | Path, base: str | None = None, dtype: str | None = None,
                      device: str | None = None, overwrite: bool = False) -> FlexiModel:
    """Read the official checkpoint at `source` (folder or Hub id), write a flexicli checkpoint to `output`."""
    from ..core.base_model import load_base

    output = refuse_existing(output, overwrite)  # before the slow load; the writer checks again
    folder = source_folder(source)
    official = read_official(folder)  # before the slow base load: a wrong folder fails fast
    model_type = json.loads((folder / "config.json").read_text()).get("model_type") \
        if (folder / "config.json").is_file() else None
    if base is None and model_type not in FAMILIES:
        raise BadInput(f"{source} declares model type {model_type!r}, which stock transformers cannot load as the base",
                       "pass --base with the model it was trained from, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    model, tokenizer, info = load_base(base or source, dtype=dtype, device=device)
    if base is not None:
        _check_same_base(model, folder)
    hidden = model.config.hidden_size
    tensors = {f"layers.{i}.{k}": v for i, layer in official.items() for k, v in to_flexicli(layer, hidden, i).items()}
    first = official[min(official)]
    fm = FlexiModel.wrap(model, tokenizer, routed_layers=sorted(official), base_model=info.base_model,
                         base_revision=info.revision, gate_mode="scale", threshold=0.5, router_init_bias=0.0,
                         router_reduction=_reduction(hidden, first["router.router_enc"].shape[0], "router"),
                         adapter_reduction=_reduction(model.config.intermediate_size,
                                                      first["router_proj.gate_proj"].shape[0], "adapter"))
    ref = next(model.parameters())
    fm.load_flexi_state_dict({k: v.to(ref.device, ref.dtype) for k, v in tensors.items()})
    fm.config.extra["imported_from"] = {"format": "flexidepth", "source": source}
    fm.path = fm.save(output, overwrite=overwrite)
    return fm
