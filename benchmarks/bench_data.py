"""Data-pipeline timings (issue 3 targets, on the shared BUSI data).

    python -m benchmarks.bench_data [--data ../shared/data] [--batch 16] [--repeats 3]

Measures (best of --repeats):
  read_s         reading + preprocessing every PNG to 256x256 (target < 10 s, 2-core CPU)
  cache_mb       size of the `data prepare` cache at 256x256 (target <= 30 MB)
  cache_load_s   loading that cache, with native-size masks (target < 2 s)
  augment_ms     one on-device sampled + augmented batch (jitted, after warm-up)
  train_step_*   the third target (device-side augmentation adds < 5% to a training step,
                 on GPU): one jitted step of the `seed` U-Net (Adam, BCE) with the batch
                 drawn inside it, once without augmentation (gather + /255 only) and once
                 with the default AugmentConfig; augment_overhead = with / without - 1.
                 The step is self-contained here (not unet_jax.train) so the number does not
                 move with the training code. Default: 20 steps on an accelerator, skipped
                 on a CPU (seconds per step there); --train-steps N forces it.
Writes benchmarks/results/bench_data_<backend>.json (backend and device recorded).

    python -m benchmarks.bench_data --augment-only [--cache DIR] --out FILE

measures only augmentation's share of a training step (the GPU target), on a prepared
cache (``unet-jax data prepare``) or, without one, on generated phantom images
(``--size``, ``--phantom-images``); ``--model features=4,depth=2`` shrinks the U-Net
(benchmarks/gpu_run.py's CPU dry run).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from benchmarks.harness import REPO, environment, write_result
from benchmarks.throughput import parse_fields
from unet_jax.data import ReadOptions, load_busi
from unet_jax.data.augment import AugmentConfig, make_sampler, to_device
from unet_jax.data.cache import load_cache, save_cache
from unet_jax.models import create_unet


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def train_step_ms(
    data, n: int, batch: int, config: AugmentConfig | None, steps: int, repeats: int, model_fields: dict | None = None
) -> float:
    """Best-of-``repeats`` mean time (ms) of one jitted training step of the `seed` U-Net
    whose batch is sampled (and, with ``config``, augmented) inside the step."""
    model = create_unet("seed", **{**(model_fields or {}), "in_channels": int(data.images.shape[-1])})
    sample = make_sampler(batch, n, config)
    # Jitted init: eager init compiles every initializer separately (a minute on a CPU).
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *data.images.shape[1:]), jnp.float32))
    tx = optax.adam(1e-3)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    @jax.jit
    def step(state, key, i):
        params, stats, opt = state
        b = sample(data, key, i)

        def loss(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats},
                b.images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(key, i)},
            )
            return optax.sigmoid_binary_cross_entropy(logits, b.masks).mean(), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), upd["batch_stats"], opt), value

    key = jax.random.key(1)
    idx = [jax.device_put(jnp.int32(i)) for i in range(steps + 1)]
    state, v = step(state, key, idx[0])  # compile
    jax.block_until_ready(v)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in idx[1:]:
            state, v = step(state, key, i)
        jax.block_until_ready(v)
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


def sampler_ms(data, n: int, batch: int, steps: int) -> float:
    """Mean time (ms) of one on-device sampled + augmented batch (jitted, after warm-up)."""
    sample = make_sampler(batch, n)
    key = jax.random.key(0)
    jax.block_until_ready(sample(data, key, 0))  # compile
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        out = sample(data, key, step)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps * 1e3


def augment_only(args: argparse.Namespace) -> dict:
    """Augmentation's share of a training step, on a cache or on generated phantom images."""

    t0 = time.perf_counter()
    if args.cache and Path(args.cache).is_dir():
        ds, source = load_cache(args.cache, original_masks=False), f"cache {args.cache}"
    else:
        from unet_jax.data.phantom import write_phantom

        tmp = Path(tempfile.mkdtemp())
        try:
            n = args.phantom_images
            write_phantom(
                tmp / "p",
                {"benign": n // 2, "malignant": n // 3, "normal": n - n // 2 - n // 3},
                size=(args.size, args.size),
            )
            ds = load_busi(tmp / "p", ReadOptions(size=(args.size, args.size)))
        finally:
            shutil.rmtree(tmp)
        source = f"phantom ({len(ds)} images; cache {args.cache!r} absent)"
    fields = parse_fields(args.model)
    data = to_device(ds)
    steps = args.train_steps or 20
    plain = train_step_ms(data, len(ds), args.batch, None, steps, args.repeats, fields)
    aug = train_step_ms(data, len(ds), args.batch, AugmentConfig(), steps, args.repeats, fields)
    return {
        "benchmark": "augment_share",
        "data": source,
        "images": len(ds),
        "size": list(ds.images_u8.shape[1:3]),
        "channels": int(ds.images_u8.shape[-1]),
        "batch": args.batch,
        "train_preset": "seed",
        "model_overrides": fields,
        "train_steps": steps,
        "repeats": args.repeats,
        "augment_ms_per_batch": round(sampler_ms(data, len(ds), args.batch, steps), 3),
        "train_step_ms_no_augment": round(plain, 3),
        "train_step_ms_augment": round(aug, 3),
        "augment_overhead": round(aug / plain - 1.0, 4),
        "augment_share_of_step": round(max(aug - plain, 0.0) / aug, 4),
        "augment_overhead_target": 0.05,
        "augment_overhead_target_backend": "gpu",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "environment": environment(None, None),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--augment-only", action="store_true", help="only augmentation's share of a training step (see above)"
    )
    ap.add_argument("--cache", default=None, help="--augment-only: a prepared cache folder")
    ap.add_argument("--size", type=int, default=256, help="--augment-only: phantom image size")
    ap.add_argument("--phantom-images", type=int, default=120)
    ap.add_argument("--model", default="", help="--augment-only: seed U-Net field overrides")
    ap.add_argument("--out", default=None, help="--augment-only: the JSON file to write")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="timed augmentation batches")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="timed training steps per variant (default: 20 on an accelerator, 0 = skipped on a CPU)",
    )
    args = ap.parse_args()
    if args.augment_only:
        result = augment_only(args)
        out = Path(args.out or REPO / "benchmarks" / "results" / f"augment_{result['backend']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_result(out, result)
        print(
            f"augmentation, batch {args.batch} ({result['data']}): step "
            f"{result['train_step_ms_no_augment']:.2f} ms without, {result['train_step_ms_augment']:.2f} ms "
            f"with: +{100 * result['augment_overhead']:.1f}% (target < 5% on GPU; this is {result['backend']})"
        )
        print(f"wrote {out}")
        return 0
    if args.train_steps is None:
        args.train_steps = 0 if jax.default_backend() == "cpu" else 20

    read_s, ds = best_of(lambda: load_busi(args.data, ReadOptions()), args.repeats)
    tmp = Path(tempfile.mkdtemp())
    try:
        save_cache(ds, tmp / "cache")
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache").iterdir()) / 1e6
        load_s, _ = best_of(lambda: load_cache(tmp / "cache"), args.repeats)
        load_no_orig_s, _ = best_of(lambda: load_cache(tmp / "cache", original_masks=False), args.repeats)
    finally:
        shutil.rmtree(tmp)

    data = to_device(ds)
    sample = make_sampler(args.batch, len(ds))
    key = jax.random.key(0)
    jax.block_until_ready(sample(data, key, 0))  # compile
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = sample(data, key, step)
    jax.block_until_ready(out)
    augment_ms = (time.perf_counter() - t0) / args.steps * 1e3

    plain_ms = aug_ms = overhead = None
    if args.train_steps > 0:
        plain_ms = train_step_ms(data, len(ds), args.batch, None, args.train_steps, args.repeats)
        aug_ms = train_step_ms(data, len(ds), args.batch, AugmentConfig(), args.train_steps, args.repeats)
        overhead = aug_ms / plain_ms - 1.0

    backend = jax.default_backend()
    result = {
        "benchmark": "bench_data",
        "images": len(ds),
        "size": [256, 256],
        "read_s": round(read_s, 3),
        "read_target_s": 10.0,
        "cache_mb": round(cache_mb, 2),
        "cache_target_mb": 30.0,
        "cache_load_s": round(load_s, 3),
        "cache_load_no_original_masks_s": round(load_no_orig_s, 3),
        "cache_load_target_s": 2.0,
        "augment_ms_per_batch": round(augment_ms, 3),
        "augment_batch": args.batch,
        "train_step_ms_no_augment": None if plain_ms is None else round(plain_ms, 3),
        "train_step_ms_augment": None if aug_ms is None else round(aug_ms, 3),
        "augment_overhead": None if overhead is None else round(overhead, 4),
        "augment_overhead_target": 0.05,
        "augment_overhead_target_backend": "gpu",
        "train_steps": args.train_steps,
        "train_preset": "seed",
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "environment": environment(None, None),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "repeats": args.repeats,
    }
    print(f"read + preprocess {len(ds)} PNGs -> 256x256: {read_s:.2f} s (target < 10 s)")
    print(
        f"cache: {cache_mb:.1f} MB (target <= 30 MB); load {load_s:.2f} s with native masks, "
        f"{load_no_orig_s:.2f} s without (target < 2 s)"
    )
    print(
        f"on-device sample + augment, batch {args.batch} on {backend} ({result['device']}): {augment_ms:.2f} ms/batch"
    )
    if overhead is None:
        print("augmentation vs a training step: skipped (CPU; the target is for GPU; --train-steps N forces it)")
    else:
        print(
            f"seed U-Net train step, batch {args.batch}: {plain_ms:.1f} ms without, "
            f"{aug_ms:.1f} ms with augmentation: +{100 * overhead:.1f}% "
            f"(target < 5% on GPU; this is {backend})"
        )
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_data_{backend}.json"
    write_result(path, result)
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
