import click

from .common import device_options, emit_json, json_option, model_option, stderr_console


@click.command("bench", help="Prefill and decode speed of the routed model against the original, in one run.\n\n"
               "Configurations: original; routed (routers at the checkpoint's threshold); fixed (exactly N "
               "routed layers skip every token: the ones the router skips most, latest first on ties); run "
               "(nothing skipped, routers computed: the routing overhead). Timings are interleaved and repeated; "
               "figures are medians, ratios are against the original from the same run.")
@model_option
@click.option("--skip", default=8, show_default=True, type=int, help="Routed layers forced to skip in 'fixed'.")
@click.option("--prefill-len", default=512, show_default=True, type=int, help="Prefill shape 1 x N tokens.")
@click.option("--decode-prompt", default=64, show_default=True, type=int, help="Untimed prompt before decoding.")
@click.option("--new-tokens", default=8, show_default=True, type=int, help="Greedy decode steps timed.")
@click.option("--repeats", default=5, show_default=True, type=int, help="Timed rounds (each configuration once per round).")
@click.option("--threads", default=None, type=int, help="CPU threads for torch (default: torch's own choice).")
@device_options
@json_option
def command(model_dir, skip, prefill_len, decode_prompt, new_tokens, repeats, threads, device, dtype, as_json):
    import torch

    from ..speed.bench import run_bench
    from ..core.flexi_model import FlexiModel

    if threads is not None:
        if threads < 1:
            from ..core.errors import BadInput

            raise BadInput(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    console = stderr_console()
    with console.status(f"loading {model_dir}..."):
        fm = FlexiModel.load(model_dir, device=device, dtype=dtype)
    with console.status("timing...") as status:
        result = run_bench(fm, skip=skip, prefill_len=prefill_len, decode_prompt=decode_prompt,
                           new_tokens=new_tokens, repeats=repeats,
                           progress=lambda i, n: status.update(f"timing... {i}/{n}"))
    if as_json:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    tps = result["tokens_per_s"]
    table = Table(title=f"flexi bench on {result['device']}, {result['dtype']}")
    table.add_column("configuration")
    table.add_column(f"prefill tok/s (1x{prefill_len})", justify="right")
    table.add_column("ratio (cpu-time)", justify="right")
    table.add_column(f"decode tok/s (1 x {new_tokens} steps)", justify="right")
    table.add_column("ratio (cpu-time)", justify="right")
    skipped = result["mean_skipped_at_threshold"]
    labels = {"original": "original",
              "routed": f"routed, threshold {result['threshold']:g} (skips {skipped['prefill']:.1f} / "
                        f"{skipped['decode']:.1f} layers)",
              "fixed": f"fixed: layers {','.join(map(str, result['skip_layers']))} skip",
              "run": "routed, nothing skipped (overhead)"}
    wall = {"routed": (result["prefill_ratio"], result["decode_ratio"]),
            "fixed": (result["fixed_prefill_ratio"], result["fixed_decode_ratio"]),
            "run": (result["overhead_prefill_ratio"], result["overhead_decode_ratio"])}
    cpu = result["cpu_time_ratios"]
    for config, label in labels.items():
        p, d = tps["prefill"][config], tps["decode"][config]
        if config == "original":
            table.add_row(label, f"{p:.1f}", "1", f"{d:.2f}", "1")
            continue
        table.add_row(label, f"{p:.1f}", f"{wall[config][0]:.2f}x ({cpu['prefill_' + config]:.2f}x)",
                      f"{d:.2f}", f"{wall[config][1]:.2f}x ({cpu['decode_' + config]:.2f}x)")
    console = Console()
    console.print(table)
    engine = result["engine"]
    if isinstance(engine, dict):
        e = engine["decode_tokens_per_s"]
        console.print(f"GPU decode engine (one CUDA graph per step): full {e['full']:.1f} tok/s "
                      f"({engine['full_over_hf_original']:.2f}x HF decode), routed {e['routed']:.1f} "
                      f"({engine['routed_over_full']:.3f}x full), fixed {e['fixed']:.1f} ({engine['fixed_over_full']:.3f}x)")
    else:
        console.print(f"GPU decode engine: {engine}")
