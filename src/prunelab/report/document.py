"""A report as a list of parts, and the two renderers (Markdown, self-contained HTML).

Building the content once and rendering it twice keeps report.md and report.html saying the
same thing; the HTML embeds each figure as a base64 data URI so the one file can be mailed.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

_STYLE = (
    "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
    "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
    "figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:48%}figure img{max-width:100%}"
    "figcaption{font-size:12px;color:#555}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
    ".note{color:#a33;font-size:13px}</style>"
)


@dataclass
class Heading:
    title: str


@dataclass
class Text:
    lines: list[str]
    hard_breaks: bool = False  # Markdown: keep the line breaks (two trailing spaces)


@dataclass
class Table:
    header: list[str]
    body: list[list[str]]


@dataclass
class Figure:
    name: str  # file name in report_files/
    caption: str
    png: bytes | None = None
    path: Path | None = None  # an existing PNG (analysis plots)

    def data(self) -> bytes:
        return self.png if self.png is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]


@dataclass
class Notes:
    """What is missing or failed in a section (a list in Markdown, red lines in HTML)."""

    items: list[str] = field(default_factory=list)


@dataclass
class Code:
    text: str
    language: str = ""


Part = Heading | Text | Table | Figure | Notes | Code


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def html_table(header: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>"


def _md(part: Part) -> list[str]:
    match part:
        case Heading(title):
            return [f"## {title}", ""]
        case Text(lines, hard_breaks):
            return [f"{line}  " if hard_breaks else line for line in lines] + [""]
        case Table(header, body):
            return [md_table(header, body), ""]
        case Figure():
            return [f"![{part.caption}](report_files/{part.name})", "", f"*{part.caption}*", ""]
        case Notes(items):
            return [f"- {n}" for n in items] + ([""] if items else [])
        case Code(text, language):
            return [f"```{language}", text.rstrip(), "```", ""]
    raise TypeError(f"not a report part: {part!r}")


def _html(part: Part) -> list[str]:
    match part:
        case Heading(title):
            return [f"<h2>{html.escape(title)}</h2>"]
        case Text(lines):
            return [f"<p>{html.escape(line)}</p>" for line in lines]
        case Table(header, body):
            return [html_table(header, body)]
        case Figure():
            b64 = base64.b64encode(part.data()).decode("ascii")
            return [f"<figure><img alt='{html.escape(part.caption, quote=True)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{html.escape(part.caption)}</figcaption></figure>"]
        case Notes(items):
            return [f"<p class='note'>{html.escape(note)}</p>" for note in items]
        case Code(text):
            return [f"<pre>{html.escape(text)}</pre>"]
    raise TypeError(f"not a report part: {part!r}")


def render_markdown(title: str, parts: list[Part]) -> str:
    return "\n".join([f"# {title}", "", *(line for part in parts for line in _md(part))])


def render_html(title: str, parts: list[Part], comment: str = "") -> str:
    """One self-contained page (figures inline); `comment` ends up in an HTML comment for tools."""
    head = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            _STYLE + "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    tail = [f"<!-- {html.escape(comment)} -->"] if comment else []
    return "\n".join([*head, *(line for part in parts for line in _html(part)), *tail, "</body></html>"])
