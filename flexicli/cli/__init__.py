"""flexi: the command line. This file is the table of contents; each verb lives in its own module."""

from __future__ import annotations

import importlib
import keyword
import os

import click

from .common import FlexiGroup

# verb -> module in flexicli.cli; imported only when that verb runs, so `flexi --help` stays instant.
VERBS = {
    "convert": "Wrap a Hugging Face decoder with routers and adapters (base weights untouched).",
    "train": "Distil the routed model against the original model under a layer budget.",
    "eval": "Is the output preserved? Routed vs original model: numbers and a pass/fail verdict.",
    "generate": "Generate text; --show-layers colours each token by the layers it used.",
    "patterns": "Which tokens need depth: per-layer usage, per-category means, HTML report + dataset.",
    "push": "Push a checkpoint and its model card to the Hub in one commit.",
    "export": "Write a folder that stock transformers loads (trust_remote_code) and runs with skipping.",
    "import": "Import a checkpoint in the official FlexiDepth format as a flexicli checkpoint.",
    "bench": "Prefill and decode speed of the routed model against the original, in one run.",
}


class LazyGroup(FlexiGroup):
    def list_commands(self, ctx):
        return list(VERBS)

    def get_command(self, ctx, name):
        if name not in VERBS:
            return None
        module = name.replace("-", "_")
        module += "_" if keyword.iskeyword(module) else ""  # `flexi import` lives in import_.py
        return importlib.import_module(f"flexicli.cli.{module}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="flexicli")
@click.pass_context
def main(ctx, debug):
    """Adaptive layer skipping (FlexiDepth) for any Hugging Face decoder LLM.

    convert -> train -> eval -> generate -> push
    """
    ctx.obj = {"debug": debug}
    # Our own progress bars and summaries go to stderr; the libraries' per-file bars and advice would bury them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
