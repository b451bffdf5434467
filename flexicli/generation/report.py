"""The pictures of `flexi patterns`: a self-contained HTML report (inline SVG, inline CSS, no scripts, nothing
fetched when it is viewed) and PNG figures drawn with matplotlib (when installed)."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from pathlib import Path

from .decode import depth_colour

UNROUTED = "#9ca3af"  # grey: layers without a router always run


def layer_span(analysis) -> tuple[int, int]:
    """(fewest, most) layers a token can use, in whole layers for the colour scale and the legend (skip units
    module/mlp count layer-equivalents: the fewest round down)."""
    return math.floor(analysis.fewest_layers + 1e-9), analysis.num_layers


# ---- inline SVG charts --------------------------------------------------------------------------------------
def svg_layer_usage(analysis, width: int = 720, height: int = 260) -> str:
    """The "bowl": share of tokens that ran each decoder layer (vertical bars, one per layer)."""
    n = analysis.num_layers
    left, right, top, bottom = 44, 10, 24, 34
    pw, ph = width - left - right, height - top - bottom
    bw = pw / n
    routed = set(analysis.routed_layers)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="per-layer usage">',
             f'<text x="{left}" y="15" class="ttl">share of generated tokens that ran each layer</text>']
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + ph * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax" text-anchor="end">{int(frac * 100)}%</text>')
    for layer, rate in enumerate(analysis.layer_usage):
        h = ph * rate
        colour = depth_colour(round(rate * 100), 0, 100) if layer in routed else UNROUTED
        x = left + layer * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + ph - h:.1f}" width="{max(1.0, bw - 2):.1f}" height="{h:.1f}" '
                     f'fill="{colour}"><title>layer {layer}: {100 * rate:.1f}%'
                     f'{"" if layer in routed else " (not routed)"}</title></rect>')
        if n <= 40 or layer % 2 == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{top + ph + 14}" class="ax" '
                         f'text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="ax" text-anchor="middle">decoder layer '
                 f'(grey: not routed, always run)</text></svg>')
    return "".join(parts)


def svg_categories(analysis, width: int = 720) -> str:
    """Mean layers used per category (horizontal bars on the model's range of possible layer counts)."""
    cats = sorted(analysis.category_mean_layers, key=analysis.category_mean_layers.get)
    fewest, most = layer_span(analysis)
    lo = max(0, fewest - 1)
    left, right, top, row = 130, 60, 26, 24
    height = top + row * len(cats) + 24
    pw = width - left - right
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="mean layers per category">',
             f'<text x="{left}" y="15" class="ttl">mean layers used per generated token, by category '
             f'(of {most})</text>']
    for i, c in enumerate(cats):
        v = analysis.category_mean_layers[c]
        y = top + i * row
        w = pw * (v - lo) / max(1, most - lo)
        parts.append(f'<text x="{left - 8}" y="{y + 15}" class="lbl" text-anchor="end">{html.escape(c)}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 7}" '
                     f'fill="{depth_colour(round(v), fewest, most)}"><title>{html.escape(c)}: {v:.2f} layers, '
                     f'{analysis.category_tokens[c]} tokens</title></rect>'
                     f'<text x="{left + w + 6:.1f}" y="{y + 15}" class="ax">{v:.2f}</text>')
    parts.append(f'<text x="{left}" y="{height - 6}" class="ax">axis from {lo} to {most} layers</text></svg>')
    return "".join(parts)


