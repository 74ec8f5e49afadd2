"""The GPU profile (benchmarks/gpu_profile.py; issue 31), run tiny on the CPU through the
device command (``bash benchmarks/gpu_run.sh profile``) so that it cannot rot before its GPU
run: the files come back within the device tool's limits, the HLO texts are the compiled
steps, the per-op tables are non-empty with Flax module paths, and every timing is there
with its ratios."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
gpu_run = importlib.import_module("benchmarks.gpu_run")  # check_out_dir: the device tool's limits
PRESETS = ("seed", "padded")


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """One dry run per preset, both at once (each compiles on one core)."""
    procs, outs = {}, {}
    t0 = time.monotonic()
    for preset in PRESETS:
        outs[preset] = tmp_path_factory.mktemp(f"profile_{preset}")
        env = {
            **os.environ,
            "OUT": str(outs[preset]),
            "GPU_CARRY": str(outs[preset] / "no_carry"),
            "XLA_FLAGS": "--xla_gpu_deterministic_ops=true",  # removed by the script
            # optax's Adam raises a float to an int step count, which strict promotion
            # refuses (the training loop runs it under standard, as here).
            "JAX_NUMPY_DTYPE_PROMOTION": "standard",
        }
        procs[preset] = subprocess.Popen(
            ["bash", "benchmarks/gpu_run.sh", "profile", "--dry-run", "--presets", preset],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    logs = {preset: proc.communicate(timeout=600)[0] for preset, proc in procs.items()}
    print(f"gpu_profile dry runs: {time.monotonic() - t0:.1f} s wall")
    return {p: (procs[p].returncode, logs[p], outs[p]) for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_writes_hlo_op_tables_and_timings(dry_runs, preset):
    rc, log, out = dry_runs[preset]
    assert rc == 0, log[-4000:]
    assert gpu_run.check_out_dir(out) == []
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["profile.json", f"hlo_{preset}_before.txt.gz", f"hlo_{preset}_after.txt.gz"])
    result = json.loads((out / "profile.json").read_text())
    assert result["dry_run"] and "--xla_gpu_enable_command_buffer=" in result["xla_flags"].split()
    assert result["removed_flags"] == ["--xla_gpu_deterministic_ops=true"]
    row = result["presets"][preset]
    for tag in ("before", "after"):
        prof = row["profile"][tag]
        assert "error" not in prof, prof
        hlo = gzip.open(out / prof["hlo_file"], "rt").read()
        assert hlo.startswith("HloModule") and "convolution" in hlo
        ops = prof["top_ops"]
        assert 0 < len(ops) <= 20 and prof["ms_per_step_total"] > 0
        assert all(op["op"] in hlo and op["ms_per_step"] >= 0 for op in ops)
        # Flax module paths of the layers, forward and backward (transposed) ops both.
        paths = {op["module_path"] for op in ops}
        assert any(p.startswith(("enc1/", "dec1/", "bottleneck/")) for p in paths), paths
        assert {op["pass"] for op in prof["top_modules"]} == {"forward", "backward"}
    # The up-convolution's method is what the two programs differ in.
    assert "lhs_dilate" not in json.dumps(row["profile"])  # (the tables hold no HLO text)
    timings = row["timings"]
    expected = {"before", "all", "matmul"} if preset == "padded" else {"before", "all", "unsafe_rbg"}
    assert set(timings) == expected, timings
    for name, timing in timings.items():
        assert timing["images_per_s"] > 0 and timing["vs_torch"] > 0, (name, timing)
    assert timings["before"]["vs_before"] == 1.0
    assert timings["all"]["up_method"] == "interleave"
    assert timings["all"]["dropout_prng"] == ("unsafe_rbg" if preset == "seed" else "threefry2x32")
    assert timings["all"]["dropout_bits"] == (8 if preset == "seed" else 32)
    assert row["torch"]["train"]["images_per_s"] > 0
    assert log.strip().splitlines()[0].startswith("gpu_profile (dry run)")


def test_module_paths_and_hlo_ops_are_read_from_the_metadata():
    profile = importlib.import_module("benchmarks.gpu_profile")
    name = "jit(train_steps)/transpose(jvp(UNet))/dec1/conv0/while/body/conv_general_dilated"
    assert profile.module_path(name) == "dec1/conv0"
    assert profile.module_path("jit(f)/UNet._dropout/drop_pool1/jit(_bernoulli)/add") == "UNet._dropout/drop_pool1"
    hlo = (
        "ENTRY %main {\n"
        '  %fusion.3 = f32[2,4]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/jvp(UNet)/enc1/add"}\n'
        "  ROOT %while.1 = (f32[], s32[]) while(%t), condition=%c, body=%b\n"
        "}\n"
    )
    assert profile.hlo_ops(hlo) == {"fusion.3": ("fusion", "jit(f)/jvp(UNet)/enc1/add"), "while.1": ("while", "")}
    table = profile.op_table({"fusion.3": [2e6, 4e6]}, profile.hlo_ops(hlo), steps=2)
    assert table["top_ops"][0]["ms_per_step"] == 3.0 and table["top_ops"][0]["module_path"] == "enc1"
