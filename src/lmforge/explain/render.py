"""Explanations as people read them: coloured terminal text, HTML, and PNG figures (CJK labels included).

Terminal colours are ANSI 24-bit backgrounds, used only when the stream is a terminal (and ``NO_COLOR`` is
unset); otherwise the same content is plain text. PNGs use matplotlib's Agg backend with a CJK-capable font
found by name through ``matplotlib.font_manager`` (WenQuanYi Micro Hei, Noto CJK, ...); without one, labels
in Chinese would draw as empty boxes, so a one-line warning says which package to install.
"""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lmforge.errors import LmforgeError
from lmforge.explain.attention import AttentionMaps, LogitLens
from lmforge.explain.attribution import Attribution
from lmforge.explain.tokens import TokenExplanation

CJK_FONTS = (
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Serif CJK SC",
    "Source Han Sans SC",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "AR PL UMing CN",
    "Droid Sans Fallback",
)
MAX_HEATMAP_TOKENS = 128  # beyond this, labels overlap and the figure says nothing


def use_colour(stream: IO[str]) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def _background(text: str, rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m"


def _probability_rgb(p: float) -> tuple[int, int, int]:
    """Red (unsure) through yellow to green (sure), pale enough to read black text on."""
    p = min(max(p, 0.0), 1.0)
    if p < 0.5:
        return 255, int(150 + 200 * p), 150
    return int(255 - 210 * (p - 0.5)), 250, 150


def _signed_rgb(value: float, scale: float) -> tuple[int, int, int]:
    """Positive: red; negative: blue; the depth of the shade is |value| / scale."""
    depth = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    fade = int(255 - 150 * depth)
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def tokens_terminal(explanation: TokenExplanation, *, colour: bool, top: int = 3) -> str:
    """The generated text with every piece shaded by its probability, then one line per piece.

    A character made of several tokens lists its first token's alternatives; that token itself shows as the
    character with its share (``实[1/2]``), the rest as their bytes (``\\xe5\\xae``)."""
    shown = [
        _background(t.text, _probability_rgb(t.probability)) if colour else t.text for t in explanation.tokens
    ]
    lines = [explanation.prompt + "".join(shown), ""]
    lines.append(f"{'token':<12} {'p':>6} {'rank':>5} {'entropy':>7}  alternatives")
    for t in explanation.tokens:
        first = t.steps[0].token_id if t.steps else None
        rivals = []
        for a in t.alternatives[:top]:
            text = f"{t.text}[1/{len(t.steps)}]" if a.token_id == first and len(t.steps) > 1 else a.text
            rivals.append(f"{_quoted(text)} {a.probability:.3f}")
        lines.append(
            f"{_quoted(t.text):<12} {t.probability:6.3f} {t.rank:5d} {t.entropy:7.3f}  {', '.join(rivals)}"
        )
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return "'" + _label(text) + "'"


def attribution_terminal(attribution: Attribution, *, colour: bool) -> str:
    """The text with every piece shaded by its attribution (plain: piece[+0.123] marks)."""
    scale = max((abs(s) for s in attribution.scores), default=0.0)
    if colour:
        body = "".join(
            _background(p, _signed_rgb(s, scale))
            for p, s in zip(attribution.pieces, attribution.scores, strict=True)
        )
    else:
        body = " ".join(
            f"{p.strip() or repr(p)}[{s:+.3f}]"
            for p, s in zip(attribution.pieces, attribution.scores, strict=True)
        )
    note = f"{attribution.method} for {attribution.target!r} (score {attribution.score:.3f}"
    if attribution.completeness_error is not None:
        note += f", completeness error {attribution.completeness_error:.2%} in {attribution.steps} steps"
    return f"{body}\n  {note})"


def attribution_html(attributions: Sequence[Attribution]) -> str:
    """A standalone HTML page: one shaded paragraph per explained text."""
    rows = []
    for a in attributions:
        scale = max((abs(s) for s in a.scores), default=0.0)
        spans = "".join(
            f'<span title="{s:+.4f}" style="background:rgb{_signed_rgb(s, scale)}">{html.escape(p)}</span>'
            for p, s in zip(a.pieces, a.scores, strict=True)
        )
        note = html.escape(f"{a.method} for {a.target!r}, score {a.score:.3f}")
        if a.completeness_error is not None:
            note += f", completeness error {a.completeness_error:.2%} in {a.steps} steps"
        rows.append(f"<p>{spans}<br><small>{note}</small></p>")
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>lmforge attributions</title></head>'
        '<body style="font-family:sans-serif;white-space:pre-wrap">' + "\n".join(rows) + "</body></html>\n"
    )


