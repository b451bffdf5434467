import click

from ..core import DEFAULT_DIR
from .common import device_options, emit_json, json_option, stderr_console


@click.command("convert", help="Wrap a Hugging Face decoder with routers and adapters (base weights untouched).\n\n"
               "MODEL is a Hub id, a local folder, a .gguf file, or nothing for the embedded SmolLM2-135M-Instruct.")
@click.argument("model_spec", metavar="[MODEL]", required=False)
@click.option("-o", "--output", default=DEFAULT_DIR, show_default=True, help="Checkpoint folder to write.")
@click.option("--layers", default=None, help="Layers to route: every layer but the first two (default), 'half' (the second half), 'all', '16-31', '2-' (2 to the last), '16,18,20'.")
@click.option("--gate-mode", type=click.Choice(["ste", "scale"]), default="ste", show_default=True,
              help="ste: exact hard routing, straight-through gradient; scale: official FlexiDepth w-scaling.")
@click.option("--skip-unit", default="layer", show_default=True,
              help="What a router skips: layer (FlexiDepth: the whole layer), module (a router for attention and one "
                   "for the MLP, each deciding on its own), mlp (attention always runs; only the MLP is routed).")
@click.option("--router", "router_kind", default="flexidepth", show_default=True,
              help="Router: flexidepth (bottleneck) or linear (Learning to Skip: one Linear(hidden, 1) + bias).")
@click.option("--adapter-reduction", type=click.IntRange(min=1), default=None,
              help="Adapter width = the MLP's width / this (default 4; FlexiDepth's is 16; 16, 8 and 4 measured in "
                   "docs/results.md, the levers at a glance).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the new routers' and adapters' initial weights (the same command writes the same "
                   "checkpoint).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a Hub model's own modeling code to run.")
@device_options
@json_option
def command(model_spec, output, layers, gate_mode, skip_unit, router_kind, adapter_reduction, seed, force,
            trust_remote_code, device, dtype, as_json):
    from ..convert import convert, summary

    console = stderr_console()
    with console.status(f"converting {model_spec or 'the embedded SmolLM2-135M-Instruct'}..."):
        fm = convert(model_spec, output, layers=layers, dtype=dtype, device=device, gate_mode=gate_mode,
                     overwrite=force, trust_remote_code=trust_remote_code, skip_unit=skip_unit, router=router_kind,
                     adapter_reduction=adapter_reduction, seed=seed)
    info = summary(fm)
    if as_json:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="flexi convert", show_header=False)
    for key, label in [("base_model", "base model"), ("family", "family"), ("layers", "decoder layers"),
                       ("routed_layers", "routed layers"), ("skip_unit", "skip unit"), ("router", "router"),
                       ("skip_capacity", "most layer-equivalents skippable"), ("dtype", "dtype"),
                       ("output", "checkpoint")]:
        table.add_row(label, str(info[key]))
    table.add_row("trainable parameters",
                  f"{info['trainable_parameters']:,} ({100 * info['trainable_share']:.2f}% of {info['base_parameters']:,})")
    Console().print(table)