# ---- HTML -----------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:960px;color:#111827;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.meta{color:#4b5563} .meta code{background:#f3f4f6;padding:1px 4px;border-radius:3px}
svg .ttl{font-size:13px;font-weight:600} svg .ax{font-size:11px;fill:#4b5563} svg .lbl{font-size:12px}
svg .grid{stroke:#e5e7eb}
.legend span{display:inline-block;min-width:26px;text-align:center;border-radius:3px;margin-right:2px;font-size:12px}
.gen{margin:10px 0 14px} .gen .hd{color:#374151;font-size:12px;margin-bottom:3px}
.gen .hd b{color:#111827}
.gen .txt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;
background:#fafafa;border:1px solid #e5e7eb;border-radius:6px;padding:6px 8px}
.t{border-radius:2px;padding:1px 0}
table{border-collapse:collapse;margin-right:24px}
td,th{padding:2px 8px;border-bottom:1px solid #f3f4f6;text-align:left;font-size:13px}
td.n{text-align:right;font-variant-numeric:tabular-nums} .tables{display:flex;flex-wrap:wrap;gap:8px}
code.tok{white-space:pre;background:#f3f4f6;padding:0 3px;border-radius:3px}
"""


def _tint(hex_colour: str, amount: float = 0.55) -> str:
    """The colour mixed with white: a background light enough for black text."""
    rgb = [int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def _legend(fewest: int, most: int) -> str:
    step = max(1, (most - fewest + 1) // 16)
    cells = "".join(f'<span style="background:{_tint(depth_colour(n, fewest, most))}">{n}</span>'
                    for n in range(fewest, most + 1, step))
    return f'<div class="legend">layers used: {cells}</div>'


def _token_table(rows: list[dict], title: str) -> str:
    body = "".join(f'<tr><td><code class="tok">{html.escape(r["text"])}</code></td>'
                   f'<td class="n">{r["mean_layers_used"]:.2f}</td><td class="n">{r["count"]}</td></tr>' for r in rows)
    return (f'<table><caption style="text-align:left;font-weight:600">{title}</caption>'
            f'<tr><th>token</th><th>mean layers</th><th>seen</th></tr>'
            f'{body or "<tr><td colspan=3>none to rank</td></tr>"}'
            f'</table>')


def _unit_table(analysis) -> str:
    """Skip units module/mlp: the share of tokens that ran each routed unit (the bars above weigh them by cost)."""
    if not analysis.unit_usage:
        return ""
    body = "".join(f'<tr><td><code>{html.escape(label)}</code></td><td class="n">{100 * ran:.1f}%</td></tr>'
                   for label, ran in analysis.unit_usage.items())
    return ('<h2>Per-unit usage</h2><p class="meta">each routed sublayer (17.attn: layer 17\'s attention, 17.mlp: '
            'its MLP); a layer\'s bar above is the share of its layer-equivalents that ran</p>'
            f'<table><tr><th>unit</th><th>tokens that ran it</th></tr>{body}</table>')


def render_html(records, analysis, meta: dict, prompts) -> str:
    fewest, most = layer_span(analysis)
    by_prompt = defaultdict(list)
    for r in records:
        by_prompt[r.prompt_id].append(r)
    gens = []
    for p in prompts:
        toks = by_prompt.get(p.id, [])
        spans = "".join(
            f'<span class="t" style="background:{_tint(depth_colour(r.layers_used, fewest, most))}" '
            f'title="{r.layers_used} layers; skipped {", ".join(map(str, r.skipped_layers)) or "none"}">'
            f'{html.escape(r.text)}</span>' for r in toks)
        mean = sum(r.layers_used for r in toks) / len(toks) if toks else float("nan")
        gens.append(f'<div class="gen"><div class="hd"><b>{html.escape(p.category)}</b> · {html.escape(p.id)} · '
                    f'mean {mean:.2f} layers · prompt: {html.escape(p.text[:160])}</div>'
                    f'<div class="txt">{spans or "<i>(no tokens)</i>"}</div></div>')
    meta_rows = " · ".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in meta.items())
    skipped = 100 * (1 - analysis.mean_layers_used / analysis.num_layers)
    r = analysis.routed_layers
    routed = "none" if not r else f"{r[0]}..{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else ", ".join(map(str, r))
    tables = _token_table(analysis.hungriest, "most layers") + _token_table(analysis.cheapest, "fewest layers")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flexi patterns</title>
<style>{CSS}</style></head><body>
<h1>Which tokens need depth</h1>
<p class="meta">{meta_rows}</p>
<p>{analysis.tokens} generated tokens · mean layers used <b>{analysis.mean_layers_used:.2f}</b> of {most}
({skipped:.1f}% of layer computations skipped) · routed layers {routed}.
A token is coloured by the layers that processed it (the decode step that consumed it).</p>
<h2>Per-layer usage</h2>{svg_layer_usage(analysis)}{_unit_table(analysis)}
<h2>Mean layers per category</h2>{svg_categories(analysis)}
<h2>Most and least layer-hungry tokens</h2>
<p class="meta">mean layers used over a token's occurrences; tokens seen at least {analysis.min_count} times</p>
<div class="tables">{tables}</div>
<h2>Token depth map</h2>{_legend(fewest, most)}
<p class="meta">hover a token for its layer count and the layers it skipped</p>
{"".join(gens)}
</body></html>
"""


# ---- PNG figures (matplotlib) ---------------------------------------------------------------------------------
def save_figures(folder: Path, analysis) -> list[str]:
    """Writes the PNG figures and returns their names; none without matplotlib, which is optional (the `plots`
    extra): the HTML report draws the same charts without it."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":  # matplotlib is there but broken: say so rather than skip the figures
            raise
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = set(analysis.routed_layers)
    fewest, most = layer_span(analysis)

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=120)
    layers = list(range(analysis.num_layers))
    colours = [depth_colour(round(r * 100), 0, 100) if i in routed else UNROUTED
               for i, r in enumerate(analysis.layer_usage)]
    ax.bar(layers, [100 * r for r in analysis.layer_usage], color=colours)
    ax.set_xlabel("decoder layer (grey: not routed, always run)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # layers are whole numbers (not 2.5, 7.5)
    ax.set_ylabel("tokens that ran it (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Per-layer usage over {analysis.tokens} generated tokens")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(folder / "layer_usage.png")
    plt.close(fig)

    cats = sorted(analysis.category_mean_layers, key=analysis.category_mean_layers.get)
    vals = [analysis.category_mean_layers[c] for c in cats]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(cats) + 1.2), dpi=120)
    ax.barh(cats, vals, color=[depth_colour(round(v), fewest, most) for v in vals])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=9)
    ax.set_xlim(max(0, fewest - 1), most + 1)
    ax.set_xlabel(f"mean layers used per generated token (of {most})")
    ax.set_title("Layers used by task category")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(folder / "category_layers.png")
    plt.close(fig)
    return ["layer_usage.png", "category_layers.png"]
