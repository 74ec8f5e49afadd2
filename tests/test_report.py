"""report.html: its structure, parsed with the standard library's html.parser (one table for
predict, the header cells, one row per image in order, every thumbnail a PNG data URI that
decodes to the expected pixels, text escaped); evaluate's CIs, per-class table and cases from
the worst Dice to the best. tests/browser_check.py (run by .ci/run) opens the pages in
Chromium and clicks."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from _train_helpers import save_untrained_run
from PIL import Image

from unet_jax import metrics as M
from unet_jax.cli import main
from unet_jax.data import write_phantom
from unet_jax.inference import export_model, load
from unet_jax.plots import GT_COLOR, PRED_COLOR
from unet_jax.report import (
    CASE_SIDE,
    THUMBNAIL_SIDE,
    case_thumbnail,
    evaluation_report_html,
    png_data_uri,
    prediction_report_html,
    thumbnail,
)


class _Tables(HTMLParser):
    """Every <table>: its class, header cells (text, attributes) and body rows (cells of
    text, attributes and image sources); every tag seen (to catch unescaped text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.tags: list[str] = []
        self._cell: dict | None = None
        self._part = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "id": attrs.get("id"), "head": [], "rows": []})
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr" and self._part == "tbody":
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = {"text": "", "attrs": attrs, "imgs": []}
            (self.tables[-1]["head"] if tag == "th" else self.tables[-1]["rows"][-1]).append(self._cell)
        elif tag == "img" and self._cell is not None:
            self._cell["imgs"].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    parser.close()
    return parser