# ------------------------------------------------------------------ figures
def cjk_font() -> str | None:
    """The name of an installed font that draws Chinese, or None."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font is None:
        warnings.warn(
            "no CJK font found: Chinese labels will draw as boxes; install fonts-wqy-microhei or fonts-noto-cjk",
            stacklevel=3,
        )
    else:
        plt.rcParams["font.sans-serif"] = [font, "DejaVu Sans"]
        plt.rcParams["font.family"] = "sans-serif"
    plt.rcParams["axes.unicode_minus"] = False
    return plt


def attention_png(
    maps: AttentionMaps, out: str | Path, *, layer: int | None = None, head: int | None = None
) -> Path:
    """A heatmap of one layer's head (``head=None``: the heads' mean; ``layer=None``: the rollout)."""
    T = len(maps.labels)
    if T > MAX_HEATMAP_TOKENS:
        raise LmforgeError(
            f"{T} tokens are too many for a readable heatmap", hint=f"use up to {MAX_HEATMAP_TOKENS}"
        )
    if layer is None:
        matrix, title = maps.rollout(), "attention rollout"
    else:
        weights = maps.weights[layer]
        matrix = weights.mean(0) if head is None else weights[head]
        title = f"layer {layer}, " + ("mean of heads" if head is None else f"head {head}")
    plt = _pyplot()
    size = max(4.0, 0.35 * T + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(T), [_label(label) for label in maps.labels], rotation=90)
    ax.set_yticks(range(T), [_label(label) for label in maps.labels])
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("token (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, plt, out)


def attribution_png(attributions: Sequence[Attribution], out: str | Path) -> Path:
    """Each text as a line of boxes, one per piece, shaded red (for) / blue (against) the target."""
    plt = _pyplot()
    width = 12.0
    lines: list[list[tuple[str, float, float]]] = []
    for a in attributions:
        scale = max((abs(s) for s in a.scores), default=0.0)
        lines.append([(p, s, scale) for p, s in zip(a.pieces, a.scores, strict=True)])
    height = 0.6 * sum(1 + sum(len(p) for p, _, _ in line) // 60 for line in lines) + 0.6
    fig = plt.figure(figsize=(width, max(1.5, height)))
    renderer = fig.canvas.get_renderer()
    y = 1.0 - 0.3 / fig.get_figheight()
    step = 0.45 / fig.get_figheight()
    for a, line in zip(attributions, lines, strict=True):
        x = 0.01
        for piece, value, scale in line:
            shade = tuple(c / 255 for c in _signed_rgb(value, scale))
            label = fig.text(
                x,
                y,
                _label(piece),
                fontsize=12,
                va="top",
                bbox={"facecolor": shade, "edgecolor": "none", "pad": 1},
            )
            extent = label.get_window_extent(renderer=renderer)
            x += extent.width / fig.bbox.width + 0.002
            if x > 0.95:
                x, y = 0.01, y - step
        y -= step
        fig.text(0.01, y, f"{a.method} for {a.target!r}", fontsize=9, va="top", color="grey")
        y -= step
    return _save(fig, plt, out)


def lens_table(lens: LogitLens) -> str:
    """Rows: blocks (0 = embeddings); columns: positions; cells: the top prediction and its probability."""
    header = ["layer"] + [f"{label!r}"[:14] for label in lens.labels]
    rows = [header]
    for row in lens.rows:
        rows.append([str(row.layer)] + [f"{top[0][0]!r} {top[0][1]:.2f}"[:14] for top in row.top])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


def lens_png(lens: LogitLens, out: str | Path) -> Path:
    """The lens as a grid: colour = the top token's probability, text = the token."""
    import numpy as np

    plt = _pyplot()
    L, T = len(lens.rows), len(lens.labels)
    probs = np.array([[top[0][1] for top in row.top] for row in lens.rows])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * T + 2), max(3.0, 0.45 * L + 1.5)))
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer, row in enumerate(lens.rows):
        for t, top in enumerate(row.top):
            ax.text(t, layer, _label(top[0][0])[:10], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(T), [_label(label) for label in lens.labels], rotation=90)
    ax.set_yticks(range(L), [str(r.layer) for r in lens.rows])
    ax.set_xlabel("input token (the prediction is of the token after it)")
    ax.set_ylabel("after block (0 = embeddings)")
    ax.set_title("logit lens")
    fig.tight_layout()
    return _save(fig, plt, out)


def _label(text: str) -> str:
    """Text a figure can draw: control characters (no font has glyphs for them) as escapes, newlines as \\n."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _save(fig: Any, plt: Any, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
