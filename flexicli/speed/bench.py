"""Wall-clock speed of a routed model against its own original, measured in one run.

    result = run_bench(fm, skip=8)   # dict: tokens/s per configuration, ratios, device, shapes

Configurations, all on the same weights in the same process:
    original  the untouched base layers (routing "full")
    routed    the routers decide at the checkpoint's threshold (the trained model as it would run)
    fixed     exactly `skip` routed layers skip every token (routing "fixed"): the N routed layers the
              router skips most on the benchmark text at its threshold, the latest layers first on ties
              (a fresh checkpoint, which skips nothing, therefore gets the last N)
    run       every routed layer runs every token, routers still computed: the routing overhead
The machine may be shared and noisy, so the configurations are interleaved (one round = each configuration
once, in a rotating order), tokens/s are medians over rounds, and each ratio is the median over rounds of
(original time / configuration time) within the round.
Prefill asks for the last position's logits only (as generation does), with a KV cache built.
Decode is greedy, one token a step, with the KV cache, after a prompt that is not timed.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..core.compat import cache_kwargs, output_cache

CONFIGS = ("original", "routed", "fixed", "run")


def bench_ids(fm, length: int, batch: int = 1) -> torch.Tensor:
    """Benchmark tokens: the built-in task texts through the tokenizer (so routers see real text),
    repeated to `length`; random ids where the checkpoint has no tokenizer."""
    device = next(fm.model.parameters()).device
    if fm.tokenizer is None:
        vocab = fm.model.config.vocab_size
        ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
        return ids.to(device)
    from ..data.tasks import CORE, load_tasks

    text = " ".join(f"{t.prompt} {t.answer}" for t in load_tasks(per_category=CORE))  # the text benches always had
    ids = fm.tokenizer(text, return_tensors="pt").input_ids[0]
    ids = ids.repeat(length // len(ids) + 1)[:length]
    return ids.expand(batch, length).contiguous().to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_skip_layers(fm, ids: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """The n routed layers the router skips most at its threshold (latest first on ties), and per-unit
    usage (share of tokens that ran each routed unit: a layer, or its attention / MLP) on `ids`."""
    with torch.no_grad(), fm.routing("routed"), fm.record() as rec:
        fm.model(ids, logits_to_keep=1)
    usage = rec.decisions().float().mean(dim=(0, 1)).tolist()
    layers = fm.config.routed_layers
    by_layer = usage
    if len(usage) != len(layers):  # skip units module / mlp: a layer's usage is its units', weighted by cost
        keys, costs = fm.unit_keys, fm.unit_costs
        by_layer = [sum(u * c for u, c, k in zip(usage, costs, keys) if k[0] == i) /
                    sum(c for c, k in zip(costs, keys) if k[0] == i) for i in layers]
    order = sorted(range(len(by_layer)), key=lambda i: (by_layer[i], -i))
    return sorted(layers[i] for i in order[:n]), usage


def _routing(fm, config: str, skip_layers):
    if config == "original":
        return fm.routing("full")
    if config == "fixed":
        return fm.routing("fixed", skip_layers=skip_layers)
    return fm.routing(config)  # "routed" (at the checkpoint's threshold) or "run"


class _Clock:
    """Wall-clock seconds (what a user waits) and this process's CPU seconds (on a shared CPU, the time other
    processes take from us does not count there: a steadier ratio, reported beside the wall-clock one)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_prefill(model, ids: torch.Tensor) -> _Clock:
    with torch.no_grad(), _Clock(ids.device) as clock:
        model(ids, use_cache=True, logits_to_keep=1)
    return clock


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> _Clock:
    """The clock of `new_tokens` greedy steps after an untimed prefill of `prompt`."""
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        with _Clock(prompt.device) as clock:
            for _ in range(new_tokens):
                out = model(nxt, **cache_kwargs(model, cache), use_cache=True)
                cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    return clock


