import click

from ..data.tasks import PER_CATEGORY
from .common import device_options, emit_json, json_option, model_option, run_with_progress, stderr_console

# The same as evaluate.Thresholds() (a test checks); repeated here so that `--help` needs no torch import.
_DEFAULTS = dict(max_kl=0.25, min_top1=0.80, min_retention=0.90, min_greedy_match=None)


class Limit(click.ParamType):
    """A threshold: a number, or 'off' to leave that metric out of the verdict."""

    name = "X|off"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "off":
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'off'", param, ctx)


@click.command("eval", help="Is the output preserved? Compare the routed model with the original (routing off) on "
               "held-out data and give a verdict: exit code 0 = passed, 1 = failed. Reports the mean and the 99th "
               "percentile of the per-token KL, top-1 and greedy agreement, and task retention; the result is "
               "stored in the checkpoint (with a hash of its weights, so `flexi push` knows it is current).\n\n"
               "Thresholds take a number or 'off'. Every set threshold whose metric was measured must hold.")
@model_option
@click.option("--data", default=None, help="Held-out data: .jsonl (`messages` or `text` per line) or .txt. "
              "Default: the built-in held-out conversations.")
@click.option("--max-samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Held-out texts scored under teacher forcing.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
              help="Tokens per text (truncated).")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=0), default=8, show_default=True,
              help="Held-out prompts for greedy-generation agreement (0: skip).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per prompt.")
@click.option("--tasks-per-category", type=click.IntRange(min=0), default=PER_CATEGORY, show_default=True,
              help="Items of each task category run on both models (the default is all of them; 0: skip the task suite).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Rows a teacher-forced pass; greedy generation decodes 2x as many prompts at once, the task "
              "suite 12x (a category of 48).")
@click.option("--threshold", type=float, default=None,
              help="Router threshold to evaluate at (default: the checkpoint's own).")
@click.option("--skip-layers", default=None, help="Instead of the routers: skip these routed layers for every "
              "token, run the rest (e.g. '25-28'), to compare with static layer skipping.")
@click.option("--max-kl", type=Limit(), default=_DEFAULTS["max_kl"], show_default=True,
              help="Highest mean KL(original||routed) per token, nats.")
@click.option("--min-top1", type=Limit(), default=_DEFAULTS["min_top1"], show_default=True,
              help="Lowest teacher-forced top-1 agreement.")
@click.option("--min-retention", type=Limit(), default=_DEFAULTS["min_retention"], show_default=True,
              help="Lowest task-suite retention (routed/original score; 0.9 = 90%).")
@click.option("--min-greedy-match", type=Limit(), default="off", show_default=True,
              help="Lowest fraction of prompts with identical greedy continuations.")
@click.option("--yardstick", is_flag=True, help="Also measure int8 and int4 (groups of 32) fake-quantised copies of "
              "the original under teacher forcing, to place the routed model's KL between them, and on the task "
              "suite, to read its retention against theirs. Costs two more teacher-forced passes and two more runs "
              "of the suite.")
@click.option("--lm-eval-tasks", default=None, help="Also run these lm-evaluation-harness tasks (comma-separated, "
              "e.g. hellaswag,arc_easy) on both models: scores, retention and flips per task. Needs "
              "`pip install 'flexicli[lm-eval]'`; not part of the verdict.")
@click.option("--lm-eval-limit", type=click.IntRange(min=1), default=None, help="Items per lm-eval task (default: all).")
@click.option("--lm-eval-include", multiple=True, help="A folder of local lm-eval task YAMLs (repeatable); their "
              "relative data_files are read relative to the YAML.")
@click.option("--lm-eval-fewshot", type=click.IntRange(min=0), default=None, help="Few-shot examples (default: the "
              "task's own).")
