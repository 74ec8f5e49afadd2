"""Segment Anything port: parity with the reference PyTorch package on random weights,
presets, parameter counts, the segmenter wrapper and checkpoint conversion.

Relative error everywhere: ``max|a - b| / max|b|`` with ``b`` the PyTorch reference,
required below 1e-4 in float32.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import serialization


def _import_reference():
    """The reference ``segment_anything.modeling`` without running the package
    ``__init__``: that imports the predictor, which imports torchvision, and the registry's
    torchvision wheel is a CUDA build that cannot load next to CPU torch. Registering a
    bare package object with the right ``__path__`` lets the submodules import normally.
    A missing ``segment_anything`` is an error here (it is in the ``test`` extra)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment_anything is not installed (pip install segment-anything)")
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("segment_anything", pkg)
    from segment_anything import modeling
    from segment_anything.modeling import image_encoder as image_encoder_module

    return modeling, image_encoder_module


ref, ref_image_encoder = _import_reference()

from unet_jax.convert import sam as convert_sam  # noqa: E402
from unet_jax.convert.sam import (  # noqa: E402
    SamCheckpointError,
    convert_sam_checkpoint,
    infer_sam_preset,
    load_sam_params,
    sam_params_from_state_dict,
)
from unet_jax.models.sam import (  # noqa: E402
    SAM_PRESETS,
    Sam,
    SamSegmenter,
    create_sam,
    postprocess_masks,
    resize_bilinear,
    sam_init_params,
)
from unet_jax.models.sam.image_encoder import get_rel_pos  # noqa: E402

TOL = 1e-4
# sam_tiny with a window (3) that does not divide the 8x8 grid: exercises the padding of
# window_partition/unpartition.
TINY = dict(SAM_PRESETS["sam_tiny"], encoder_window_size=3)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def build_torch_sam(p: dict) -> torch.nn.Module:
    """The reference ``Sam`` built as ``build_sam._build_sam`` does, from our field values."""
    e = p["image_size"] // p["patch_size"]
    return ref.Sam(
        image_encoder=ref.ImageEncoderViT(
            depth=p["encoder_depth"],
            embed_dim=p["encoder_embed_dim"],
            img_size=p["image_size"],
            mlp_ratio=p["encoder_mlp_ratio"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=p["encoder_num_heads"],
            patch_size=p["patch_size"],
            qkv_bias=p["encoder_qkv_bias"],
            use_rel_pos=p["encoder_use_rel_pos"],
            global_attn_indexes=list(p["encoder_global_attn_indexes"]),
            window_size=p["encoder_window_size"],
            out_chans=p["prompt_embed_dim"],
        ),
        prompt_encoder=ref.PromptEncoder(
            embed_dim=p["prompt_embed_dim"],
            image_embedding_size=(e, e),
            input_image_size=(p["image_size"], p["image_size"]),
            mask_in_chans=p["mask_in_chans"],
        ),
        mask_decoder=ref.MaskDecoder(
            num_multimask_outputs=p["num_multimask_outputs"],
            transformer=ref.TwoWayTransformer(
                depth=p["decoder_depth"],
                embedding_dim=p["prompt_embed_dim"],
                mlp_dim=p["decoder_mlp_dim"],
                num_heads=p["decoder_num_heads"],
            ),
            transformer_dim=p["prompt_embed_dim"],
            iou_head_depth=p["iou_head_depth"],
            iou_head_hidden_dim=p["iou_head_hidden_dim"],
        ),
    ).eval()


def randomised_torch_sam(p: dict, seed: int = 0) -> torch.nn.Module:
    """Reference model with every parameter random: torch's default init plus noise, and
    a larger noise on the constant-initialised ones (LayerNorm weights/biases, position
    embeddings, relative position tables) so that nothing is trivially 0 or 1."""
    torch.manual_seed(seed)
    model = build_torch_sam(p)
    with torch.no_grad():
        for _, t in model.named_parameters():
            constant = t.numel() > 1 and float(t.std()) == 0.0
            t.add_((0.2 if constant else 0.02) * torch.randn_like(t))
    model.requires_grad_(False)
    return model


def japply(module, variables, *args, **kwargs):
    """``module.apply`` jitted (array arguments traced, keyword arguments static): one
    compilation is much cheaper than eager op-by-op dispatch on CPU."""
    return jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)


