"""The one place that saves and loads checkpoint folders.

A checkpoint folder holds only what flexicli adds, never the base weights:
    flexi_config.json          base model id/path, revision, fingerprint of the base weights, routed layers, sizes
    flexi_weights.safetensors  router and adapter weights (never pickle)
    README.md                  model card
Folders are written atomically: into a temporary sibling first, then swapped into place in one step (Linux
renameat2 RENAME_EXCHANGE), so a process killed at any moment leaves the old folder or the new one at the path,
never a mix or nothing. Siblings a killed writer left behind (.NAME.tmp-PID-*, .NAME.old-PID) are removed by the
next write to that path.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .errors import CheckpointError
from .routed_layer import is_threshold

CONFIG_FILE = "flexi_config.json"
WEIGHTS_FILE = "flexi_weights.safetensors"
CARD_FILE = "README.md"
FORMAT = "flexicli/1"


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
    skip_unit: str = "layer"  # layer | module | mlp (flexicli/core/units.py); configs from before skip units: layer
    router: str = "flexidepth"  # flexidepth (bottleneck) | linear
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
        from .base_model import DTYPES

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
        if not is_threshold(t):
            bad(f"threshold must be a number in [0, 1], not {t!r}")
        if self.gate_mode not in ("ste", "scale"):
            bad(f"gate_mode must be 'ste' or 'scale', not {self.gate_mode!r}")
        from .units import check_choice

        check_choice(self.skip_unit, self.router, CheckpointError)
        if self.dtype not in DTYPES:
            bad(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        return self


def fingerprint(model: torch.nn.Module) -> str:
    """A fingerprint of the base weights that ignores flexicli's own parameters and the dtype the base was
    loaded in (values are compared in bfloat16). Samples up to 4096 values per tensor: cheap for 8B models,
    and any real change to a tensor (fine-tuning, another checkpoint) shows up."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if ".router." in name or ".adapter." in name or re.search(r"\.\d+\.(attn|mlp)_router\.", name):
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(name.replace("base_layer.", "").encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


_KILL_HITS: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Tests of crash safety only: with FLEXI_TEST_KILL_AT=NAME:N this process SIGKILLs itself the Nth time it
    passes the point NAME (as an outside `kill -9` landing exactly there would). Unset: does nothing.
    Points: save-partial, save-written, save-swapped (checkpoint writes), step (flexicli/train/loop.py)."""
    spec = os.environ.get("FLEXI_TEST_KILL_AT")
    if not spec or spec.partition(":")[0] != name:
        return
    _KILL_HITS[name] = _KILL_HITS.get(name, 0) + 1
    if _KILL_HITS[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove what writers of `target` that were killed mid-write left beside it: their temporary folders, and old
    folders not yet deleted after the swap. Where the two-rename fallback was killed between its renames (no
    folder at `target`, the old one beside it), the old one goes back into place."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)(-.*)?")
    for p in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists():
            os.replace(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def refuse_existing(target: str | Path, overwrite: bool = False) -> Path:
    """`target` as a Path; a CheckpointError if it exists and may not be replaced. Commands call it before their
    slow part (loading a model), and atomic_dir again when it writes."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists", "choose another -o/--output or pass --force")
    return target


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False):
    """Yields a temporary folder beside `target`; on success it replaces `target`, on error it vanishes."""
    target = Path(target)
    clean_stale(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the names: clean_stale tells a killed writer's leftovers from a live writer's
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        yield tmp
        kill_point("save-written")
        if target.exists():
            if _exchange(tmp, target):  # one step: a reader (or a kill) sees the old folder or the new, never none
                old = tmp
            else:  # no exchange here: two renames, with a moment without `target` that clean_stale repairs
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
            kill_point("save-swapped")
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
        kill_point("save-partial")
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
        clean_stale(folder)  # a writer killed between the fallback's two renames: its old folder goes back
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


def weights_digest(folder: Path) -> str:
    """sha256 of the weights file's bytes: what a stored eval was given, so a later change is noticed."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}", "the checkpoint is incomplete: convert again")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
