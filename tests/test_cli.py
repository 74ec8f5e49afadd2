"""The `unet-jax` command line end to end: train/demo, evaluate, predict, and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _train_helpers import TINY
from unet_jax.cli import main
from unet_jax.config import TrainConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def test_overrides_are_typed_and_unknown_keys_refused():
    config = apply_overrides(TrainConfig(), ["epochs=5", "learning_rate=3e-4", "model.dropout_rate=0.1",
                                             "patience=None", "augment=false", "loss=bce"])
    assert (config.epochs, config.learning_rate, config.patience, config.augment, config.loss) == (5, 3e-4, None, False, "bce")
    assert config.model == {"dropout_rate": 0.1}
    with pytest.raises(ValueError, match=r"override 'epoch=5': unknown config key 'epoch'"):
        apply_overrides(TrainConfig(), ["epoch=5"])
    with pytest.raises(ValueError, match=r"override 'model.width=3': unknown model field 'width'"):
        apply_overrides(TrainConfig(), ["model.width=3"])
    with pytest.raises(ValueError, match=r"override epochs='many': expected int"):
        apply_overrides(TrainConfig(), ["epochs=many"])
    with pytest.raises(ValueError, match=r"override loss='focal': expected one of \['bce', 'dice', 'bce_dice'\]"):
        apply_overrides(TrainConfig(), ["loss=focal"])
    with pytest.raises(ValueError, match=r"config batch_size = 0: expected a positive integer"):
        apply_overrides(TrainConfig(), ["batch_size=0"])


@pytest.mark.parametrize("name", ["base", "report", "report_cpu"])
def test_experiment_configs_load(name):
    config = load_config(REPO / "experiments" / f"{name}.py")
    assert isinstance(config, TrainConfig)
    if name.startswith("report"):
        # The notebook's protocol: seed preset, lesion images, 80/20, RGB, BCE, Adam 1e-3, batch 32.
        assert (config.preset, config.classes, config.split, config.channels, config.loss) == ("seed", "lesion", "seed", 3, "bce")
        assert (config.optimizer, config.learning_rate, config.batch_size, config.patience) == ("adam", 1e-3, 32, 20)


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "defines no get_config()" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.py"), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "data=/no/such/busi"]) == 2
    assert "data folder '/no/such/busi' does not exist; expected a folder in the BUSI layout" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# demo, evaluate, predict
# --------------------------------------------------------------------------------------
def test_demo_end_to_end(tmp_path, capsys):
    # The README's main job with its size turned down for CI (the real one: `unet-jax demo`).
    code = main(["demo", "--out", str(tmp_path / "demo"), "epochs=2", "image_size=32", "phantom_images=24",
                 "batch_size=4", "model.features=4", "model.depth=2", "plots=false"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "accuracy*" in out.out and "Dice" in out.out and "IoU" in out.out
    assert "pixel accuracy: what the report's Keras 'accuracy' measured" in out.out
    assert "test split at native resolution" in out.out
    assert "epoch   2/2" in out.err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["epochs_run"] == 2


def test_evaluate_json(trained_run, capsys):
    run_dir, _, _ = trained_run
    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", str(run_dir / "phantom"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for metric in ("dice", "iou", "pixel_accuracy"):
        assert set(report[metric]) >= {"mean", "benign", "malignant", "normal"}
        assert 0 <= report[metric]["mean"] <= 1
    assert 0 <= report["normal_false_positive_rate"] <= 1
    assert report["resolution"] == "native"
    assert report["images"]["overall"] == TINY.phantom_images
    assert len(report["per_image"]) == TINY.phantom_images


def test_evaluate_at_training_resolution_and_text(trained_run, capsys):
    run_dir, _, _ = trained_run
    assert main(["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best"), "--data", str(run_dir / "phantom"),
                 "--resolution", "training"]) == 0
    assert "dice" in capsys.readouterr().out


def test_checkpoint_of_another_architecture_is_refused(trained_run):
    from unet_jax.evaluate import load_checkpoint
    from unet_jax.train.checkpoint import find_checkpoint, restore_variables

    run_dir, _, _ = trained_run
    with pytest.raises(ValueError, match=r"holds preset='seed'; expected preset='padded'"):
        load_checkpoint(run_dir, expect={"preset": "padded"})
    import jax
    import jax.numpy as jnp

    from unet_jax.models import create_unet

    other = create_unet("seed", in_channels=1, features=8, depth=2)
    abstract = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
    with pytest.raises(ValueError, match=r"saved from a different architecture: \d+ shape\(s\) differ, e.g. .*: checkpoint \(\d+,\) vs model"):
        restore_variables(find_checkpoint(run_dir), abstract)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "no checkpoint found in" in capsys.readouterr().err


def test_predict_writes_masks_at_original_size_and_skips_bad_files(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    images = sorted((run_dir / "phantom" / "malignant").glob("*).png"))[:2]
    big = tmp_path / "big.png"
    Image.open(images[0]).resize((48, 40)).save(big)  # another size than training
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(run_dir), str(images[0]), str(broken), str(big), "--out", str(out), "--tta"])
    captured = capsys.readouterr()
    assert code == 1  # one input could not be read; the others were predicted
    assert "skipped" in captured.err and "broken.png" in captured.err
    mask = np.asarray(Image.open(out / "big_mask.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}
    overlay = np.asarray(Image.open(out / "big_overlay.png"))
    assert overlay.shape == (40, 48, 3)
    assert (out / f"{images[0].stem}_mask.png").is_file()
    assert not (out / "broken_mask.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_resume_after_finishing_trains_nothing_more(trained_run, tmp_path):
    from unet_jax.train import train

    run_dir, result, _ = trained_run
    events = []
    again = train(dataclasses.replace(TINY, plots=True), run_dir, progress=events.append)
    assert not [e for e in events if e["kind"] == "epoch"]
    assert again.history == result.history
