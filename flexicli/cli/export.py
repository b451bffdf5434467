import click

from .common import emit_json, json_option, model_option, stderr_console


@click.command("export", help="Write a self-contained folder that stock transformers loads with "
               "trust_remote_code=True and runs with skipping (base weights, tokenizer, routers, adapters, "
               "modeling_flexi.py). Written atomically; `flexi push -m OUT` pushes it whole.")
@model_option
@click.option("-o", "--output", required=True, help="Folder to write.")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's dtype).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@json_option
def command(model_dir, output, dtype, force, as_json):
    from ..sharing.export import export

    with stderr_console().status(f"exporting {model_dir}..."):
        info = export(model_dir, output, dtype=dtype, overwrite=force)
    if as_json:
        emit_json(info)
        return
    click.echo(f"exported {model_dir} to {info['output']} ({info['bytes'] / 1e6:.1f} MB, {info['model_class']} on "
               f"{info['base_class']}); load it with AutoModelForCausalLM.from_pretrained({info['output']!r}, "
               "trust_remote_code=True)")