@click.option("--no-save", is_flag=True, help="Do not store the result in the checkpoint's config.")
@device_options
@json_option
@click.pass_context
def command(ctx, model_dir, data, max_samples, seq_len, n_prompts, new_tokens, tasks_per_category, batch_size,
            threshold, skip_layers, max_kl, min_top1, min_retention, min_greedy_match, yardstick, lm_eval_tasks,
            lm_eval_limit, lm_eval_include, lm_eval_fewshot, no_save, device, dtype, as_json):
    from pathlib import Path

    from ..core.checkpoint import weights_digest
    from ..core.errors import BadInput
    from ..core.flexi_model import FlexiModel
    from ..core.hub import looks_like_hub_id
    from ..evaluation.evaluate import Thresholds, evaluate, store
    from ..generation.decode import check_threshold

    check_threshold(threshold)
    if data is not None and not Path(data).is_file():  # checked before the slow load
        raise BadInput(f"no such data file: {data}", "pass a .jsonl or .txt file to --data")
    harness = None
    if lm_eval_tasks is not None or lm_eval_include or lm_eval_limit or lm_eval_fewshot is not None:
        # checked before the slow load, the task names too: an --lm-eval-* option without tasks is an error
        from ..evaluation.lm_eval import task_specs

        names = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
        harness = dict(tasks=task_specs(names, list(lm_eval_include)), limit=lm_eval_limit,
                       num_fewshot=lm_eval_fewshot)
    # The weights as they are now, before loading: what the stored verdict is about, even if the file changes
    # while the evaluation runs (`flexi push` compares it with the file it would upload).
    digest = None if looks_like_hub_id(model_dir) or not Path(model_dir).is_dir() else weights_digest(Path(model_dir))
    console = stderr_console()
    with console.status(f"loading {model_dir}..."):
        fm = FlexiModel.load(model_dir, device=device, dtype=dtype)
    if fm.tokenizer is None:
        raise BadInput(f"the base model of {model_dir} has no tokenizer, so eval cannot read text",
                       "evaluate from Python with token ids: flexicli.evaluation.evaluate.evaluate(fm, data=[[ids...]])")
    texts = None
    if data is not None:
        from ..data.text import read_data

        texts = read_data(data, fm.tokenizer)
    routing = {"mode": "routed"} if threshold is None else {"mode": "routed", "threshold": threshold}
    if skip_layers is not None:
        routing = {"mode": "fixed", "skip_layers": _routed_subset(fm, skip_layers)}
    thresholds = Thresholds(max_kl=max_kl, min_top1=min_top1, min_retention=min_retention,
                            min_greedy_match=min_greedy_match)

    result = run_with_progress(console, lambda progress: evaluate(
        fm, data=texts, max_samples=max_samples, seq_len=seq_len, n_prompts=n_prompts, new_tokens=new_tokens,
        tasks_per_category=tasks_per_category, batch_size=batch_size, thresholds=thresholds, routing=routing,
        progress=progress, yardstick=yardstick, lm_eval=harness))
    result["data"] = str(data) if data else "built-in held-out"
    # Stored only for the checkpoint as it is configured: its card must not show another threshold's numbers.
    if no_save:
        pass
    elif threshold is not None or skip_layers is not None:
        console.print("[dim]evaluated with --threshold/--skip-layers: the result is not stored in the checkpoint[/dim]")
    elif looks_like_hub_id(model_dir):
        console.print(f"[dim]{model_dir} is a Hub checkpoint: the result is not stored[/dim]")
    else:
        store(fm.path, result, weights_sha256=digest)
    if as_json:
        emit_json(result)
    else:
        _print_report(result)
    ctx.exit(0 if result["passed"] else 1)


def _routed_subset(fm, spec: str) -> list[int]:
    from ..core.errors import BadInput
    from ..core.flexi_model import parse_layers

    try:
        layers = parse_layers(spec, fm.config.num_layers)
    except BadInput as e:
        raise BadInput(str(e).replace("--layers", "--skip-layers"), e.hint) from None
    outside = sorted(set(layers) - set(fm.config.routed_layers))
    if outside:
        routed = fm.config.routed_layers
        raise BadInput(f"--skip-layers names layers {outside} that are not routed (routed: {routed[0]}..{routed[-1]})")
    return layers


def _fmt(value, pct=False):
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    return f"{100 * value:.1f}%" if pct else f"{value:.4g}"


def _range(low_high, pct=False) -> str:
    """' (5-95%: a-b)' for a retention interval, '' when there is none (no task suite, or no original score)."""
    return f" (5-95%: {_fmt(low_high[0], pct)}-{_fmt(low_high[1], pct)})" if low_high else ""


