"""`OUT/index.html`: one self-contained page rendered from the results document.

Inline CSS, no scripts, figures referenced by relative path (so the folder can be zipped or
served as is). Every piece of text passes through `html.escape`: claims, verdicts and config
values are data, and a `<` in any of them must not become markup.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from meanwise.atomic_io import atomic_write_text
from meanwise.experiments.claims import Claim

__all__ = ["INDEX_FILE", "render_html", "write_html"]

INDEX_FILE = "index.html"

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em;
       margin-top: 2.2em; } h3 { margin: 1.4em 0 0.4em; }
.meta, .paper, figcaption, caption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
caption { caption-side: bottom; text-align: left; padding-top: 0.3em; max-width: 60em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
.claim { background: #f6f8fa; border-left: 4px solid #8899aa; padding: 0.6em 1em; }
.verdict { border: 2px solid #333; border-radius: 6px; padding: 0.4em 1em; margin: 0.8em 0; }
.verdict p { margin: 0.4em 0; padding: 0.2em 0.5em; border-radius: 4px; }
.status { font-weight: 600; white-space: nowrap; padding: 0.05em 0.45em; border-radius: 4px; }
.status-supported { background: #e3f6e6; color: #14532d; }
.status-contradicted { background: #fde5e3; color: #7f1d1d; }
.status-unresolved { background: #eef0f3; color: #374151; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
.claims td.detail { color: #444; font-size: 0.92em; max-width: 34em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
.error { color: #a00; } details { margin: 0.6em 0; } code { font-size: 0.9em; }
"""


def _table(table: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in table.get("columns", []))
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in table.get("rows", [])
    )
    caption = table.get("caption") or ""
    caption_html = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{caption_html}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STATUS_LABEL = {
    "supported": "supported",
    "contradicted": "contradicted",
    "unresolved": "unresolved at this scale",
}


def _status(status: str) -> str:
    """One style per status; the words come from the status too, never from free text."""
    label = _STATUS_LABEL.get(status, status)
    return f'<span class="status status-{escape(status, quote=True)}">{escape(label)}</span>'


