"""What every verb shares: options defined once, error mapping, stdout for results and stderr for the rest."""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from ..core import DEFAULT_DIR


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def model_option(f):
    return click.option("-m", "--model", "model_dir", default=DEFAULT_DIR, show_default=True,
                        help="Checkpoint folder (or the Hub id of a pushed checkpoint).")(f)


def device_options(f):
    f = click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA).")(f)
    f = click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available).")(f)
    return f


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")(f)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


class FlexiGroup(click.Group):
    """Maps flexicli's typed errors to one line on stderr and their exit code; traceback only with --debug."""

    def invoke(self, ctx):
        from ..core.errors import FlexiError

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FlexiError as e:
            self._fail(ctx, f"error: {e.line()}", e.exit_code)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", 130)
        except Exception as e:  # noqa: BLE001 - last resort: one line, not a wall of text
            self._fail(ctx, f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)

    @staticmethod
    def _fail(ctx, line: str, code: int):
        if (ctx.obj or {}).get("debug") or os.environ.get("FLEXI_DEBUG"):
            traceback.print_exc()
        click.echo(line, err=True)
        sys.exit(code)


def run_with_progress(console, work, transient_stages=()):
    """work(progress) under one bar per stage: the library reports progress(stage, done, total, info="") and the
    bars live here. The bars of `transient_stages` vanish when work ends (so an error line after them stays the
    only line), the others stay as a record of what ran."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=False) as bar:
        ids = {}

        def progress(stage, done, total, info=""):
            if stage not in ids:
                ids[stage] = bar.add_task(stage, total=total, info=info)
            bar.update(ids[stage], completed=done, total=total, info=info)

        try:
            return work(progress)
        finally:
            for stage in transient_stages:
                if stage in ids:
                    bar.remove_task(ids[stage])
