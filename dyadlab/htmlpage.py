"""Self-contained HTML pages (figures inline), readable offline and printable:
the cohort report and the dyad page share these pieces."""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from matplotlib.figure import Figure

CSS = """
body{font-family:Georgia,'Times New Roman',serif;max-width:1100px;margin:2em auto;color:#111;line-height:1.45}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
caption{text-align:left;font-style:italic;padding-bottom:.4em}
thead th{border-top:2px solid #000;border-bottom:1px solid #000;padding:.3em .7em;text-align:left}
tbody td{padding:.25em .7em} tbody tr:last-child td{border-bottom:2px solid #000}
tr.sig td{font-weight:bold} .note{font-size:.88em;color:#333} img{max-width:100%}
"""


def png(fig: Figure) -> bytes:
    """A matplotlib figure as PNG bytes, without software metadata."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def table(df: pd.DataFrame, caption: str, table_id: str, bold: pd.Series | None = None) -> str:
    """An APA-looking table; rows where `bold` is true are set in bold."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        cls = ' class="sig"' if bold is not None and bool(bold.iloc[i]) else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>")
    return (
        f'<table id="{table_id}"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
        f"</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>"
    )


def para(text: str, cls: str = "") -> str:
    return f"<p{f' class={cls!r}' if cls else ''}>{html.escape(text)}</p>"
