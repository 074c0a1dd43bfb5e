"""Self-contained HTML reports a person opens in a browser (thumbnails inlined as base64, no external files).

:func:`search_report_html` renders the ``search`` pipeline's answers: every query photo beside its K nearest
catalogue photos with their part names and distances, the verdict (a part name with its vote confidence, or
"unknown part" when the nearest catalogue photo is farther than the threshold), wrong matches marked in red
when the query's true part name is known, and files that could not be read with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from PIL import Image, ImageOps

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem} .meta{color:#555;font-size:.9rem;margin-bottom:1rem}
.meta b{color:#222} table.summary{border-collapse:collapse;margin:.5rem 0 1.2rem;font-size:.9rem}
table.summary td{padding:.15rem .8rem .15rem 0}
section.q{display:flex;gap:1rem;align-items:flex-start;background:#fff;border:1px solid #ddd;border-left:6px solid #999;
  border-radius:6px;padding:.8rem;margin-bottom:.9rem}
section.right{border-left-color:#2e7d32} section.wrong{border-left-color:#c62828}
section.unknown{border-left-color:#ef6c00} section.error{border-left-color:#6d4c41;background:#fbf7f5}
.query{width:var(--px);flex:none} .matches{display:flex;gap:.6rem;flex-wrap:wrap}
figure{margin:0;width:var(--px);font-size:.8rem} figure img,.noimg{width:var(--px);height:var(--px);object-fit:contain;
  background:#fff;border:3px solid #ccc;border-radius:4px;display:block;box-sizing:border-box}
.noimg{display:flex;align-items:center;justify-content:center;text-align:center;color:#888;font-size:.75rem;
  padding:.3rem}
figure.ok img{border-color:#2e7d32} figure.bad img{border-color:#c62828} figure.bad figcaption .name{color:#c62828}
figcaption{margin-top:.2rem;line-height:1.25;word-break:break-word} .name{font-weight:600}
.verdict{font-size:1.05rem;font-weight:700;margin:.3rem 0} .unknown .verdict{color:#ef6c00}
.mark{font-weight:700} .mark.ok{color:#2e7d32} .mark.bad{color:#c62828}
.reason{color:#6d4c41;font-weight:600} .dim{color:#777}
"""


