"""Strict JAX settings and shared fixtures for the whole suite."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# The suite compiles hundreds of small XLA programs and runs each a few times, so LLVM's
# optimisation of the generated CPU code costs more than it saves (measured on 2 cores:
# tests/test_levers.py 136 s -> 52 s). Semantics do not change with the optimisation level;
# every test that compares numbers still compares them. Set before jax is imported, and
# through the environment so that the subprocesses of the suite (CLI runs, the GPU dry run,
# the multi-device checks) inherit it. UNET_JAX_TEST_XLA_OPT=1 keeps XLA's default.
if os.environ.get("UNET_JAX_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Implicit dtype promotion hides precision bugs (a float64 NumPy constant turning a float32
# or bfloat16 computation into float32/float64, an int array silently becoming float):
# every mix of dtypes must be an explicit cast. Through the environment too, so the
# suite's subprocesses run under the same rule.
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"

# A developer's tuned lowering table (python -m benchmarks.cpu_conv tune) would switch
# `predict` and `evaluate` to other convolution lowerings: the suite runs without one,
# as CI does; tests of the table point this variable at their own file.
os.environ["UNET_JAX_LOWERING_TABLE"] = os.path.join(os.sep, "nonexistent", "unet_jax_lowering_table.json")

# The XLA:CPU flags that `unet-jax train` sets, so that the whole suite runs under them (its
# subprocesses too, through the environment); imported after the variables above, since
# importing JAX reads them. The CLI adds none that the variable already names.
from unet_jax.train.cpu import XLA_CPU_FLAGS, use_xla_cpu_flags  # noqa: E402

use_xla_cpu_flags(XLA_CPU_FLAGS["train"])

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Implicit rank promotion hides shape bugs (a (N,) bias added to (N, 1)); make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


# Compilation makes the first example of a property slow; deadlines would be flaky.
settings.register_profile("ci", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset_BUSI_with_GT"


@pytest.fixture(scope="session")
def shared_busi() -> Path:
    """The shared BUSI folder beside the checkout; the test using it is skipped if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared BUSI data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished TINY run (with plots), shared by the training and CLI tests:
    (run folder, RunResult, the progress events it emitted)."""
    from _train_helpers import TINY

    from unet_jax.train import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    events: list[dict] = []
    result = train(dataclasses.replace(TINY, plots=True), run_dir, progress=events.append)
    return run_dir, result, events
