"""Training state on disk: the optimiser, the budget's state and the step, written atomically beside the checkpoint
so `flexi train --resume` continues exactly where a killed run last saved (same data order, same budget)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .config import TrainConfig


TRAIN_STATE = "train_state.safetensors"


METRICS = "metrics.jsonl"


# ---- saving -------------------------------------------------------------------------------------------------
def save_training(fm, folder: Path, cfg: TrainConfig, step: int, opt, budget, summary: dict | None,
                  weights: dict[str, list] | None = None, selected: dict | None = None,
                  rollbacks: list[int] | None = None) -> None:
    """`weights`: lists of tensors, one per trainable parameter, kept in the training state under their name
    ("ema": the running average; "best": the best on validation so far; "last": the last step's weights when the
    checkpoint holds other ones). `selected`: the best's {"step", "kl", "budget"}. `rollbacks`: the steps whose
    evaluation sent training back to the best (loop._roll_back)."""
    from safetensors.torch import save_file

    from ..core.card import render_card
    from ..core.checkpoint import write_checkpoint

    flat = {}
    scalars = {"step": step, "budget": budget.state(), "train_config": asdict(cfg), "selected": selected,
               "rollbacks": list(rollbacks or [])}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(float(v))
    for name, tensors in (weights or {}).items():
        flat.update({f"{name}.{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)})
    fm.config.training = {**(fm.config.training or {}), **(summary or {}), "skip_target": cfg.skip_target,
                          "steps_done": step, "command": (fm.config.training or {}).get("command", _command())}
    metrics = folder / METRICS
    extra = {METRICS: metrics.read_bytes() if metrics.is_file() else b""}

    def write_state(tmp: Path):
        save_file(flat, tmp / TRAIN_STATE, metadata={"scalars": json.dumps(scalars)})

    write_checkpoint(folder, fm.config, fm.flexi_state_dict(), render_card(fm.config), overwrite=True,
                     extra_files=extra, writer=write_state)


def load_training(folder: Path, opt) -> tuple[int, dict, dict, dict[str, list], dict | None, list[int]]:
    """Restore the optimiser; returns (steps done, the run's TrainConfig as a dict, the budget's state, the weight
    lists save_training kept, the best-on-validation's {"step", "kl", "budget"} or None, the rollbacks' steps)."""
    from safetensors import safe_open

    path = folder / TRAIN_STATE
    with safe_open(path, "pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    sd = opt.state_dict()
    for key, v in flat.items():
        i, name = key.split(".", 1)
        if i.isdigit():  # the optimiser's state of parameter i; the rest are weight lists (_weight_lists)
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return (scalars["step"], scalars["train_config"], scalars["budget"], _weight_lists(flat), scalars.get("selected"),
            scalars.get("rollbacks", []))


def saved_weights(folder: Path) -> dict[str, list]:
    """The weight lists save_training kept in `folder`'s training state ({} if none), e.g. ["last"]: the last step's
    weights of a run whose checkpoint holds the average, in FlexiModel.trainable_parameters() order."""
    from safetensors.torch import load_file

    return _weight_lists(load_file(folder / TRAIN_STATE))


def _weight_lists(flat: dict) -> dict[str, list]:
    """{"<list name>.<parameter index>": tensor} entries of a training state as {list name: [tensor, ...]}."""
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for key, v in flat.items():
        name, i = key.split(".", 1)
        if not name.isdigit():
            by_name.setdefault(name, {})[int(i)] = v
    return {name: [by_index[j] for j in range(len(by_index))] for name, by_index in by_name.items()}


def trim_metrics(path: Path, step: int) -> None:
    """Cut metrics.jsonl back to the lines of steps 1..step. It is appended live, once a step, outside the atomic
    saves, so a run killed after the last save has lines past it (perhaps a half-written last one); the resumed run
    writes those steps again, and without this they would appear twice. Truncated in place (one call, no temporary
    file in the checkpoint folder)."""
    if not path.is_file():
        return
    keep = 0
    with path.open("rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)


def _command() -> str:
    # without --resume: the command that reproduces the run (a run saved first by a --resume that found no state)
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return "flexi " + " ".join(shlex.quote(a) for a in args) if sys.argv and "flexi" in sys.argv[0] else ""
