"""`controlplane report` as CSV files and as one self-contained HTML page: text out, no I/O.

The HTML page is for an auditor's browser and printer: inline CSS only (no script, no font, no image, no URL
to fetch), so it opens offline, can be attached to a ticket and prints the same. Every value that reaches it
is escaped (`html.escape`, quotes too): audit fields come from requests and tokens an attacker may shape, and a
path holding `<script>` must show as text. Characters a reader cannot see (bidi overrides, zero-width spaces,
controls) are shown as `<U+XXXX>` in HTML and CSV (`visible`), so no value can pass for another. A
Content-Security-Policy meta tag forbids scripts and any fetch as a second wall. Multi-line cells (a
version's access changes) keep their lines (CSS `white-space: pre-wrap`).

CSV: one file per section, `<section>.csv`, header row of column keys, then the rows; plus `summary.csv`
(name, value) and `index.csv` (section, title, rows, more): a spreadsheet-free auditor reads the HTML, a
spreadsheet reads these. Cells that a spreadsheet would run as a formula (leading `=`, `+`, `-`, `@`, tab, CR)
are prefixed with `'`: audit values are attacker-influenced here too.
"""

from __future__ import annotations

import csv
import html
import io
import re
import unicodedata
from collections.abc import Iterable

from controlplane.audit.report import Report, Section, cell_text, format_time

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1b1f24;
       background: #ffffff; font-size: 13px; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 17px; margin: 28px 0 6px 0; border-bottom: 2px solid #1f3a5f; padding-bottom: 3px; }
p.about { margin: 2px 0; color: #444c56; }
table { border-collapse: collapse; margin: 8px 0; width: 100%; }
th { background: #1f3a5f; color: #ffffff; text-align: left; padding: 4px 6px; font-weight: 600; }
td { border: 1px solid #c9d1d9; padding: 3px 6px; vertical-align: top; white-space: pre-wrap;
     word-break: break-word; }
tbody tr:nth-child(even) td { background: #eef2f7; }
td.count { text-align: right; font-variant-numeric: tabular-nums; }
td.time, td.id { white-space: nowrap; }
table.summary { width: auto; }
table.summary th { background: #dde5ef; color: #1b1f24; }
p.more { font-style: italic; color: #8a3b12; margin: 2px 0 8px 0; }
p.empty { color: #57606a; }
ul.notes li { margin: 3px 0; }
@media print {
  body { margin: 0; font-size: 10px; }
  h2 { break-after: avoid; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; }
  th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


# Characters a reader cannot see, or that reorder what is around them: controls (but the newline of a
# multi-line cell), format characters (bidi overrides and isolates, zero-width spaces and joiners), surrogates,
# private use, line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_NOT_PLAIN = re.compile(r"[^\n\x20-\x7e]")


def visible(text: str) -> str:
    """`text` with every character a reader cannot see shown as `<U+XXXX>`. Audit values come from tokens a
    job shapes (a branch may be named "\u202eniam", which a browser or a spreadsheet draws as "main") and
    commits anyone with push rights writes: what the auditor reads must be what was recorded. The JSON keeps
    the exact values (escaped, as JSON writes every non-ASCII character)."""
    return _NOT_PLAIN.sub(_shown, text)


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    return f"<U+{ord(char):04X}>" if unicodedata.category(char) in _HIDDEN_CATEGORIES else char


def _e(text: object) -> str:
    return html.escape(visible(str(text)), quote=True)


def render_html(report: Report) -> str:
    window = f"{format_time(report.since)} to {format_time(report.until)}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Access report {_e(window)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Access report: {_e(window)}</h1>",
        f'<p class="about">Generated {_e(format_time(report.generated))} by controlplane report.</p>',
        '<table class="summary" id="summary"><tbody>',
        *(
            f"<tr><th>{_e(name)}</th><td>{_e('' if value is None else value)}</td></tr>"
            for name, value in ((key.replace("_", " "), value) for key, value in report.summary)
        ),
        "</tbody></table>",
    ]
    for section in report.sections:
        parts.extend(_section_html(section))
    parts.append("<h2>Not recorded, so not reported</h2>")
    parts.append('<ul class="notes">')
    parts.extend(f"<li>{_e(note)}</li>" for note in report.not_recorded)
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _section_html(section: Section) -> Iterable[str]:
    yield f'<h2 id="{_e(section.key)}">{_e(section.title)}</h2>'
    yield from (f'<p class="about">{_e(line)}</p>' for line in section.about)
    if not section.rows:
        yield '<p class="empty">None in the window.</p>'
    else:
        yield f'<table id="table-{_e(section.key)}"><thead><tr>'
        yield "".join(f"<th>{_e(c.title)}</th>" for c in section.columns)
        yield "</tr></thead><tbody>"
        for row in section.rows:
            cells = (f'<td class="{c.kind}">{_e(cell_text(c, row.get(c.key)))}</td>' for c in section.columns)
            yield f"<tr>{''.join(cells)}</tr>"
        yield "</tbody></table>"
    if section.more:
        yield f'<p class="more">{section.more} more not shown (raise --max-rows, or narrow --since).</p>'


_FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(text: str) -> str:
    text = visible(text)
    return "'" + text if text.startswith(_FORMULA_LEAD) else text


def _csv(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows([_csv_cell(cell) for cell in row] for row in rows)
    return out.getvalue()


def render_csv(report: Report) -> dict[str, str]:
    """File name -> content: one per section, `summary.csv` and `index.csv`."""
    files = {
        "summary.csv": _csv(("name", "value"), ((n, "" if v is None else str(v)) for n, v in report.summary)),
        "index.csv": _csv(
            ("section", "title", "rows", "more"),
            ((s.key, s.title, str(len(s.rows)), str(s.more)) for s in report.sections),
        ),
        "not_recorded.csv": _csv(("not_recorded",), ((note,) for note in report.not_recorded)),
    }
    for section in report.sections:
        files[f"{section.key}.csv"] = _csv(
            (c.key for c in section.columns),
            ([cell_text(c, row.get(c.key)) for c in section.columns] for row in section.rows),
        )
    return files
