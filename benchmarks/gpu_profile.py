"""Where the seed U-Net's GPU training step spends its time (issue 31), in one process:

    bash benchmarks/gpu_run.sh profile                      # on the device (calls this file)
    python3 -m benchmarks.gpu_profile --dry-run --out /tmp/gpu_profile   # the same, tiny, on a CPU

Device tool call (one call of <= 5 minutes; ``.gpu`` packed as for gpu_run, only its wheels
are used here: the data are generated):

    run(command="bash benchmarks/gpu_run.sh profile", carry=[".gpu"], timeout_s=420)

For the seed and the padded U-Net at batch 32 in bf16 (256x256, Adam, bce+dice, the
training step of unet_jax.train.steps), in priority order under ``--budget-s``:

1. ``before`` (up-convolutions by ``zero_insertion``, threefry dropout bits: the step the
   first H200 run measured) and ``after`` (:data:`ALL`: every lever together): the
   compiled HLO text (``hlo_<preset>_<before|after>.txt.gz``) and a table of device time
   per HLO op, the top 20 with their Flax module paths (from the ops' ``op_name``
   metadata) and by module, read from the profiler's ``.xplane.pb`` with
   ``jax.profiler.ProfileData``. ``--xla_gpu_enable_command_buffer=`` is set before JAX
   starts, so each kernel is its own op in the profile; the flags that exclude
   nondeterministic ops (slow scatters) are removed from ``XLA_FLAGS`` (recorded);
2. the PyTorch peer's training step (benchmarks/torch_peer.py: torch.compile, bf16
   autocast, channels-last) in the same process;
3. the step timed (benchmarks/cpu_levers.py's ``train_variant``: ``--steps`` scanned steps
   per dispatch, median of ``--windows``) with ``before``, each lever of :data:`LEVERS` alone,
   and :data:`ALL`.

``--levers`` picks the levers timed alone (default all). Files in ``--out`` (at most 6,
each well under 16 MiB): ``profile.json`` (environment, flags, per preset the op tables,
the timings with their ratio to ``before`` and to PyTorch) and the four HLO texts,
gzipped. Nothing is written elsewhere. The JSON is rewritten after every part, so a run
cut short keeps what finished. ``--dry-run``: 32x32 images, 2-wide one-level U-Nets,
batch 2, PyTorch eager, the levers of ``DRY_LEVERS`` (tests/test_gpu_profile.py).
"""

from __future__ import annotations

import os

# Before JAX starts (XLA reads its flags once): no command buffers, so the profiler sees one
# event per kernel; no flag that excludes nondeterministic ops (they make scatters slow).
NONDETERMINISTIC_FLAGS = ("--xla_gpu_deterministic_ops", "--xla_gpu_exclude_nondeterministic_ops")
_FLAGS = os.environ.get("XLA_FLAGS", "").split()
REMOVED_FLAGS = [f for f in _FLAGS if f.split("=")[0] in NONDETERMINISTIC_FLAGS]
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in _FLAGS if f not in REMOVED_FLAGS and not f.startswith("--xla_gpu_enable_command_buffer")]
    + ["--xla_gpu_enable_command_buffer="]
)

import argparse  # noqa: E402
import gc  # noqa: E402
import gzip  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from benchmarks.cpu_levers import train_variant  # noqa: E402
from benchmarks.flops import preset_flops  # noqa: E402
from benchmarks.harness import environment, write_result  # noqa: E402
from benchmarks.throughput import DTYPES, bench_torch, make_host_data, parse_fields  # noqa: E402
from unet_jax.config import TrainConfig  # noqa: E402
from unet_jax.data.augment import DeviceData, make_sampler  # noqa: E402
from unet_jax.losses import get_loss  # noqa: E402
from unet_jax.models import create_unet  # noqa: E402
from unet_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from unet_jax.train.steps import train_steps  # noqa: E402

