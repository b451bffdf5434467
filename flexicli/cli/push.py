import click

from .common import emit_json, json_option, model_option, stderr_console


@click.command("push", help="Push a checkpoint (or an exported folder) and its model card to the Hub, in one "
               "commit.\n\nREPO_ID defaults to <your user>/<base name>-flexi-skip<N>. The token is the one huggingface_hub "
               "finds (HF_TOKEN or `hf auth login`); it is never printed or written. A checkpoint without a "
               "passing `flexi eval` is refused unless --force.")
@model_option
@click.argument("repo_id", required=False)
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="List the files and show the card; no network.")
@click.option("--force", is_flag=True, help="Push even without a passing eval.")
@json_option
def command(model_dir, repo_id, private, dry_run, force, as_json):
    from ..push import plan_push, push

    if dry_run:
        plan = plan_push(model_dir, repo_id)
        if as_json:
            emit_json({**plan.summary(), "card": plan.card, "dry_run": True})
            return
        _show_plan(plan)
        for note in plan.notes + ([f"a real push would be refused: {plan.refusal}"] if plan.refusal else []):
            click.echo(f"note: {note}", err=True)
        return
    with stderr_console().status("pushing to the Hub..."):
        result = push(model_dir, repo_id, private=private, force=force)
    if as_json:
        emit_json(result)
        return
    n = len(result["files"])
    click.echo(f"pushed {n} files to {result['repo_id']} in one commit ({result['commit'][:10]}): {result['url']}")


def _show_plan(plan):
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    click.echo(f"flexi push --dry-run: {len(plan.files) + 1} files to {plan.repo_id}, in one commit")
    table = Table()
    table.add_column("file in the repo")
    table.add_column("bytes", justify="right")
    for f in plan.summary()["files"]:
        table.add_row(f["path"], f"{f['bytes']:,}")
    out.print(table)
    click.echo("README.md (model card):")
    click.echo(plan.card)
