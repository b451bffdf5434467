"""Optional extra: lm-evaluation-harness tasks on a flexi checkpoint, the routed model against the original.

    pip install 'flexicli[lm-eval]'         # lm_eval, the tested range (pyproject.toml)
    flexi eval -m flexi-model --lm-eval-tasks hellaswag,arc_easy --limit 200
    flexi eval -m flexi-model --lm-eval-tasks flexi_mc,flexi_gen --lm-eval-include tests/lm_eval_tasks   # offline

Tested against the real harness (lm_eval 0.4.13, tests/test_lm_eval.py): local task YAMLs with local data files,
on a tiny random model and on SmolLM2, with the scores checked against the tests' own loglikelihoods and greedy
decodes. compare() runs each task twice on the same weights in memory, routing off (the original model) and
routed, and reports per task: each metric for both and the retention (routed / original), and flips.

Flips (Dutta et al. 2024, "Accuracy is Not All You Need"): the share of items whose correctness changed, in each
direction (correct_to_wrong, wrong_to_correct). An item is correct when its per-item score is >= 0.5; for the
harness that is the per-sample value of the task's first metric (`acc` for multiple choice, 0 or 1, so it is
the score itself). Local task YAMLs: relative `data_files` are read relative to the YAML file.

From Python: `flexi_lm(checkpoint, routing="full")` is an HFLM for `lm_eval.simple_evaluate(model=...)`;
`register()` adds the model name "flexi" (`model_args="pretrained=DIR,routing=full"`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..core import DEFAULT_DIR
from ..core.errors import BadInput
from .scores import flips, retention

ROUTINGS = ("routed", "full")  # routed: the routers decide; full: the original model (routing off)
INSTALL = "pip install 'flexicli[lm-eval]'"


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise BadInput("lm-evaluation-harness is not installed", INSTALL) from e
    return HFLM


def _load(checkpoint: str, routing: str, threshold: float | None, device: str | None, dtype: str | None):
    from ..core.flexi_model import FlexiModel

    if routing not in ROUTINGS:
        raise BadInput(f"routing must be one of {ROUTINGS}, not {routing!r}")
    fm = FlexiModel.load(checkpoint, device=device, dtype=dtype)
    if fm.tokenizer is None:
        raise BadInput(f"the base model of {checkpoint} has no tokenizer; lm-eval needs one")
    # The harness calls the model many times; the routing state stays set for all of them.
    fm.state.mode = routing
    if threshold is not None:
        fm.set_threshold(threshold)
    return fm


def wrap(fm, batch_size: int = 1, **hflm_kwargs):
    """An lm-eval HFLM around a loaded FlexiModel (no copy); `.flexi` is the FlexiModel."""
    if fm.tokenizer is None:
        raise BadInput("this model has no tokenizer; lm-eval needs one")
    lm = _hflm()(pretrained=fm.model, tokenizer=fm.tokenizer, batch_size=batch_size, **hflm_kwargs)
    lm.flexi = fm
    return lm


def flexi_lm(checkpoint: str = DEFAULT_DIR, routing: str = "routed", threshold: float | None = None,
             device: str | None = None, dtype: str | None = None, batch_size: int = 1, **hflm_kwargs):
    """An lm-eval HFLM around a loaded flexi checkpoint; `.flexi` is the FlexiModel (e.g. to switch routing)."""
    _hflm()  # before the slow load
    return wrap(_load(checkpoint, routing, threshold, device, dtype), batch_size, **hflm_kwargs)


def register():
    """Register "flexi" as an lm-eval model name; returns the class."""
    HFLM = _hflm()
    from lm_eval.api.registry import register_model

    @register_model("flexi")
    class FlexiLM(HFLM):
        def __init__(self, pretrained: str = DEFAULT_DIR, routing: str = "routed", threshold=None, device=None,
                     dtype=None, **kwargs):
            fm = _load(pretrained, routing, threshold, device, dtype)
            super().__init__(pretrained=fm.model, tokenizer=fm.tokenizer, **kwargs)
            self.flexi = fm

    return FlexiLM


# ---- tasks --------------------------------------------------------------------------------------------------
class TaskSet(NamedTuple):
    """Tasks checked and ready for simple_evaluate: the names, the TaskManager, the specs to pass."""
    names: list
    manager: object
    specs: list


def task_specs(names: list[str], include: list[str] = ()) -> TaskSet:
    """Check the task names (unknown ones are BadInput, before any model is loaded) and prepare them. Tasks
    from `include` folders are passed as their config with relative data_files made relative to the YAML file
    (the harness would read them relative to the working directory)."""
    _hflm()
    for folder in include:
        if not Path(folder).is_dir():
            raise BadInput(f"no such task folder: {folder}", "--lm-eval-include takes a folder of task YAML files")
    if not names:
        raise BadInput("no lm-eval task named", "pass task names, e.g. --lm-eval-tasks hellaswag,arc_easy")
    tm = _manager(tuple(str(Path(f).resolve()) for f in include))
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise BadInput(f"unknown lm-eval task {', '.join(unknown)}",
                       "see `lm_eval ls tasks`; local YAML tasks need --lm-eval-include DIR")
    local = [Path(f).resolve() for f in include]
    return TaskSet(list(names), tm, [_local_config(tm, n, local) or n for n in names])


@lru_cache(maxsize=4)
def _manager(include: tuple[str, ...]):
    """A TaskManager (indexing the harness's ~200 task folders takes seconds: once per process and folders)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def _local_config(tm, name: str, folders: list[Path]) -> dict | None:
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager uses (includes, !function)

    path = getattr(tm.task_index.get(name), "yaml_path", None)
    if path is None or not any(Path(path).resolve().is_relative_to(f) for f in folders):
        return None
    cfg = dict(load_yaml(Path(path), resolve_func=True))
    if cfg.get("task") != name:
        return None  # a group or tag: left to the harness
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return None

    def fix(f):
        return f if "://" in f or Path(f).is_absolute() else str(Path(path).resolve().parent / f)

    kwargs["data_files"] = (fix(files) if isinstance(files, str) else [fix(f) for f in files]
                            if isinstance(files, list) else {k: fix(v) if isinstance(v, str) else [fix(f) for f in v]
                                                             for k, v in files.items()})
    return {**cfg, "dataset_kwargs": kwargs}


# ---- the comparison -----------------------------------------------------------------------------------------
def _metric_name(key: str) -> str:
    return key.removesuffix(",none")  # "acc,none" -> "acc"; a named filter stays ("exact_match,strip")


def correctness(samples: list[dict], key: str) -> dict[int, bool]:
    """doc_id -> correct from simple_evaluate's logged samples: the per-sample value of the metric in `key`
    ("acc,none", "exact_match,strip": metric,filter) is >= 0.5."""
    metric, _, flt = key.partition(",")
    return {int(s["doc_id"]): float(s[metric]) >= 0.5 for s in samples
            if s.get("filter", flt) == flt and isinstance(s.get(metric), (int, float))}


def compare(fm, tasks: list[str] | TaskSet, include: list[str] = (), limit: int | None = None, num_fewshot: int | None = None,
            batch_size: int = 1, routing: dict | None = None) -> dict:
    """Each task on the original model (routing off) and on the routed model (`routing`: fm.routing keywords),
    the same weights in memory. `tasks`: names, or task_specs()'s result.
    Returns {"tasks": {name: {"metrics": {metric: {original, routed, retention}}, "flip_metric", "flips"}},
    "limit", "num_fewshot", "lm_eval_version", "raw"}; `raw` holds both simple_evaluate outputs (not JSON-ready).
    Metric names drop the harness's ",none" filter suffix ("acc"); a named filter stays ("exact_match,strip")."""
    import lm_eval

    _, tm, specs = tasks if isinstance(tasks, TaskSet) else task_specs(tasks, include)
    lm = wrap(fm, batch_size)
    runs = {}
    for name, mode in (("original", {"mode": "full"}), ("routed", dict(routing or {"mode": "routed"}))):
        with fm.routing(**mode):
            runs[name] = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=tm, limit=limit,
                                                 num_fewshot=num_fewshot, log_samples=True)
    out = {}
    for task, routed in runs["routed"]["results"].items():
        original = runs["original"]["results"].get(task, {})
        keys = [k for k, v in routed.items() if "," in k and "_stderr," not in k and isinstance(v, (int, float))
                and isinstance(original.get(k), (int, float))]
        row = {"metrics": {k.removesuffix(",none"): {"original": float(original[k]), "routed": float(routed[k]),
                                                     "retention": retention([original[k]], [routed[k]])}
                           for k in keys}}
        samples = {k: runs[k].get("samples", {}).get(task) for k in runs}
        flip_key = next((k for k in keys if k.startswith("acc,")), keys[0] if keys else None)
        if flip_key and all(samples.values()):
            row["flip_metric"] = flip_key.removesuffix(",none")
            row["flips"] = flips(correctness(samples["original"], flip_key), correctness(samples["routed"], flip_key))
        out[task] = row
    return {"tasks": out, "limit": limit, "num_fewshot": num_fewshot, "lm_eval_version": lm_eval.__version__,
            "raw": runs}
