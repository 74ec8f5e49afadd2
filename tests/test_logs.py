"""Run logs: TensorBoard events written by tensorboardX and read back by TensorBoard itself,
cut back on resume, images (prediction overlays, training curves), and the metrics file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_jax.train.logs import MetricsLog, cut_back, prediction_overlays, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def accumulator(logdir: Path, purge: bool = True):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return acc


def decoded(event) -> np.ndarray:
    with Image.open(io.BytesIO(event.encoded_image_string)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def record(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "train/loss": 1 / epoch,
        "val/dice": 0.1 * epoch,
        "val/iou": float("nan"),
        "lr": 1e-3,
        "epoch_time_s": 1.5,
        "flag/bool": True,
    }


def test_scalars_and_images_reach_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    picture = np.zeros((6, 8, 3), np.uint8)
    picture[:, :4] = (255, 0, 0)
    png = io.BytesIO()
    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(png, format="PNG")
    for epoch in (1, 2):
        log.write(record(epoch), 10 * epoch)
        log.images(10 * epoch, {"val/picture": picture, "gray": np.full((4, 4), 9, np.uint8)})
    log.images(20, {"curves": png.getvalue()})
    log.close()

    acc = accumulator(tmp_path / "tensorboard")
    # Only numeric group/name values are scalars: not lr, epoch_time_s or a bool.
    assert set(acc.Tags()["scalars"]) == {"train/loss", "val/dice", "val/iou"}
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/dice")] == [(10, 0.1), (20, 0.2)]
    assert np.isnan(acc.Scalars("val/iou")[0].value)
    assert set(acc.Tags()["images"]) == {"val/picture", "gray", "curves"}
    shown = acc.Images("val/picture")
    assert [e.step for e in shown] == [10, 20] and (shown[0].width, shown[0].height) == (8, 6)
    np.testing.assert_array_equal(decoded(shown[1]), picture)
    assert decoded(acc.Images("gray")[0])[0, 0].tolist() == [9, 9, 9]
    assert decoded(acc.Images("curves")[0]).shape == (5, 7, 3)
    # metrics.jsonl holds every key, a non-finite float as null
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["val/iou"] is None and rows[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.zeros((4, 4), np.float32), "float32 array of shape (4, 4)"),
        (np.zeros((4, 4, 2), np.uint8), "uint8 array of shape (4, 4, 2)"),
    ],
)
def test_an_image_that_is_not_one_is_refused_by_its_tag(tmp_path, value, expected):
    log = MetricsLog(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"image 'val/x': {expected[:8]}.*; expected PNG bytes or a uint8 array"):
            log.images(1, {"val/x": value})
    finally:
        log.close()


def test_resume_cuts_events_after_the_checkpoint_and_a_record_cut_short(tmp_path):
    log = MetricsLog(tmp_path)
    for epoch in (1, 2, 3):
        log.write(record(epoch), 10 * epoch)
        log.images(10 * epoch, {"val/picture": np.full((2, 2, 3), epoch, np.uint8)})
    log.close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    with open(events, "ab") as f:
        f.write(b"\x2a\x00\x00")  # a record cut short by a kill
    before = events.stat().st_size

    log = MetricsLog(tmp_path, resume_epochs=1, resume_step=10)  # the checkpoint saw epoch 1
    assert events.stat().st_size < before
    for epoch in (2, 3):
        log.write(record(epoch), 10 * epoch)
        log.images(10 * epoch, {"val/picture": np.full((2, 2, 3), 10 + epoch, np.uint8)})
    log.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per writer
    for purge in (False, True):  # whether or not the reader purges orphaned data itself
        acc = accumulator(tmp_path / "tensorboard", purge)
        assert [e.step for e in acc.Scalars("val/dice")] == [10, 20, 30]
        assert [decoded(e)[0, 0, 0] for e in acc.Images("val/picture")] == [1, 12, 13]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    cut_back(tmp_path / "tensorboard", 30)  # nothing past step 30: the files are left as they are
    assert [e.step for e in accumulator(tmp_path / "tensorboard").Scalars("val/dice")] == [10, 20, 30]


def test_prediction_overlays_show_image_truth_and_prediction(tmp_path):
    images = np.full((2, 8, 6, 1), 100, np.uint8)
    masks = np.zeros((2, 8, 6, 1), np.float32)
    masks[0, :4] = 1
    predicted = np.zeros((2, 8, 6), bool)
    predicted[1, :, :3] = True
    out = prediction_overlays(images, masks, predicted)
    assert out.dtype == np.uint8 and out.shape == (2 * 8 + 2, 3 * 6 + 2 * 2, 3)
    row0, row1 = out[:8], out[10:]
    image, truth, pred = row0[:, :6], row0[:, 8:14], row0[:, 16:22]
    assert (image == 100).all() and (pred == 100).all()  # no prediction on image 0
    assert truth[0, 0].tolist() == [55, 170, 55] and truth[7, 0].tolist() == [100, 100, 100]  # green where lesion
    assert row1[0, 16].tolist() == [170, 55, 55] and row1[0, 21].tolist() == [100, 100, 100]  # red where predicted
    assert (row1[:, 8:14] == 100).all()  # image 1 has no lesion
    assert (out[8:10] == 255).all() and (out[:, 6:8] == 255).all()  # white gaps
    big = prediction_overlays(np.zeros((1, 300, 200, 3), np.uint8), np.zeros((1, 300, 200)), np.zeros((1, 300, 200)))
    assert big.shape == (100, 3 * 67 + 4, 3)  # stride 3: at most 128 pixels a side
    with pytest.raises(ValueError, match=r"masks of shape \(2, 8, 5, 1\); expected \(2, 8, 6\)"):
        prediction_overlays(images, masks[:, :, :5], predicted)


def test_predictions_run_the_model_once_and_log_its_overlays(tmp_path):
    from types import SimpleNamespace

    from test_train import tiny_state

    state = tiny_state()
    rng = np.random.default_rng(0)
    examples = SimpleNamespace(
        images_u8=rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8),
        masks=(rng.random((3, 32, 32, 1)) > 0.5).astype(np.uint8),
    )
    log = MetricsLog(tmp_path)
    log.predictions(7, state, examples, threshold=0.5)
    log.predictions(8, state, SimpleNamespace(images_u8=examples.images_u8[:0], masks=examples.masks[:0]), 0.5)
    log.close()
    (shown,) = accumulator(tmp_path / "tensorboard").Images("val/predictions")
    assert shown.step == 7 and (shown.height, shown.width) == (3 * 32 + 2 * 2, 3 * 32 + 2 * 2)
    picture = decoded(shown)
    np.testing.assert_array_equal(picture[:32, :32, 0], examples.images_u8[0, :, :, 0])
    truth = picture[:32, 34:66]
    lesion = examples.masks[0, :, :, 0] == 1
    assert (truth[lesion][:, 1] > truth[lesion][:, 0]).all()  # green over the lesion
    np.testing.assert_array_equal(truth[~lesion], picture[:32, :32][~lesion])  # untouched elsewhere
    with pytest.raises(ValueError, match=r"threshold 1.5: expected a probability in \(0, 1\)"):
        MetricsLog(tmp_path / "other").predictions(1, state, examples, threshold=1.5)


def test_a_training_run_logs_overlays_every_epoch_and_the_curves_at_the_end(trained_run):
    run_dir, result, _ = trained_run  # TINY with plots: 3 epochs
    acc = accumulator(run_dir / "tensorboard")
    steps = [r["step"] for r in result.history]
    assert {"train/loss", "val/loss", "val/dice"} <= set(acc.Tags()["scalars"])
    assert {"val/predictions", "training_curves"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("val/predictions")] == steps
    assert [e.step for e in acc.Images("training_curves")] == steps[-1:]
    first = acc.Images("val/predictions")[0]
    assert first.height == 4 * 32 + 3 * 2 and first.width == 3 * 32 + 2 * 2  # 4 validation images, 3 panels


def test_without_tensorboardx_the_metrics_file_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
    with pytest.warns(
        RuntimeWarning,
        match=r"tensorboardX cannot be imported .*: no TensorBoard events in '.*"
        r"tensorboard' for this run, metrics.jsonl has every value",
    ):
        log = MetricsLog(tmp_path)
    log.write(record(1), 10)
    log.images(10, {"val/picture": np.zeros((2, 2, 3), np.uint8)})
    log.close()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert not list(tmp_path.glob("tensorboard/*"))


def test_tensorboardx_is_imported_without_torch():
    code = (
        "import sys, importlib.util; from unet_jax.train import logs; logs._tensorboardx(); "
        "print('tensorboardX' in sys.modules, 'torch' in sys.modules, "
        "importlib.util.find_spec('torch') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    loaded, torch_loaded, torch_installed = out.stdout.split()
    assert (loaded, torch_loaded) == ("True", "False"), out.stderr[-2000:]
    if torch_installed == "True":  # and torch still imports afterwards
        code += "; import torch; print('torch ok')"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )
        assert out.stdout.split()[-2:] == ["torch", "ok"], out.stderr[-2000:]
