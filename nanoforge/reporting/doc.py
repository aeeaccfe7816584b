"""The report as a list of blocks, rendered twice: Markdown beside its PNGs, and one self-contained HTML file.

Notable:
- One document model (headings, paragraphs, tables, key/value lists, images,
  preformatted text, samples) and two small renderers, so the .md and the .html
  always say the same thing and no Markdown library is needed.
- The HTML embeds every image as a base64 data URI and its CSS inline: one file
  that opens anywhere with no network.
- Text from the run (samples, task names) is escaped: in Markdown, raw text goes
  in fences longer than any backtick run inside it; in HTML, everything is escaped.
  Paragraph text written by the report itself may use `code` and **bold**.
- Human formatting lives here: thousands separators, 4 significant digits for
  metrics, SI prefixes for FLOPs, durations as h/m/s.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NA = "n/a"


# ---------------------------------------------------------------------------
# numbers for humans

def finite(x: Any) -> float | None:
    """A finite float, or None for anything else (None, bools, text, NaN, inf)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def count(x: Any) -> str:
    """An integer with thousands separators: 1,234,567."""
    value = finite(x)
    return NA if value is None else f"{round(value):,}"


def sig(x: Any, digits: int = 4) -> str:
    """A metric to `digits` significant digits; large values keep all integer digits (12,346)."""
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    value = finite(x)
    if value is None:
        return NA
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 15 or magnitude < -4:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:,.{decimals}f}"
    return text


def signed(x: Any, digits: int = 4) -> str:
    value = finite(x)
    if value is None:
        return NA
    return ("+" if value > 0 else "") + sig(value, digits)


def si(x: Any, unit: str = "", digits: int = 4) -> str:
    """1.234e15 -> '1.234 P<unit>'."""
    value = finite(x)
    if value is None:
        return NA
    prefixes = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{sig(value / scale, digits)} {prefix}{unit}"
    return f"{sig(value, digits)} {unit}".rstrip()


def nbytes(x: Any) -> str:
    """Binary units, as memory is sold: 23.54 GiB."""
    value = finite(x)
    if value is None:
        return NA
    for scale, unit in [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]:
        if abs(value) >= scale:
            return f"{sig(value / scale)} {unit}"
    return f"{count(value)} B"


def duration(seconds: Any) -> str:
    """42.1s, 2m 05s, 1h 02m 03s, 3d 04h 05m."""
    value = finite(seconds)
    if value is None:
        return NA
    if value < 60:
        return f"{value:.1f}s"
    total = round(value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def percent(fraction: Any) -> str:
    value = finite(fraction)
    return NA if value is None else f"{sig(100 * value)}%"


def usd(x: Any) -> str:
    """Dollars as people write them: $1,234.50, $2.49, $0.0517, $0.05."""
    value = finite(x)
    if value is None:
        return NA
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) < 1e-4:  # a tiny CPU run: pennies are not worth scientific notation
        return "$0" if value == 0 else "< $0.0001"
    return f"${value:.3g}"


# ---------------------------------------------------------------------------
# the document

@dataclass
class Block:
    kind: str  # heading | text | table | kv | image | pre | sample | note
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Doc:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", {"text": text, "level": level}))

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", {"text": text}))

    def note(self, text: str) -> None:
        """A boxed remark: 'not run', warnings."""
        self.blocks.append(Block("note", {"text": text}))

    def table(self, headers: list[str], rows: list[list[Any]], align: str | None = None) -> None:
        """align: one char per column, 'l' or 'r' (default: first left, rest right)."""
        align = align or "l" + "r" * (len(headers) - 1)
        self.blocks.append(Block("table", {"headers": headers, "rows": rows, "align": align}))

    def kv(self, pairs: list[tuple[str, Any]]) -> None:
        self.blocks.append(Block("kv", {"pairs": pairs}))

    def image(self, filename: str, caption: str) -> None:
        self.blocks.append(Block("image", {"file": filename, "caption": caption}))

    def pre(self, text: str) -> None:
        self.blocks.append(Block("pre", {"text": text}))

    def sample(self, prompt: str, completion: str) -> None:
        self.blocks.append(Block("sample", {"prompt": prompt, "completion": completion}))


# ---------------------------------------------------------------------------
# Markdown

def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        d = block.data
        if block.kind == "heading":
            out += ["#" * d["level"] + " " + d["text"], ""]
        elif block.kind == "text":
            out += [d["text"], ""]
        elif block.kind == "note":
            out += ["> " + d["text"], ""]
        elif block.kind in ("table", "kv"):
            if block.kind == "kv":
                headers, rows, align = ["", ""], [[f"**{k}**", v] for k, v in d["pairs"]], "ll"
            else:
                headers, rows, align = d["headers"], d["rows"], d["align"]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
            for row in rows:
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            out.append("")
        elif block.kind == "image":
            out += [f"![{d['caption']}]({d['file']})", ""]
        elif block.kind == "pre":
            fence = _fence(d["text"])
            out += [fence + "text", d["text"], fence, ""]
        elif block.kind == "sample":
            # the marker shows where the model took over; the completion keeps its own spacing
            body = f"{d['prompt']}⟶{d['completion']}" if d["prompt"] else d["completion"]
            fence = _fence(body)
            out += [fence + "text", body, fence, ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .7em;vertical-align:top}
th{background:#f6f8fa} td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{font-weight:600;background:#f6f8fa}
code{background:#f6f8fa;padding:.1em .3em;border-radius:4px;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;border-radius:6px;white-space:pre-wrap;word-break:break-word}
pre b{color:#0550ae}
.note{border-left:4px solid #bf8700;background:#fff8c5;padding:.5em 1em;margin:.8em 0}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{color:#656d76;font-size:.9em}
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of markup the report's own prose uses: `code` and **bold**."""
    escaped = html.escape(str(text), quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(doc: Doc, image_dir: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        d = block.data
        if block.kind == "heading":
            level = min(6, max(2, d["level"]))
            parts.append(f"<h{level}>{_inline(d['text'])}</h{level}>")
        elif block.kind == "text":
            parts.append(f"<p>{_inline(d['text'])}</p>")
        elif block.kind == "note":
            parts.append(f'<div class="note">{_inline(d["text"])}</div>')
        elif block.kind == "table":
            align = d["align"]
            head = "".join(f'<th class="{a}">{_inline(h)}</th>' for h, a in zip(d["headers"], align))
            body = "".join(
                "<tr>" + "".join(f'<td class="{a}">{_inline(c)}</td>' for c, a in zip(row, align)) + "</tr>"
                for row in d["rows"]
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "kv":
            body = "".join(f"<tr><td>{_inline(k)}</td><td>{_inline(v)}</td></tr>" for k, v in d["pairs"])
            parts.append(f'<table class="kv"><tbody>{body}</tbody></table>')
        elif block.kind == "image":
            src = _data_uri(image_dir / d["file"])
            caption = html.escape(d["caption"])
            parts.append(f'<figure><img src="{src}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
        elif block.kind == "pre":
            parts.append(f"<pre>{html.escape(d['text'], quote=False)}</pre>")
        elif block.kind == "sample":
            prompt = f"<b>{html.escape(d['prompt'], quote=False)}</b>" if d["prompt"] else ""
            parts.append(f"<pre>{prompt}{html.escape(d['completion'], quote=False)}</pre>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
