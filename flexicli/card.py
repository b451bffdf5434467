"""The model card written into every checkpoint folder (and pushed with it)."""

from __future__ import annotations

from .checkpoint import FlexiConfig


def _base_id(config: FlexiConfig) -> str:
    if config.base_model.startswith("embedded:"):
        return "HuggingFaceTB/" + config.base_model.removeprefix("embedded:")
    return config.base_model


def render_card(config: FlexiConfig) -> str:
    base = _base_id(config)
    routed = config.routed_layers
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: flexicli",
        "pipeline_tag: text-generation",
        "tags:",
        "- flexicli",
        "- flexidepth",
        "- layer-skipping",
        "---",
        "",
        f"# {base.split('/')[-1]} with adaptive layer skipping (flexicli)",
        "",
        f"Routers and adapters for layers {routed[0]}..{routed[-1]} ({len(routed)} of {config.num_layers}) of "
        f"`{base}`. The base weights are not included: they are loaded from the base model and checked against "
        f"fingerprint `{config.base_fingerprint[:12]}`.",
        "",
        "```",
        "pip install flexicli",
        "flexi generate -m <this repo id> --show-layers \"Your prompt\"",
        "```",
    ]
    if config.training:
        t = config.training
        lines += ["", "## Training", "", f"`{t.get('command', 'flexi train')}`", "",
                  f"Held-out mean skipped layers per token: {t.get('mean_skipped_layers', float('nan')):.2f} "
                  f"(target {t.get('skip_target')})."]
    if config.eval:
        e = config.eval
        lines += ["", "## Evaluation (against the original model)", "", "| metric | value |", "|---|---|"]
        for key in ("kl", "top1_agreement", "greedy_match", "mean_skipped_layers", "passed"):
            if key in e:
                lines.append(f"| {key} | {e[key]:.4f} |" if isinstance(e[key], float) else f"| {key} | {e[key]} |")
    return "\n".join(lines) + "\n"
