import click

from ..core import DEFAULT_DIR
from .common import device_options, emit_json, json_option, stderr_console


@click.command("import", help="Import a checkpoint in the official FlexiDepth format as a flexicli checkpoint.\n\n"
               "SOURCE is a folder or Hub id such as xuan-luo/FlexiDepth-Llama-3-8B-Instruct (base weights plus "
               "`router`/`router_proj` tensors). The result uses their computation (FFN scaled by w or 1-w, "
               "threshold 0.5) and works with generate, eval, patterns, export and push.")
@click.argument("source")
@click.option("-o", "--output", default=DEFAULT_DIR, show_default=True, help="Checkpoint folder to write.")
@click.option("--base", default=None, help="The model it was trained from, when SOURCE's own config is not a "
              "stock transformers model (its base weights are checked to be the same).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@device_options
@json_option
def command(source, output, base, force, device, dtype, as_json):
    from ..convert import summary
    from ..sharing.flexidepth_import import import_flexidepth

    with stderr_console().status(f"importing {source}..."):
        fm = import_flexidepth(source, output, base=base, dtype=dtype, device=device, overwrite=force)
    info = {**summary(fm), "gate_mode": fm.config.gate_mode, "threshold": fm.config.threshold}
    if as_json:
        emit_json(info)
        return
    click.echo(f"imported FlexiDepth routers for layers {info['routed_layers']} of {info['base_model']} into "
               f"{info['output']} (gate mode {info['gate_mode']}, threshold {info['threshold']})")
