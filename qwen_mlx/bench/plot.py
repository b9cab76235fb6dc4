"""Decode tok/s against context length as a self-contained SVG (no plotting library): one line per engine and
cache kind, colour by cache kind, solid for qwen-mlx, dashed for mlx-lm; context on a log2 axis."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

COLOURS = {"plain": "#1f77b4", "rotating": "#ff7f0e", "kv8": "#2ca02c", "kv4": "#d62728",
           "rotating-kv8": "#9467bd", "rotating-kv4": "#8c564b"}
WIDTH, HEIGHT = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 50, 60  # margins: the legend sits on the right


def context_svg(result: dict) -> str:
    """The SVG text for a bench JSON document's context_cases."""
    cases = result["context_cases"]
    if not cases:
        raise ValueError("no long-context cases to plot")
    several = len({(c["model"], c["bits"]) for c in cases}) > 1
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for c in cases:
        key = (c["model"], c["bits"], c["engine"], c["cache"])
        lines.setdefault(key, []).append((c["context_tokens"], c["decode_tps"]))
    xs = sorted({c["context_tokens"] for c in cases})
    x_lo, x_hi = math.log2(xs[0]), math.log2(xs[-1])
    y_hi = _nice_max(max(c["decode_tps"] for c in cases))
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (w / 2 if x_hi == x_lo else (math.log2(x) - x_lo) / (x_hi - x_lo) * w)

    def py(y: float) -> float:
        return TOP + h - y / y_hi * h

    first = cases[0]
    title = f"decode tok/s vs context: {first['model']} {first['bits']}, {first['layers']} layers, {result['device']}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="24" font-size="14">{escape(title if not several else "decode tok/s vs context")}'
           f'</text>',
           f'<line x1="{LEFT}" y1="{TOP + h}" x2="{LEFT + w}" y2="{TOP + h}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + h}" stroke="black"/>']
    for x in xs:
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP + h}" x2="{px(x):.1f}" y2="{TOP + h + 5}" stroke="black"/>'
                   f'<text x="{px(x):.1f}" y="{TOP + h + 18}" text-anchor="middle">{_tokens(x)}</text>')
    for i in range(5):
        y = y_hi * i / 4
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + w}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 15}" text-anchor="middle">context tokens</text>')
    out.append(f'<text x="18" y="{TOP + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {TOP + h / 2})">decode tok/s</text>')
    for n, ((model, bits, engine, cache), points) in enumerate(sorted(lines.items(), key=_legend_order)):
        colour = COLOURS[cache]
        dash = ' stroke-dasharray="6 4"' if engine == "mlx-lm" else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in points)
        label = f"{engine} {cache}" + (f" ({model} {bits})" if several else "")
        ly = TOP + 10 + 18 * n
        out.append(f'<line x1="{LEFT + w + 15}" y1="{ly}" x2="{LEFT + w + 45}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{LEFT + w + 50}" y="{ly + 4}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_context_svg(result: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(context_svg(result))
    tmp.replace(path)


def _legend_order(item: tuple) -> tuple:
    """Lines grouped by cache kind (in COLOURS order), qwen-mlx above mlx-lm."""
    (model, bits, engine, cache), _ = item
    return model, bits, list(COLOURS).index(cache), engine != "qwen-mlx"


def _nice_max(y: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above y (the y axis' top)."""
    if y <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(y))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= y)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