def torch_state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_pair():
    """(torch Sam, flax Sam, flax variables) sharing the same random weights."""
    tmodel = randomised_torch_sam(TINY)
    module = Sam(**TINY)
    params = sam_params_from_state_dict(torch_state_numpy(tmodel), module)
    return tmodel, module, {"params": params}


def _prompts(rng: np.random.Generator, b: int, n: int, size: int):
    pts = rng.uniform(0, size, (b, n, 2)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], (b, n)).astype(np.int64)
    labels[:, 0] = 1
    xs = np.sort(rng.uniform(0, size, (b, 2)), axis=1)
    ys = np.sort(rng.uniform(0, size, (b, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
    return pts, labels, boxes


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_size,k_size,length", [(4, 4, 7), (4, 4, 15), (6, 6, 5), (3, 5, 9)])
def test_get_rel_pos_matches_reference(q_size, k_size, length):
    table = np.random.default_rng(0).normal(size=(length, 6)).astype(np.float32)
    want = ref_image_encoder.get_rel_pos(q_size, k_size, torch.from_numpy(table)).numpy()
    got = get_rel_pos(q_size, k_size, jnp.asarray(table))
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("size", [(50, 37), (7, 23)])
def test_resize_bilinear_matches_torch_interpolate(size):
    x = np.random.default_rng(1).normal(size=(2, 32, 24, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(nchw(x)), size, mode="bilinear", align_corners=False)
    got = resize_bilinear(jnp.asarray(x), size)
    assert rel_err(nchw(got), want.numpy()) < 1e-5


# --------------------------------------------------------------------------------------
# Parity of the three parts and end to end (sam_tiny, window padding exercised)
# --------------------------------------------------------------------------------------
def test_image_encoder_parity(tiny_pair):
    tmodel, module, variables = tiny_pair
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = tmodel.image_encoder(torch.from_numpy(nchw(x))).numpy()
    got = japply(module, variables, jnp.asarray(x), method="encode_image")
    assert got.shape == (2, 8, 8, 32)
    assert rel_err(nchw(got), want) < TOL


@pytest.mark.parametrize("kinds", ["points", "boxes", "masks", "points+boxes", "all", "none"])
def test_prompt_encoder_parity(tiny_pair, kinds):
    tmodel, module, variables = tiny_pair
    rng = np.random.default_rng(3)
    pts, labels, boxes = _prompts(rng, 3, 4, 64)
    masks = rng.normal(size=(3, 32, 32, 1)).astype(np.float32)
    use = {
        "points": "points" in kinds or kinds == "all",
        "boxes": "boxes" in kinds or kinds == "all",
        "masks": kinds in ("masks", "all"),
    }
    t_args = dict(
        points=(torch.from_numpy(pts), torch.from_numpy(labels)) if use["points"] else None,
        boxes=torch.from_numpy(boxes) if use["boxes"] else None,
        masks=torch.from_numpy(nchw(masks)) if use["masks"] else None,
    )
    with torch.no_grad():
        t_sparse, t_dense = tmodel.prompt_encoder(**t_args)
        t_pe = tmodel.prompt_encoder.get_dense_pe().numpy()

    def run(mdl):
        return mdl.prompt_encoder(
            (jnp.asarray(pts), jnp.asarray(labels)) if use["points"] else None,
            jnp.asarray(boxes) if use["boxes"] else None,
            jnp.asarray(masks) if use["masks"] else None,
        ), mdl.get_dense_pe()

    (sparse, dense), pe = japply(module, variables, method=run)
    assert sparse.shape == tuple(t_sparse.shape)
    if t_sparse.numel():
        assert rel_err(sparse, t_sparse.numpy()) < TOL
    assert rel_err(nchw(dense), t_dense.numpy()) < TOL
    assert rel_err(nchw(pe), t_pe) < TOL


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder_parity(tiny_pair, multimask):
    tmodel, module, variables = tiny_pair
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(1, 8, 8, 32)).astype(np.float32)
    sparse = rng.normal(size=(3, 5, 32)).astype(np.float32)
    dense = rng.normal(size=(3, 8, 8, 32)).astype(np.float32)
    with torch.no_grad():
        t_masks, t_iou = tmodel.mask_decoder(
            image_embeddings=torch.from_numpy(nchw(emb)),
            image_pe=tmodel.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.from_numpy(sparse),
            dense_prompt_embeddings=torch.from_numpy(nchw(dense)),
            multimask_output=multimask,
        )

    def run(mdl):
        return mdl.mask_decoder(
            jnp.asarray(emb), mdl.get_dense_pe(), jnp.asarray(sparse), jnp.asarray(dense), multimask
        )

    masks, iou = japply(module, variables, method=run)
    m = 3 if multimask else 1
    assert masks.shape == (3, 32, 32, m) and iou.shape == (3, m)
    assert rel_err(nchw(masks), t_masks.numpy()) < TOL
    assert rel_err(iou, t_iou.numpy()) < TOL


@pytest.mark.parametrize("multimask", [True])  # False: see test_mask_decoder_parity
def test_sam_forward_parity_end_to_end(tiny_pair, multimask):
    """``Sam.forward`` with points + boxes + mask inputs on one non-square (padded) image,
    masks post-processed to an original size different from image_size (upsampling), and
    the same logits post-processed to a smaller size (downsampling, no antialiasing)."""
    tmodel, module, variables = tiny_pair
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 255, (1, 64, 48, 3)).astype(np.float32)
    pts, labels, boxes = _prompts(rng, 2, 3, 48)
    mask_in = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
    original = (100, 75)
    record = {
        "image": torch.from_numpy(image[0].transpose(2, 0, 1)),
        "original_size": original,
        "point_coords": torch.from_numpy(pts),
        "point_labels": torch.from_numpy(labels),
        "boxes": torch.from_numpy(boxes),
        "mask_inputs": torch.from_numpy(nchw(mask_in)),
    }
    with torch.no_grad():
        out_t = tmodel([record], multimask_output=multimask)[0]
        logits_t = tmodel.postprocess_masks(out_t["low_res_logits"], (64, 48), original).numpy()
        small_t = tmodel.postprocess_masks(out_t["low_res_logits"], (64, 48), (21, 17)).numpy()
    out = japply(
        module,
        variables,
        jnp.asarray(image),
        (jnp.asarray(pts), jnp.asarray(labels)),
        jnp.asarray(boxes),
        jnp.asarray(mask_in),
        multimask_output=multimask,
        original_size=original,
    )
    m = 3 if multimask else 1
    assert out["mask_logits"].shape == (2, *original, m)
    assert rel_err(nchw(out["low_res_logits"]), out_t["low_res_logits"].numpy()) < TOL
    assert rel_err(out["iou_predictions"], out_t["iou_predictions"].numpy()) < TOL
    assert rel_err(nchw(out["mask_logits"]), logits_t) < TOL
    # Thresholded masks agree except where a logit is within rounding of 0.
    sure = np.abs(logits_t) > 1e-3 * np.abs(logits_t).max()
    assert np.array_equal(nchw(out["masks"])[sure], out_t["masks"].numpy()[sure])
    small = postprocess_masks(out["low_res_logits"], 64, (64, 48), (21, 17))
    assert rel_err(nchw(small), small_t) < TOL


# --------------------------------------------------------------------------------------
# The segmenter wrapper
# --------------------------------------------------------------------------------------
def _torch_segmenter(tmodel, images: np.ndarray, boxes: np.ndarray, multimask: bool) -> np.ndarray:
    """The segmenter's pipeline written with the reference modules: (B, h, w, 1) images in
    [0, 1] stretched to s x s, boxes scaled per axis, the best-IoU mask when multimask."""
    s = 64
    b, h, w, _ = images.shape
    with torch.no_grad():
        x = torch.from_numpy(nchw(images)).repeat(1, 3, 1, 1) * 255.0
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False)
        emb = tmodel.image_encoder(torch.stack([tmodel.preprocess(im) for im in x]))
        scale = np.asarray([s / w, s / h, s / w, s / h], np.float32)
        want = []
        for i in range(b):
            sparse, dense = tmodel.prompt_encoder(
                points=None, boxes=torch.from_numpy(boxes[i : i + 1] * scale), masks=None
            )
            low, iou = tmodel.mask_decoder(
                image_embeddings=emb[i : i + 1],
                image_pe=tmodel.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            if multimask:
                best = int(torch.argmax(iou[0]))
                low = low[:, best : best + 1]
            want.append(tmodel.postprocess_masks(low, (s, s), (h, w)))
        return torch.cat(want).numpy()


@pytest.mark.parametrize("shape, multimask", [((40, 40), False), ((40, 56), True)])
def test_segmenter_matches_torch_pipeline(tiny_pair, shape, multimask):
    """Square and stretched (non-square) inputs, boxes scaled per axis; with
    multimask_output the mask of the highest predicted IoU."""
    tmodel, _, variables = tiny_pair
    seg = create_sam("sam_tiny", encoder_window_size=3, multimask_output=multimask)
    assert SamSegmenter.box_prompts is True and "box_prompts" not in SamSegmenter.__dataclass_fields__
    assert set(variables["params"]) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    rng = np.random.default_rng(6)
    b, (h, w) = 2, shape
    images = rng.uniform(0, 1, (b, h, w, 1)).astype(np.float32)
    boxes = np.array([[4.0, 6.0, 30.0, 25.0], [10.0, 2.0, 38.0, 36.0]], np.float32)
    logits = japply(seg, variables, jnp.asarray(images), jnp.asarray(boxes))
    assert logits.shape == (b, h, w, 1) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert rel_err(nchw(logits), _torch_segmenter(tmodel, images, boxes, multimask)) < TOL
    no_box = jax.eval_shape(seg.apply, variables, jnp.asarray(images))
    assert no_box.shape == (b, h, w, 1)


def test_segmenter_init_tree_and_rgb(preset_tiny):
    seg = create_sam("sam_tiny", in_channels=3)
    images = jnp.zeros((1, 32, 32, 3))
    box = jnp.array([[1.0, 2.0, 20.0, 30.0]])
    # A plain init (boxes only, as the training loop does) creates the full tree, the
    # same as sam_init_params and as the converter fills: a checkpoint maps one to one.
    variables = jax.eval_shape(seg.init, jax.random.PRNGKey(0), images, box)
    assert set(variables["params"]) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    full = jax.eval_shape(lambda: sam_init_params(seg))
    params = preset_tiny[1]
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(variables["params"]) == jax.tree_util.tree_structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(params)))
    out = jax.eval_shape(partial(seg.apply, train=True), {"params": params}, images, box)
    assert out.shape == (1, 32, 32, 1) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\)"):
        seg.apply({"params": full}, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="unknown SAM preset"):
        create_sam("sam_vit_x")
    with pytest.raises(ValueError, match="unknown SamSegmenter field"):
        create_sam("sam_tiny", depth=3)


