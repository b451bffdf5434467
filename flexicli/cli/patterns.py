"""flexi patterns: which tokens need depth, on the built-in task categories or your own prompts."""

from __future__ import annotations

import click

from .common import device_options, emit_json, json_option, model_option, stderr_console


@click.command("patterns",
               short_help="Which tokens need depth: per-layer usage, per-category means, HTML report + dataset.",
               help="Greedy generations on the built-in task categories (or --prompts FILE) with every "
               "token's routing decisions recorded. Writes OUT/: report.html (self-contained), layer_usage.png, "
               "category_layers.png (PNGs need matplotlib: pip install 'flexicli[plots]'), "
               "tokens.jsonl (one record per generated token), summary.json.")
@model_option
@click.option("--base", "base", default=None, metavar="MODEL",
              help="No checkpoint: analyse this base model (every token uses every layer).")
@click.option("-o", "--output", default="flexi-patterns", show_default=True, help="Folder to write.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="One prompt per line, or .jsonl objects {\"prompt\", \"category\"?, \"id\"?}.")
@click.option("--categories", default=None, help="Comma-separated built-in categories (default: all).")
@click.option("--per-category", type=int, default=None, help="At most this many built-in prompts per category.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--threshold", type=float, default=None, help="Override the routing threshold tau.")
@click.option("--raw", is_flag=True, help="Do not apply the chat template to the prompts.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@device_options
@json_option
def command(model_dir, base, output, prompts_file, categories, per_category, max_new_tokens, threshold, raw, force,
            device, dtype, as_json):
    from ..core.checkpoint import refuse_existing
    from ..core.errors import BadInput
    from ..generation.decode import check_threshold, open_model
    from ..generation.patterns import analyse, builtin_prompts, collect, read_prompts, unit_args, write_outputs

    check_threshold(threshold)
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    refuse_existing(output, force)  # before the slow part; write_outputs checks again
    if prompts_file and (categories or per_category):
        raise BadInput("--prompts replaces the built-in categories", "drop --categories/--per-category")
    prompts = read_prompts(prompts_file) if prompts_file else builtin_prompts(
        [c.strip() for c in categories.split(",")] if categories else None, per_category)

    err = stderr_console()
    with err.status(f"loading {base or model_dir}..."):
        lm = open_model(model_dir, base=base, device=device, dtype=dtype)
    if lm.flexi is None and threshold is not None:
        raise BadInput("--threshold needs a flexicli checkpoint", "pass -m with a folder written by `flexi convert`")
    with err.status("generating...") as status:
        records = collect(lm, prompts, max_new_tokens, threshold, chat=False if raw else None,
                          on_prompt=lambda i, p: status.update(f"generating {i + 1}/{len(prompts)}: {p.id}"))
    analysis = analyse(records, lm.num_layers, lm.routed_layers, **unit_args(lm))
    meta = {"model": lm.source, "threshold": lm.threshold if threshold is None else threshold,
            "prompts": prompts_file or "built-in task categories", "max_new_tokens": max_new_tokens}
    folder, figures = write_outputs(output, records, analysis, meta, prompts, overwrite=force)
    if not figures:
        err.print("no PNG figures: they need matplotlib (pip install 'flexicli[plots]'); report.html has the same "
                  "charts", markup=False, soft_wrap=True)

    summary = {"output": str(folder), "files": ["report.html", *figures, "tokens.jsonl", "summary.json"],
               "tokens": analysis.tokens, "mean_layers_used": analysis.mean_layers_used,
               "num_layers": analysis.num_layers, "category_mean_layers": analysis.category_mean_layers,
               "layer_usage": analysis.layer_usage}
    if analysis.unit_usage is not None:  # skip units module/mlp: the share of tokens that ran each routed unit
        summary["unit_usage"] = analysis.unit_usage
    if as_json:
        emit_json(summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"flexi patterns: {analysis.tokens} tokens, mean {analysis.mean_layers_used:.2f} of "
                        f"{analysis.num_layers} layers")
    table.add_column("category")
    table.add_column("tokens", justify="right")
    table.add_column("mean layers used", justify="right")
    for c, v in sorted(analysis.category_mean_layers.items(), key=lambda kv: kv[1]):
        table.add_row(c, str(analysis.category_tokens[c]), f"{v:.2f}")
    out = Console()
    out.print(table)
    if analysis.hungriest:
        for label, rows in (("most", analysis.hungriest), ("least", analysis.cheapest)):
            top = ", ".join(f"{r['text']!r} {r['mean_layers_used']:.1f}" for r in rows[:5])
            out.print(f"{label} layer-hungry: {top or 'none to rank'}")
    if analysis.unit_usage:
        ran = " ".join(f"{k}:{100 * v:.0f}%" for k, v in analysis.unit_usage.items())
        out.print(f"tokens that ran each unit: {ran}")
    out.print(f"wrote {folder}/: " + ", ".join(summary["files"]))
