"""Exported model folders: what `export --overwrite` may replace, stale temporaries, and
weights checked (SHA-256 per member, finite values) when a model is loaded."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from _train_helpers import save_untrained_run
from flax import serialization

from unet_jax._io import pid_alive
from unet_jax.cli import main
from unet_jax.inference import export_model, load


def _save_run(run_dir, poison: bool = False):
    return save_untrained_run(run_dir, poison=poison)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def loaded(run):
    return load(run)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_an_export(loaded, tmp_path, capsys):
    data = tmp_path / "busi"
    (data / "benign").mkdir(parents=True)
    (data / "benign" / "benign (1).png").write_bytes(b"an image")
    before = _snapshot(data)
    with pytest.raises(ValueError, match=r"refusing to replace .*busi.*not empty and not a model folder of `unet-jax"):
        export_model([loaded], data, overwrite=True)
    assert main(["export", str(loaded.step_dir), "--out", str(data), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-jax export: error: refusing to replace") and err.count("\n") == 1
    assert _snapshot(data) == before and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("where", ["run", "checkpoints", "step"])
def test_overwrite_refuses_a_folder_that_is_or_holds_a_source(tmp_path, where):
    run = _save_run(tmp_path / "victim")
    loaded = load(run)
    out = {"run": run, "checkpoints": run / "checkpoints", "step": loaded.step_dir}[where]
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"it is or holds .*, a checkpoint being exported"):
        export_model([loaded], out, overwrite=True)
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    assert _snapshot(run) == before


def test_overwrite_replaces_an_export_but_not_itself(loaded, tmp_path):
    out = export_model([loaded], tmp_path / "m")
    (out / "model.onnx").write_bytes(b"an earlier export's network")  # the export's own files
    (out / "MODEL_CARD.md").write_text("an earlier card")
    assert export_model([loaded], out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == ["member_0.msgpack", "model.json"]
    again = load(out)  # an export as the source of a new export
    with pytest.raises(ValueError, match="a checkpoint being exported"):
        export_model([again], out, overwrite=True)
    (tmp_path / "empty").mkdir()
    assert export_model([loaded], tmp_path / "empty", overwrite=True) == tmp_path / "empty"


def test_overwrite_never_deletes_a_file_the_export_did_not_write(loaded, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(loaded.step_dir), "--out", str(out), "--onnx"]) == 0
    (out / "my scan.png").write_bytes(b"a user's image")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("a user's file")
    before = _snapshot(out)
    assert main(["export", str(loaded.step_dir), "--out", str(out), "--onnx", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-jax export: error: refusing to replace {str(out)!r}: it holds 'my scan.png', 'notes'")
    assert err.count("\n") == 1
    with pytest.raises(ValueError, match="not part of a model folder of `unet-jax export`"):
        export_model([loaded], out, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _dead_pid() -> int:
    pid = 4_000_000
    while pid_alive(pid):
        pid -= 1
    return pid


def test_stale_temporaries_of_killed_exports_are_removed(loaded, tmp_path):
    dead = tmp_path / f".m.{_dead_pid()}-0123abcd.tmp"  # what a killed export leaves
    live = tmp_path / f".m.{os.getpid()}-89abcdef.tmp"  # another export, still writing
    other = tmp_path / f".n.{_dead_pid()}-0123abcd.tmp"  # not this output's
    older = tmp_path / f".m.{_dead_pid()}.tmp"  # an older writer's naming
    for folder in (dead, live, other, older):
        folder.mkdir()
        (folder / "member_0.msgpack").write_bytes(b"half")
    export_model([loaded], tmp_path / "m")
    assert not dead.exists() and not older.exists() and live.exists() and other.exists()


# ---- weights checked when loaded --------------------------------------------------------
def test_member_sha256_recorded_and_verified(loaded, tmp_path):
    out = export_model([loaded], tmp_path / "m")
    info = json.loads((out / "model.json").read_text())
    data = (out / "member_0.msgpack").read_bytes()
    assert info["member_sha256"] == {"member_0.msgpack": hashlib.sha256(data).hexdigest()}
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 200):  # 200 flipped bytes still decode
        flipped[i] ^= 0x01
    (out / "member_0.msgpack").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"member_0.msgpack' is damaged: its SHA-256 is [0-9a-f]{64}, model.json"):
        load(out)


def test_an_export_without_digests_still_loads(loaded, tmp_path):
    out = export_model([loaded], tmp_path / "m")
    info = json.loads((out / "model.json").read_text())
    del info["member_sha256"]  # as written before the field existed (the bundled model)
    (out / "model.json").write_text(json.dumps(info))
    again = load(out)
    np.testing.assert_allclose(
        again.variables["params"]["head"]["kernel"], loaded.variables["params"]["head"]["kernel"], atol=1e-3
    )
    info["member_sha256"] = 3
    (out / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="member_sha256=3; expected an object"):
        load(out)


def test_non_finite_member_is_refused_naming_file_and_parameter(loaded, tmp_path):
    out = export_model([loaded], tmp_path / "m")
    info = json.loads((out / "model.json").read_text())
    del info["member_sha256"]  # an old export: only the finite check can catch it
    (out / "model.json").write_text(json.dumps(info))
    variables = jax.device_get({"params": loaded.variables["params"], "batch_stats": loaded.variables["batch_stats"]})
    kernel = np.array(variables["params"]["head"]["kernel"])
    kernel[0, 0, 0, 0] = np.nan
    variables["params"]["head"]["kernel"] = kernel
    (out / "member_0.msgpack").write_bytes(serialization.to_bytes(variables))
    with pytest.raises(ValueError, match=r"member_0.msgpack' holds non-finite weights .* params/head/kernel \(1 of"):
        load(out)


def test_non_finite_checkpoint_is_refused_naming_the_parameter(tmp_path, capsys):
    run = _save_run(tmp_path / "run", poison=True)
    with pytest.raises(ValueError, match=r"checkpoint .*best/0' holds non-finite weights .* e\.g\. params/\S+ \(1 of"):
        load(run)
    assert main(["export", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "non-finite weights" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_an_export_without_its_model_json_is_named(loaded, tmp_path, capsys):
    out = export_model([loaded], tmp_path / "m")
    (out / "model.json").unlink()
    assert main(["predict", "--checkpoint", str(out), "x.png", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"exported model {str(out)!r} has no model.json: {str(out / 'model.json')!r} does not exist" in err


def test_restoring_a_checkpoint_logs_no_missing_metadata_warning(run, caplog):
    import logging

    from unet_jax.inference import quiet_missing_metadata

    with caplog.at_level(logging.INFO):
        load(run)
        with quiet_missing_metadata():
            logging.getLogger("absl").warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Metadata file does not exist" in m], messages
    assert "another warning" in messages  # only that one warning is silenced
    assert not logging.getLogger("absl").filters


def test_int8_storage_quantises_kernels_per_channel_and_loads_back_close(loaded, tmp_path):
    from unet_jax.inference import as_stored, from_stored, predict_probabilities

    stored = as_stored(loaded.variables, "int8")
    kernel = loaded.variables["params"]["enc1"]["conv1"]["kernel"]
    leaf = stored["params"]["enc1"]["conv1"]["kernel"]
    assert set(leaf) == {"int8", "scale"} and leaf["int8"].dtype == np.int8
    assert leaf["scale"].shape == kernel.shape[-1:]
    # Closed form: each output channel's largest |w| maps to 127 and comes back within half a step.
    assert np.abs(leaf["int8"]).reshape(-1, kernel.shape[-1]).max(axis=0).tolist() == [127] * kernel.shape[-1]
    back = from_stored(stored)["params"]["enc1"]["conv1"]["kernel"]
    assert np.all(np.abs(back - np.asarray(kernel)) <= leaf["scale"] / 2 + 1e-7)
    assert stored["params"]["enc1"]["conv1"]["bias"].dtype == np.float16  # the rest float16

    sizes = {}
    for dtype in ("float32", "int8"):
        export_model([loaded], tmp_path / dtype, dtype=dtype)
        sizes[dtype] = (tmp_path / dtype / "member_0.msgpack").stat().st_size
    assert sizes["int8"] < 0.4 * sizes["float32"]
    reloaded = load(tmp_path / "int8")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    want = predict_probabilities(loaded, images, 2)
    got = predict_probabilities(reloaded, images, 2)
    assert np.max(np.abs(got - want)) < 0.05


def test_a_damaged_quantised_kernel_is_refused_naming_the_member(loaded, tmp_path):
    from unet_jax.inference import as_stored

    out = export_model([loaded], tmp_path / "int8", dtype="int8")
    stored = as_stored(loaded.variables, "int8")
    stored["params"]["enc1"]["conv1"]["kernel"]["scale"] = np.ones(1, np.float32)  # not one per channel
    (out / "member_0.msgpack").write_bytes(serialization.to_bytes(stored))
    info = json.loads((out / "model.json").read_text())
    info.pop("member_sha256")
    (out / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"member_0.msgpack.*one scale per output channel"):
        load(out)
