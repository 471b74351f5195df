"""`Report`: sections of figures and tables → PNG + CSV files and one self-contained `index.html`.

Every figure is written with the CSV of every number it plots beside it; images are embedded in the HTML as
base64, so `index.html` can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loopscope.resume import write_atomic

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555;font-size:.92em} figure{margin:1.4em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.93em;color:#333;margin-top:.3em} .files{font-size:.82em;color:#777}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f5f5f5} .note{background:#f8f8f2;border-left:3px solid #bbb;padding:.4em .8em;font-size:.93em}
nav a{margin-right:1em} table.text td{text-align:left;vertical-align:top}
"""


@dataclass
class Figure:
    """A PNG already drawn to `png`, its one-line caption, and the CSV files holding every plotted number."""

    png: Path
    caption: str
    csv: list[Path] = field(default_factory=list)


@dataclass
class Table:
    """A DataFrame shown in the page (first `max_rows` rows) and saved whole as CSV."""

    frame: pd.DataFrame
    caption: str
    csv: Path | None = None
    max_rows: int = 30
    text: bool = False  # left-aligned cells, for tables of sentences rather than numbers


@dataclass
class Section:
    title: str
    intro: str = ""
    items: list[Figure | Table] = field(default_factory=list)


@dataclass
class Report:
    title: str
    out_dir: Path
    meta: dict[str, object] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str, intro: str = "") -> Section:
        self.sections.append(Section(title, intro))
        return self.sections[-1]

    def table(self, section: Section, frame: pd.DataFrame, name: str, caption: str, max_rows: int = 30,
              text: bool = False) -> Table:
        """Save `frame` as tables/NAME.csv and add it to `section`."""
        path = save_csv(frame, self.out_dir, name)
        item = Table(frame, caption, path, max_rows, text)
        section.items.append(item)
        return item

    def child(self, folder: str) -> Report:
        """A report writing its figures and tables under OUT/folder; `adopt` moves its sections into this one.
        Lets one page hold the same section builder's output for several models without overwriting files."""
        return Report(self.title, self.out_dir / folder)

    def adopt(self, child: Report, prefix: str) -> None:
        """Append `child`'s sections (files already under this report's folder), titles prefixed `prefix: `."""
        for sec in child.sections:
            sec.title = f"{prefix}: {sec.title}"
            self.sections.append(sec)

    def write(self) -> Path:
        """Write index.html (self-contained) and report.json (what is where) into out_dir."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        body = [f"<h1>{esc(self.title)}</h1>", meta_html(self.meta), nav_html(self.sections)]
        for n, sec in enumerate(self.sections):
            body.append(f'<h2 id="s{n}">{esc(sec.title)}</h2>')
            if sec.intro:
                body.append(f'<p class="note">{esc(sec.intro)}</p>')
            for item in sec.items:
                body.append(figure_html(item, self.out_dir) if isinstance(item, Figure)
                            else table_html(item, self.out_dir))
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
                f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
        index = self.out_dir / "index.html"
        write_atomic(index, page.encode("utf-8"))
        manifest = {
            "title": self.title, "meta": self.meta,
            "sections": [{"title": s.title, "items": [item_manifest(i, self.out_dir) for i in s.items]}
                         for s in self.sections],
        }
        write_atomic(self.out_dir / "report.json", json.dumps(manifest, indent=1, default=str).encode())
        return index


def save_csv(frame: pd.DataFrame, out_dir: Path, name: str) -> Path:
    """OUT/tables/NAME.csv, written atomically (`resume.write_atomic`): whole or absent, never half a table."""
    path = out_dir / "tables" / f"{name}.csv"
    keep_index = not isinstance(frame.index, pd.RangeIndex)
    write_atomic(path, frame.to_csv(index=keep_index).encode())
    return path


def esc(text: object) -> str:
    return html.escape(str(text))


def meta_html(meta: dict[str, object]) -> str:
    """The report's header: one row per setting; a nested dict (a stream's record, every setting) as a table of its
    own, a list as comma-separated values — never a raw Python dict."""
    if not meta:
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td style='text-align:left'>{meta_value_html(v)}</td></tr>"
                   for k, v in meta.items())
    return f"<table class='meta'>{rows}</table>"


def meta_value_html(value: object) -> str:
    if isinstance(value, dict):
        if not value:
            return "—"
        rows = "".join(f"<tr><th>{esc(k)}</th><td style='text-align:left'>{meta_value_html(v)}</td></tr>"
                       for k, v in value.items())
        return f"<table class='meta'>{rows}</table>"
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value)) if value else "—"
    return "—" if value is None else esc(value)


def nav_html(sections: list[Section]) -> str:
    return "<nav>" + "".join(f'<a href="#s{n}">{esc(s.title)}</a>' for n, s in enumerate(sections)) + "</nav>"


def figure_html(fig: Figure, out_dir: Path) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode()
    files = ", ".join(esc(p.relative_to(out_dir)) for p in [fig.png, *fig.csv])
    return (f"<figure><img alt='{esc(fig.caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(fig.caption)}</figcaption><div class='files'>{files}</div></figure>")


def table_html(table: Table, out_dir: Path) -> str:
    shown = table.frame.head(table.max_rows)
    more = len(table.frame) - len(shown)
    note = f" (first {len(shown)} of {len(table.frame)} rows)" if more > 0 else ""
    path = f"<div class='files'>{esc(table.csv.relative_to(out_dir))}{note}</div>" if table.csv else ""
    body = shown.to_html(float_format=lambda v: f"{v:.4g}", border=0, na_rep="—",
                         classes="text" if table.text else None)
    return f"<figure>{body}<figcaption>{esc(table.caption)}</figcaption>{path}</figure>"


def item_manifest(item: Figure | Table, out_dir: Path) -> dict[str, object]:
    if isinstance(item, Figure):
        return {"figure": str(item.png.relative_to(out_dir)), "caption": item.caption,
                "csv": [str(p.relative_to(out_dir)) for p in item.csv]}
    return {"table": str(item.csv.relative_to(out_dir)) if item.csv else None, "caption": item.caption}