# The step the first H200 run measured, every lever alone, and all together. A lever is
# model fields plus the dropout key's bit generator; one that does not apply to a preset
# (matmul needs up_kernel 2; dropout levers need dropout) is left out for it.
BEFORE: dict[str, Any] = {"up_method": "zero_insertion"}
LEVERS: dict[str, dict[str, Any]] = {
    "interleave": {"up_method": "interleave"},
    "matmul": {"up_method": "matmul"},
    "subpixel": {"up_method": "subpixel"},
    "custom_vjp": {"up_method": "custom_vjp"},
    "rbg": {**BEFORE, "dropout_prng": "rbg"},
    "unsafe_rbg": {**BEFORE, "dropout_prng": "unsafe_rbg"},
    "bits8": {**BEFORE, "dropout_bits": 8},
}
# All together: issue 31's recommended up-convolution (equinox PR #1259's interleave) and
# the cheapest dropout bits (XLA's generator, 8 bits an element). Unmeasured on a GPU until this script runs.
ALL: dict[str, Any] = {"up_method": "interleave", "dropout_prng": "unsafe_rbg", "dropout_bits": 8}
DROPOUT_SWITCHES = ("dropout_prng", "dropout_bits")
TINY_MODEL = "features=2,depth=1,convs_per_block=1"
# The dry run times one model-field lever and one dropout lever (its test must stay fast);
# every lever's numbers are tested in tests/test_conv_transpose.py and test_dropout_prng.py.
DRY_LEVERS = "matmul,unsafe_rbg"
SKIP_PATH_PARTS = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation", "pjit"}
CONTAINER_OPCODES = {"while", "call", "conditional", "async-start", "async-done"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s})\]])([a-z][a-z0-9\-_]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


# --------------------------------------------------------------------------------------
# HLO and the profile
# --------------------------------------------------------------------------------------
def module_path(op_name: str) -> str:
    """The Flax module path in an op's ``op_name`` metadata: its plain names (``UNet/dec1/
    conv0``), without the transformations (``jit(...)``, ``transpose(jvp(...))``), loop
    scaffolding or the primitive at the end."""
    parts = op_name.split("/")[:-1]
    return "/".join(p for p in parts if re.fullmatch(r"[A-Za-z_][\w.]*", p) and p not in SKIP_PATH_PARTS)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (opcode, op_name metadata)}`` of a compiled HLO module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        opcode = _OPCODE.search(m.group(2))
        op_name = _OP_NAME.search(m.group(2))
        ops[m.group(1)] = (opcode.group(1) if opcode else "", op_name.group(1) if op_name else "")
    return ops


def op_times(xplane: Path, ops: dict[str, tuple[str, str]]) -> dict[str, list[float]]:
    """``{op: [ns of each event]}`` from a profile: the device planes' "XLA Ops" lines (a
    GPU), else the host's events that name an HLO op (XLA:CPU's thunks); only ops of
    ``ops``, and never a container (a while loop's time is its body's ops')."""
    data = ProfileData.from_file(str(xplane))
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    planes = devices or [p for p in data.planes if p.name == "/host:CPU"]
    times: dict[str, list[float]] = defaultdict(list)
    for plane in planes:
        lines = [line for line in plane.lines if line.name == "XLA Ops"] or list(plane.lines)
        for line in lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op") or event.name
                if op in ops and ops[op][0] not in CONTAINER_OPCODES:
                    times[op].append(event.duration_ns)
    return times


def op_table(times: dict[str, list[float]], ops: dict[str, tuple[str, str]], steps: int, top: int = 20) -> dict:
    """The top ``top`` ops by device time per step, with their module paths, and the same
    time summed by module path and pass (forward, or backward: ``transpose(...)``)."""
    total = sum(sum(v) for v in times.values()) or 1.0
    rows, by_module = [], defaultdict(float)
    for op, ns in times.items():
        opcode, op_name = ops[op]
        backward = "transpose(" in op_name
        by_module[(module_path(op_name) or "(none)", "backward" if backward else "forward")] += sum(ns)
        rows.append(
            {
                "op": op,
                "opcode": opcode,
                "module_path": module_path(op_name),
                "pass": "backward" if backward else "forward",
                "ms_per_step": round(sum(ns) / steps / 1e6, 4),
                "share": round(sum(ns) / total, 4),
                "events": len(ns),
                "op_name": op_name[-240:],
            }
        )
    rows.sort(key=lambda r: -r["ms_per_step"])
    modules = sorted(by_module.items(), key=lambda kv: -kv[1])[:top]
    return {
        "ms_per_step_total": round(total / steps / 1e6, 4),
        "ops_seen": len(rows),
        "top_ops": rows[:top],
        "top_modules": [
            {"module_path": m, "pass": p, "ms_per_step": round(ns / steps / 1e6, 4), "share": round(ns / total, 4)}
            for (m, p), ns in modules
        ],
    }


