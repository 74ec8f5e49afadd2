"""Training: the pure steps, the loop, checkpoints and resumption, logs, data parallelism."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_helpers import TINY, overflow_batch_norm_after
from PIL import Image

from unet_jax.config import TrainConfig
from unet_jax.data import AugmentConfig, DeviceData, make_sampler
from unet_jax.inference import find_checkpoint, read_meta
from unet_jax.losses import get_loss
from unet_jax.models import create_unet
from unet_jax.train import TrainingDiverged, train
from unet_jax.train.checkpoint import CheckpointStore
from unet_jax.train.logs import read_jsonl
from unet_jax.train.state import create_train_state, make_optimizer
from unet_jax.train.steps import make_mesh, train_step, train_steps


def tiny_state(config: TrainConfig = TINY, steps_per_epoch: int = 5, tx=None, size: int = 32):
    model = create_unet(config.preset, in_channels=1, **config.model)
    tx = make_optimizer(config, steps_per_epoch) if tx is None else tx
    return create_train_state(model, tx, jax.random.key(0, impl="rbg"), (1, size, size, 1))


# The step tests need only a U-Net, not a good one: one level, 16x16 images.
SHALLOW = dataclasses.replace(TINY, model={"features": 4, "depth": 1})


def random_device_data(n: int = 16, size: int = 16) -> DeviceData:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.integers(size // 4, size - size // 4, (n, 2))
    masks = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2 < (size / 5) ** 2
    images = np.clip(120 + 40 * rng.standard_normal((n, size, size)) - 80 * masks, 0, 255)
    return DeviceData(
        images=jnp.asarray(images[..., None], jnp.uint8),
        masks=jnp.asarray(masks[..., None], jnp.uint8),
        labels=jnp.zeros(n, jnp.int32),
    )


# --------------------------------------------------------------------------------------
# The pure steps
# --------------------------------------------------------------------------------------
def test_one_step_lowers_the_loss():
    state = tiny_state(dataclasses.replace(SHALLOW, model={"features": 4, "depth": 1, "dropout_rate": 0.0}), size=16)
    data = random_device_data()
    batch = make_sampler(8, 16, None)(data, jax.random.key(1), 0)
    loss_fn = get_loss("bce_dice")

    def loss_on_batch(state):
        logits, _ = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch.images,
            train=True,
            mutable=["batch_stats"],
        )
        return float(loss_fn(logits, batch.masks))

    before = loss_on_batch(state)
    after_state, metrics = jax.jit(lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=loss_fn))(state, batch)
    assert loss_on_batch(after_state) < before
    assert float(metrics["loss"][0] / metrics["loss"][1]) == pytest.approx(before, rel=1e-5)
    assert int(after_state.step) == 1


def test_bfloat16_training_step_keeps_float32_parameters():
    config = dataclasses.replace(SHALLOW, dtype="bfloat16")
    from unet_jax.models import build_model

    model = build_model(dataclasses.replace(config, channels=1))
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(0, impl="rbg"), (1, 16, 16, 1))
    batch = make_sampler(8, 16, None)(random_device_data(), jax.random.key(1), 0)
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=get_loss("bce_dice")))
    state, metrics = step(state, batch)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"][0]))


def test_scanned_steps_equal_single_steps_and_never_recompile():
    data = random_device_data()
    sample = make_sampler(4, 16, AugmentConfig())
    loss_fn = get_loss("bce_dice")
    mesh = make_mesh()
    run = lambda state, start, n: train_steps(  # noqa: E731
        state,
        data,
        jax.random.key(3),
        jax.random.key(4),
        jnp.asarray(start, jnp.int32),
        num_steps=n,
        sample=sample,
        loss_fn=loss_fn,
        threshold=0.5,
        mesh=mesh,
    )

    # Plain SGD: Adam would scale the rounding noise in the gradients of the conv biases
    # before batch norm (mathematically zero) up to the learning rate.
    sgd = optax.sgd(0.05)
    one_by_one = tiny_state(SHALLOW, tx=sgd, size=16)
    totals = []
    for step in range(3):
        one_by_one, metrics = run(one_by_one, step, 1)
        totals.append(metrics)
    compiled = train_steps._cache_size()
    scanned, scanned_totals = run(tiny_state(SHALLOW, tx=sgd, size=16), 0, 3)

    # The same batches, dropout masks and updates whichever way the steps are dispatched.
    leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats))  # noqa: E731
    for a, b in zip(leaves(one_by_one), leaves(scanned)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(scanned_totals["loss"][0]) == pytest.approx(sum(float(m["loss"][0]) for m in totals), rel=1e-4)
    # New step numbers and new states reuse the compiled single-step program.
    run(one_by_one, 7, 1)
    assert train_steps._cache_size() == compiled + 1  # + the 3-step scan, nothing else


# --------------------------------------------------------------------------------------
# The loop: a reference run shared by the tests below
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(trained_run):
    return trained_run


def params_of(run_dir: Path):
    store = CheckpointStore(run_dir)
    state, meta = store.restore("latest", tiny_state())
    store.close()
    return state, meta


def test_run_folder_holds_everything(reference_run):
    run_dir, result, events = reference_run
    for name in (
        "config.json",
        "split.json",
        "environment.json",
        "metrics.jsonl",
        "results.json",
        "plots/training_curves.png",
        "plots/test_predictions.png",
        "predictions/test_per_image.json",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["image_size"] == 32
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["backend"] == "cpu" and environment["wall_time_s"] > 0 and environment["jax"] == jax.__version__
    assert environment["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # speed and rounding depend on them
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert {"train/loss", "val/loss", "val/dice", "val/iou", "val/pixel_accuracy"} <= set(history[0])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["resolution"] == "native"
    assert set(results["test"]["dice"]) >= {"mean", "benign", "malignant", "normal", "lesion"}
    assert 0 <= results["test"]["normal_false_positive_rate"] <= 1
    assert [e["kind"] for e in events][-1] == "done"
    assert result.best_epoch in (1, 2, 3)


def test_validation_and_test_splits_are_disjoint_from_training(reference_run):
    run_dir, _, _ = reference_run
    split = json.loads((run_dir / "split.json").read_text())
    parts = {name: set(ids) for name, ids in split["partitions"].items()}
    assert parts["train"].isdisjoint(parts["val"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"])


def test_tensorboard_can_read_the_event_file(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = reference_run
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    assert {"train/loss", "val/dice"} <= set(accumulator.Tags()["scalars"])
    history = read_jsonl(run_dir / "metrics.jsonl")
    values = [e.value for e in accumulator.Scalars("val/dice")]
    np.testing.assert_allclose(values, [r["val/dice"] for r in history], rtol=1e-6)
    assert [e.step for e in accumulator.Scalars("val/dice")] == [r["step"] for r in history]


@pytest.mark.parametrize(
    "change, message",
    [
        ("image", r"1 image\(s\) with other pixels or masks \('malignant \(2\)'\)"),
        ("mask", r"1 image\(s\) with other pixels or masks \('benign \(3\)'\)"),
        ("removed", r"1 image\(s\) gone \('benign \(1\)'\)"),
        ("resized", r"1 image\(s\) of another size \('normal \(1\)'; e\.g\. 'normal \(1\)' 32x32 -> 40x32, HxW\)"),
    ],
)
def test_resuming_on_other_data_is_refused_naming_what_changed(reference_run, tmp_path, change, message):
    run_dir, _, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    saved = json.loads((copy / "split.json").read_text())
    ids = [i for part in saved["partitions"].values() for i in part]
    assert sorted(saved["extra"]["fingerprints"]) == sorted(ids)
    data = copy / "phantom"
    if change == "image":
        p = data / "malignant" / "malignant (2).png"
        Image.fromarray(255 - np.asarray(Image.open(p))).save(p)
    elif change == "mask":
        p = data / "benign" / "benign (3)_mask.png"
        m = np.asarray(Image.open(p).convert("L")) > 0
        Image.fromarray(np.roll(m, 5, axis=1).astype(np.uint8) * np.uint8(255)).save(p)
    elif change == "removed":
        for p in data.glob("benign/benign (1)*.png"):
            p.unlink()
    else:
        for p in data.glob("normal/normal (1)*.png"):
            Image.open(p).resize((32, 40)).save(p)
    before = (copy / "split.json").read_bytes()
    with pytest.raises(ValueError, match=rf"run folder .* was trained on other data than this resume reads: {message}"):
        train(TINY, copy)
    assert (copy / "split.json").read_bytes() == before


def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    from unet_jax.cli import main

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "run" / "train.lock"
        lock.parent.mkdir()
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(ValueError, match=rf"run folder '.*run' is in use by process {holder.pid} \(lock file"):
            train(TINY, tmp_path / "run")
        assert main(["train", "--out", str(tmp_path / "run"), "epochs=1"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in err and err.count("\n") == 1
        assert sorted(p.name for p in lock.parent.iterdir()) == ["train.lock"]  # nothing else touched
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_the_run_folder_is_locked_while_training_and_a_stale_lock_taken_over(tmp_path, monkeypatch):
    import unet_jax.train.loop as loop

    lock = tmp_path / "train.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # a killed run's
    seen = []

    def spy(config, run_dir, *args):
        seen.append(json.loads((Path(run_dir) / "train.lock").read_text()))
        raise Killed

    monkeypatch.setattr(loop, "_start_run", spy)
    with pytest.raises(Killed):
        train(TINY, tmp_path)
    assert seen == [{"pid": os.getpid(), "host": socket.gethostname()}]
    assert not lock.exists()  # released however the run ended


def test_resuming_from_a_non_finite_checkpoint_is_refused(reference_run, tmp_path):
    run_dir, _, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    step = find_checkpoint(copy / "checkpoints" / "latest")
    state, meta = params_of(copy)
    state = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params))
    store = CheckpointStore(copy)
    store.save("latest", state, meta)  # as damaged files would read
    store.close()
    assert find_checkpoint(copy / "checkpoints" / "latest") == step
    with pytest.raises(
        ValueError,
        match=r"checkpoint '.*latest' holds non-finite values \(NaN or inf\) in \d+ "
        r"array\(s\), e\.g\. params/",
    ):
        train(TINY, copy)


class Killed(Exception):
    """Stands for the process being killed at that moment."""


def test_killed_and_restarted_run_equals_uninterrupted_run(reference_run, tmp_path, monkeypatch):
    import unet_jax.train.loop as loop

    run_dir, _, _ = reference_run
    real_steps, seen = loop.train_steps, {}

    def note_epochs(event):
        if event["kind"] == "epoch":
            seen["steps_per_epoch"] = event["step"] // event["epoch"]

    def killing_steps(state, data, data_key, dropout_key, start, **kwargs):
        # Killed during epoch 3's dispatch (an epoch is one dispatch), after epoch 2's checkpoint.
        if seen and int(start) >= 2 * seen["steps_per_epoch"]:
            raise Killed
        return real_steps(state, data, data_key, dropout_key, start, **kwargs)

    monkeypatch.setattr(loop, "train_steps", killing_steps)
    with pytest.raises(Killed):
        train(TINY, tmp_path, progress=note_epochs)
    monkeypatch.undo()
    resumed_events = []
    train(TINY, tmp_path, progress=resumed_events.append)
    start = next(e for e in resumed_events if e["kind"] == "start")
    assert start["resumed_epoch"] == 2

    reference, _ = params_of(run_dir)
    restarted, _ = params_of(tmp_path)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(restarted)):
        np.testing.assert_array_equal(a, b)  # bitwise, on CPU with the same seed
    untimed = lambda path: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_jsonl(path)]  # noqa: E731
    assert untimed(tmp_path / "metrics.jsonl") == untimed(run_dir / "metrics.jsonl")


def test_resuming_with_another_configuration_is_refused(reference_run, tmp_path):
    run_dir, _, _ = reference_run
    with pytest.raises(
        ValueError, match=r"holds a checkpoint of a different configuration \(learning_rate: 0.003 -> 0.01"
    ):
        train(dataclasses.replace(TINY, learning_rate=1e-2), run_dir)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import unet_jax.train.loop as loop

    real = loop.metrics_to_host
    calls = {"train": 0}

    def poisoned(metrics, prefix=""):
        values = real(metrics, prefix)
        if prefix == "train/":
            calls["train"] += 1
            if calls["train"] >= 2:  # the second epoch's training loss
                values["train/loss"] = float("nan")
        return values

    monkeypatch.setattr(loop, "metrics_to_host", poisoned)
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 2: \{'train/loss': nan\}"):
        train(dataclasses.replace(TINY, epochs=2), tmp_path)
    meta = read_meta(find_checkpoint(tmp_path / "checkpoints" / "latest"))
    assert meta["loop"]["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    # Finite loss and metrics, inf in the batch statistics from epoch 2 on: the guard used
    # to save that state as `latest` and `best`.
    overflow_batch_norm_after(monkeypatch, 5)  # TINY: 5 steps per epoch
    with pytest.raises(
        TrainingDiverged,
        match=(
            r"training diverged at epoch 2: non-finite values in \d+ array\(s\) of the training state, e.g. "
            rf"batch_stats/\S+/var; nothing of that epoch was saved; kept in {tmp_path / 'checkpoints'}: "
            r"latest \(epoch 1\), best \(epoch 1\)"
        ),
    ):
        train(TINY, tmp_path)
    store = CheckpointStore(tmp_path)
    for which in ("latest", "best"):
        state, meta = store.restore(which, tiny_state())
        assert meta["loop"]["epoch"] == 1
        assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)))
    store.close()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_save = CheckpointStore.save

    def killed_after_logging_epoch_2(self, which, state, meta):
        if which == "latest" and meta["loop"]["epoch"] == 2:
            raise Killed  # epoch 2 is in the logs, its checkpoint is not written
        real_save(self, which, state, meta)

    monkeypatch.setattr(CheckpointStore, "save", killed_after_logging_epoch_2)
    with pytest.raises(Killed):
        train(TINY, tmp_path)
    monkeypatch.undo()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    with open(events, "ab") as f:
        f.write(b"\x2a\x00\x00")  # and a record cut short by the kill
    train(TINY, tmp_path)  # resumes after epoch 1, logs epochs 2 and 3 again

    history = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for purge in (False, True):  # whether or not the reader purges orphaned data itself
        accumulator = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=purge)
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("val/dice")] == [r["step"] for r in history]
        np.testing.assert_allclose(
            [e.value for e in accumulator.Scalars("val/dice")], [r["val/dice"] for r in history], rtol=1e-6
        )


def test_early_stopping_restores_the_best_epoch(tmp_path, monkeypatch):
    # The validation losses are scripted (2 is the best, 2.5 does not improve on it), so that
    # the stopping epoch does not hang on a diverging run's float rounding; the weights
    # and the test split are real (a large learning rate makes epochs 2 and 3 differ).
    import unet_jax.train.loop as loop

    scripted = iter([3.0, 2.0, 2.5, 1.0])
    real_evaluate = loop._Run.evaluate

    def evaluate(self, state, data, prefix="val/", **kwargs):
        metrics = real_evaluate(self, state, data, prefix, **kwargs)
        return {**metrics, "val/loss": next(scripted)} if prefix == "val/" else metrics

    monkeypatch.setattr(loop._Run, "evaluate", evaluate)
    config = dataclasses.replace(TINY, epochs=4, patience=1, monitor="val/loss", learning_rate=0.3)
    result = train(config, tmp_path)
    history = result.history
    best = 2
    assert [r["val/loss"] for r in history] == [3.0, 2.0, 2.5]  # one epoch without improvement, then stop
    assert result.best_epoch == best and result.stopped_early
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_epoch"] == best
    assert results["val_at_best_epoch"]["val/loss"] == pytest.approx(history[best - 1]["val/loss"])

    # The test split was evaluated with the best epoch's weights, not the last epoch's.
    from unet_jax.inference import load
    from unet_jax.train.run import load_run_data

    split = json.loads((tmp_path / "split.json").read_text())["partitions"]
    test_set = load_run_data(config, tmp_path).subset(split["test"])
    images, masks = jnp.asarray(test_set.images_u8, jnp.float32) / 255.0, jnp.asarray(test_set.masks, jnp.float32)
    loss_fn = get_loss(config.loss)

    def test_loss(which):
        loaded = load(tmp_path / "checkpoints" / which)
        logits = loaded.model.apply(loaded.variables, images, train=False)
        return float(np.mean([loss_fn(logits[i : i + 1], masks[i : i + 1]) for i in range(len(images))]))

    reported = results["test_training_resolution"]["test/loss"]
    assert test_loss("best") == pytest.approx(reported, rel=1e-5)
    assert test_loss("latest") != pytest.approx(reported, rel=1e-3)


# --------------------------------------------------------------------------------------
# Data parallelism: 4 simulated CPU devices give the result of 1
# --------------------------------------------------------------------------------------
def test_four_devices_equal_one_device():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        assert jax.device_count() == 4, jax.devices()
        import sys; sys.path.insert(0, 'tests')
        from test_train import SHALLOW, tiny_state, random_device_data
        from unet_jax.data import AugmentConfig, make_sampler
        from unet_jax.losses import get_loss
        from unet_jax.train.steps import make_mesh, train_steps
        from jax.sharding import NamedSharding, PartitionSpec

        data = random_device_data()
        sample = make_sampler(8, 16, AugmentConfig())
        results = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = make_mesh(devices)
            replicated = NamedSharding(mesh, PartitionSpec())
            # Plain SGD: Adam would scale up the rounding noise of the (mathematically
            # zero) gradients of the conv biases before batch norm.
            state = jax.device_put(tiny_state(SHALLOW, tx=optax.sgd(0.05), size=16), replicated)
            placed = jax.device_put(data, replicated)
            for step in range(2):
                state, metrics = train_steps(state, placed, jax.random.key(3), jax.random.key(4), jnp.int32(step),
                                             num_steps=1, sample=sample, loss_fn=get_loss("bce_dice"),
                                             threshold=0.5, mesh=mesh)
            results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(metrics["loss"][0])))
            assert len(state.params["head"]["kernel"].sharding.device_set) == len(devices)
        (p1, b1, l1), (p4, b4, l4) = results
        for a, b in zip(jax.tree.leaves((p1, b1)), jax.tree.leaves((p4, b4))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert abs(l1 - l4) <= 1e-5 * abs(l1), (l1, l4)
        print("ok", l1, l4)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_batch_size_must_divide_over_devices(tmp_path):
    three_devices = SimpleNamespace(devices=np.zeros(3))  # the check reads only the mesh's size
    with pytest.raises(ValueError, match=r"batch_size 4 is not divisible by the 3 devices; expected a multiple of 3"):
        train(TINY, tmp_path, mesh=three_devices)


# --------------------------------------------------------------------------------------
# Killed at any point: half-written checkpoints and logs
# --------------------------------------------------------------------------------------
def test_a_step_best_already_holds_is_saved_again(tmp_path):
    # Killed between saving `best` and `latest` (or with checkpoint_every > 1), the resumed
    # run repeats the epoch and saves `best` at a step it already holds.
    state = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: tiny_state(SHALLOW, size=16)))  # nothing compiled
    store = CheckpointStore(tmp_path)
    store.save("best", state, {"loop": {"epoch": 1}})
    store.close()
    store = CheckpointStore(tmp_path)
    store.save("best", state, {"loop": {"epoch": 1, "again": True}})
    assert store.restore("best", state)[1]["loop"]["again"] is True
    store.close()


def test_a_save_interrupted_before_the_first_checkpoint_does_not_block_the_rerun(tmp_path):
    from unet_jax.train.run import check_resume

    half = tmp_path / "checkpoints" / "latest" / "5.orbax-checkpoint-tmp-1712345678"
    (half / "state").mkdir(parents=True)
    check_resume(TINY, tmp_path)  # nothing complete to resume from: start afresh
    CheckpointStore(tmp_path).close()
    assert not half.exists()  # the half-written folder is cleared away


def test_a_damaged_latest_checkpoint_is_a_clear_error(reference_run, tmp_path):
    import shutil

    run_dir, _, _ = reference_run
    shutil.copytree(run_dir / "checkpoints" / "latest", tmp_path / "checkpoints" / "latest")
    step = find_checkpoint(tmp_path / "checkpoints" / "latest")
    biggest = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:64])
    store = CheckpointStore(tmp_path)
    target = jax.eval_shape(tiny_state)  # shapes only: nothing to compile
    with pytest.raises(
        ValueError, match=rf"checkpoint '{step}' could not be read \(.*\); expected a complete checkpoint"
    ):
        store.restore("latest", target)
    store.close()


def test_metrics_log_drops_a_line_cut_short_and_refuses_a_bad_one(tmp_path):
    from unet_jax.train.logs import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val/dice": 0.5}\n{"epoch": 2, "val/dice": 0.6}\n{"epoch": 3, "val/di')
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]
    log = MetricsLog(tmp_path, resume_epochs=2)
    log.write({"epoch": 3, "val/dice": 0.7}, step=30)
    log.close()
    assert [r["val/dice"] for r in read_jsonl(path)] == [0.5, 0.6, 0.7]
    assert path.read_text().endswith("}\n") and not list(tmp_path.glob("*.tmp"))
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON .*; expected one JSON object per line"):
        read_jsonl(path)


# --------------------------------------------------------------------------------------
# Hard negatives: normal images repeated in the training split
# --------------------------------------------------------------------------------------
def test_repeat_normals_adds_copies_of_the_normal_training_images_only():
    from unet_jax.data import CLASSES
    from unet_jax.train.loop import repeat_normals

    ids = ("b1", "n1", "m1", "n2")
    labels = np.array([CLASSES.index(c) for c in ("benign", "normal", "malignant", "normal", "benign")])
    order = {k: i for i, k in enumerate((*ids, "b2"))}
    dataset = SimpleNamespace(labels=labels, index_of=lambda keys: np.array([order[k] for k in keys]))
    assert repeat_normals(ids, dataset, 1) == ids
    assert repeat_normals(ids, dataset, 3) == (*ids, "n1", "n2", "n1", "n2")
    with pytest.raises(ValueError, match=r"config normal_repeats = 0: expected a positive integer"):
        dataclasses.replace(TINY, normal_repeats=0)


def test_normal_repeats_lengthen_the_epoch_by_the_copies(tmp_path):
    # BUSI ids name their class ("normal (3)"); the phantom data follows the same layout.
    events = []
    config = dataclasses.replace(TINY, epochs=1, normal_repeats=3)
    result = train(config, tmp_path, progress=events.append)
    train_ids = json.loads((tmp_path / "split.json").read_text())["partitions"]["train"]
    normals = sum(1 for i in train_ids if i.startswith("normal"))
    assert normals > 0
    steps = max(e["step"] for e in events if "step" in e)
    assert steps == (len(train_ids) + 2 * normals) // config.batch_size
    assert result.best_epoch == 1