def thumbnail_data_uri(data: bytes, px: int = 112) -> str:
    """A JPEG ``data:`` URI of the photo shrunk to fit ``px`` x ``px`` (EXIF-upright, transparency on white).

    Raises the decoder's exception when ``data`` is not a readable image.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        img = img.convert("RGB")
        img.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _img(uri: str | None, alt: str, reason: str | None = None) -> str:
    if uri:
        return f'<img src="{uri}" alt="{_e(alt)}" title="{_e(alt)}">'
    return f'<div class="noimg">{_e(reason or "no preview")}</div>'


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return "–" if _missing(value) else fmt.format(float(value))


def _query_section(row: Mapping[str, Any], top_k: int, thumbs: Mapping[str, str | None],
                   reasons: Mapping[str, str]) -> str:
    truth = None if _missing(row.get("true_label")) else str(row["true_label"])
    error = None if _missing(row.get("error")) else str(row["error"])
    name = str(row["query"])
    query_fig = (f'<figure class="query">{_img(thumbs.get(row["file"]), name, reasons.get(row["file"]))}'
                 f'<figcaption><span class="name">{_e(name)}</span>'
                 + (f'<br><span class="dim">true part: {_e(truth)}</span>' if truth else "")
                 + "</figcaption></figure>")
    if error is not None:
        body = (f'<div><div class="verdict">could not be read</div><div class="reason">{_e(error)}</div>'
                f'<div class="dim">{_e(row["file"])}</div></div>')
        return f'<section class="q error">{query_fig}{body}</section>'

    unknown = row["verdict"] != "known"
    correct = row.get("correct")
    css = "unknown" if unknown else "known"
    if truth is not None and not _missing(correct):
        css += " right" if bool(correct) else " wrong"
    if unknown:
        verdict = (f'unknown part <span class="dim">(nearest {_num(row["nearest_distance"])} &gt; threshold '
                   f'{_num(row["threshold"])}; closest looks like {_e(row["predicted_label"])})</span>')
    else:
        verdict = (f'{_e(row["predicted_label"])} <span class="dim">confidence {_num(row["confidence"], "{:.0%}")}, '
                   f'nearest {_num(row["nearest_distance"])} ≤ {_num(row["threshold"])}</span>')
    mark = ""
    if truth is not None and not _missing(correct):
        mark = ('<span class="mark ok">✓ right</span>' if bool(correct)
                else f'<span class="mark bad">✗ wrong</span> <span class="dim">(answer should be '
                     f'{_e(row.get("expected_answer") or truth)})</span>')
    figures = []
    for r in range(1, top_k + 1):
        label = row.get(f"match_{r}_label")
        if _missing(label):
            continue
        file = row.get(f"match_{r}_path")
        cls = ""
        tick = ""
        if truth is not None:
            cls = "ok" if label == truth else "bad"
            tick = '<span class="mark ok">✓</span> ' if label == truth else '<span class="mark bad">✗</span> '
        figures.append(f'<figure class="{cls}">{_img(thumbs.get(file), str(label), reasons.get(file))}'
                       f'<figcaption>{tick}<span class="name">{_e(label)}</span><br>#{r} · distance '
                       f'{_num(row.get(f"match_{r}_distance"))}</figcaption></figure>')
    body = (f'<div><div class="verdict">{verdict}</div><div>{mark}</div>'
            f'<div class="matches">{"".join(figures)}</div></div>')
    return f'<section class="q {css}">{query_fig}{body}</section>'


def search_report_html(results: pd.DataFrame, thumbnails: Mapping[str, str | None], summary: Mapping[str, Any],
                       top_k: int, thumbnail_px: int = 112, reasons: Mapping[str, str] | None = None) -> str:
    """The search report as one HTML page.

    Args:
        results: one row per query file, as the ``search`` pipeline's CSV (``query``, ``file``, ``true_label``,
            ``error``, ``predicted_label``, ``verdict``, ``confidence``, ``nearest_distance``, ``threshold``,
            ``correct``, ``expected_answer``, ``match_<r>_label|distance|path`` for r = 1..top_k).
        thumbnails: file path -> ``data:`` URI (see :func:`thumbnail_data_uri`), for queries and matches.
        summary: shown in the header (model, distance, threshold and its source, index size, counts).
        reasons: file path -> why there is no thumbnail (e.g. "catalogue photo not found").
    """
    reasons = reasons or {}
    answered = results[results["error"].isna()] if "error" in results else results
    n_unknown = int((answered["verdict"] != "known").sum()) if len(answered) else 0
    judged = answered[answered["correct"].notna()] if len(answered) else answered
    rows = [("model", summary.get("model")), ("distance", summary.get("distance")),
            ("threshold", f'{_num(summary.get("threshold"))} ({summary.get("threshold_source", "")})'),
            ("catalogue index", f'{summary.get("index_vectors", "?")} photos of {summary.get("index_parts", "?")} '
                                f'part names ({summary.get("index_kind", "")})'),
            ("query photos", f"{len(results)} ({len(results) - len(answered)} unreadable, {n_unknown} unknown part)")]
    if len(judged):
        rows.append(("right answers", f'{int(judged["correct"].astype(bool).sum())} of {len(judged)} photos whose '
                                      "true part is known from their folder"))
    table = "".join(f"<tr><td>{_e(k)}</td><td><b>{_e(v)}</b></td></tr>" for k, v in rows)
    sections = "".join(_query_section(row, top_k, thumbnails, reasons) for row in results.to_dict("records"))
    title = "partmatch — catalogue search"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body style="--px:{int(thumbnail_px)}px"><h1>{_e(title)}</h1>'
            f'<div class="meta">Each query photo with its {int(top_k)} most similar catalogue photos '
            "(smaller distance = more alike). The answer is a distance-weighted vote of the nearest matches; when "
            'even the nearest is farther than the threshold the answer is <b>unknown part</b>. Green ✓ / red ✗ '
            "compare a match with the query's true part, known when the query sits in a folder named after it."
            f'</div><table class="summary">{table}</table>{sections}</body></html>\n')
