"""``report.html``: one self-contained page (inline CSS and JavaScript, images as base64 PNG
data URIs, nothing fetched) that a reader opens in any browser.

- :func:`prediction_report_html`: ``unet-jax predict``'s per-image table (the rows of
  ``predictions.csv``) with a thumbnail of each overlay; a click on a column header sorts the
  rows by it (numbers as numbers, text as text, empty cells last).
- :func:`evaluation_report_html`: ``unet-jax evaluate``'s metrics with their bootstrap 95%
  confidence intervals (the two rates: Wilson intervals), the per-class table, the
  classification scores, and every case from the worst Dice to the best with the predicted
  (red) and ground-truth (green) contours.

The HTML builders are pure (rows in, a string out); every text is escaped
(:func:`html.escape`), so a file name holding ``<`` or ``&`` stays text. The writers build
the whole page first and then write it atomically (:func:`unet_jax._io.write_text`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_jax._io import write_text
from unet_jax.metrics import CLASSES, METRICS, resize_mask
from unet_jax.plots import GT_COLOR, PRED_COLOR, contour_overlay

__all__ = [
    "CASE_SIDE",
    "GENERATOR",
    "REPORT_NAME",
    "THUMBNAIL_SIDE",
    "case_collector",
    "case_thumbnail",
    "check_report_folder",
    "is_own_report",
    "evaluation_report_html",
    "png_data_uri",
    "prediction_report_html",
    "table_html",
    "thumbnail",
    "write_evaluation_report",
    "write_prediction_report",
]

REPORT_NAME = "report.html"
# Every page's mark (a <meta name="generator">): a later run replaces only a report.html it wrote.
GENERATOR = '<meta name="generator" content="unet-jax">'
THUMBNAIL_SIDE = 160  # predict: the overlay's longer side in the table, in pixels
CASE_SIDE = 200  # evaluate: a case's longer side (contours drawn at this size)
# predict's path columns: shown as the thumbnail (overlay) or not at all (the files sit beside
# the report; the input's name is its own column).
_PREDICT_HIDDEN = ("mask", "overlay", "probability", "seg", "recipe")
_METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "pixel_accuracy": "pixel accuracy",
    "precision": "precision",
    "recall": "recall",
    "hd95": "HD95 (px)",
}
_CASE_COLUMNS = ("id", "class", *METRICS, "gt_area", "pred_area")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#111;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:middle}
th{background:#f0f0f0;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th button{all:unset;cursor:pointer;font-weight:bold}
th[aria-sort=ascending] button::after{content:" \\25B2"}
th[aria-sort=descending] button::after{content:" \\25BC"}
img.thumb{display:block}
.meta{color:#444}.swatch{display:inline-block;width:1em;height:0.25em;vertical-align:middle;margin:0 0.3em}
""".strip()

# Sorts every ``table.sortable`` by a clicked header: numbers (th data-type="number") by
# value, text by locale order with digits as numbers; empty cells last either way; ties keep
# the page's original order (a stable sort on the rows' first index).
_JS = """
(function () {
  function key(row, col) { return row.cells[col].getAttribute("data-sort"); }
  function sortBy(table, th) {
    var col = th.cellIndex, numeric = th.getAttribute("data-type") === "number";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { if (r.dataset.index === undefined) { r.dataset.index = i; } });
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col), c;
      if (x === "" || y === "") { c = (x === "") - (y === ""); }
      else if (numeric) { c = dir * (parseFloat(x) - parseFloat(y)); }
      else { c = dir * x.localeCompare(y, undefined, {numeric: true}); }
      return c || a.dataset.index - b.dataset.index;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable th[data-type] button").forEach(function (button) {
    button.addEventListener("click", function () {
      var th = button.parentNode;
      sortBy(th.closest("table"), th);
    });
  });
})();
""".strip()


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 ``(H, W)`` or ``(H, W, 3)`` array as ``data:image/png;base64,...``."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fit(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side ``max_side`` and the aspect kept (each side >= 1)."""
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def thumbnail(image: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """``image`` (uint8 ``(H, W[, 3])``) shrunk so its longer side is at most ``max_side``
    (aspect kept, Lanczos); a smaller image is returned as it is, never enlarged."""
    a = np.asarray(image)
    if max(a.shape[:2]) <= max_side:
        return a
    h, w = _fit(a.shape[0], a.shape[1], max_side)
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.LANCZOS))


