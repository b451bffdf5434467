"""Optional extra: run lm-evaluation-harness tasks on a flexi checkpoint, routed or as the original model.

UNTESTED AGAINST lm-eval: the harness is not installed where flexicli is developed (no network), so this module
follows its documented 0.4 API (`HFLM(pretrained=<loaded model>, tokenizer=...)`, `lm_eval.simple_evaluate`,
`lm_eval.api.registry.register_model`) without having run it. flexicli's tests check only our side of that
contract, with a stand-in for the harness. lm-eval is not a dependency: it is imported when used.

    pip install lm-eval
    python -m flexicli.lm_eval -m flexi-model --tasks hellaswag,arc_easy --limit 200            # routed
    python -m flexicli.lm_eval -m flexi-model --tasks hellaswag,arc_easy --limit 200 --compare  # + original, retention

From Python:

    import lm_eval
    from flexicli.lm_eval import flexi_lm
    out = lm_eval.simple_evaluate(model=flexi_lm("flexi-model"), tasks=["hellaswag"], limit=200)

`register()` adds the model name "flexi" to the harness's registry
(`model="flexi", model_args="pretrained=flexi-model,routing=full"`), for code that builds models by name.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import BadInput

ROUTINGS = ("routed", "full")  # routed: the routers decide; full: the original model (routing off)


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise BadInput("lm-evaluation-harness is not installed", "pip install lm-eval") from e
    return HFLM


def _load(checkpoint: str, routing: str, threshold: float | None, device: str | None, dtype: str | None):
    from .model import FlexiModel

    if routing not in ROUTINGS:
        raise BadInput(f"routing must be one of {ROUTINGS}, not {routing!r}")
    fm = FlexiModel.load(checkpoint, device=device, dtype=dtype)
    if fm.tokenizer is None:
        raise BadInput(f"the base model of {checkpoint} has no tokenizer; lm-eval needs one")
    # The harness calls the model many times; the routing state stays set for all of them.
    fm.state.mode = routing
    if threshold is not None:
        fm.state.threshold = float(threshold)
    return fm


def flexi_lm(checkpoint: str = "flexi-model", routing: str = "routed", threshold: float | None = None,
             device: str | None = None, dtype: str | None = None, batch_size: int = 1, **hflm_kwargs):
    """An lm-eval HFLM around a loaded flexi checkpoint; `.flexi` is the FlexiModel (e.g. to switch routing)."""
    HFLM = _hflm()
    fm = _load(checkpoint, routing, threshold, device, dtype)
    lm = HFLM(pretrained=fm.model, tokenizer=fm.tokenizer, batch_size=batch_size, **hflm_kwargs)
    lm.flexi = fm
    return lm


def register():
    """Register "flexi" as an lm-eval model name; returns the class."""
    HFLM = _hflm()
    from lm_eval.api.registry import register_model

    @register_model("flexi")
    class FlexiLM(HFLM):
        def __init__(self, pretrained: str = "flexi-model", routing: str = "routed", threshold=None, device=None,
                     dtype=None, **kwargs):
            fm = _load(pretrained, routing, threshold, device, dtype)
            super().__init__(pretrained=fm.model, tokenizer=fm.tokenizer, **kwargs)
            self.flexi = fm

    return FlexiLM


def retention_table(original: dict, routed: dict) -> dict:
    """Per task and metric: original value, routed value, routed / original. Inputs are simple_evaluate()
    outputs; standard errors and non-numeric entries are left out."""
    table = {}
    for task, metrics in routed.get("results", {}).items():
        for name, value in metrics.items():
            base = original.get("results", {}).get(task, {}).get(name)
            if "stderr" in name or not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
                continue
            table[f"{task}/{name}"] = {"original": base, "routed": value, "retention": value / base if base else None}
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexicli.lm_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="flexi-model", help="checkpoint folder or Hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--routing", choices=ROUTINGS, default="routed")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--compare", action="store_true", help="also run the original model and print retention")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.utils import make_table
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install lm-eval)", file=sys.stderr)
        return 2

    lm = flexi_lm(args.model, args.routing, args.threshold, args.device, args.dtype, args.batch_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    def run():
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot)

    out = {args.routing: run()}
    print(make_table(out[args.routing]))
    if args.compare and args.routing != "full":
        lm.flexi.state.mode = "full"  # same weights in memory: the original model
        out["full"] = run()
        print(make_table(out["full"]))
        out["retention"] = retention_table(out["full"], out["routed"])
        for key, row in out["retention"].items():
            ret = "n/a" if row["retention"] is None else f"{100 * row['retention']:.1f}%"
            print(f"{key:40s} original {row['original']:.4f}  routed {row['routed']:.4f}  retention {ret}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({k: v.get("results", v) if k != "retention" else v for k, v in out.items()}, f, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
