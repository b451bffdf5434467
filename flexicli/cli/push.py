import click

from .common import emit_json, json_option, model_option, run_with_progress, stderr_console


@click.command("push", help="Push a checkpoint (or an exported folder) and its model card to the Hub, in one "
               "commit.\n\nREPO_ID defaults to <your user>/<base name>-flexi-skip<N>. The token is the one huggingface_hub "
               "finds (HF_TOKEN or `hf auth login`); it is never printed or written.\n\n"
               "The preservation check is part of the push: a checkpoint without a current `flexi eval` verdict "
               "(none stored, or one made before its weights or router threshold changed) is evaluated first with "
               "`flexi eval`'s default settings (minutes; progress on stderr), and the result is stored in its "
               "config and card. A failed verdict is refused (exit code 1) unless --force.")
@model_option
@click.argument("repo_id", required=False)
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="List the files and show the card; no network, and no check run "
              "(it says whether a real push would run one first).")
@click.option("--force", is_flag=True, help="Push even when the check fails (the check still runs when there is "
              "no current verdict, so the card describes the weights that go up).")
@click.option("--device", default=None, help="Where the check runs, if it runs: cpu | cuda | cuda:N "
              "(default: cuda if available).")
@json_option
def command(model_dir, repo_id, private, dry_run, force, device, as_json):
    from ..sharing.push import plan_push, push

    if dry_run:
        plan = plan_push(model_dir, repo_id)
        if as_json:
            emit_json({**plan.summary(), "card": plan.card, "dry_run": True})
            return
        _show_plan(plan)
        for note in plan.notes + _dry_run_notes(plan):
            click.echo(f"note: {note}", err=True)
        return

    # the check's progress bars (if it runs) and the upload's, on stderr, as `flexi eval` shows them
    result = run_with_progress(stderr_console(), lambda progress: push(
        model_dir, repo_id, private=private, force=force, progress=progress, check_options={"device": device}),
        transient_stages=("upload",))
    if as_json:
        emit_json(result)
        return
    n = len(result["files"])
    if result["checked"]:
        click.echo(f"checked first ({result['checked']}): {'passed' if result['passed'] else 'FAILED'}")
    click.echo(f"pushed {n} files to {result['repo_id']} in one commit ({result['commit'][:10]}): {result['url']}")


def _dry_run_notes(plan) -> list[str]:
    if plan.check:
        return [f"a real push would first run the preservation check ({plan.check}); the dry run does not"]
    return [f"a real push would be refused: {plan.refusal}"] if plan.refusal else []


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
