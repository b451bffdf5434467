"""The one place that saves and loads checkpoint folders.

A checkpoint folder holds only what flexicli adds, never the base weights:
    flexi_config.json          base model id/path, revision, fingerprint of the base weights, routed layers, sizes
    flexi_weights.safetensors  router and adapter weights (never pickle)
    README.md                  model card
Folders are written atomically: into a temporary sibling first, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .errors import CheckpointError

CONFIG_FILE = "flexi_config.json"
WEIGHTS_FILE = "flexi_weights.safetensors"
CARD_FILE = "README.md"
FORMAT = "flexicli/1"
DEFAULT_DIR = "flexi-model"


@dataclass
class FlexiConfig:
    base_model: str
    base_fingerprint: str
    model_type: str
    parts: dict
    num_layers: int
    routed_layers: list[int]
    hidden_size: int
    adapter_dim: int
    base_revision: str | None = None
    router_reduction: int = 16
    router_init_bias: float = 0.1
    threshold: float = 0.5
    gate_mode: str = "ste"
    dtype: str = "float32"
    format: str = FORMAT
    training: dict | None = None
    eval: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "FlexiConfig":
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise CheckpointError(f"{CONFIG_FILE} lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self, where: str = CONFIG_FILE) -> "FlexiConfig":
        """What a hand-edited or damaged config can get wrong, each as one CheckpointError naming the field; the
        checks that need the base model are FlexiModel.check_base's."""
        from .base import DTYPES

        def bad(what: str):
            raise CheckpointError(f"{where}: {what}", "restore the file or convert again")

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.parts, dict) or not isinstance(self.parts.get("layers"), str):
            bad(f"parts must be an object whose 'layers' names where the decoder layers live, not {self.parts!r}")
        for name in ("num_layers", "hidden_size", "adapter_dim", "router_reduction"):
            if not whole(getattr(self, name)) or getattr(self, name) < 1:
                bad(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        r = self.routed_layers
        if not isinstance(r, list) or not r or not all(whole(i) for i in r):
            bad(f"routed_layers must be a non-empty list of layer numbers, not {r!r}")
        outside = [i for i in r if not 0 <= i < self.num_layers]
        if outside:
            bad(f"routed layers {outside} are outside 0..{self.num_layers - 1} (the base's layers)")
        if r != sorted(set(r)):  # decisions are recorded in layer order and labelled with this list
            bad(f"routed_layers {r} must be increasing, without repeats")
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 1:
            bad(f"threshold must be a number in [0, 1], not {t!r}")
        if self.gate_mode not in ("ste", "scale"):
            bad(f"gate_mode must be 'ste' or 'scale', not {self.gate_mode!r}")
        if self.dtype not in DTYPES:
            bad(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        return self


def fingerprint(model: torch.nn.Module) -> str:
    """A fingerprint of the base weights that ignores flexicli's own parameters and the dtype the base was
    loaded in (values are compared in bfloat16). Samples up to 4096 values per tensor: cheap for 8B models,
    and any real change to a tensor (fine-tuning, another checkpoint) shows up."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if ".router." in name or ".adapter." in name:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(name.replace("base_layer.", "").encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False):
    """Yields a temporary folder beside `target`; on success it replaces `target`, on error it vanishes."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists", "choose another -o/--output or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(folder: Path, config: FlexiConfig, tensors: dict[str, torch.Tensor], card: str,
                     overwrite: bool = False, extra_files: dict[str, bytes] | None = None, writer=None) -> Path:
    """Write the whole folder atomically. `extra_files` (name -> bytes) and `writer(tmp_folder)` add what other
    stages keep beside the weights (training state, metrics log)."""
    from safetensors.torch import save_file

    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        save_file({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, tmp / WEIGHTS_FILE,
                  metadata={"format": FORMAT})
        (tmp / CARD_FILE).write_text(card)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if writer is not None:
            writer(tmp)
    return Path(folder)


def update_config(folder: Path, **changes) -> FlexiConfig:
    """Rewrite flexi_config.json with some fields changed (atomically: write then rename)."""
    config = read_config(folder)
    for k, v in changes.items():
        setattr(config, k, v)
    tmp = Path(folder) / f".{CONFIG_FILE}.tmp"
    tmp.write_text(config.to_json())
    os.replace(tmp, Path(folder) / CONFIG_FILE)
    return config


def read_config(folder: Path) -> FlexiConfig:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"no checkpoint folder at {folder}", "run `flexi convert` first, or pass -m/--model")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a flexicli checkpoint (no {CONFIG_FILE})",
                              "pass the folder written by `flexi convert`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config")
    return FlexiConfig.from_dict(data).check(str(path))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}", "the checkpoint is incomplete: convert again")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is corrupted ({str(e).splitlines()[0]})",
                              "restore it or convert again") from e
