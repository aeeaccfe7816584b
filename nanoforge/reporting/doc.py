"""The report as a list of blocks, rendered twice: Markdown beside its PNGs, and one self-contained HTML file.

Notable:
- One document model (headings, paragraphs, tables, key/value lists, images,
  preformatted text, samples) and two small renderers, so the .md and the .html
  always say the same thing and no Markdown library is needed.
- The HTML embeds every image as a base64 data URI and its CSS inline: one file
  that opens anywhere with no network.
- Text from the run (samples, task names) is escaped: in Markdown, raw text goes
  in fences longer than any backtick run inside it; in HTML, everything is escaped.
  Paragraph text written by the report itself may use `code`, **bold** and
  [links](http://...) (http(s) only: MLflow runs).
- A sample shows the prompt, then ⟶ where the model takes over, in both renderings.
- Numbers are formatted by nanoforge/formats.py (one helper for every human view:
  report, terminal, Dagster, the demo table); re-exported here for the sections.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoforge.formats import (  # noqa: F401  (re-exported for the report sections)
    NA, count, duration, finite, nbytes, percent, si, sig, signed, usd,
)

SAMPLE_MARK = "⟶"  # between a sample's prompt and the model's continuation (the report's caption names it)


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
            body = f"{d['prompt']}{SAMPLE_MARK}{d['completion']}" if d["prompt"] else d["completion"]
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
    """Escape, then the markup the report's own prose uses: `code`, **bold**, [text](http://link)."""
    escaped = html.escape(str(text), quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r'\[([^\]]+)\]\((https?://[^)\s"<>]+)\)', r'<a href="\2">\1</a>', escaped)
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
            prompt = f"<b>{html.escape(d['prompt'], quote=False)}</b>{SAMPLE_MARK}" if d["prompt"] else ""
            parts.append(f"<pre>{prompt}{html.escape(d['completion'], quote=False)}</pre>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