def _print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    limits = {row["metric"]: row for row in r["checks"]}

    def verdict(key, pct):
        row = limits.get(key)
        if row is None:
            return "off", ""
        mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[yellow]not measured[/yellow]"}[row["ok"]]
        return f"{row['op']} {_fmt(row['limit'], pct)}", mark

    table = Table(title=f"flexi eval: routed vs original ({r['texts']} texts, {r['scored_tokens']} tokens)")
    for col in ("metric", "value", "threshold", ""):
        table.add_column(col)
    rows = [("KL(original||routed) / token", "kl", False), ("KL 99th percentile", "kl_p99", False),
            ("top-1 agreement", "top1_agreement", True),
            ("greedy exact match", "greedy_match", True), ("task retention", "retention", True)]
    for label, key, pct in rows:
        table.add_row(label, _fmt(r.get(key), pct), *verdict(key, pct))
    table.add_row("perplexity original / routed",
                  f"{_fmt(r['perplexity_original'])} / {_fmt(r['perplexity_routed'])}", "", "")
    table.add_row("first greedy divergence (mean)",
                  f"{_fmt(r.get('greedy_first_divergence'))} of {r.get('greedy_new_tokens', '-')}", "", "")
    table.add_row("mean skipped layers / token",
                  f"{r['mean_skipped_layers']:.2f} of {r.get('skip_capacity', len(r['per_layer_skip_rate'])):g}"
                  " (layer-equivalents)", "", "")
    out.print(table)
    if r.get("yardstick"):
        ys = r["yardstick"]
        out.print(f"yardstick: routed KL {_fmt(r['kl'])} is [bold]{r['yardstick_place']}[/bold] "
                  f"(int8: KL {_fmt(ys['int8']['kl'])}, p99 {_fmt(ys['int8']['kl_p99'])}, top-1 "
                  f"{_fmt(ys['int8']['top1_agreement'], True)}; int4 g32: KL {_fmt(ys['int4']['kl'])}, p99 "
                  f"{_fmt(ys['int4']['kl_p99'])}, top-1 {_fmt(ys['int4']['top1_agreement'], True)})")
        if ys["int8"].get("retention") is not None or ys["int4"].get("retention") is not None:
            out.print(f"yardstick: task retention routed {_fmt(r.get('retention'))}"
                      f"{_range(r.get('retention_interval'))}, int8 copy {_fmt(ys['int8'].get('retention'))}"
                      f"{_range(ys['int8'].get('retention_interval'))}, int4 g32 copy "
                      f"{_fmt(ys['int4'].get('retention'))}{_range(ys['int4'].get('retention_interval'))}")
    out.print("skip rate per routed unit: " + "  ".join(
        f"{layer}:{100 * rate:.0f}%" for layer, rate in r["per_layer_skip_rate"].items()))
    if r.get("task_scores"):
        tasks = Table(title="task suite (mean score; retention = routed / original)")
        for col in ("category", "items", "original", "routed", "retention"):
            tasks.add_column(col)
        for cat, s in r["task_scores"].items():
            tasks.add_row(cat, str(s["items"]), _fmt(s["original"]), _fmt(s["routed"]), _fmt(s["retention"], True))
        low_high = r.get("retention_interval")
        tasks.add_row("all", str(sum(s["items"] for s in r["task_scores"].values())), _fmt(r["task_score_original"]),
                      _fmt(r["task_score_routed"]), _fmt(r["retention"], True)
                      + _range(low_high, pct=True))
        out.print(tasks)
    if r.get("task_answer_tokens"):
        out.print(f"on the original's answers ({r['task_answer_tokens']} tokens, teacher-forced): KL "
                  f"{_fmt(r['task_answer_kl'])}, top-1 agreement {_fmt(r['task_answer_top1'], True)}")
    if r.get("task_flips"):
        f = r["task_flips"]
        out.print(f"task suite flips (item correct: score >= 0.5): {_fmt(f['flips'], True)} of {f['items']} items "
                  f"(correct -> wrong {_fmt(f['correct_to_wrong'], True)}, "
                  f"wrong -> correct {_fmt(f['wrong_to_correct'], True)})")
    if r.get("lm_eval"):
        _print_lm_eval(out, r["lm_eval"])
    failed = [f"{row['metric']} {_fmt(row['value'])} (needs {row['op']} {row['limit']:g})"
              for row in r["checks"] if row["ok"] is False]
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("stage_seconds", {}).items())
    out.print(f"time: {r['seconds']:.0f} s ({stages})")
    if r["passed"]:
        out.print("[bold green]PASSED[/bold green]")
    else:
        out.print(f"[bold red]FAILED[/bold red]: {'; '.join(failed) or 'no threshold was measured'}")


def _print_lm_eval(out, h: dict) -> None:
    from rich.table import Table

    limit = "all items" if h.get("limit") is None else f"limit {h['limit']}"
    table = Table(title=f"lm-evaluation-harness {h.get('lm_eval_version')} ({limit}; flips: correct -> wrong / "
                  "wrong -> correct)")
    for col in ("task", "metric", "original", "routed", "retention", "flips"):
        table.add_column(col)
    for task, row in h["tasks"].items():
        f = row.get("flips") or {}
        for metric, m in row["metrics"].items():
            flip = ""
            if metric == row.get("flip_metric") and f.get("items"):
                flip = f"{_fmt(f['correct_to_wrong'], True)} / {_fmt(f['wrong_to_correct'], True)} of {f['items']}"
            table.add_row(task, metric, _fmt(m["original"]), _fmt(m["routed"]), _fmt(m["retention"], True), flip)
    out.print(table)
