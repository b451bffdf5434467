"""patterns: which tokens need depth. Greedy generations on the built-in task categories (or your prompts),
with every generated token's routing decisions recorded, turned into a dataset and an analysis.

    lm = open_model("flexi-model")
    records = collect(lm, builtin_prompts(), max_new_tokens=48)
    analysis = analyse(records, lm.num_layers, lm.routed_layers, **unit_args(lm))
    write_outputs("flexi-patterns", records, analysis, meta)   # report.html, *.png, tokens.jsonl, summary.json

A token's decisions are those of the step that processed it (see flexicli.generate). With skip units module and mlp
(flexicli/core/units.py) a decision is per routed unit ("17.attn", "17.mlp"), a layer's usage is the share of its
layer-equivalents that ran, and layer counts are in layer-equivalents.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import BadInput
from .decode import LayerModel, Sampling, generate

DEFAULT_OUT = "flexi-patterns"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


@dataclass
class TokenRecord:
    """One generated token: a line of tokens.jsonl."""

    category: str
    prompt_id: str
    position: int  # index among the generated tokens of its prompt
    token_id: int
    text: str
    layers_used: int | float  # layer-equivalents for skip units module/mlp
    skipped_layers: list[int]  # module/mlp: the layers all of whose units it skipped
    decisions: list[int]  # 1 = ran, 0 = skipped, one per routed layer in the order of `routed_layers`; module/mlp:
    #                       one per routed unit, in the order of Analysis.units
    skipped_units: list[str] | None = None  # module/mlp only: the routed units it skipped ("17.attn")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["skipped_units"] is None:  # skip unit `layer`: the layers say it all
            del d["skipped_units"]
        return d


def builtin_prompts(categories=None, per_category: int | None = None) -> list[Prompt]:
    from ..data.tasks import load_tasks

    try:
        tasks = load_tasks(categories=categories, per_category=per_category)
    except ValueError as e:
        raise BadInput(str(e)) from None
    counts: dict[str, int] = defaultdict(int)
    out = []
    for t in tasks:
        out.append(Prompt(f"{t.category}-{counts[t.category]}", t.category, t.prompt))
        counts[t.category] += 1
    return out


def read_prompts(path: str | Path) -> list[Prompt]:
    """A .jsonl file of {"prompt": ..., "category": ... (optional), "id": ... (optional)} objects, or a text
    file with one prompt per line (category "custom"). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no prompts file {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                text = obj["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"{path}:{n} is not a JSON object with a \"prompt\"") from None
            category = str(obj.get("category", "custom"))
            out.append(Prompt(str(obj.get("id", f"{category}-{n}")), category, str(text)))
        else:
            out.append(Prompt(f"custom-{n}", "custom", line.strip()))
    if not out:
        raise BadInput(f"{path} holds no prompts")
    return out


def collect(lm: LayerModel, prompts: list[Prompt], max_new_tokens: int = 48, threshold: float | None = None,
            chat: bool | None = None, encode: Callable[[str], list[int]] | None = None,
            on_prompt: Callable[[int, Prompt], None] | None = None, **kw) -> list[TokenRecord]:
    """Greedy generation for each prompt; one record per generated token. `encode` defaults to the model's
    chat template (or raw text without one); `kw` goes to generate (e.g. decode= for tokenizer-less models)."""
    routed = lm.routed_layers
    labels = unit_args(lm).get("units")
    records = []
    for i, p in enumerate(prompts):
        if on_prompt is not None:
            on_prompt(i, p)
        ids = encode(p.text) if encode is not None else lm.encode(p.text, chat=chat)
        gen = generate(lm, ids, max_new_tokens, Sampling(), threshold, **kw)
        for pos, t in enumerate(gen.tokens):
            skipped = set(t.skipped_layers if labels is None else t.skipped_units)
            records.append(TokenRecord(p.category, p.id, pos, t.token_id, t.text, t.layers_used, t.skipped_layers,
                                       [0 if key in skipped else 1 for key in (labels or routed)], t.skipped_units))
    return records


@dataclass
class Analysis:
    num_layers: int
    routed_layers: list[int]
    tokens: int
    mean_layers_used: float
    layer_usage: list[float]  # per decoder layer: share of tokens that ran it (unrouted layers: 1.0); module/mlp:
    #                           the share of its layer-equivalents that ran, per token on average
    category_mean_layers: dict[str, float]
    category_tokens: dict[str, int]
    hungriest: list[dict] = field(default_factory=list)  # {"text", "mean_layers_used", "count"}, most first
    cheapest: list[dict] = field(default_factory=list)  # fewest first
    min_count: int = 3
    units: list[str] | None = None  # module/mlp: the routed units ("17.attn", "17.mlp"), in decision order
    unit_usage: dict[str, float] | None = None  # module/mlp: per unit, the share of tokens that ran it
    capacity: float | None = None  # the most layer-equivalents a token can skip (None: the routed layers)

    @property
    def fewest_layers(self) -> float:
        """The fewest layers (layer-equivalents) a token can use."""
        return self.num_layers - (len(self.routed_layers) if self.capacity is None else self.capacity)

    def to_dict(self) -> dict:
        return asdict(self)


def unit_args(lm) -> dict:
    """analyse()'s arguments for skip units module/mlp (flexicli/core/units.py); none for `layer` or a base model."""
    if lm.flexi is None or lm.unit_keys == lm.routed_layers:
        return {}
    return {"units": lm.flexi.unit_labels, "costs": lm.unit_costs}


def analyse(records: list[TokenRecord], num_layers: int, routed_layers: list[int], min_count: int = 3,
            top: int = 15, units: list[str] | None = None, costs: list[float] | None = None) -> Analysis:
    """Per-layer usage (FlexiDepth's "bowl"), mean layers per category, and the most and least layer-hungry
    tokens: mean layers used over a token's occurrences, among tokens seen at least `min_count` times
    (whitespace-stripped text, so " the" and "the" count together). `units`/`costs`: skip units module/mlp
    (unit_args): the decisions are per unit, each unit's usage is reported, and a layer's usage is 1 minus its
    units' skip rates weighted by their cost (the share of its layer-equivalents that ran)."""
    if not records:
        raise BadInput("no tokens were generated", "raise --max-new-tokens or check the prompts")
    n = len(records)
    usage = [1.0] * num_layers
    unit_usage = None
    if units is None:
        for j, layer in enumerate(routed_layers):
            usage[layer] = sum(r.decisions[j] for r in records) / n
    else:
        unit_usage = {label: sum(r.decisions[j] for r in records) / n for j, label in enumerate(units)}
        for (label, ran), cost in zip(unit_usage.items(), costs, strict=True):
            usage[int(label.split(".")[0])] -= cost * (1 - ran)
    by_cat: dict[str, list[int]] = defaultdict(list)
    by_text: dict[str, list[int]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r.layers_used)
        key = r.text.strip()
        if key:
            by_text[key].append(r.layers_used)
    ranked = sorted(({"text": k, "mean_layers_used": sum(v) / len(v), "count": len(v)}
                     for k, v in by_text.items() if len(v) >= min_count),
                    key=lambda d: (d["mean_layers_used"], d["count"]))
    top = min(top, len(ranked) // 2)  # the two lists never share a token
    if ranked and ranked[0]["mean_layers_used"] == ranked[-1]["mean_layers_used"]:
        top = 0  # every token used the same number of layers: no ranking to show
    return Analysis(num_layers, list(routed_layers), n, sum(r.layers_used for r in records) / n, usage,
                    {c: sum(v) / len(v) for c, v in by_cat.items()}, {c: len(v) for c, v in by_cat.items()},
                    hungriest=ranked[::-1][:top], cheapest=ranked[:top], min_count=min_count, units=units,
                    unit_usage=unit_usage, capacity=None if costs is None else round(float(sum(costs)), 9))


def write_outputs(out_dir: str | Path, records: list[TokenRecord], analysis: Analysis, meta: dict,
                  prompts: list[Prompt], overwrite: bool = False) -> tuple[Path, list[str]]:
    """Writes the folder atomically (a failure leaves no half-written folder); returns it and the PNG names."""
    from ..core.checkpoint import atomic_dir
    from .report import render_html, save_figures

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with open(tmp / "tokens.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        summary = {"meta": meta, **analysis.to_dict()}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        figures = save_figures(tmp, analysis)
        (tmp / "report.html").write_text(render_html(records, analysis, meta, prompts), encoding="utf-8")
    return out_dir, figures
