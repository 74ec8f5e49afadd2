"""One run as two real processes on 127.0.0.1 (jax.distributed, Gloo on CPU): it equals the
one-process run, a killed process stops the other with a clear message, the same command
resumes, another process count is refused, and one process reads the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from unet_jax.train.distributed import Launch, launch_from

ROOT = Path(__file__).resolve().parents[1]
# Small, and long enough per epoch (30 steps) for a process to be killed mid-run. Plain SGD:
# its updates follow the gradients, so one and two processes agree to rounding (Adam would
# magnify the rounding of near-zero gradients into full-size steps).
OVERRIDES = [
    "preset=padded",
    "model.features=2",
    "model.depth=1",
    "image_size=16",
    "phantom_images=90",
    "batch_size=2",
    "eval_batch_size=16",
    "epochs=5",
    "patience=None",
    "optimizer=sgd",
    "learning_rate=0.05",
    "seed=3",
    "plots=False",
    "tune_inference=False",
]
LIMIT_S = 240


def test_launch_comes_from_flags_or_jax_variables_and_is_checked():
    assert launch_from(environ={}) is None  # JAX's cluster detection decides
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert launch_from(environ=env) == Launch("10.0.0.1:1234", 2, 1)
    assert launch_from("h:5", 3, 0, environ=env) == Launch("h:5", 3, 0)  # flags win
    with pytest.raises(ValueError, match="missing --process-id / JAX_PROCESS_ID"):
        launch_from("h:5", 2, environ={})
    with pytest.raises(ValueError, match="coordinator 'h': expected host:port"):
        launch_from("h", 2, 0, environ={})
    with pytest.raises(ValueError, match=r"process id 2: expected 0 <= id < 2"):
        launch_from("h:5", 2, 2, environ={})
    with pytest.raises(ValueError, match="process count 'two': expected an integer"):
        launch_from("h:5", "two", 0, environ={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, *extra: str, processes: int = 0, port: int = 0, pid: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "unet_jax.cli", "train", "--out", str(out), *OVERRIDES, *extra]
    if processes:
        cmd += [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(processes),
            "--process-id",
            str(pid),
            "--heartbeat-timeout",
            "30",
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(procs: list[subprocess.Popen], deadline: float) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out + err))
    finally:
        for p in procs:  # nothing left running after a failure
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return results


def _epochs(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _saved(run: Path) -> int:
    """Complete checkpoints of ``run`` (the loop logs an epoch before saving it)."""
    from unet_jax.inference import finished_steps

    return len(finished_steps(run / "checkpoints" / "latest"))


def _variables(run: Path):
    from unet_jax.inference import load

    return load(run / "checkpoints" / "latest")


def test_two_processes_equal_one_survive_a_kill_resume_and_are_read_by_one(tmp_path):
    deadline = time.monotonic() + LIMIT_S
    one, two = tmp_path / "one", tmp_path / "two"
    reference = _train(one)
    port = _free_port()
    procs = [_train(two, processes=2, port=port, pid=i) for i in (0, 1)]
    try:
        while not _saved(two) and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _saved(two), _finish(procs, deadline)
        killed_at = time.monotonic()
        os.killpg(procs[1].pid, signal.SIGKILL)
        (rc0, log0), _ = _finish(procs, min(deadline, killed_at + 60))
    finally:
        _finish(procs, deadline)
    # Process 0 notices within a bounded time and says what happened and what to do.
    assert time.monotonic() - killed_at < 60
    assert rc0 == 4, log0[-3000:]
    assert "another process of this run stopped" in log0 and "rerun the same command" in log0, log0[-3000:]
    stopped_after = _epochs(two)
    assert 1 <= stopped_after < 5, "the run ended before the kill: make its epochs longer"

    # The same command resumes from the last checkpoint and finishes.
    port = _free_port()
    results = _finish([_train(two, processes=2, port=port, pid=i) for i in (0, 1)], deadline)
    for rc, log in results:
        assert rc == 0, log[-3000:]
        assert "resuming after epoch" in log, log[-3000:]
    ((rc, log),) = _finish([reference], deadline)
    assert rc == 0, log[-3000:]

    # Equal to the one-process run with the same global batch, to rounding.
    a, b = _variables(one), _variables(two)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a.variables))
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5 * scale)
    h1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in h2] == [1, 2, 3, 4, 5]  # each epoch logged once, by process 0
    for r1, r2 in zip(h1, h2):
        for key in ("train/loss", "val/loss", "val/dice"):
            np.testing.assert_allclose(r2[key], r1[key], rtol=1e-4, atol=1e-6)
    assert json.loads((two / "environment.json").read_text())["process_count"] == 2
    results_two = json.loads((two / "results.json").read_text())
    assert results_two["test"]["images"] == json.loads((one / "results.json").read_text())["test"]["images"]

    # One process reads the two-process checkpoint (evaluation, prediction) ...
    from unet_jax.inference import predict_probabilities

    images = np.zeros((2, 16, 16, 1), np.uint8)
    np.testing.assert_allclose(predict_probabilities(b, images), predict_probabilities(a, images), atol=1e-4)
    # ... but does not resume it: the data shards and the batch placement depend on the count.
    ((rc, log),) = _finish([_train(two)], deadline)
    assert rc == 2 and "was trained as 2 process(es); this launch has 1" in log, log[-2000:]
