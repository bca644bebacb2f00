"""The report as two documents built side by side: self-contained HTML and Markdown.

The HTML embeds figures as base64 data URIs, so the page opens offline and can be mailed as one
file. A small script in the page records, on load, each image's decoded size in
``data-decoded`` (and ``data-images="ok/total"`` on ``<body>``): a headless browser's DOM dump
then proves every figure decoded.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# A table cell that is a number (possibly with an interval, sign or unit): right-aligned.
_NUMERIC = re.compile(r"^[\s\d.,:+\-−–%×/\[\]eptn]*\d[\s\d.,:+\-−–%×/\[\]eptn]*$|^[–-]$")


@dataclass
class Document:
    """Builds the HTML and the Markdown side by side."""

    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{anchor}"' if anchor else ""
        self.html.append(f"<h{level}{a}>{html.escape(text)}</h{level}>")
        self.md.append("#" * level + " " + text + "\n")

    def p(self, text: str, cls: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def fig(self, name: str, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        self.figures[name] = png
        b64 = base64.b64encode(png).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(caption)}" data-figure="{name}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(caption)}</figcaption>'
            "</figure>"
        )
        self.md.append(f"![{caption}](figures/{name}.png)\n\n*{caption}*\n")

    def table(
        self,
        head: Sequence[str],
        rows: Sequence[Sequence[object]],
        cls: str = "",
        strong: set[tuple[int, int]] | None = None,
    ) -> None:
        """A table in both documents; ``strong`` cells (row, column) are emphasised."""
        strong = strong or set()
        # A column of numbers is right-aligned (header included), anything else left.
        num = [
            i > 0 and all(_NUMERIC.match(str(r[i])) for r in rows) and bool(rows)
            for i in range(len(head))
        ]
        cls_ = [' class="num"' if n else "" for n in num]
        th = "".join(f"<th{cls_[i]}>{html.escape(h)}</th>" for i, h in enumerate(head))
        body = []
        for j, r in enumerate(rows):
            tds = "".join(
                f"<td{cls_[i]}>"
                + (f"<b>{html.escape(str(x))}</b>" if (j, i) in strong else html.escape(str(x)))
                + "</td>"
                for i, x in enumerate(r)
            )
            body.append(f"<tr>{tds}</tr>")
        self.html.append(
            f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
        esc = [str(h).replace("|", "\\|") for h in head]
        self.md.append("| " + " | ".join(esc) + " |")
        self.md.append("|" + "|".join("---:" if n else "---" for n in num) + "|")
        for j, r in enumerate(rows):
            cells = [str(x).replace("|", "\\|") for x in r]
            cells = [f"**{c}**" if (j, i) in strong else c for i, c in enumerate(cells)]
            self.md.append("| " + " | ".join(cells) + " |")
        self.md.append("")

    def raw_html(self, text: str) -> None:
        self.html.append(text)

    @contextmanager
    def section(self, anchor: str, title: str) -> Iterator[None]:
        """``<section id=anchor>`` with its heading; the body is what the block adds."""
        self.raw_html(f'<section id="{anchor}">')
        self.h(2, title, f"{anchor}-h")
        yield
        self.raw_html("</section>")


CSS = """
:root { --fg:#1d232b; --muted:#5b6673; --line:#e3e7ec; --bg:#f6f8fa; --ok:#1f7a3f; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", "Liberation Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1d2733; color:#fff; padding:22px 0 18px; }
header .wrap h1 { margin:0 0 4px; font-size:22px; }
header .wrap p { margin:0; color:#c7d0da; }
.wrap { max-width:1120px; margin:0 auto; padding:0 24px; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; }
nav a { display:inline-block; padding:9px 12px; color:var(--muted); text-decoration:none; font-size:13px; }
nav a:hover { color:var(--fg); }
section { background:#fff; border:1px solid var(--line); border-radius:8px; margin:18px 0; padding:6px 22px 16px; }
h2 { font-size:18px; margin:14px 0 8px; }
h3 { font-size:15px; margin:14px 0 6px; }
p { margin:6px 0 10px; }
.muted { color:var(--muted); font-size:13px; }
figure { margin:10px 0 16px; text-align:center; }
figure img { max-width:100%; height:auto; }
figcaption { color:var(--muted); font-size:12px; margin-top:2px; }
.grid { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap:8px 20px; align-items:start; }
.scroll { overflow-x:auto; margin:6px 0 14px; }
table { border-collapse:collapse; font-size:12.5px; min-width:50%; }
th, td { padding:4px 9px; border-bottom:1px solid var(--line); white-space:nowrap; text-align:left; }
th { background:#f0f3f6; font-weight:600; position:sticky; top:0; }
th.num, td.num { text-align:right; font-variant-numeric: tabular-nums; }
table.results td:first-child, table.results th:first-child { position:sticky; left:0; background:#fff; z-index:1; }
table.results td:last-child, table.results th:last-child { position:sticky; right:0; background:#f4f7fb;
  border-left:1px solid var(--line); }
table.results th { background:#f0f3f6; }
tbody tr:nth-child(even) { background:#fafbfc; }
.verdicts { list-style:none; padding:0; margin:8px 0; }
.verdicts li { border-left:4px solid #999; background:#fafbfc; padding:8px 12px; margin:8px 0; border-radius:0 6px 6px 0; }
.verdicts li.ok { border-color:var(--ok); } .verdicts li.bad { border-color:var(--bad); }
.badge { display:inline-block; font-size:11px; font-weight:700; padding:1px 7px; border-radius:10px; margin-right:8px; color:#fff; background:#888; }
.ok .badge { background:var(--ok); } .bad .badge { background:var(--bad); }
.overall { font-size:16px; font-weight:600; margin:10px 0; }
.kpis { display:flex; flex-wrap:wrap; gap:12px; margin:10px 0; }
.kpi { border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:150px; }
.kpi b { display:block; font-size:18px; } .kpi span { color:var(--muted); font-size:12px; }
"""

# Records each image's decoded size on load (see the module docstring).
DECODE_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) {
    im.setAttribute('data-decoded', im.naturalWidth + 'x' + im.naturalHeight);
    if (im.complete && im.naturalWidth > 0 && im.naturalHeight > 0) { ok++; }
  });
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def write_documents(doc: Document, title: str, nav: Sequence[tuple[str, str]], out_dir: Path):
    """``index.html`` (written atomically), ``report.md`` and ``figures/*.png`` in ``out_dir``;
    ``nav`` is (anchor, text) for the page's navigation bar."""
    links = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in nav)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f'<header><div class="wrap"><h1>{html.escape(title)}</h1>'
        "<p>MERIT: conflict-aware splitting and weight merging — run report</p></div></header>"
        f'<nav><div class="wrap">{links}</div></nav><main class="wrap">'
        + "\n".join(doc.html)
        + f"</main><script>{DECODE_SCRIPT}</script></body></html>\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    html_path = out_dir / "index.html"
    md_path = out_dir / "report.md"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page)
    tmp.replace(html_path)
    md_path.write_text(f"# {title}\n\n" + "\n".join(doc.md) + "\n")
    return html_path, md_path
