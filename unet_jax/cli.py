"""The ``unet-jax`` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _add_summary(sub: argparse._SubParsersAction) -> None:
    from unet_jax.models import PRESETS, DEFAULT_PRESET

    p = sub.add_parser("summary", help="layer-by-layer shapes and parameter counts of a preset")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--size", type=int, nargs="+", metavar=("H", "W"), default=None,
                   help="input height [width]; default: the preset's canonical size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from unet_jax.summary import format_summary, summarize

    if args.size is not None and len(args.size) > 2:
        raise SystemExit(f"--size takes H or H W, got {len(args.size)} values: {args.size}")
    size = None if args.size is None else (args.size[0], args.size[-1])
    summary = summarize(args.preset, size=size, batch=args.batch)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 0


# ---- data commands (unet_jax.data) -------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    from unet_jax.data.cli import add_data_commands

    add_data_commands(sub)
# ---- end data commands -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_summary(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"unet-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