def case_thumbnail(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, max_side: int = CASE_SIDE) -> str:
    """One evaluated case as a PNG data URI: ``image`` resized to the masks' aspect with the
    longer side ``max_side``, the ground truth's contour in green and the prediction's in red
    (:data:`unet_jax.plots.GT_COLOR`, :data:`~unet_jax.plots.PRED_COLOR`; 1 pixel at this size).

    ``image``: uint8 ``(h, w[, 1 or 3])`` at any size (e.g. the model's input size); ``pred``,
    ``gt``: bool ``(H, W)`` masks of one size (e.g. the image's native size). The masks are
    resized smoothly (:func:`unet_jax.metrics.resize_mask`) before their contours are drawn.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction of shape {pred.shape} and ground truth of shape {gt.shape}; expected one shape")
    size = _fit(pred.shape[0], pred.shape[1], max_side)
    a = np.asarray(image)
    a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
    rgb = np.asarray(Image.fromarray(a).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR))
    contours = [(resize_mask(gt, size), GT_COLOR), (resize_mask(pred, size), PRED_COLOR)]
    return png_data_uri(contour_overlay(rgb, contours))


def case_collector(
    ids: Sequence[str], images: np.ndarray, max_side: int = CASE_SIDE
) -> tuple[dict[str, str], Callable[[Mapping[str, Any], np.ndarray, np.ndarray], None]]:
    """(thumbnails by id, a callback filling it): pass the callback as
    :func:`unet_jax.evaluate.evaluate_dataset`'s ``on_case``, so that each case's
    :func:`case_thumbnail` is drawn as it is scored and no mask is kept. ``images[n]`` is the
    image of ``ids[n]`` (e.g. a dataset's ``images_u8``, at the model's input size)."""
    position: dict[str, int] = {k: n for n, k in enumerate(ids)}
    thumbnails: dict[str, str] = {}

    def keep(row: Mapping[str, Any], pred: np.ndarray, gt: np.ndarray) -> None:
        thumbnails[str(row["id"])] = case_thumbnail(images[position[row["id"]]], pred, gt, max_side)

    return thumbnails, keep


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _cell(value: Any) -> tuple[str, str]:
    """(shown text, sort key) of one value: empty for None/NaN, yes/no for booleans, floats
    to 3 decimals (1 from 100 up), the full value as the numeric sort key."""
    if value is None or (_is_number(value) and not math.isfinite(float(value))):
        return ("" if value is None else str(float(value))), ""
    if isinstance(value, bool | np.bool_):
        return ("yes" if value else "no"), ("yes" if value else "no")
    if _is_number(value):
        v = float(value)
        if isinstance(value, int | np.integer):
            return str(int(value)), repr(v)
        return (f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"), repr(v)
    return str(value), str(value)


def table_html(
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    labels: Mapping[str, str] | None = None,
    thumbnails: Sequence[str | None] | None = None,
    table_id: str = "table",
) -> str:
    """A sortable ``<table>``: one header cell per column (``data-type`` "number" when every
    value present is a number, else "text"), one row per row in order, each cell with its
    sort key in ``data-sort``. ``thumbnails``: one PNG data URI (or None) per row, shown in a
    first, unsorted "overlay" column."""
    labels = labels or {}
    if thumbnails is not None and len(thumbnails) != len(rows):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(rows)} rows; expected one per row")
    kinds = {}
    for c in columns:
        present = [r.get(c) for r in rows if r.get(c) is not None]
        kinds[c] = "number" if present and all(_is_number(v) for v in present) else "text"
    head = ['<th scope="col">overlay</th>'] if thumbnails is not None else []
    head += [
        f'<th scope="col" data-type="{kinds[c]}"><button type="button">{html.escape(labels.get(c, c))}</button></th>'
        for c in columns
    ]
    body = []
    for n, row in enumerate(rows):
        cells = []
        if thumbnails is not None:
            uri = thumbnails[n]
            cells.append(f'<td><img class="thumb" alt="overlay" src="{uri}"></td>' if uri else "<td></td>")
        for c in columns:
            text, key = _cell(row.get(c))
            cls = ' class="num"' if kinds[c] == "number" else ""
            cells.append(f'<td{cls} data-sort="{html.escape(key)}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="sortable" id="{html.escape(table_id)}"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>\n{chr(10).join(body)}\n</tbody></table>"
    )


def _page(title: str, sections: Sequence[str]) -> str:
    """The whole HTML document: ``sections`` (HTML) under an escaped ``title``."""
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{GENERATOR}\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + f"\n<script>\n{_JS}\n</script>\n</body>\n</html>\n"
    )


def _meta(items: Sequence[tuple[str, Any]]) -> str:
    lines = [f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in items if v is not None]
    return '<ul class="meta">' + "".join(lines) + "</ul>"


def prediction_report_html(rows: Sequence[Mapping[str, Any]], thumbnails: Sequence[str | None]) -> str:
    """``unet-jax predict``'s report: the table rows (``predictions.json``'s, in order) with
    one overlay thumbnail (a PNG data URI, or None for an input not predicted) each.

    Every column of the rows is shown except the output paths (``mask``, ``overlay``,
    ``probability``: the files beside the report) and ``recipe``, listed once above the table.
    """
    columns = [c for c in (rows[0] if rows else {}) if c not in _PREDICT_HIDDEN]
    recipes = sorted({str(r["recipe"]) for r in rows if r.get("recipe") is not None})
    predicted = sum(1 for r in rows if r.get("mask"))
    meta = _meta([("images", f"{len(rows)} input(s), {predicted} predicted"), ("recipe", "; ".join(recipes) or None)])
    hint = "<p>Click a column header to sort by it (again: reverse). Red: the predicted lesion's contour.</p>"
    return _page("unet-jax predict: report", [meta, hint, table_html(columns, rows, thumbnails=thumbnails)])


def write_prediction_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` for predict's table ``rows`` (each with the ``overlay``
    path it wrote, or None), each overlay shrunk to :data:`THUMBNAIL_SIDE` pixels."""
    thumbnails = []
    for row in rows:
        overlay = row.get("overlay")
        if overlay is None:
            thumbnails.append(None)
            continue
        with Image.open(overlay) as im:
            thumbnails.append(png_data_uri(thumbnail(np.asarray(im.convert("RGB")))))
    return write_text(Path(out_dir) / REPORT_NAME, prediction_report_html(rows, thumbnails))