# --------------------------------------------------------------------------------------
# The step: HLO, profile, timings
# --------------------------------------------------------------------------------------
def _step(args: argparse.Namespace, preset: str, host: dict, switch: dict[str, Any]) -> tuple[Any, tuple, dict]:
    """The jitted one-step training function, its arguments and keywords, for ``switch``."""
    fields = {**args.model, **{k: v for k, v in switch.items() if k != "dropout_prng"}}
    model = create_unet(preset, **fields, dtype=DTYPES[args.dtype])
    n = host["images"].shape[0]
    data = jax.device_put(
        DeviceData(jnp.asarray(host["images"]), jnp.asarray(host["masks"]), jnp.asarray(host["labels"]))
    )
    tx = make_optimizer(TrainConfig(preset=preset, batch_size=args.batch), max(1, n // args.batch))
    data_key, dropout_key, init_key = jax.random.split(jax.random.key(0), 3)
    if switch.get("dropout_prng", "threefry2x32") != "threefry2x32":
        dropout_key = jax.random.key(0, impl=switch["dropout_prng"])
    state = create_train_state(model, tx, init_key, (1, args.size, args.size, model.in_channels))
    kwargs = dict(
        num_steps=1, sample=make_sampler(args.batch, n, None), loss_fn=get_loss("bce_dice"), threshold=0.5, mesh=None
    )
    return train_steps, (state, data, data_key, dropout_key, jnp.int32(0)), kwargs


def profile_step(args: argparse.Namespace, preset: str, host: dict, switch: dict, tag: str, out: Path) -> dict:
    """Compile the step, write its HLO text (gzipped), profile ``--profile-steps`` calls and
    return the op table."""
    fn, call_args, kwargs = _step(args, preset, host, switch)
    t0 = time.perf_counter()
    compiled = fn.lower(*call_args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    hlo_file = out / f"hlo_{preset}_{tag}.txt.gz"
    with gzip.open(hlo_file, "wt") as fh:
        fh.write(hlo)
    state, rest = call_args[0], call_args[1:]
    for _ in range(2):  # warm up (autotuning, allocation) outside the trace
        state, metrics = compiled(state, *rest)
    jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.profile_steps):
            state, metrics = compiled(state, *rest)
        jax.block_until_ready((state, metrics))
        jax.profiler.stop_trace()
        xplane = next(Path(trace_dir).rglob("*.xplane.pb"))
        ops = hlo_ops(hlo)
        table = op_table(op_times(xplane, ops), ops, args.profile_steps, args.top)
    del state, metrics, compiled
    gc.collect()
    return {"switch": switch, "compile_s": round(compile_s, 2), "hlo_file": hlo_file.name, **table}


def _fit(preset: str, switch: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """``switch`` as it applies to ``preset``: without a dropout generator where there is no
    dropout; None where it cannot apply (``matmul`` with a kernel other than the stride)."""
    model = create_unet(preset, **args.model)
    if switch.get("up_method") == "matmul" and model.up_kernel != 2:
        return None
    return {k: v for k, v in switch.items() if k not in DROPOUT_SWITCHES or model.dropout_rate > 0.0}


def _lever_args(args: argparse.Namespace, preset: str, peak: float | None) -> argparse.Namespace:
    """The namespace benchmarks.cpu_levers.train_variant reads."""
    return argparse.Namespace(
        preset=preset,
        model=args.model,
        batch=args.batch,
        size=args.size,
        dtype=args.dtype,
        steps=args.steps,
        warmup=1,
        window_s=args.window_s,
        max_steps=args.steps,
        windows=args.windows,
        peak=peak,
    )


def _torch_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace benchmarks.throughput.bench_torch reads (training only)."""
    return argparse.Namespace(
        torch_compile="off" if args.dry_run else "auto",
        torch_compile_mode=None,
        torch_no_channels_last=False,
        model=args.model,
        modes=("train",),
        warmup=1,
        window_s=args.window_s,
        steps=args.steps,
        max_steps=100,
        windows=args.windows,
    )


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def _guard(result: dict, key: str, fn: Any, save: Any) -> None:
    """``result[key] = fn()`` or its error (one failure never stops the others); then save."""
    try:
        result[key] = fn()
    except Exception as e:  # noqa: BLE001 - record and go on
        result[key] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
    save()


def run_preset(args: argparse.Namespace, preset: str, result: dict, out: Path, save: Any, t_start: float) -> None:
    """Profiles (before, after), the PyTorch peer, then the timings, for one preset."""
    import torch  # deferred: the peer's framework, only where it is measured

    row: dict[str, Any] = result["presets"].setdefault(preset, {"profile": {}, "timings": {}})
    flops = preset_flops(preset, args.size, **args.model)
    host = make_host_data(2 * args.batch, args.size, create_unet(preset, **args.model).in_channels)
    for tag, switch in (("before", BEFORE), ("after", ALL)):
        fitted = _fit(preset, switch, args)
        _guard(row["profile"], tag, lambda s=fitted, t=tag: profile_step(args, preset, host, s, t, out), save)
    device = torch.device("cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu")
    torch_args = _torch_args(args)
    _guard(
        row,
        "torch",
        lambda: bench_torch(torch, device, preset, args.batch, args.dtype, host, torch_args, flops, None),
        save,
    )
    lever_args = _lever_args(args, preset, None)
    jobs = [("before", BEFORE), ("all", ALL), *((name, LEVERS[name]) for name in args.levers)]
    for name, switch in jobs:
        fitted = _fit(preset, switch, args)
        if fitted is None or (name != "before" and fitted == BEFORE):  # not a lever of this preset
            continue
        if time.perf_counter() - t_start > args.budget_s:
            row["timings"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            save()
            continue
        _guard(row["timings"], name, lambda s=fitted: train_variant(lever_args, host, s, flops), save)
    _ratios(row)
    save()


def _ratios(row: dict[str, Any]) -> None:
    """Each timing's images/s over ``before``'s and over PyTorch's."""
    base = row["timings"].get("before", {}).get("images_per_s")
    peer = (row.get("torch") or {}).get("train", {}).get("images_per_s")
    for timing in row["timings"].values():
        if "images_per_s" in timing:
            if base:
                timing["vs_before"] = round(timing["images_per_s"] / base, 3)
            if peer:
                timing["vs_torch"] = round(timing["images_per_s"] / peer, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu_profile_out")
    ap.add_argument("--presets", default="seed,padded")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--model", type=parse_fields, default={}, help="architecture overrides")
    ap.add_argument("--steps", type=int, default=20, help="scanned steps per timed dispatch")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window-s", type=float, default=0.3, help="PyTorch: seconds per window")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=240.0, help="no timing starts after this")
    ap.add_argument(
        "--levers", default=None, help=f"timed alone (default all: {','.join(LEVERS)}; dry run {DRY_LEVERS})"
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (the CPU test)")
    args = ap.parse_args(argv)
    args.levers = [x for x in (args.levers or (DRY_LEVERS if args.dry_run else ",".join(LEVERS))).split(",") if x]
    unknown = set(args.levers) - set(LEVERS)
    if unknown:
        ap.error(f"unknown lever(s) {sorted(unknown)}; expected some of {list(LEVERS)}")
    if args.dry_run:
        args.size, args.batch, args.steps, args.windows, args.window_s = 32, 2, 1, 2, 0.01
        args.profile_steps = 2
        args.model = {**parse_fields(TINY_MODEL), **args.model}
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "gpu_profile",
        "schema": 1,
        "dry_run": args.dry_run,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "xla_flags": os.environ["XLA_FLAGS"],
        "removed_flags": REMOVED_FLAGS,
        "args": {k: v for k, v in vars(args).items()},
        "levers": {"before": BEFORE, "all": ALL, **LEVERS},
        "environment": environment(None, None),
        "presets": {},
    }

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_result(out / "profile.json", result)

    for preset in args.presets.split(","):
        run_preset(args, preset, result, out, save, t_start)
    print(summary(result))
    return 0


def summary(result: dict[str, Any]) -> str:
    """A screen: per preset the top ops of ``before`` and the timings."""
    lines = [f"gpu_profile{' (dry run)' if result['dry_run'] else ''} on {result['device']}"]
    for preset, row in result["presets"].items():
        for tag, prof in row["profile"].items():
            lines.append(f"{preset} {tag}: {prof.get('ms_per_step_total', prof.get('error'))} ms/step in ops")
            for op in prof.get("top_ops", [])[:5]:
                lines.append(f"  {op['ms_per_step']:9.3f} ms {op['opcode']:14s} {op['pass']:8s} {op['module_path']}")
        for name, t in row["timings"].items():
            lines.append(
                f"  {name:12s} {t.get('images_per_s', t.get('error', t.get('skipped')))} {t.get('vs_torch', '')}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