def _number(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return f"{x:+.3g}" if abs(x) < 1000 else f"{x:+.0f}"


def _effect(claim: Claim) -> str:
    lo, hi = claim.ci95
    return f"{_number(claim.effect)} [{_number(lo)}, {_number(hi)}]"


def _claims(records: list[dict[str, Any]]) -> str:
    if not records:
        return '<p class="error">This experiment stated no testable claims.</p>'
    rows = "".join(
        "<tr>"
        f"<td>{escape(c.claim)}</td><td>{_status(c.status)}</td>"
        f'<td class="num">{escape(_effect(c))}</td>'
        f'<td class="num">{escape(_number(c.paper_effect))}</td>'
        f'<td class="num">{c.n_seeds}</td><td>{escape(c.test)}</td>'
        f'<td class="detail">{escape(c.detail)}</td>'
        "</tr>"
        for c in map(Claim.from_json, records)
    )
    return (
        '<table class="claims"><thead><tr><th>claim</th><th>status</th>'
        "<th>our effect [95 % CI]</th><th>paper</th><th>seeds</th><th>test</th><th>detail</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def _summary(experiments: dict[str, Any]) -> str:
    """The page's opening table: every claim of every paper, its status, effect and interval."""
    claims = {
        name: [Claim.from_json(c) for c in e.get("claims", [])] for name, e in experiments.items()
    }
    rows = []
    for name, found in claims.items():
        for c in found:
            rows.append(
                f'<tr><td><a href="#{escape(name, quote=True)}">{escape(name)}</a></td>'
                f"<td>{escape(c.claim)}</td><td>{_status(c.status)}</td>"
                f'<td class="num">{escape(_effect(c))}</td>'
                f'<td class="num">{escape(_number(c.paper_effect))}</td>'
                f'<td class="num">{c.n_seeds}</td></tr>'
            )
    if not rows:
        return ""
    counts = {s: 0 for s in _STATUS_LABEL}
    for found in claims.values():
        for c in found:
            counts[c.status] = counts.get(c.status, 0) + 1
    tally = ", ".join(f"{n} {_STATUS_LABEL[s]}" for s, n in counts.items())
    return (
        "<h2>Every claim at a glance</h2>"
        f'<p class="meta">{escape(tally)}. A status comes from a 95 % confidence interval '
        "over seeds: supported when it lies wholly on the paper's side, contradicted when "
        "wholly on the other side, otherwise unresolved at this scale.</p>"
        '<table class="claims summary"><thead><tr><th>experiment</th><th>claim</th>'
        "<th>status</th><th>our effect [95 % CI]</th><th>paper</th><th>seeds</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _figure(figure: dict[str, Any]) -> str:
    caption = escape(figure.get("caption", ""))
    if not figure.get("file"):
        error = escape(str(figure.get("error", "not drawn")))
        return f'<p class="error">Figure missing ({error}): {caption}</p>'
    src = escape(figure["file"], quote=True)
    return (
        f'<figure><img src="{src}" alt="{escape(figure.get("caption", ""), quote=True)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _config(config: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(str(k))}</code></td><td>{escape(json.dumps(v))}</td></tr>"
        for k, v in config.items()
    )
    return (
        f"<table><thead><tr><th>field</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _runtime(entry: dict[str, Any]) -> str:
    total = float(entry.get("runtime_s", 0.0))
    seeds = entry.get("seeds", [])
    cached = entry.get("cached_seeds", [])
    text = f"{total:.1f} s of compute for {len(seeds)} seed(s) {seeds}"
    if cached:
        text += f"; seeds {cached} were reused from the cache (their original time is counted)"
    return escape(text)


def _section(name: str, entry: dict[str, Any]) -> str:
    parts = [f'<section id="{escape(name, quote=True)}">']
    parts.append(f"<h2>{escape(entry.get('title', name))} <code>{escape(name)}</code></h2>")
    if entry.get("paper"):
        parts.append(f'<p class="paper">{escape(entry["paper"])}</p>')
    parts.append("<h3>The paper's claim</h3>")
    parts.append(f'<p class="claim">{escape(entry.get("claim", ""))}</p>')
    parts.extend(_table(t) for t in entry.get("published", []))
    parts.append("<h3>Verdict here</h3>")
    parts.append(_claims(entry.get("claims", [])))
    if entry.get("protocol"):
        parts.append("<h3>The paper's protocol and ours</h3>")
        parts.append(_table(entry["protocol"]))
    parts.append("<h3>Our results</h3>")
    parts.extend(_table(t) for t in entry.get("summary", {}).get("tables", []))
    parts.extend(_figure(f) for f in entry.get("figures", []))
    parts.append("<h3>Setup</h3>")
    parts.append(
        f'<p class="meta">Preset <b>{escape(str(entry.get("preset", "?")))}</b>, config hash '
        f"<code>{escape(str(entry.get('config_hash', '?')))}</code>, finished "
        f"{escape(str(entry.get('finished', '?')))}. Runtime: {_runtime(entry)}.</p>"
    )
    parts.append(
        f"<details><summary>Config used</summary>{_config(entry.get('config', {}))}</details>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(document: dict[str, Any]) -> str:
    """The whole page for a results document (see `meanwise.report.results`)."""
    experiments = document.get("experiments", {})
    toc = "".join(
        f'<li><a href="#{escape(n, quote=True)}">{escape(e.get("title", n))}</a></li>'
        for n, e in experiments.items()
    )
    sections = "\n".join(_section(n, e) for n, e in experiments.items())
    meta = (
        f"meanwise {escape(str(document.get('meanwise_version', '?')))}, "
        f"written {escape(str(document.get('created', '?')))}"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>meanwise: reproductions</title><style>{_CSS}</style></head><body>\n"
        f'<header><h1>meanwise: reproductions</h1><p class="meta">{meta}</p>'
        f"<ul>{toc}</ul></header>\n{_summary(experiments)}\n{sections}\n</body></html>\n"
    )


def write_html(out_dir: Path, document: dict[str, Any]) -> Path:
    """Write `out_dir/index.html` atomically."""
    path = Path(out_dir) / INDEX_FILE
    atomic_write_text(path, render_html(document))
    return path
