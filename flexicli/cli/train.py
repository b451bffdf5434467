import click

from .common import emit_json, json_option, model_option, run_with_progress, stderr_console

# Flags that map one to one onto TrainConfig fields; given flags override the recipe/config file.
_FLAGS = ["steps", "batch_size", "grad_accum", "seq_len", "lr", "seed", "data", "objective", "alpha", "eval_every",
          "save_every", "gradient_checkpointing", "calibrate", "cache_teacher", "budget", "router_init",
          "adapter_init"]


@click.command("train", help="Distil the routed model against the original model under a layer budget.")
@model_option
@click.option("--skip-target", type=float, default=None, help="Mean layers to skip per token, in layer-equivalents: a skipped attention or MLP sublayer (skip unit module/mlp) counts its share of the layer's parameters (required unless the recipe sets it).")
@click.option("--data", default=None, help="mix (default: selfgen, about half the rows, and documentation of installed packages) | selfgen (the model's own answers to built-in prompts) | docs | prompts | PATH (.jsonl with messages, text or input_ids per line; .txt) | Hub dataset id. input_ids rows (token ids, packed as given) train a model that has no tokenizer.")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 160: convert + train of SmolLM2-135M within an hour on 2 CPU cores, data preparation included).")
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-batch (default 4).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimiser step (default 1).")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence (default 256).")
@click.option("--lr", type=float, default=None, help="Peak learning rate, cosine schedule with warm-up (default 1e-3).")
@click.option("--seed", type=int, default=None)
@click.option("--objective", type=click.Choice(["kl", "lm"]), default=None, help="kl: distillation (default); lm: FlexiDepth's LM loss + alpha*(sum w)^2.")
@click.option("--budget", type=click.Choice(["penalty", "threshold", "capacity", "density"]), default=None, help="How the skip target is met. penalty (default): a PI-controlled Lagrange term; capacity: each routed unit is skipped by exactly its share of a batch's tokens (lowest gates), shares following the routers; threshold: the threshold follows the quantile of the router logits; density: the seed paper's regulariser pulling each routed unit's share of running tokens toward one target density.")
@click.option("--router-init", type=click.Choice(["none", "influence", "cost", "blend"]), default=None, help="influence (default): first fit the routers to each routed unit's token-level influence (layer, attention or MLP sublayer); cost: to the measured cost (KL) of skipping each unit per token, after the adapter fit; blend: to both ranks averaged; none: start from the fresh routers.")
@click.option("--adapter-init", type=click.Choice(["fit", "none"]), default=None, help="fit (default): before step 0, fit each adapter to the update it replaces (the whole layer's for skip unit layer, the MLP's for module/mlp; least squares, then a short local MSE phase); none: fresh adapters that add nothing.")
@click.option("--alpha", type=float, default=None, help="FlexiDepth penalty weight (objective lm).")
@click.option("--eval-every", type=int, default=None, help="Steps between validation evaluations (default 40): they choose the checkpoint and catch a diverged run (config key rollback).")
@click.option("--save-every", type=int, default=None)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute each routed layer in backward instead of storing its activations (default on: peak memory 1.12x the frozen model's instead of 1.60x, for a few % more time a step).")
@click.option("--calibrate/--no-calibrate", default=None, help="Nudge the threshold after training so held-out skipping hits the target.")
@click.option("--cache-teacher/--no-cache-teacher", default=None, help="Keep the teacher's hidden states per training row (default on when under 4 GiB; filled as training first reaches each row).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the checkpoint's training state (its settings; --steps may raise the total). A folder that no run has saved a step to yet (e.g. killed before the first --save-every) starts from step 0, as without --resume (then --skip-target is needed); a trained folder without train_state.safetensors is an error.")
@click.option("--recipe", default=None, help="A recipe shipped in flexicli/train/recipes/ (smollm2-135m-cpu, gemma3-270m-cpu, llama3-8b-instruct), or a YAML file.")
@click.option("--config", "config_file", default=None, type=click.Path(), help="A YAML file of training settings.")
@click.option("--device", default=None)
@json_option
def command(model_dir, skip_target, resume, recipe, config_file, device, as_json, **flags):
    from ..train import distributed
    from ..core.errors import BadInput
    from ..core.flexi_model import FlexiModel
    from ..train.resume import TRAIN_STATE
    from ..train.config import TrainConfig, load_recipe
    from ..train.loop import train

    if recipe and config_file:
        raise BadInput("pass --recipe or --config, not both")
    source = recipe or config_file
    settings = load_recipe(source) if source else {}
    measured = load_recipe(source, "convert") if source else {}  # a --config file may carry a convert: section too
    settings.update({k: v for k, v in flags.items() if k in _FLAGS and v is not None})
    if skip_target is not None:
        settings["skip_target"] = skip_target
    given = set(settings)
    if "skip_target" not in settings and not resume:
        raise BadInput("--skip-target is required", "e.g. flexi train --skip-target 4")
    settings.setdefault("skip_target", 0)
    cfg = TrainConfig.from_dict(settings)
    cfg.check()  # before the slow load: what does not need the model; train() checks the layer count
    console = stderr_console()
    dist = distributed.init(device)  # torchrun / accelerate launch: this rank's device; else device as given
    with console.status(f"loading {model_dir}..."):
        fm = FlexiModel.load(model_dir, device=dist.load_device)
    fresh = not (fm.path and (fm.path / TRAIN_STATE).is_file()) and not (fm.config.training or {}).get("steps_done")
    if resume and fresh and "skip_target" not in given:  # train() starts it from step 0: the target must be given
        raise BadInput("--skip-target is required: no step of a run was saved here yet, so there are no settings "
                       "to resume", "e.g. flexi train --skip-target 4 --resume")
    log = lambda m: console.print(m)  # noqa: E731
    mismatch = recipe_mismatch(fm, measured)
    if mismatch:
        log(f"[yellow]note:[/yellow] recipe {source} was measured on {mismatch}")
    if dist.is_main:
        summary = run_with_progress(console, lambda progress: train(fm, cfg, resume=resume, progress=progress, log=log))
    else:  # distributed: rank 0 reports
        summary = train(fm, cfg, resume=resume, log=log)
    if not dist.is_main:  # distributed: rank 0 reports
        return
    if as_json:
        emit_json(summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flexi train: held-out", show_header=False)
    for key in ("mean_skipped_layers", "kl", "top1_agreement", "greedy_match", "greedy_first_divergence", "threshold"):
        if key in summary:
            table.add_row(key, f"{summary[key]:.4f}")
    if "selected_step" in summary:
        table.add_row("checkpoint", f"the weights{' (average)' if 'ema' in summary else ''} of step "
                      f"{summary['selected_step']}: lowest KL on the validation prompts "
                      f"({summary['selected_validation_kl']:.4f})")
    if "last_step" in summary:  # the saved weights against the last step's on the same rows
        last = summary["last_step"]
        table.add_row("last step's weights", f"kl {last['kl']:.4f}  top1_agreement {last['top1_agreement']:.4f}  "
                      f"skipped {last['mean_skipped_layers']:.2f} (the checkpoint holds "
                      + (f"their average, ema {summary['ema']:g})" if "selected_step" not in summary else
                         "the selected weights)"))
    if summary.get("rollbacks"):  # evaluations that found the run diverged (train's rollback)
        from ..train.loop import rollback_factor

        table.add_row("rolled back", f"at step {', '.join(map(str, summary['rollbacks']))} to the best weights so far, "
                      f"learning rate x {rollback_factor(summary['rollbacks']):g} after")
    rates = summary.get("per_layer_skip_rate", {})
    table.add_row("per-unit skip rate", " ".join(f"{k}:{v:.2f}" for k, v in rates.items()))
    if "wall_seconds" in summary:
        table.add_row("wall time", "  ".join(f"{k} {v / 60:.1f} min" for k, v in summary["wall_seconds"].items()))
    Console().print(table)


def recipe_mismatch(fm, measured: dict) -> str:
    """'' when the checkpoint has the settings a recipe was measured with (its `convert:` section); else what
    differs and the flexi convert flag that matches. Training goes on: the recipe is untested there, not wrong."""
    from ..core.flexi_model import adapter_dim_for

    reduction = measured.get("adapter_reduction")
    if reduction is None:
        return ""
    want = adapter_dim_for(fm.model.config, reduction)
    if fm.config.adapter_dim == want:
        return ""
    return (f"adapters {want} wide (MLP width / {reduction}); this checkpoint's are {fm.config.adapter_dim} "
            f"(flexi convert --adapter-reduction {reduction} matches it)")
