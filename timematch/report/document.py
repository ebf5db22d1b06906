"""The report as one list of sections, rendered from that one structure to Markdown and to a
self-contained HTML page (:class:`Document`).

Each part of the report owns its section: the results table (``ResultTable.section``), the
selection gap and the paired comparison (``SelectionGap.section``,
``PairedComparison.section``), the hyper-parameter importance
(:func:`timematch.importance.importance_section`); the runner puts them in order with the
figures. The Markdown links each figure by its path relative to ``report.md`` (GitHub, an
editor, a file browser show it); the HTML embeds it as a ``data:`` URI, so the one file shows
everything where only that file is served (MLflow's artifact preview)::

    Document("timematch-quick", [table.section(), gap.section(), ...]).to_markdown()
    Document(...).to_html()
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: A table column's alignment: its Markdown separator
ALIGNMENTS = {"left": "---", "center": ":-:", "right": "---:"}


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A list of plain-text items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table of plain-text cells; ``bold`` holds the (row, column) indices of the cells shown in
    bold, ``align`` a key of :data:`ALIGNMENTS` per column (default: the first column left, the others
    centred)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: tuple[str, ...] = ()
    bold: frozenset[tuple[int, int]] = frozenset()

    def alignment(self, column: int) -> str:
        if self.align:
            return self.align[column]
        return "left" if column == 0 else "center"


@dataclass(frozen=True)
class Figure:
    """A PNG of the report: ``path`` on disk, ``link`` its path relative to ``report.md``."""

    path: Path
    link: str
    caption: str


Block = Text | Bullets | Table | Figure


@dataclass(frozen=True)
class Section:
    """A heading and its blocks, in order."""

    heading: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    def to_markdown(self, heading: bool = True) -> str:
        """The section as Markdown (``heading=False``: its blocks only)."""
        parts = [f"## {self.heading}"] if heading else []
        parts += [_markdown(block) for block in self.blocks]
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        return "\n".join([f"<h2>{html.escape(self.heading)}</h2>", *(_html(block) for block in self.blocks)])


@dataclass(frozen=True)
class Document:
    """A titled list of sections; :meth:`to_markdown` and :meth:`to_html` render the same content."""

    title: str
    sections: Sequence[Section]
    #: One line under the title of the Markdown only: where the figures are shown inline
    markdown_preface: str = ""

    def to_markdown(self, preface: bool = True) -> str:
        """The document as Markdown (``preface=False``: without :attr:`markdown_preface`, for a terminal)."""
        head = f"# {self.title}\n\n" + (f"{self.markdown_preface}\n\n" if self.markdown_preface and preface else "")
        return head + "\n".join(section.to_markdown() for section in self.sections)

    def to_html(self) -> str:
        body = "\n".join(section.to_html() for section in self.sections)
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )


STYLE = (
    "body{font-family:sans-serif;margin:16px;line-height:1.4}"
    ".table{overflow-x:auto}table{border-collapse:collapse;margin:8px 0;font-size:90%}"
    "th,td{border:1px solid #999;padding:4px 8px}th{background:#eee}"
    "figure{margin:12px 0}img{max-width:100%}figcaption{color:#555;font-size:90%}"
)


def _markdown(block: Block) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(block.header) + " |",
                 "|" + "|".join(ALIGNMENTS[block.alignment(c)] for c in range(len(block.header))) + "|"]
        for r, row in enumerate(block.rows):
            cells = [f"**{text}**" if (r, c) in block.bold else text for c, text in enumerate(row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.link})"
    raise TypeError(f"not a block of a report: {block!r}")


def _html(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        def cell(tag: str, text: str, column: int, bold: bool = False) -> str:
            shown = f"<b>{html.escape(text)}</b>" if bold else html.escape(text)
            return f'<{tag} style="text-align:{block.alignment(column)}">{shown}</{tag}>'

        head = "".join(cell("th", text, c) for c, text in enumerate(block.header))
        body = "".join(
            "<tr>" + "".join(cell("td", text, c, (r, c) in block.bold) for c, text in enumerate(row)) + "</tr>"
            for r, row in enumerate(block.rows))
        return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Figure):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        caption = html.escape(block.caption)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption} ({html.escape(block.link)})</figcaption></figure>")
    raise TypeError(f"not a block of a report: {block!r}")