def skipped_prefill_decode(fm, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Mean routed layers skipped per token at the threshold (layer-equivalents): over the prefill, and over decode
    steps."""
    with torch.no_grad(), fm.routing("routed"), fm.record() as rec:
        out = fm.model(prompt, use_cache=True, logits_to_keep=1)
        cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = fm.model(nxt, **cache_kwargs(fm.model, cache), use_cache=True)
            cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    skipped = rec.skipped_layers()  # [B, T_total]
    t = prompt.shape[1]
    return skipped[:, :t].mean().item(), skipped[:, t:].mean().item()


def _time_rounds(fm, prefill_ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int, skip_layers, repeats: int,
                 progress=None) -> dict:
    """{(prefill|decode, configuration): [clock per round]}: after one untimed warm-up of each configuration,
    `repeats` rounds of every configuration, the order rotated so that none is always first."""
    for config in CONFIGS:  # warm-up: first calls allocate, build plans, pick kernels
        with _routing(fm, config, skip_layers):
            time_prefill(fm.model, prefill_ids[:, :32])
            time_decode(fm.model, prompt[:, :8], 2)
    times = {(kind, c): [] for kind in ("prefill", "decode") for c in CONFIGS}
    for r in range(repeats):
        for i in range(len(CONFIGS)):
            config = CONFIGS[(i + r) % len(CONFIGS)]
            with _routing(fm, config, skip_layers):
                times["prefill", config].append(time_prefill(fm.model, prefill_ids))
                times["decode", config].append(time_decode(fm.model, prompt, new_tokens))
            if progress:
                progress(r * len(CONFIGS) + i + 1, repeats * len(CONFIGS))
    return times


def run_bench(fm, skip: int = 8, prefill_len: int = 512, decode_prompt: int = 64, new_tokens: int = 8,
              repeats: int = 5, progress=None) -> dict:
    from ..core.errors import BadInput

    n_routed = len(fm.config.routed_layers)
    if not 0 <= skip <= n_routed:
        raise BadInput(f"--skip {skip}: this checkpoint routes {n_routed} layers", f"use 0..{n_routed}")
    if min(prefill_len, decode_prompt, new_tokens, repeats) < 1:
        raise BadInput("prefill length, decode prompt, new tokens and repeats must all be at least 1")
    device = next(fm.model.parameters()).device
    prefill_ids = bench_ids(fm, prefill_len)
    prompt = prefill_ids[:, :decode_prompt]
    skip_layers, usage = choose_skip_layers(fm, prefill_ids, skip)

    times = _time_rounds(fm, prefill_ids, prompt, new_tokens, skip_layers, repeats, progress)

    tps = {}
    for (kind, config), clocks in times.items():
        tokens = prefill_len if kind == "prefill" else new_tokens
        tps.setdefault(kind, {})[config] = tokens / statistics.median(c.wall for c in clocks)
    skipped_prefill, skipped_decode = skipped_prefill_decode(fm, prompt, new_tokens)

    def paired(attr):  # each configuration against the original timed in the same round, median over rounds
        return {f"{kind}_{c}": statistics.median(getattr(o, attr) / getattr(t, attr)
                                                 for o, t in zip(times[kind, "original"], times[kind, c]))
                for kind in ("prefill", "decode") for c in CONFIGS[1:]}

    ratio, cpu_ratio = paired("wall"), paired("cpu")
    engine = engine_bench(fm, prompt, new_tokens, skip_layers, repeats, tps["decode"]["original"]) \
        if device.type == "cuda" else "CPU run: the GPU decode engine needs CUDA"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(next(fm.model.parameters()).dtype).removeprefix("torch."),
        "base_model": fm.config.base_model,
        "num_layers": fm.config.num_layers,
        "routed_layers": fm.config.routed_layers,
        "threshold": fm.state.threshold,
        "shapes": {"prefill": [1, prefill_len], "decode_prompt": [1, decode_prompt], "decode_new_tokens": new_tokens},
        "repeats": repeats,
        "tokens_per_s": tps,
        "prefill_ratio": ratio["prefill_routed"],
        "decode_ratio": ratio["decode_routed"],
        "fixed_prefill_ratio": ratio["prefill_fixed"],
        "fixed_decode_ratio": ratio["decode_fixed"],
        "overhead_prefill_ratio": ratio["prefill_run"],
        "overhead_decode_ratio": ratio["decode_run"],
        "cpu_time_ratios": cpu_ratio,  # same pairs, this process's CPU seconds instead of wall-clock
        "engine": engine,  # GPU decode engine (flexicli/speed/gpu_engine.py): a dict of figures, or why it did not run
        "skip": skip,
        "skip_layers": skip_layers,
        "routed_usage": dict(zip(fm.unit_labels, (round(u, 4) for u in usage), strict=True)),  # per routed unit
        "mean_skipped_at_threshold": {"prefill": skipped_prefill, "decode": skipped_decode},
    }


def engine_bench(fm, prompt: torch.Tensor, new_tokens: int, skip_layers, repeats: int, hf_original_tps: float):
    """Batch-1 greedy decode on the GPU engine: full model, routers at the threshold (decided on the device),
    and `skip_layers` statically reduced to K/V + adapter. Ratios are within-round, medians over rounds."""
    from .gpu_engine import DecodeEngine, engine_available

    reason = engine_available(fm)
    if reason is not None:
        return f"not run: {reason}"
    engine = DecodeEngine(fm.model, fm, max_len=prompt.shape[1] + new_tokens + 8)
    graphs = {"full": engine.graph("full"), "routed": engine.graph("routed"),
              "fixed": engine.graph("fixed", skip_layers=skip_layers)}
    secs = {name: [] for name in graphs}
    for r in range(repeats + 1):  # the first round warms up
        for name, g in graphs.items():
            g.prefill(prompt)
            with _Clock(prompt.device) as clock:
                g.generate(new_tokens)
            if r:
                secs[name].append(clock.wall)
    tps = {name: new_tokens / statistics.median(v) for name, v in secs.items()}
    return {
        "decode_tokens_per_s": tps,
        "full_over_hf_original": tps["full"] / hf_original_tps,
        "routed_over_full": statistics.median(f / t for f, t in zip(secs["full"], secs["routed"])),
        "fixed_over_full": statistics.median(f / t for f, t in zip(secs["full"], secs["fixed"])),
    }