def _ci(summary: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``mean [ci_low, ci_high]`` of one summary; "-" when it has no value."""
    if not summary or summary.get("n", 0) == 0 or summary.get("mean") is None:
        return "-"
    lo, hi = summary.get("ci_low"), summary.get("ci_high")
    ci = "" if lo is None or hi is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{summary['mean']:.{digits}f}{ci}"


def _rate(r: Mapping[str, Any] | None) -> str:
    if not r or not r.get("n"):
        return "-"
    return _ci({"mean": r["rate"], "n": r["n"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}) + (
        f" ({r['count']}/{r['n']})"
    )


def _static_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metric_sections(report: Mapping[str, Any]) -> list[str]:
    """The summary (lesion images, the two rates) and the per-class table, every value a
    mean with its bootstrap 95% CI, a rate with its Wilson 95% CI (count/n)."""
    lesion = [(_METRIC_LABELS[m], _ci(report[m]["summary"].get("lesion"))) for m in METRICS if m in report]
    summary_rows = [
        *((f"{label}, lesion images", value) for label, value in lesion),
        ("normal images with a false positive", _rate(report.get("normal_false_positive"))),
        ("lesion images predicted empty", _rate(report.get("lesion_empty_prediction"))),
    ]
    counts = report.get("images", {})
    groups = [g for g in ("overall", "lesion", *CLASSES) if g in counts]
    per_class = [
        [g, str(counts[g]), *(_ci(report[m]["summary"].get(g)) for m in METRICS if m in report)] for g in groups
    ]
    header = ["group", "images", *(_METRIC_LABELS[m] for m in METRICS if m in report)]
    return [
        "<h2>Metrics: mean [95% bootstrap CI]; rates: rate [95% Wilson CI] (count/n)</h2>",
        _static_table(["metric", "value"], summary_rows, "metrics"),
        "<h2>Per class: mean [95% bootstrap CI]</h2>",
        _static_table(header, per_class, "per-class"),
    ]


def _classification_section(c: Mapping[str, Any]) -> list[str]:
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [
        ["images", str(c.get("n"))],
        ["accuracy", num(c.get("accuracy"))],
        ["loss", num(c.get("loss"))],
        ["malignant-vs-rest AUC", num(c.get("malignant_vs_rest_auc"))],
        *([f"recall {k}", num(v)] for k, v in c.get("per_class_recall", {}).items()),
    ]
    return ["<h2>Image classification (class head)</h2>", _static_table(["metric", "value"], rows, "classification")]


def _worst_first(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The cases from the lowest Dice to the highest (ties and missing Dice: input order,
    missing last)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("dice") is None, rows[i].get("dice") or 0.0, i))
    return [rows[i] for i in order]


def evaluation_report_html(report: Mapping[str, Any], thumbnails: Mapping[str, str] | None = None) -> str:
    """``unet-jax evaluate``'s report from its JSON object (:func:`unet_jax.evaluate.evaluation_report`
    plus ``checkpoint``, ``recipe_description`` and ``classification`` when present):
    the metrics with their CIs, the per-class table, the classification scores, and the cases
    (``per_image``) from the worst Dice to the best, each with ``thumbnails[id]`` (a PNG data URI
    from :func:`case_thumbnail`) when given."""
    sections = [
        _meta(
            [
                ("data", report.get("source")),
                ("checkpoint", report.get("checkpoint")),
                ("resolution", report.get("resolution")),
                ("recipe", report.get("recipe_description")),
            ]
        )
    ]
    if "per_image" in report:
        sections += _metric_sections(report)
    if "classification" in report:
        sections += _classification_section(report["classification"])
    if "per_image" in report:
        cases = _worst_first(report["per_image"])
        thumbs = None if thumbnails is None else [thumbnails.get(str(r["id"])) for r in cases]
        legend = (
            '<p>From the worst Dice to the best (click a header to sort). Contours: <span class="swatch" '
            f'style="background:rgb{GT_COLOR}"></span>ground truth <span class="swatch" '
            f'style="background:rgb{PRED_COLOR}"></span>prediction.</p>'
        )
        labels = {m: _METRIC_LABELS[m] for m in METRICS} | {
            "gt_area": "GT area (px)",
            "pred_area": "predicted area (px)",
        }
        sections += [
            "<h2>Cases</h2>",
            legend,
            table_html(_CASE_COLUMNS, cases, labels=labels, thumbnails=thumbs, table_id="cases"),
        ]
    return _page("unet-jax evaluate: report", sections)


def write_evaluation_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike, thumbnails: Mapping[str, str] | None = None
) -> Path:
    """Write ``out_dir/report.html`` (:func:`evaluation_report_html`); ``out_dir`` is created."""
    check_report_folder(out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_text(Path(out_dir) / REPORT_NAME, evaluation_report_html(report, thumbnails))


def check_report_folder(out_dir: str | os.PathLike) -> None:
    """Raise ValueError unless ``out_dir`` is a folder or can be created as one (nothing
    is created here), and holds no ``report.html`` that this package did not write, so that
    a bad ``--report`` fails before any work and never replaces a user's file."""
    path = Path(out_dir)
    existing = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(
            f"report folder {str(out_dir)!r}: {str(existing)!r} is a file; expected a folder (created if missing)"
        )
    if (path / REPORT_NAME).exists() and not is_own_report(path / REPORT_NAME):
        raise ValueError(
            f"report folder {str(out_dir)!r} holds {REPORT_NAME!r}, which unet-jax did not write and the "
            f"report would overwrite; expected another folder (or move that file)"
        )


def is_own_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a report.html this package wrote (its head holds :data:`GENERATOR`)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return GENERATOR in f.read(4096)
    except OSError:
        return False