def _decode(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def _column(table: dict, name: str) -> list[str]:
    names = [c["text"] for c in table["head"]]
    return [row[names.index(name)]["text"] for row in table["rows"]]


# ---- pure builders ----------------------------------------------------------------------
def test_prediction_table_has_one_row_per_image_in_order_with_escaped_text():
    rows = [
        {
            "input": "x/<b>bold</b>&amp.png",
            "mask": "m1",
            "overlay": "o1",
            "recipe": "raw",
            "area_px": 12,
            "p": 0.25,
            "error": None,
        },
        {"input": "y.png", "mask": "m2", "overlay": "o2", "recipe": "raw", "area_px": 3, "p": None, "error": None},
        {"input": "z.png", "mask": None, "overlay": None, "recipe": None, "area_px": None, "p": None, "error": "bad"},
    ]
    image = np.arange(200 * 320 * 3, dtype=np.uint8).reshape(200, 320, 3)
    thumbs = [png_data_uri(thumbnail(image)), png_data_uri(image[:10, :10]), None]
    parsed = _parse(prediction_report_html(rows, thumbs))
    assert len(parsed.tables) == 1 and "b" not in parsed.tags  # the file name stayed text
    table = parsed.tables[0]
    assert [c["text"] for c in table["head"]] == ["overlay", "input", "area_px", "p", "error"]
    assert [c["attrs"].get("data-type") for c in table["head"]] == [None, "text", "number", "number", "text"]
    assert _column(table, "input") == ["x/<b>bold</b>&amp.png", "y.png", "z.png"]
    assert _column(table, "area_px") == ["12", "3", ""] and _column(table, "p") == ["0.250", "", ""]
    assert [r[2]["attrs"]["data-sort"] for r in table["rows"]] == ["12.0", "3.0", ""]
    first = _decode(table["rows"][0][0]["imgs"][0])
    assert first.shape == (100, THUMBNAIL_SIDE, 3)  # 320x200 shrunk to 160 wide, aspect kept
    np.testing.assert_array_equal(_decode(table["rows"][1][0]["imgs"][0]), image[:10, :10])  # never enlarged
    assert table["rows"][2][0]["imgs"] == []  # not predicted: no thumbnail
    assert "recipe: raw" in prediction_report_html(rows, thumbs)


def _evaluation(rows: list[dict]) -> dict:
    agg = M.aggregate(rows, n_boot=200, seed=0)
    report = {"source": "data/<&>", "resolution": "native", "images": agg["counts"], "per_image": rows}
    for metric in M.METRICS:
        report[metric] = {"summary": agg[metric]}
    report["normal_false_positive"] = agg["normal_false_positive_rate"]
    report["lesion_empty_prediction"] = agg["lesion_empty_prediction_rate"]
    return M.to_jsonable(report)


def _case_rows() -> list[dict]:
    shapes = {"benign (1)": (2, 6), "benign (2)": (6, 6), "malignant (1)": (0, 6), "normal (1)": (0, 0)}
    rows = []
    for (id_, (pred_rows, gt_rows)), cls in zip(shapes.items(), ("benign", "benign", "malignant", "normal")):
        pred, gt = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
        pred[:pred_rows, :5], gt[:gt_rows, :5] = True, True
        rows.append({"id": id_, "class": cls, **M.image_metrics(pred, gt)})
    return rows  # Dice 0.5, 1, 0, 1 (an empty normal image predicted empty)


def test_evaluation_report_has_cis_the_per_class_table_and_cases_worst_first():
    report = _evaluation(_case_rows())
    thumbs = {r["id"]: png_data_uri(np.full((4, 5, 3), n, np.uint8)) for n, r in enumerate(report["per_image"])}
    page = evaluation_report_html(report, thumbs)
    parsed = _parse(page)
    by_class = {t["class"]: t for t in parsed.tables}
    assert set(by_class) == {"metrics", "per-class", "sortable"}
    dice = report["dice"]["summary"]
    lesion = f"{dice['lesion']['mean']:.3f} [{dice['lesion']['ci_low']:.3f}, {dice['lesion']['ci_high']:.3f}]"
    assert ("Dice, lesion images", lesion) in [(r[0]["text"], r[1]["text"]) for r in by_class["metrics"]["rows"]]
    per_class = {r[0]["text"]: [c["text"] for c in r] for r in by_class["per-class"]["rows"]}
    assert list(per_class) == ["overall", "lesion", "benign", "malignant", "normal"]
    benign = dice["benign"]
    assert per_class["benign"][:3] == ["benign", "2", f"0.750 [{benign['ci_low']:.3f}, {benign['ci_high']:.3f}]"]
    assert per_class["malignant"][2] == "0.000 [0.000, 0.000]"
    cases = by_class["sortable"]
    assert _column(cases, "id") == ["malignant (1)", "benign (1)", "benign (2)", "normal (1)"]  # ties: input order
    assert _column(cases, "Dice") == ["0.000", "0.500", "1.000", "1.000"]
    shades = [int(_decode(row[0]["imgs"][0])[0, 0, 0]) for row in cases["rows"]]
    assert shades == [2, 0, 1, 3]  # each case's own thumbnail
    assert "data/&lt;&amp;&gt;" in page and f"rgb{GT_COLOR}" in page and f"rgb{PRED_COLOR}" in page


def test_case_thumbnail_draws_the_ground_truth_green_and_the_prediction_red_on_top():
    gt, pred = np.zeros((20, 40), bool), np.zeros((20, 40), bool)
    gt[4:16, 4:20], pred[4:16, 24:36] = True, True
    image = np.full((10, 10), 90, np.uint8)  # e.g. the model's input size: resized to 40x20
    out = _decode(case_thumbnail(image, pred, gt, max_side=40))
    assert out.shape == (20, 40, 3)
    np.testing.assert_array_equal(np.all(out == GT_COLOR, axis=-1), M.boundary(gt))
    np.testing.assert_array_equal(np.all(out == PRED_COLOR, axis=-1), M.boundary(pred))
    assert np.all(out[~(M.boundary(gt) | M.boundary(pred))] == 90)
    with pytest.raises(ValueError, match="expected one shape"):
        case_thumbnail(image, pred, gt[:10])


# ---- end to end through the CLI ---------------------------------------------------------
@pytest.fixture(scope="module")
def untuned(tmp_path_factory):
    loaded = load(save_untrained_run(tmp_path_factory.mktemp("report") / "run"))
    return export_model([loaded], tmp_path_factory.mktemp("untuned") / "m")


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("busi") / "busi"
    write_phantom(folder, counts={"benign": 2, "malignant": 2, "normal": 1}, size=(40, 48), seed=2)
    return folder


def test_predict_writes_the_report_with_the_tables_rows_and_overlay_thumbnails(untuned, busi, tmp_path, capsys):
    odd = tmp_path / "in" / "a<b&c.png"
    odd.parent.mkdir()
    odd.write_bytes((busi / "benign" / "benign (1).png").read_bytes())
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [str(odd), str(busi / "malignant" / "malignant (1).png"), str(broken)]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(untuned), *inputs, "--out", str(out)]) == 1
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    rows = json.loads((out / "predictions.json").read_text())
    parsed = _parse((out / "report.html").read_text(encoding="utf-8"))
    assert len(parsed.tables) == 1
    table = parsed.tables[0]
    header = [c["text"] for c in table["head"]]
    assert header[:4] == ["overlay", "input", "frame", "lesion_present"] and "area_px" in header
    assert "mask" not in header and "seg" not in header  # paths are not columns
    assert _column(table, "input") == [r["input"] for r in rows] == inputs
    assert _column(table, "area_px") == [str(r["area_px"]) for r in rows[:2]] + [""]
    for row, cells in zip(rows[:2], table["rows"][:2], strict=True):
        with Image.open(row["overlay"]) as im:
            expected = thumbnail(np.asarray(im.convert("RGB")))
        np.testing.assert_array_equal(_decode(cells[0]["imgs"][0]), expected)
    assert table["rows"][2][0]["imgs"] == [] and "unreadable image" in _column(table, "error")[2]
    again = tmp_path / "again"
    assert main(["predict", "--checkpoint", str(untuned), inputs[1], "--out", str(again), "--no-report"]) == 0
    assert not (again / "report.html").exists() and (again / "predictions.json").is_file()


