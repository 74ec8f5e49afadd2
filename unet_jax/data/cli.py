"""``unet-jax data ...``: parse arguments, call unet_jax.data, print. Nothing more.

    unet-jax data check PATH [--json] [--threshold BITS]
    unet-jax data prepare PATH --out DIR [--size H [W]] [--channels {1,3}] [--skip-bad]
                          [--overwrite]
    unet-jax data phantom --out DIR [--counts B M N] [--size H [W]] [--seed S] [--duplicates K]
    unet-jax data split PATH --out FILE [--protocol {stratified,kfold,seed}] [--seed S] [--k K]
                        [--overwrite]

PATH is a BUSI-layout folder (or its parent, e.g. ../shared/data); ``data split`` also
accepts a cache folder written by ``data prepare``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from unet_jax.data import splits
from unet_jax.data.busi import ReadOptions, check_dataset, load_busi
from unet_jax.data.cache import load_cache, prepare
from unet_jax.data.phantom import write_phantom
from unet_jax.progress import ProgressPrinter

__all__ = ["add_data_commands"]


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command (with check/prepare/phantom/split) to ``subparsers``."""
    data = subparsers.add_parser("data", help="check, prepare, split or generate BUSI data")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("check", help="validate a dataset folder and summarize it; exit 1 on any problem")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threshold", type=int, default=None, help="duplicate threshold in pHash bits (default: 10)")
    p.set_defaults(func=_os_errors_as_value_errors(_check))

    p = sub.add_parser("prepare", help="write a compact cache for training")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, nargs="+", default=[256], metavar=("H", "W"))
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--skip-bad", action="store_true", help="leave out bad images (reported) instead of failing")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_os_errors_as_value_errors(_prepare))

    p = sub.add_parser("phantom", help="generate a synthetic dataset in the BUSI layout")
    p.add_argument("--out", required=True)
    p.add_argument("--counts", type=int, nargs=3, default=[12, 8, 4], metavar=("BENIGN", "MALIGNANT", "NORMAL"))
    p.add_argument("--size", type=int, nargs="+", default=[256], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duplicates", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_os_errors_as_value_errors(_phantom))

    p = sub.add_parser("split", help="write a duplicate-aware split manifest (JSON)")
    p.add_argument("path", help="dataset folder or cache folder")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", choices=("stratified", "kfold", "seed"), default="stratified")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--threshold", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing split manifest")
    p.set_defaults(func=_os_errors_as_value_errors(_split))


def _os_errors_as_value_errors(fn):
    """Report file-system failures (a parent that is a file, no permission, disk full) as
    the one-line errors the ``unet-jax`` entry point prints for a ValueError, naming the
    path, instead of a traceback."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BrokenPipeError:  # output piped into `head`: not a data problem
            raise
        except OSError as err:
            where = f": {err.filename!r}" if err.filename else ""
            raise ValueError(f"{err.strerror or err}{where}") from err

    return run


def _size(values: list[int]) -> tuple[int, int]:
    if len(values) > 2:
        raise ValueError(f"--size takes H or H W, got {len(values)} values: {values}")
    return values[0], values[-1]


def _progress():
    """Image-reading progress on stderr: a live bar on a terminal, a few plain lines in a
    log (see unet_jax.progress)."""
    printer = ProgressPrinter()
    return lambda done, total: printer({"kind": "read", "done": done, "total": total})


def _check(args: argparse.Namespace) -> int:
    report = check_dataset(args.path, args.threshold, _progress())
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.ok else 1
    d = report.to_dict()
    print(f"dataset: {report.root}")
    for c, n in report.images.items():
        print(f"  {c:10s} {n:4d} images  {report.mask_files[c]:4d} mask files")
    print(f"  total      {d['total_images']:4d} images")
    if report.sizes:
        s = report.sizes
        print(
            f"size (HxW): min {s['min_hw'][0]:.0f}x{s['min_hw'][1]:.0f}, "
            f"max {s['max_hw'][0]:.0f}x{s['max_hw'][1]:.0f}, "
            f"mean {s['mean_hw'][0]:.0f}x{s['mean_hw'][1]:.0f}"
        )
    print(f"merged masks (union of several mask files): {len(report.merged_masks)}")
    for i in report.merged_masks:
        print(f"  {i}")
    print(
        f"duplicate groups (pHash <= {report.duplicate_threshold} bits): "
        f"{len(report.duplicate_groups)} groups, {d['duplicate_images']} images, "
        f"{len(report.cross_class_groups)} spanning classes"
    )
    for g in report.duplicate_groups:
        mark = "  [classes differ]" if g in report.cross_class_groups else ""
        print(f"  {', '.join(g)}{mark}")
    print(f"problems: {len(report.problems)}")
    for p in report.problems:
        print(f"  {p}")
    return 0 if report.ok else 1


def _prepare(args: argparse.Namespace) -> int:
    opts = ReadOptions(size=_size(args.size), channels=args.channels, on_error="skip" if args.skip_bad else "raise")
    t0 = time.perf_counter()
    ds = prepare(args.path, args.out, opts, overwrite=args.overwrite, progress=_progress())
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(
        f"wrote {args.out}: {len(ds)} images {ds.images_u8.shape[1:]} "
        f"({', '.join(f'{c} {n}' for c, n in ds.class_counts().items())}), "
        f"{size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
    )
    for p in ds.skipped:
        print(f"  skipped {p}")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    counts = dict(zip(("benign", "malignant", "normal"), args.counts))
    info = write_phantom(
        args.out, counts, size=_size(args.size), seed=args.seed, duplicates=args.duplicates, overwrite=args.overwrite
    )
    print(
        f"wrote {info.root}: "
        + ", ".join(f"{c} {len(v)}" for c, v in info.ids.items())
        + f"; {len(info.multi_mask)} multi-mask, {len(info.duplicates)} duplicates"
    )
    return 0


def _split(args: argparse.Namespace) -> int:
    threshold = splits.DUPLICATE_THRESHOLD if args.threshold is None else args.threshold
    splits.check_threshold(threshold)  # before the slow read
    splits.check_manifest_target(args.out, args.overwrite)
    path = Path(args.path)
    ds = (
        load_cache(path, original_masks=False)
        if (path / "index.json").is_file()
        else load_busi(path, ReadOptions(size=(16, 16), keep_original=False), _progress())
    )
    groups = splits.duplicate_groups(ds.hashes, threshold)
    if args.protocol == "stratified":
        fr = dict(zip(("train", "val", "test"), args.fractions))
        split = splits.stratified_split(ds.ids, ds.labels, groups, fr, seed=args.seed)
    elif args.protocol == "kfold":
        split = splits.kfold_split(ds.ids, ds.labels, groups, k=args.k, seed=args.seed)
    else:
        split = splits.seed_protocol(ds.ids, ds.labels, seed=args.seed)
    labels = dict(zip(ds.ids, (int(x) for x in ds.labels)))
    splits.write_manifest(split, args.out, labels, source=str(ds.root), duplicate_threshold=threshold)
    print(
        f"wrote {args.out}: {split.protocol} split, seed {split.seed}, "
        f"{len(split.duplicate_groups)} duplicate groups kept together"
    )
    for name, counts in split.counts(labels).items():
        print(f"  {name:7s} " + "  ".join(f"{c} {n:3d}" for c, n in counts.items()))
    return 0
