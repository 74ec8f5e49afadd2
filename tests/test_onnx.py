"""ONNX export (`unet-jax export --onnx`, unet_jax.inference.onnx_export) checked by ONNX
Runtime: probabilities within 1e-4 of JAX's at the model's input size with a batch of
several images, identical masks after the recipe, and the README's snippet run literally.

Time: `python3 -m pytest -q -n 0 tests/test_onnx.py --durations=0` took 40 s for the first
eight tests on the shared 2-core machine (other jobs running); the bundled model's export
(five members, 39 MB of float32 weights in the graph) is about 6 s of it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _train_helpers import save_untrained_run
from PIL import Image

from unet_jax import metrics as M
from unet_jax.cli import main
from unet_jax.config import TrainConfig
from unet_jax.inference import (
    InferenceRecipe,
    LearnedGate,
    export_model,
    load,
    predict_outputs,
    recipe_mask,
)
from unet_jax.inference.onnx_export import network_graph, onnx_export

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE = 128

# A freshly initialised model of the bundled architecture (padded U-Net with a class head)
# at the bundled model's input size, 4 features wide so that it builds in seconds.
SMALL = TrainConfig(preset="padded", model={"features": 4, "class_head": 3}, image_size=SIZE, eval_batch_size=4)


def _images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 128, 128, 1): smooth blobs on noise, so the maps are not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(30, 98), rng.uniform(30, 98), rng.uniform(8, 25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        out.append(np.clip(120 - 90 * blob + rng.normal(0, 20, (SIZE, SIZE)), 0, 255))
    return np.asarray(out, np.uint8)[..., None]


def _session(path_or_bytes) -> ort.InferenceSession:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _onnx_outputs(session: ort.InferenceSession, images_u8: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": images_u8.astype(np.float32) / 255.0})))


def _masks(recipe, probs, classes, sizes):
    return [
        recipe_mask(p, None if classes is None else c, recipe, s)
        for p, c, s in zip(probs, classes if classes is not None else [None] * len(probs), sizes)
    ]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load(save_untrained_run(tmp_path_factory.mktemp("onnx") / "run", config=SMALL))


@pytest.mark.parametrize("flip", [False, True])
def test_small_model_probabilities_match_jax(small, flip):
    images = _images(5)
    session = _session(network_graph(small, flip).SerializeToString())
    out = _onnx_outputs(session, images)
    probs, classes = predict_outputs(small, images, flip_tta=flip, batch_size=5)
    assert out["probabilities"].shape == (5, SIZE, SIZE) and out["class_probabilities"].shape == (5, 3)
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["class_probabilities"], classes, atol=1e-4, rtol=0)
    # The batch size is symbolic: one image through the same graph gives the same numbers.
    one = _onnx_outputs(session, images[2:3])
    np.testing.assert_allclose(one["probabilities"][0], out["probabilities"][2], atol=1e-6, rtol=0)
    # Not a constant map: a mirrored image gives a different one (the test can fail).
    assert np.abs(out["probabilities"] - out["probabilities"][:, :, ::-1]).max() > 1e-3 or flip


def _threshold_in_a_gap(probs: np.ndarray, margin: float) -> float:
    """A threshold near the median probability with no probability within ``margin``: an
    untrained model's probabilities crowd around one value, and the masks of two maps that
    agree within ``margin`` must then be identical."""
    values = np.unique(np.round(probs.ravel().astype(np.float64), 7))
    gaps = np.diff(values)
    middle = np.argsort(np.abs(values[:-1] - np.median(values)))
    for i in middle:
        if gaps[i] > 2 * margin:
            return float(values[i] + gaps[i] / 2)
    raise AssertionError("no gap between probabilities")


def test_small_model_export_masks_identical_after_recipe(small, tmp_path):
    images = _images(6, seed=1)
    stored = InferenceRecipe(threshold=0.5, flip_tta=True, gate="class", gate_threshold=0.99, fill_holes=True)
    out = export_model([small], tmp_path / "model", recipe=stored, onnx=onnx_export([small], stored.flip_tta))
    info = json.loads((out / "model.json").read_text())
    assert info["onnx"]["flip_tta_in_graph"] is True and info["inference"] == stored.to_dict()
    assert set(info["onnx"]["outputs"]) == {"probabilities", "class_probabilities"}
    probs, classes = predict_outputs(load(out), images, flip_tta=True, batch_size=6)  # float16 weights, as stored
    recipe = dataclasses.replace(stored, threshold=_threshold_in_a_gap(probs, 1e-4))
    onnx.checker.check_model(str(out / "model.onnx"))
    got = _onnx_outputs(_session(out / "model.onnx"), images)
    sizes = [(300 + 17 * i, 410 - 9 * i) for i in range(6)]  # native sizes, not square
    jax_masks = _masks(recipe, probs, classes, sizes)
    onnx_masks = _masks(recipe, got["probabilities"], got["class_probabilities"], sizes)
    assert all(np.array_equal(a, b) for a, b in zip(jax_masks, onnx_masks))
    assert any(m.any() for m in jax_masks) and not all(m.all() for m in jax_masks)


def test_box_prompted_model_is_refused(small):
    sam = dataclasses.replace(small, model=_Prompted(small.model))
    with pytest.raises(ValueError, match="box-prompted; ONNX export covers unprompted segmenters only"):
        network_graph(sam, False)


class _Prompted:
    """A model that says it needs box prompts (as LiteMedSAM and SAM do)."""

    box_prompts = True

    def __init__(self, model):
        self.model = model


def test_unsupported_primitive_is_named():
    import jax
    import jax.numpy as jnp

    from unet_jax.inference import onnx_export as ox

    closed = jax.make_jaxpr(lambda x: jnp.cumsum(x, axis=0))(np.zeros((4,), np.float32))
    with pytest.raises(ValueError, match="uses the primitive 'cumsum', which has no ONNX translation"):
        ox._emit(ox._Graph(), closed.jaxpr, closed.consts, ["x"])


def test_missing_onnx_package_is_one_clear_line(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as if not installed
    monkeypatch.delitem(sys.modules, "unet_jax.inference.onnx_export")
    assert main(["export", str(small.step_dir), "--out", str(tmp_path / "m"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err == "unet-jax export: error: --onnx needs the package 'onnx': pip install 'unet-jax[onnx]'\n"
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# The bundled model (five float16 members, flip TTA, learned gate) through the CLI
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "model"
    assert main(["export", str(load().step_dir), "--out", str(out), "--onnx"]) == 0
    return out


def _busi_images() -> list[Path]:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset_BUSI_with_GT"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared BUSI data)")
    return [root / c / f"{c} ({i}).png" for c, i in [("benign", 1), ("benign", 100), ("malignant", 10), ("normal", 1)]]


def test_bundled_export_matches_jax_on_busi_images(bundled_export):
    info = json.loads((bundled_export / "model.json").read_text())
    assert info["onnx"]["members_averaged"] == 5 and len(info["members"]) == 5
    loaded = load(bundled_export)
    recipe = loaded.recipe
    assert recipe.flip_tta and isinstance(recipe.gate_model, LearnedGate)
    files = _busi_images()
    opened = [Image.open(f) for f in files]
    images = np.stack([np.asarray(im.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in opened])
    images = images[..., None]
    probs, classes = predict_outputs(loaded, images, flip_tta=True, batch_size=len(files))
    got = _onnx_outputs(_session(bundled_export / "model.onnx"), images)
    np.testing.assert_allclose(got["probabilities"], probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["class_probabilities"], classes, atol=1e-4, rtol=0)
    sizes = [im.size[::-1] for im in opened]
    jax_masks = _masks(recipe, probs, classes, sizes)
    onnx_masks = _masks(recipe, got["probabilities"], got["class_probabilities"], sizes)
    assert all(np.array_equal(a, b) for a, b in zip(jax_masks, onnx_masks))
    assert [m.any() for m in jax_masks][:3] == [True, True, True]  # the lesions are found


def _readme_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after <!-- onnx-snippet -->"
    return match.group(1)


def test_readme_snippet_segments_an_image(bundled_export, tmp_path):
    snippet = _readme_snippet()
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 10
    assert not re.search(r"^\s*(import|from)\s+(unet_jax|jax|flax)", snippet, re.M)
    (tmp_path / "my_model").symlink_to(bundled_export)
    source = _busi_images()[0]
    (tmp_path / "image.png").write_bytes(source.read_bytes())
    # Literally the README's lines, in a fresh interpreter that cannot import JAX.
    blocker = "import sys; sys.modules['jax'] = sys.modules['flax'] = sys.modules['unet_jax'] = None\n"
    subprocess.run([sys.executable, "-c", blocker + snippet], cwd=tmp_path, check=True, timeout=300)
    got = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    loaded = load(bundled_export)
    image = Image.open(source)
    x = np.asarray(image.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR))[None, ..., None]
    probs, _ = predict_outputs(loaded, x, flip_tta=True, batch_size=1)
    expected = M.resize_mask(probs[0], image.size[::-1], t=loaded.recipe.threshold)
    assert got.shape == expected.shape and np.array_equal(got, expected) and expected.any()


@pytest.mark.parametrize(
    "preset, model, size",
    [
        ("padded", {"features": 4, "lowering": "winograd2"}, 32),  # exported under the lax lowering
        ("padded", {"features": 4, "lowering": "direct"}, 32),  # lax.pad
        ("ronneberger", {"features": 4, "depth": 2}, 92),  # valid convolutions, crops
        ("resnet18_unet", {}, 64),  # max pooling (reduce_window_max), strided convolutions
        ("effnet_lite0_unet", {"class_head": 3}, 64),  # depthwise taps (custom_vjp), 'SAME' pads, ReLU6
    ],
)
def test_other_architectures_and_lowerings(preset, model, size):
    import jax

    from unet_jax.inference import LoadedModel
    from unet_jax.models import build_model, init_variables

    config = TrainConfig(preset=preset, model=model, image_size=size)
    module = build_model(config)
    loaded = LoadedModel(module, init_variables(module, jax.random.key(0), (1, size, size, 1)), config, Path("x"))
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
    got = _onnx_outputs(_session(network_graph(loaded, True).SerializeToString()), images)
    probs, _ = predict_outputs(loaded, images, flip_tta=True, batch_size=2)
    np.testing.assert_allclose(got["probabilities"], probs, atol=1e-4, rtol=0)