def test_evaluate_report_lists_every_case_worst_dice_first_with_its_contours(untuned, busi, tmp_path, capsys):
    out = tmp_path / "deep" / "report"
    args = ["evaluate", "--checkpoint", str(untuned), "--data", str(busi), "--raw", "--threshold", "0.5"]
    assert main([*args, "--json", "--report", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout stays one JSON object
    assert f"report: {out / 'report.html'}" in captured.err
    cases = sorted(result["per_image"], key=lambda r: r["dice"])  # stable: ties in input order
    parsed = _parse((out / "report.html").read_text(encoding="utf-8"))
    table = next(t for t in parsed.tables if t["id"] == "cases")
    assert _column(table, "id") == [r["id"] for r in cases] and len(cases) == 5
    assert _column(table, "Dice") == [f"{r['dice']:.3f}" for r in cases]
    for case, row in zip(cases, table["rows"], strict=True):
        image = _decode(row[0]["imgs"][0])
        assert image.shape == (round(40 * CASE_SIDE / 48), CASE_SIDE, 3)  # the native 48x40 aspect
        assert np.all(image == GT_COLOR, axis=-1).any() == (case["gt_area"] > 0)
    overall = result["dice"]["summary"]["overall"]
    assert f"{overall['mean']:.3f} [{overall['ci_low']:.3f}, {overall['ci_high']:.3f}]" in [
        c["text"] for t in parsed.tables if t["class"] == "per-class" for r in t["rows"] for c in r
    ]


def test_a_report_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("x")
    missing_model = tmp_path / "no-model"
    code = main(["evaluate", "--checkpoint", str(missing_model), "--data", str(tmp_path), "--report", str(taken / "r")])
    assert code == 2
    assert f"report folder {str(taken / 'r')!r}: {str(taken)!r} is a file" in capsys.readouterr().err


def test_a_report_html_unet_jax_did_not_write_is_refused_before_the_model_loads(untuned, busi, tmp_path, capsys):
    out = tmp_path / "paper"
    out.mkdir()
    (out / "report.html").write_text("<html>the user's own report</html>")
    missing_model = tmp_path / "no-model"
    code = main(["evaluate", "--checkpoint", str(missing_model), "--data", str(busi), "--report", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"report folder {str(out)!r} holds 'report.html', which unet-jax did not write" in err, err
    assert (out / "report.html").read_text() == "<html>the user's own report</html>"
    (out / "report.html").unlink()  # its own report is replaced by the next run
    args = ["evaluate", "--checkpoint", str(untuned), "--data", str(busi), "--raw", "--report", str(out)]
    assert main(args) == 0 and main(args) == 0
    capsys.readouterr()