# --------------------------------------------------------------------------------------
# Presets and parameter counts
# --------------------------------------------------------------------------------------
def test_presets_match_build_sam():
    common = dict(
        image_size=1024,
        patch_size=16,
        encoder_window_size=14,
        encoder_mlp_ratio=4.0,
        prompt_embed_dim=256,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=2048,
        decoder_num_heads=8,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        encoder_qkv_bias=True,
        encoder_use_rel_pos=True,
    )
    for name, (dim, depth, heads, glob) in {
        "sam_vit_b": (768, 12, 12, (2, 5, 8, 11)),
        "sam_vit_l": (1024, 24, 16, (5, 11, 17, 23)),
        "sam_vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    }.items():
        assert SAM_PRESETS[name] == dict(
            common,
            encoder_embed_dim=dim,
            encoder_depth=depth,
            encoder_num_heads=heads,
            encoder_global_attn_indexes=glob,
        )


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_tiny"])
def test_parameter_counts_match_reference(name):
    with torch.device("meta"):  # shapes only: ViT-H is never materialised
        tmodel = build_torch_sam(SAM_PRESETS[name])
    n_torch_params = sum(p.numel() for p in tmodel.parameters())
    n_torch_state = sum(v.numel() for v in tmodel.state_dict().values())
    shapes = jax.eval_shape(lambda: sam_init_params(Sam(**SAM_PRESETS[name])))
    n_flax = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    # The flax tree also carries the (2, embed/2) Fourier matrix, a torch buffer.
    gaussian = SAM_PRESETS[name]["prompt_embed_dim"]
    assert n_flax == n_torch_state == n_torch_params + gaussian
    if name == "sam_vit_b":
        assert n_torch_params == 93_735_472


# --------------------------------------------------------------------------------------
# Conversion errors, preset inference, files
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state(tiny_pair):
    return torch_state_numpy(tiny_pair[0])


def test_converter_reports_missing_unexpected_and_shapes(tiny_state):
    sd = dict(tiny_state)
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra.weight"] = np.zeros(3, np.float32)
    sd["image_encoder.neck.2.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(SamCheckpointError) as info:
        sam_params_from_state_dict(sd, TINY, source="ckpt.pth")
    msg = str(info.value)
    assert msg.startswith("ckpt.pth:")
    assert "1 missing key(s): mask_decoder.iou_token.weight" in msg
    assert "1 unexpected key(s): mask_decoder.extra.weight" in msg
    assert "image_encoder.neck.2.weight: expected (32, 32, 3, 3), found (32, 32, 1, 1)" in msg


def test_converter_suggests_preset_and_infers_it(tiny_state):
    assert infer_sam_preset(tiny_state) == "sam_tiny"
    with pytest.raises(SamCheckpointError, match=r"match preset 'sam_tiny'"):
        sam_params_from_state_dict(tiny_state, "sam_vit_b", source="x.pth")
    fake_l = {"image_encoder.patch_embed.proj.weight": np.zeros((1024, 3, 16, 16))}
    fake_l.update({f"image_encoder.blocks.{i}.norm1.weight": np.zeros(1) for i in range(24)})
    assert infer_sam_preset(fake_l) == "sam_vit_l"
    fake_3 = {"image_encoder.patch_embed.proj.weight": np.zeros((1024, 3, 16, 16))}
    fake_3.update({f"image_encoder.blocks.{i}.norm1.weight": np.zeros(1) for i in range(3)})
    with pytest.raises(SamCheckpointError, match="embed dim 1024, depth 3"):
        infer_sam_preset(fake_3)
    with pytest.raises(SamCheckpointError, match="not a SAM state dict"):
        infer_sam_preset({"conv.weight": np.zeros(1)}, "other.pth")


def test_conversion_layouts_roundtrip(tiny_pair, tiny_state):
    """Each layout class is placed where the Flax layer reads it."""
    params = tiny_pair[2]["params"]
    np.testing.assert_array_equal(
        params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
        tiny_state["image_encoder.blocks.0.attn.qkv.weight"].T,
    )
    np.testing.assert_array_equal(
        params["image_encoder"]["neck_2"]["kernel"], tiny_state["image_encoder.neck.2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["mask_decoder"]["output_upscaling_0"]["kernel"],
        tiny_state["mask_decoder.output_upscaling.0.weight"].transpose(2, 3, 0, 1),
    )
    np.testing.assert_array_equal(
        params["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
        tiny_state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )


def _fake_pth_module(monkeypatch):
    """A stand-in ``unet_jax.convert.pth`` reading with torch.load (the real reader needs
    no torch); lets the converter's own logic be tested independently of it."""
    mod = types.ModuleType("unet_jax.convert.pth")

    class TorchCheckpointError(ValueError):
        pass

    def read_torch_checkpoint(path):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise TorchCheckpointError(f"{path}: {err}") from err
        return {k: v.numpy() for k, v in sd.items()}

    mod.read_torch_checkpoint = read_torch_checkpoint
    mod.TorchCheckpointError = TorchCheckpointError
    # The converter imported the reader at its top, so the stand-in replaces that name.
    monkeypatch.setattr(convert_sam, "read_torch_checkpoint", read_torch_checkpoint)
    return mod


@pytest.fixture(scope="module")
def preset_tiny():
    """(torch model, converted params) of the exact ``sam_tiny`` preset (window 4), which
    preset inference must find."""
    tmodel = randomised_torch_sam(SAM_PRESETS["sam_tiny"], seed=3)
    return tmodel, sam_params_from_state_dict(torch_state_numpy(tmodel), "sam_tiny")


def test_convert_checkpoint_file_roundtrip(preset_tiny, tmp_path, monkeypatch):
    _fake_pth_module(monkeypatch)
    tmodel, params = preset_tiny
    variables = {"params": params}
    pth = tmp_path / "sam_tiny.pth"
    torch.save(tmodel.state_dict(), pth)
    out = convert_sam_checkpoint(pth, tmp_path / "out" / "sam_tiny.msgpack")
    assert out == tmp_path / "out" / "sam_tiny.msgpack"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sam_tiny.msgpack"]  # no temp left
    loaded = load_sam_params(out)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)

    # A failing conversion leaves an existing output untouched and no temp file.
    with pytest.raises(SamCheckpointError, match="match preset 'sam_tiny'"):
        convert_sam_checkpoint(pth, out, preset="sam_vit_b")
    assert load_sam_params(out).keys() == loaded.keys()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sam_tiny.msgpack"]


def test_load_sam_params_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.msgpack"):
        load_sam_params(tmp_path / "missing.msgpack")
    good = serialization.msgpack_serialize(
        {"image_encoder": {"a": np.ones(3)}, "prompt_encoder": {}, "mask_decoder": {}}
    )
    bad = tmp_path / "trunc.msgpack"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(SamCheckpointError, match="trunc.msgpack"):
        load_sam_params(bad)
    other = tmp_path / "other.msgpack"
    other.write_bytes(serialization.msgpack_serialize({"params": {"w": np.ones(2)}}))
    with pytest.raises(SamCheckpointError, match="not SAM params"):
        load_sam_params(other)


def test_convert_with_project_pth_reader(preset_tiny, tmp_path):
    """End to end through the project's torch-free reader (``unet_jax.convert.pth``)."""
    from unet_jax.convert.pth import TorchCheckpointError

    tmodel, params = preset_tiny
    variables = {"params": params}
    pth = tmp_path / "sam.pth"
    torch.save(tmodel.state_dict(), pth)
    out = convert_sam_checkpoint(pth, tmp_path / "sam.msgpack")
    for a, b in zip(jax.tree_util.tree_leaves(load_sam_params(out)), jax.tree_util.tree_leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(pth.read_bytes()[:100])
    with pytest.raises(TorchCheckpointError):
        convert_sam_checkpoint(broken, tmp_path / "never.msgpack")
    assert not (tmp_path / "never.msgpack").exists()


# --------------------------------------------------------------------------------------
# Opt-in: the real ViT-B shapes at 1024x1024 (pytest -m full_sam)
# --------------------------------------------------------------------------------------
@pytest.mark.full_sam
def test_full_vit_b_parity():
    p = SAM_PRESETS["sam_vit_b"]
    t0 = time.perf_counter()
    tmodel = randomised_torch_sam(p, seed=1)
    module = Sam(**p)
    variables = {"params": sam_params_from_state_dict(torch_state_numpy(tmodel), module)}
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 255, (1, 1024, 768, 3)).astype(np.float32)
    pts, labels, boxes = _prompts(rng, 2, 2, 768)
    original = (1200, 900)
    record = {
        "image": torch.from_numpy(image[0].transpose(2, 0, 1)),
        "original_size": original,
        "point_coords": torch.from_numpy(pts),
        "point_labels": torch.from_numpy(labels),
        "boxes": torch.from_numpy(boxes),
    }
    with torch.no_grad():
        emb_t = tmodel.image_encoder(tmodel.preprocess(record["image"])[None]).numpy()
        out_t = tmodel([record], multimask_output=True)[0]
        logits_t = tmodel.postprocess_masks(out_t["low_res_logits"], (1024, 768), original).numpy()

    @jax.jit
    def run(variables, image, pts, labels, boxes):
        out = module.apply(variables, image, (pts, labels), boxes, multimask_output=True, original_size=original)
        emb = module.apply(variables, module.apply(variables, image, method="preprocess"), method="encode_image")
        return out, emb

    out, emb = run(variables, jnp.asarray(image), jnp.asarray(pts), jnp.asarray(labels), jnp.asarray(boxes))
    errs = {
        "embeddings": rel_err(nchw(emb), emb_t),
        "low_res_logits": rel_err(nchw(out["low_res_logits"]), out_t["low_res_logits"].numpy()),
        "iou": rel_err(out["iou_predictions"], out_t["iou_predictions"].numpy()),
        "mask_logits": rel_err(nchw(out["mask_logits"]), logits_t),
    }
    print(f"full ViT-B parity ({time.perf_counter() - t0:.1f} s): {errs}")
    assert all(e < TOL for e in errs.values()), errs
