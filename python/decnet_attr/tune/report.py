"""Tables for the terminal and a self-contained HTML page (inline CSS and
SVG, nothing fetched at view time) for the tuning commands."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from html import escape
from typing import Any

from decnet_attr.tune.data import STATES
from decnet_attr.tune.evaluate import Metrics
from decnet_attr.tune.scenarios import Scenario


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(r, widths)
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}"
    if isinstance(c, int) and not isinstance(c, bool):
        return f"{c:,}"
    return str(c)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "", 1).replace("-", "", 1).isdigit()


def metrics_table(named: Sequence[tuple[str, Metrics]]) -> str:
    keys = list(named[0][1].summary())
    return table(
        [[k] + [m.summary()[k] for _, m in named] for k in keys], ["metric"] + [n for n, _ in named]
    )


def confusion_table(m: Metrics) -> str:
    rows = [[f"truth {STATES[i]}"] + m.confusion[i] for i in range(5)]
    return table(rows, ["", *STATES])


def scenario_table(scen: Sequence[Scenario]) -> str:
    return table(
        [[s.name, s.expected, s.observed, "pass" if s.passed else "FAIL"] for s in scen],
        ["DECNET scenario", "expected", "got", ""],
    )


def delay_histogram(delays: Sequence[int]) -> list[tuple[int, int]]:
    c = Counter(delays)
    return sorted(c.items())


# ---- HTML -----------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#222;max-width:70rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
svg text{font:11px system-ui,sans-serif;fill:#333}.legend span{margin-right:1rem}
.pass{color:#176b2c}.fail{color:#b00020;font-weight:bold}
"""


def _svg_scatter(
    svg_id: str,
    points: Sequence[tuple[float, float, str, str]],
    xlabel: str,
    ylabel: str,
    *,
    w: int = 420,
    h: int = 320,
) -> str:
    """points: (x, y, css colour, title)."""
    pad = 44
    xs = [p[0] for p in points] or [0.0]
    ys = [p[1] for p in points] or [0.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    out = [
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(ylabel)} vs {escape(xlabel)}">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">'
        f"{escape(ylabel)}</text>",
    ]
    for v, anchor in ((x0, "start"), (x1, "end")):
        out.append(
            f'<text x="{sx(v):.1f}" y="{h - pad + 14}" text-anchor="{anchor}">{v:.3g}</text>'
        )
    for v in (y0, y1):
        out.append(f'<text x="{pad - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    # draw the greys first so the highlighted points stay on top
    for x, y, colour, title in sorted(points, key=lambda p: p[2] != "#bbb"):
        r = 3 if colour == "#bbb" else 5
        out.append(
            f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{colour}" '
            f'fill-opacity="0.8"><title>{escape(title)}</title></circle>'
        )
    out.append("</svg>")
    return "".join(out)


def svg_confusion(m: Metrics, svg_id: str = "confusion") -> str:
    cell, pad = 64, 110
    n = len(STATES)
    w = pad + n * cell + 10
    h = pad + n * cell + 10
    out = [
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="confusion matrix">',
        f'<text x="{pad + n * cell / 2}" y="{pad - 30}" text-anchor="middle">predicted</text>',
    ]
    for j, s in enumerate(STATES):
        out.append(
            f'<text x="{pad + j * cell + cell / 2}" y="{pad - 8}" text-anchor="middle">{s}</text>'
        )
    for i, s in enumerate(STATES):
        row = m.confusion[i]
        total = sum(row)
        out.append(
            f'<text x="{pad - 8}" y="{pad + i * cell + cell / 2 + 4}" text-anchor="end">{s}</text>'
        )
        for j, v in enumerate(row):
            frac = v / total if total else 0.0
            # white → deep blue by the share of the truth row
            shade = int(255 - 200 * frac)
            colour = f"rgb({shade},{shade + int(30 * frac)},255)"
            out.append(
                f'<rect class="cell" x="{pad + j * cell}" y="{pad + i * cell}" width="{cell - 2}" '
                f'height="{cell - 2}" fill="{colour}"><title>truth {s}, predicted {STATES[j]}: '
                f"{v} ({frac:.1%} of the row)</title></rect>"
            )
            out.append(
                f'<text x="{pad + j * cell + cell / 2 - 1}" y="{pad + i * cell + cell / 2 + 4}" '
                f'text-anchor="middle">{v}</text>'
            )
    out.append(
        f'<text x="12" y="{pad + n * cell / 2}" transform="rotate(-90 12 {pad + n * cell / 2})" '
        'text-anchor="middle">truth</text>'
    )
    out.append("</svg>")
    return "".join(out)


def svg_histogram(
    bins: Sequence[tuple[int, int]], svg_id: str = "drift-delay", xlabel: str = ""
) -> str:
    w, h, pad = 420, 240, 40
    n = max(1, len(bins))
    top = max((c for _, c in bins), default=1) or 1
    bw = (w - 2 * pad) / n
    out = [
        f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(xlabel)}">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">{escape(xlabel)}</text>',
    ]
    for i, (k, c) in enumerate(bins):
        bh = (h - 2 * pad) * c / top
        x = pad + i * bw
        out.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{h - pad - bh:.1f}" width="{bw - 2:.1f}" '
            f'height="{bh:.1f}" fill="#4a78c2"><title>{k}: {c}</title></rect>'
        )
        out.append(f'<text x="{x + bw / 2:.1f}" y="{h - pad + 14}" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{top}</text>')
    out.append("</svg>")
    return "".join(out)


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<section><h2>{escape(h)}</h2>{content}</section>" for h, content in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>\n"
    )


def metrics_sections(named: Sequence[tuple[str, Metrics]]) -> list[tuple[str, str]]:
    """Summary, confusion heat map and drift-delay histogram of the first
    (main) entry; the summary table compares all of them."""
    keys = list(named[0][1].summary())
    main = named[0][1]
    summary = html_table(
        [[k] + [m.summary()[k] for _, m in named] for k in keys], ["metric"] + [n for n, _ in named]
    )
    return [
        ("Summary", summary),
        (f"Confusion matrix ({named[0][0]})", svg_confusion(main)),
        (
            f"Drift detection delay ({named[0][0]}; {main.drift_missed} missed)",
            svg_histogram(
                delay_histogram(main.drift_delays),
                xlabel="observations from the change point to the first drifting state",
            ),
        ),
    ]


def scenario_section(scen: Sequence[Scenario]) -> tuple[str, str]:
    rows = "".join(
        f"<tr><td>{escape(s.name)}</td><td>{s.expected}</td><td>{escape(s.observed)}</td>"
        f'<td class="{"pass" if s.passed else "fail"}">{"pass" if s.passed else "FAIL"}</td></tr>'
        for s in scen
    )
    return (
        "DECNET calibration scenarios",
        "<table><thead><tr><th>scenario</th><th>expected</th><th>got</th><th></th></tr></thead>"
        f"<tbody>{rows}</tbody></table>",
    )
