"""Data-pipeline timings (issue 3 targets, on the shared BUSI data).

    python benchmarks/bench_data.py [--data ../shared/data] [--batch 16] [--repeats 3]

Measures (best of --repeats):
  read_s         reading + preprocessing every PNG to 256x256 (target < 10 s, 2-core CPU)
  cache_mb       size of the `data prepare` cache at 256x256 (target <= 30 MB)
  cache_load_s   loading that cache, with native-size masks (target < 2 s)
  augment_ms     one on-device sampled + augmented batch (jitted, after warm-up)
The issue's third target (augmentation adds < 5% to a training step on GPU) is a ratio to
the training step, which this benchmark does not run; it reports augment_ms alone, on
whatever backend JAX uses (the JSON records it), and the ratio is computed where a train
step is timed. Writes benchmarks/results/bench_data_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from unet_jax.data import ReadOptions, load_busi  # noqa: E402
from unet_jax.data.augment import make_sampler, to_device  # noqa: E402
from unet_jax.data.cache import load_cache, save_cache  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="timed augmentation batches")
    args = ap.parse_args()

    read_s, ds = best_of(lambda: load_busi(args.data, ReadOptions()), args.repeats)
    tmp = Path(tempfile.mkdtemp())
    try:
        save_cache(ds, tmp / "cache")
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache").iterdir()) / 1e6
        load_s, _ = best_of(lambda: load_cache(tmp / "cache"), args.repeats)
        load_no_orig_s, _ = best_of(lambda: load_cache(tmp / "cache", original_masks=False),
                                    args.repeats)
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

    backend = jax.default_backend()
    result = {
        "benchmark": "bench_data", "images": len(ds), "size": [256, 256],
        "read_s": round(read_s, 3), "read_target_s": 10.0,
        "cache_mb": round(cache_mb, 2), "cache_target_mb": 30.0,
        "cache_load_s": round(load_s, 3), "cache_load_no_original_masks_s": round(
            load_no_orig_s, 3), "cache_load_target_s": 2.0,
        "augment_ms_per_batch": round(augment_ms, 3), "augment_batch": args.batch,
        "augment_vs_train_step": None,
        "augment_vs_train_step_note": "needs the training step's time per batch; not timed "
                                      "here",
        "backend": backend, "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "repeats": args.repeats,
    }
    print(f"read + preprocess {len(ds)} PNGs -> 256x256: {read_s:.2f} s (target < 10 s)")
    print(f"cache: {cache_mb:.1f} MB (target <= 30 MB); load {load_s:.2f} s with native masks, "
          f"{load_no_orig_s:.2f} s without (target < 2 s)")
    print(f"on-device sample + augment, batch {args.batch} on {backend} "
          f"({result['device']}): {augment_ms:.2f} ms/batch")
    print("augmentation relative to a training step: needs the training step's time, "
          "which this benchmark does not run")
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_data_{backend}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
