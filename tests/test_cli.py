"""The `unet-jax` command line end to end: train/demo, evaluate, predict, and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _train_helpers import TINY
from PIL import Image

from unet_jax.cli import main
from unet_jax.config import TrainConfig, config_from_dict, config_to_dict, load_config
from unet_jax.models import apply_overrides

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def test_overrides_are_typed_and_unknown_keys_refused():
    config = apply_overrides(
        TrainConfig(),
        ["epochs=5", "learning_rate=3e-4", "model.dropout_rate=0.1", "patience=None", "augment=false", "loss=bce"],
    )
    assert (config.epochs, config.learning_rate, config.patience, config.augment, config.loss) == (
        5,
        3e-4,
        None,
        False,
        "bce",
    )
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


@pytest.mark.parametrize("name", ["base", "base_cpu", "report", "report_cpu", "ensemble_cpu", "ensemble_ds_cpu"])
def test_experiment_configs_load(name):
    config = load_config(REPO / "experiments" / "configs" / f"{name}.py")
    assert isinstance(config, TrainConfig)
    if name.startswith("ensemble"):
        # The bundle's recipe, and its deep-supervised variant: the same but for the heads.
        assert (config.epochs, config.model.get("deep_supervision", 0)) == (36, 2 if "_ds" in name else 0)
    if name.startswith("report"):
        # The notebook's protocol: seed preset, lesion images, 80/20, RGB, BCE, Adam 1e-3, batch 32.
        assert (config.preset, config.classes, config.split, config.channels, config.loss) == (
            "seed",
            "lesion",
            "seed",
            3,
            "bce",
        )
        assert (config.optimizer, config.learning_rate, config.batch_size, config.patience) == ("adam", 1e-3, 32, 20)


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "defines no get_config()" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.py"), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("string.py", "TrainConfig(epochs='abc')", "config epochs = 'abc': expected an integer (int)"),
        ("quoted.py", "TrainConfig(image_size='32')", "config image_size = '32': expected an integer (int)"),
        ("float.py", "TrainConfig(epochs=1.5)", "config epochs = 1.5: expected an integer (int)"),
        ("word.py", "TrainConfig(augment='no')", "config augment = 'no': expected true or false (a bool)"),
        ("name.py", "TrainConfig(freeze='image_encoder')", "config freeze = 'image_encoder': expected a list"),
        ("unknown.py", "TrainConfig(epochz=3)", "unknown config key 'epochz'; known keys: ["),
        ("variant.py", "dataclasses.replace(TrainConfig(), epochz=3)", "unknown config key 'epochz'; known keys: ["),
        ("config.json", '{"epochs": "abc"}', "config epochs = 'abc': expected an integer (int)"),
        ("config.json", '{"epochz": 3}', "unknown config key(s) ['epochz']"),
        ("config.json", '{"augment": "no"}', "config augment = 'no': expected true or false (a bool)"),
    ],
)
def test_config_files_are_checked_like_overrides(tmp_path, capsys, name, text, message):
    # Before: a traceback not naming the key, or (1.5 epochs, augment='no') a run doing
    # something else than the file says.
    path = tmp_path / name
    path.write_text(
        text
        if name.endswith(".json")
        else f"import dataclasses\nfrom unet_jax.config import TrainConfig\n\ndef get_config():\n    return {text}\n"
    )
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-jax train: error: config file {str(path)!r}: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_every_way_into_a_config_gets_the_same_check():
    with pytest.raises(ValueError, match=r"config epochs = 1.5: expected an integer \(int\)"):
        TrainConfig(epochs=1.5)
    with pytest.raises(ValueError, match=r"config augment = 'false': expected true or false \(a bool\)"):
        dataclasses.replace(TrainConfig(), augment="false")
    with pytest.raises(ValueError, match=r"config patience = True: expected an integer \(int\) or None"):
        TrainConfig(patience=True)
    with pytest.raises(ValueError, match=r"config model = \['features', 8\]: expected a dict"):
        TrainConfig(model=["features", 8])
    with pytest.raises(ValueError, match=r"saved.json: config learning_rate = '1e-3': expected a number \(float\)"):
        config_from_dict({"learning_rate": "1e-3"}, source="saved.json")
    with pytest.raises(ValueError, match=r"override epochs='1.5': expected int"):
        apply_overrides(TrainConfig(), ["epochs=1.5"])
    # Numbers become plain Python numbers (config.json reads back the same); lists of names
    # become tuples.
    config = TrainConfig(learning_rate=1, pos_weight=2, epochs=np.int64(3), threshold=np.float32(0.25), freeze=["x"])
    assert (config.learning_rate, config.pos_weight, config.epochs, config.threshold, config.freeze) == (
        1.0,
        2.0,
        3,
        0.25,
        ("x",),
    )
    numbers = (config.learning_rate, config.pos_weight, config.epochs, config.threshold)
    assert [type(v) for v in numbers] == [float, float, int, float]
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "data=/no/such/busi"]) == 2
    assert "data folder '/no/such/busi' does not exist; expected a folder in the BUSI layout" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# demo, evaluate, predict
# --------------------------------------------------------------------------------------
def test_demo_end_to_end(tmp_path, capsys):
    # The README's main job with its size turned down for CI (the real one: `unet-jax demo`).
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "epochs=2",
            "image_size=32",
            "phantom_images=24",
            "batch_size=4",
            "model.features=4",
            "model.depth=2",
            "plots=false",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "accuracy*" in out.out and "Dice" in out.out and "IoU" in out.out
    assert "pixel accuracy: what the report's Keras 'accuracy' measured" in out.out
    assert "test split at native resolution" in out.out
    # stderr is not a terminal here: plain lines, one per epoch with its scores, no carriage return
    assert "\r" not in out.err
    assert len([line for line in out.err.splitlines() if line.startswith("epoch   2/2 ") and " | val " in line]) == 1
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["epochs_run"] == 2


def test_evaluate_json(trained_run, capsys):
    run_dir, _, _ = trained_run
    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", str(run_dir / "phantom"), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # progress on stderr (stdout stays one JSON object): reading, then evaluating
    assert f"reading images {TINY.phantom_images}/{TINY.phantom_images}" in captured.err
    assert f"evaluating images {TINY.phantom_images}/{TINY.phantom_images}" in captured.err
    assert "\r" not in captured.err and len(captured.err.splitlines()) <= 2 * 11  # start, every 10%, end
    for metric in ("dice", "iou", "pixel_accuracy"):
        assert set(report[metric]) >= {"mean", "benign", "malignant", "normal"}
        assert 0 <= report[metric]["mean"] <= 1
    assert 0 <= report["normal_false_positive_rate"] <= 1
    assert report["resolution"] == "native"
    assert report["images"]["overall"] == TINY.phantom_images
    assert len(report["per_image"]) == TINY.phantom_images


def test_evaluate_at_training_resolution_and_text(trained_run, capsys):
    run_dir, _, _ = trained_run
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run_dir / "checkpoints" / "best"),
                "--data",
                str(run_dir / "phantom"),
                "--resolution",
                "training",
            ]
        )
        == 0
    )
    assert "dice" in capsys.readouterr().out


def test_checkpoint_of_another_architecture_is_refused(trained_run):
    from unet_jax.inference import find_checkpoint, load, restore_variables

    run_dir, _, _ = trained_run
    with pytest.raises(ValueError, match=r"holds preset='seed'; expected preset='padded'"):
        load(run_dir, expect={"preset": "padded"})
    import jax
    import jax.numpy as jnp

    from unet_jax.models import create_unet

    other = create_unet("seed", in_channels=1, features=8, depth=2)
    abstract = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
    with pytest.raises(
        ValueError,
        match=r"saved from a different architecture: \d+ shape mismatch\(es\) \(expected vs found\): "
        r".*: expected \(\d+,\), found \(\d+,\)",
    ):
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
    code = main(
        ["predict", "--checkpoint", str(run_dir), str(images[0]), str(broken), str(big), "--out", str(out), "--tta"]
    )
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


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the value and what was expected
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["split=seed"], r"config split = 'seed' with classes = 'all': .*expected classes = 'lesion'"),
        (["hflip=1.5"], r"config hflip = 1.5: expected a probability in \[0, 1\]"),
        (["scale_min=1.2", "scale_max=1.1"], r"config scale_min = 1.2: expected above 0 and at most scale_max"),
        (["gamma_min=0"], r"config gamma_min = 0.0: expected above 0 and at most gamma_max"),
        (["pos_weight=-1"], r"config pos_weight = -1.0: expected None or a positive number"),
        (["loss=dice", "pos_weight=2"], r"config pos_weight = 2.0 with loss = 'dice'"),
        (["bce_weight=0", "dice_weight=0"], r"config bce_weight = 0 and dice_weight = 0"),
        (["warmup_epochs=-1"], r"config warmup_epochs = -1.0: expected a number of epochs >= 0"),
        (["grad_clip_norm=0"], r"config grad_clip_norm = 0.0: expected None or a positive number"),
    ],
)
def test_invalid_values_and_combinations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), overrides)
    # valid neighbours: the notebook's protocol, early stopping off while monitoring Dice
    apply_overrides(TrainConfig(), ["split=seed", "classes=lesion", "monitor=val/dice", "patience=None"])


def test_cache_of_another_size_is_a_clear_error(trained_run, tmp_path, capsys):
    from unet_jax.data import ReadOptions
    from unet_jax.data.cache import prepare

    run_dir, _, _ = trained_run
    prepare(run_dir / "phantom", tmp_path / "cache16", ReadOptions(size=(16, 16), channels=1))
    assert main(["train", "--out", str(tmp_path / "run"), f"cache={tmp_path / 'cache16'}", "image_size=32"]) == 2
    assert (
        "holds images of shape (16, 16, 1); the config expects (32, 32, 1) (image_size=32, channels=1)"
        in capsys.readouterr().err
    )


def test_threshold_outside_0_1_is_refused(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    image = next((run_dir / "phantom" / "benign").glob("*).png"))
    assert (
        main(["evaluate", "--checkpoint", str(run_dir), "--threshold", "1.5", "--data", str(run_dir / "phantom")]) == 2
    )
    assert "threshold 1.5: expected a probability in (0, 1)" in capsys.readouterr().err
    assert (
        main(["predict", "--checkpoint", str(run_dir), "--threshold", "0", str(image), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "threshold 0.0: expected a probability in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # refused before anything is written


def test_predict_reports_folders_non_images_and_16_bit_images(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    good = next((run_dir / "phantom" / "benign").glob("*).png"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 24), 40000, np.uint16)).save(deep)  # 16-bit: would be clipped to white
    assert Image.open(deep).mode.startswith("I")
    out = tmp_path / "pred"
    assert (
        main(
            ["predict", "--checkpoint", str(run_dir), str(tmp_path), str(text), str(deep), str(good), "--out", str(out)]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a folder; expected an image file" in err
    assert f"{text}: unreadable image" in err
    assert f"{deep}: unsupported image mode" in err and "expected 8-bit" in err
    assert "3 of 4 input(s) could not be read" in err
    assert sorted(p.name for p in out.iterdir()) == [
        f"{good.stem}_mask.png",
        f"{good.stem}_overlay.png",
        "predictions.csv",
        "predictions.json",
        "report.html",
    ]


def test_damaged_checkpoint_is_a_clear_error(trained_run, tmp_path, capsys):
    import shutil

    from unet_jax.inference import find_checkpoint

    run_dir, _, _ = trained_run
    step = find_checkpoint(run_dir)
    copy = tmp_path / "checkpoints" / "best" / step.name
    shutil.copytree(step, copy)
    biggest = max((p for p in (copy / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:64])  # a disk that filled up, a copy cut short
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(run_dir / "phantom")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(copy)!r} could not be read" in err and "Traceback" not in err


def test_unreadable_checkpoint_fails_before_orbax_starts_reading(trained_run, tmp_path, monkeypatch, capsys):
    # Orbax's concurrent reads, left in flight by the first error, used to print two
    # "RuntimeError: Event loop is closed" tracebacks after the clean error.
    import shutil
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    from unet_jax.inference import find_checkpoint

    run_dir, _, _ = trained_run
    copy = tmp_path / "checkpoints" / "best" / find_checkpoint(run_dir).name
    shutil.copytree(find_checkpoint(run_dir), copy)
    manifest = copy / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:64])
    args = ["evaluate", "--checkpoint", str(tmp_path), "--data", str(run_dir / "phantom")]

    def concurrent_restore(*args, **kwargs):
        raise RuntimeError("Orbax's concurrent restore was started")

    monkeypatch.setattr(ocp.Checkpointer, "restore", concurrent_restore)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"unet-jax evaluate: error: checkpoint {str(copy)!r} could not be read (ValueError: DATA_LOSS"
    )
    assert "concurrent restore" not in err
    proc = subprocess.run(
        [sys.executable, "-m", "unet_jax.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_divergence_is_reported_on_its_own_line(tmp_path, monkeypatch, capsys):
    from _train_helpers import overflow_batch_norm_after

    from unet_jax.inference import finished_steps

    overflow_batch_norm_after(monkeypatch, 0)  # from the first step: no epoch ends finite
    overrides = [f"{k}={v}" for k, v in dataclasses.asdict(TINY).items() if v != getattr(TrainConfig(), k)]
    assert main(["train", "--out", str(tmp_path), *overrides]) == 3
    last = capsys.readouterr().err.split("\n")[-2]
    assert last.startswith("unet-jax train: training diverged at epoch 1: "), last  # not after the progress bar
    assert "no checkpoint was saved (no epoch of this run ended with finite values)" in last
    assert not finished_steps(tmp_path / "checkpoints" / "latest")
    assert not finished_steps(tmp_path / "checkpoints" / "best")


def test_an_output_that_is_a_file_is_a_clear_error(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    taken = tmp_path / "taken"
    taken.write_text("someone's file\n")
    assert main(["train", "--out", str(taken), "epochs=1"]) == 2
    assert f"run folder {str(taken)!r} is a file; expected a folder" in capsys.readouterr().err
    image = next((run_dir / "phantom" / "benign").glob("*).png"))
    assert main(["predict", "--checkpoint", str(run_dir), str(image), "--out", str(taken)]) == 2
    assert f"output {str(taken)!r} is a file; expected a folder" in capsys.readouterr().err
    assert taken.read_text() == "someone's file\n"


def test_evaluation_is_at_the_native_size_unless_asked_otherwise(trained_run, tmp_path):
    # The phantom of the run is generated at the training size; these images are not.
    from unet_jax.data import write_phantom
    from unet_jax.evaluate import evaluate_dataset, read_for_evaluation
    from unet_jax.inference import load

    run_dir, _, _ = trained_run
    write_phantom(tmp_path / "busi", counts={"benign": 1, "malignant": 1, "normal": 1}, size=(40, 48), seed=3)
    loaded = load(run_dir)
    dataset = read_for_evaluation(loaded, tmp_path / "busi")
    pixels = lambda rows: {r["tp"] + r["fp"] + r["fn"] + r["tn"] for r in rows}  # noqa: E731
    _, native = evaluate_dataset(loaded, dataset, n_boot=10)
    _, training = evaluate_dataset(loaded, dataset, native=False, n_boot=10)
    assert pixels(native) == {40 * 48} and pixels(training) == {32 * 32}
    assert [r["gt_area"] for r in native] == [int(m.sum()) for m in dataset.original_masks]


def test_output_names_never_collide():
    from unet_jax.predict import unique_stem

    used: set[str] = set()
    assert [unique_stem(s, used) for s in ("x", "x_1", "x", "x")] == ["x", "x_1", "x_2", "x_3"]


def test_the_raw_outputs_rate_in_the_results_table_has_its_wilson_interval():
    from unet_jax.cli import _raw_rate

    counted = {"rate": 0.0, "count": 0, "n": 20, "ci_low": 0.0, "ci_high": 0.0}  # a bootstrap's [0, 0]
    assert _raw_rate({"normal_false_positive_rate": 0.0, "normal_false_positive": counted}) == (
        "0.000 (0/20) [Wilson 95% CI 0.000, 0.161]"
    )
    assert _raw_rate({"normal_false_positive_rate": 0.25}) == "0.250"  # an older results.json: no counts
