"""The benchmarks' shared harness (benchmarks/harness.py): one timing rule, one environment
card, one JSON writer; and every benchmark script importable as ``benchmarks.NAME``."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]


def test_time_windows_times_each_window_of_steps():
    calls = []
    seconds = harness.time_windows(calls.append, steps=3, windows=4)
    assert calls == [3, 3, 3, 3] and len(seconds) == 4 and all(s >= 0 for s in seconds)


def test_median_ms_warms_up_then_times_windows_of_calls():
    calls = []
    ms = harness.median_ms(lambda: calls.append(1), windows=5, calls=3)
    assert len(calls) == 2 + 5 * 3 and ms >= 0


def test_the_environment_card_and_the_writer(tmp_path):
    card = harness.environment(None, None)
    assert {"jax_backend", "versions", "python", "cpu_count"} <= set(card)
    path = harness.write_result(tmp_path / "r.json", {"environment": card, "where": tmp_path})
    assert json.loads(path.read_text())["where"] == str(tmp_path)  # values JSON cannot hold, as str
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_the_cpu_card_names_the_model_and_the_matrix_units(tmp_path):
    info = tmp_path / "cpuinfo"
    first = "model name\t: Test Xeon\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 sse4_2\n"
    info.write_text(first + "\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert harness.cpu_card(info) == {"model": "Test Xeon", "isa": ["avx2", "avx512f", "amx_tile", "amx_bf16"]}
    assert harness.cpu_card(tmp_path / "missing") is None


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_imports_as_a_package_module(name):
    if name == "torch_peer":
        pytest.importorskip("torch")
    importlib.import_module(f"benchmarks.{name}")


def test_a_benchmark_runs_with_python_m_from_the_root():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_conv", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "tune" in proc.stdout, proc.stderr
