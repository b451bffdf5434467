"""flexi generate: stream a model's answer; --show-layers colours each token by the layers that processed it."""

from __future__ import annotations

import sys

import click

from .common import device_options, emit_json, json_option, model_option, stderr_console

DIVERGENCE_MARK = "▶"


@click.command("generate", short_help="Generate text; --show-layers colours each token by the layers it used.",
               help="Generate text, token by token; --show-layers colours each token by the number of decoder "
                    "layers that processed it.\n\nPROMPT goes through the chat template (--raw: continued as "
                    "plain text). Without PROMPT: an interactive chat with history.")
@click.argument("prompt", required=False)
@model_option
@click.option("--base", "base", default=None, metavar="MODEL",
              help="No checkpoint: run this base model (Hub id, folder, .gguf, or 'embedded'); "
                   "every token uses every layer.")
@click.option("--show-layers", is_flag=True, help="Colour each token by the layers it used; legend and summary line.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--threshold", type=float, default=None,
              help="Override the routing threshold tau (a token runs a layer iff its gate > tau).")
@click.option("--compare", is_flag=True,
              help="Also run the original model (routing off); show both, first divergence marked.")
@click.option("--raw", is_flag=True, help="Do not apply the chat template: continue PROMPT as plain text.")
@device_options
@json_option
def command(prompt, model_dir, base, show_layers, max_new_tokens, temperature, top_p, seed, threshold, compare, raw,
            device, dtype, as_json):
    from ..core.errors import BadInput
    from ..generation.decode import Sampling, check_threshold, open_model

    sampling = Sampling(temperature, top_p, seed).check()
    check_threshold(threshold)
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    if prompt is None and (as_json or raw):
        raise BadInput(f"{'--json' if as_json else '--raw'} needs a PROMPT",
                       "the interactive chat takes no --json/--raw")
    err = stderr_console()
    with err.status(f"loading {base or model_dir}..."):
        lm = open_model(model_dir, base=base, device=device, dtype=dtype)
    if lm.flexi is None:
        err.print(f"note: {lm.source} is a base model, not a flexicli checkpoint: running the original model "
                  "(every token uses every layer)", soft_wrap=True)
        if compare or threshold is not None:
            raise BadInput(f"{'--compare' if compare else '--threshold'} needs a flexicli checkpoint",
                           "pass -m with a folder written by `flexi convert`")
    turn = Turn(lm, sampling, max_new_tokens, threshold, compare, show_layers, as_json)
    if prompt is not None:
        result = turn.run(lm.encode(prompt, chat=False if raw else None))
        if as_json:
            tau = lm.threshold if threshold is None else threshold
            emit_json({"model": lm.source, "prompt": prompt, "threshold": tau, **result})
        return
    chat(lm, turn, err)


def chat(lm, turn: "Turn", err) -> None:
    err.print(f"chat with {lm.source}: type a message, Enter to send; /exit or Ctrl-D ends")
    messages: list[dict] = []
    while True:
        sys.stderr.write("\nyou> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            sys.stderr.write("\n")
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        sys.stderr.write("model> ")
        sys.stderr.flush()
        result = turn.run(lm.encode_chat(messages))
        messages.append({"role": "assistant", "content": result["text"]})


class Turn:
    """One prompt -> one (or, with --compare, two) streamed generations and their summary lines."""

    def __init__(self, lm, sampling, max_new_tokens, threshold, compare, show_layers, as_json):
        from rich.console import Console

        self.lm, self.sampling, self.max_new_tokens, self.threshold = lm, sampling, max_new_tokens, threshold
        self.compare, self.show_layers, self.as_json = compare, show_layers, as_json
        self.out = Console(highlight=False, soft_wrap=True)
        # Without colours (a pipe, NO_COLOR) each token carries its count in brackets instead: "Paris[28]".
        self.plain = self.out.no_color or self.out.color_system is None

    def run(self, ids: list[int]) -> dict:
        from ..generation.decode import generate, generation_divergence

        kw = dict(max_new_tokens=self.max_new_tokens, sampling=self.sampling, threshold=self.threshold)
        original = None
        if self.compare:
            with stderr_console().status("running the original model (routing off)..."):
                original = generate(self.lm, ids, original=True, **kw)
        if self.as_json:
            result = generate(self.lm, ids, **kw)
            out = result.to_dict()
            if original is not None:
                out["original"] = original.to_dict()
                out["first_divergence"] = generation_divergence(result, original)
            return out

        if self.compare:
            self.out.print("[bold]flexi[/bold] (routed):")
        stream = Streamer(self, original)
        result = generate(self.lm, ids, on_token=stream.token, **kw)
        self.out.print()
        if self.show_layers:
            self.summary(result, "flexi" if self.compare else None)
        if original is not None:
            div = generation_divergence(result, original)
            self.out.print("\n[bold]original[/bold] (every layer):")
            replay = Streamer(self, result)
            for tok in original.tokens:
                replay.token(tok)
            self.out.print()
            if self.show_layers:
                self.summary(original, "original", legend=False)
            self.out.print(f"{DIVERGENCE_MARK} first divergence at generated token {div}" if div is not None
                           else f"identical: all {len(result.tokens)} generated tokens are the same")
        return result.to_dict()

    def summary(self, result, label, legend: bool = True) -> None:
        from rich.text import Text

        from ..generation.decode import depth_colour, layer_range

        fewest, most = layer_range(self.lm)
        if legend and not self.plain:
            line = Text("layers used: ")
            for n in range(int(fewest), most + 1, max(1, int(most - fewest + 1) // 16)):
                line.append(f"{n} ", style=depth_colour(n, fewest, most))
            self.out.print(line)
        who = f"{label}: " if label else ""
        self.out.print(f"{who}mean layers used {result.mean_layers_used:.2f} of {result.num_layers} · "
                       f"{100 * result.skipped_share:.1f}% of layer computations skipped · "
                       f"{len(result.tokens)} tokens")


class Streamer:
    """Prints tokens as they arrive, coloured by depth (--show-layers); with `other` (the generation it is
    compared with) it puts a mark before the first token where the two differ."""

    def __init__(self, turn: Turn, other=None):
        from ..generation.decode import layer_range

        self.turn, self.other = turn, other
        self.fewest, self.most = layer_range(turn.lm)
        self.index, self.marked = 0, False

    def token(self, tok) -> None:
        from rich.text import Text

        from ..generation.decode import depth_colour

        out, i = self.turn.out, self.index
        self.index += 1
        if self.other is not None and not self.marked and (
                i >= len(self.other.tokens) or self.other.tokens[i].token_id != tok.token_id):
            self.marked = True
            out.print(Text(DIVERGENCE_MARK, style="bold red reverse"), end="")
        if not self.turn.show_layers:
            out.print(Text(tok.text), end="")
        elif self.turn.plain:
            out.print(Text(f"{tok.text}[{tok.layers_used}]"), end="")
        else:
            out.print(Text(tok.text, style=depth_colour(tok.layers_used, self.fewest, self.most)), end="")
        out.file.flush()
