"""Every GPU figure of the project from one command, in priority order under one budget.

    bash benchmarks/gpu_run.sh                    # on the device (calls this file)
    python3 -m benchmarks.gpu_run --dry-run --out /tmp/gpu_out   # the same, tiny, on a CPU

Device tool call (the caches are made here, on the developer machine, and carried in one
folder with the wheels the device image lacks; benchmarks/gpu_carry.py):

    unet-jax data prepare ../shared/data --out .cache/busi256 --size 256
    unet-jax data prepare ../shared/data --out .cache/busi256_rgb --size 256 --channels 3
    python3 -m benchmarks.gpu_carry pack .cache/busi256 .cache/busi256_rgb --out .gpu
    run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600)

then, here: ``python3 -m benchmarks.ingest_gpu /work/.device/...`` (the folder the files
came back to) updates benchmarks/results/, experiments/results/ and the tables of
experiments/RESULTS.md and README.md.

Stages, in priority order; each runs in its own process (a crash, a hang or an
out-of-memory error stops only that stage) under a share of what is left of
``--total-s``, and the summary is rewritten after every stage, so what finished is always
in ``--out``:

1. ``env``: nvidia-smi, versions, devices, and that nothing imports TensorFlow;
2. ``throughput``: benchmarks/throughput.py, JAX against the PyTorch peer, padded and seed
   at batch 32 and 128 in bf16 (the targets' rows, padded first: a row costs about 150 s on
   the H200, so float32 rows are for benchmarks/throughput.py alone), with the bf16 matmul
   peak of the same card; if
   the two frameworks cannot share the process, each is measured in its own;
3. ``train_base``: experiments/configs/base.py (the strong protocol, 64-wide padded U-Net at
   256x256) from the carried grayscale cache, under a wall-time cap
   (``max_train_minutes``: it stops early, restores the best epoch, evaluates the test
   split at native resolution and writes results.json);
4. ``train_report``: experiments/configs/report.py (the notebook's protocol, seed U-Net at 256x256
   RGB) from the carried RGB cache, likewise capped;
5. ``augment``: augmentation's share of a training step (benchmarks/bench_data.py);
6. ``levers``: ``python -m benchmarks.cpu_levers model``, each lever of the training step and of inference
   switched alone in one process.

Without a cache the training stages use generated phantom data (recorded). Files in
``--out`` (at most 8, each under 16 MiB, no folders; checked by :func:`check_out_dir`):
``summary.json`` (stages, environment, headline figures), ``throughput.json``,
``runs.tar.gz`` (each run folder without checkpoints: config, split, environment,
metrics.jsonl, results.json, per-image test rows, plots), ``augment.json``,
``levers.json``, ``log.txt`` (the tail of every stage's output). The last lines printed
are a one-screen summary.

``--dry-run``: the same stages, processes, caps and files with tiny sizes (32x32 phantom
images, 2-wide one-level U-Nets, batch 2, one epoch): tests/test_gpu_run.py runs it in the
default suite so that this command cannot rot between GPU runs. ``--parallel N`` runs N
stages at a time, longest first (default 2 in a dry run, whose stages are single-threaded
compilations on a 2-core CPU; 1 on a GPU, whose stages share one device and are measured
in priority order).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import write_result

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

STAGES = ("env", "throughput", "train_base", "train_report", "augment", "levers")
# Share of the remaining budget each stage gets (renormalised over the stages still to run).
# With the default 480 s: env ~15, throughput ~190, base ~100, report ~70, augment ~30,
# levers ~65 s (a stage that ends early leaves its time to the next ones).
SHARES = {"env": 0.03, "throughput": 0.40, "train_base": 0.22, "train_report": 0.15, "augment": 0.06, "levers": 0.14}
# Dry-run seconds of each stage measured on the 2-core CPU (the order --parallel starts them).
DRY_COST = {"levers": 42, "throughput": 34, "train_base": 17, "train_report": 16, "augment": 14, "env": 2}
OUT_FILES = ("summary.json", "throughput.json", "runs.tar.gz", "augment.json", "levers.json", "log.txt")
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# What a run folder contributes to runs.tar.gz (no checkpoints, no TensorBoard, no data).
RUN_FILES = (
    "config.json",
    "split.json",
    "environment.json",
    "metrics.jsonl",
    "results.json",
    "predictions/test_per_image.json",
    "plots/training_curves.png",
    "plots/test_predictions.png",
)

# Tiny sizes of the dry run: the same code paths in seconds of CPU.
TINY_MODEL = "features=2,depth=1,convs_per_block=1"
TINY_TRAIN = [
    "data=None",
    "cache=None",
    "image_size=32",
    "phantom_images=24",
    "batch_size=2",
    "eval_batch_size=8",
    "epochs=3",
    "model.features=2",
    "model.depth=1",
    "model.convs_per_block=1",
    "max_train_minutes=0.0001",
]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def check_out_dir(out: Path) -> list[str]:
    """Problems with ``out`` as the device tool returns it (empty list: all comes back):
    at most 8 files of at most 16 MiB, no more than 2 folders down, plain names."""
    problems = []
    files = [p for p in out.rglob("*") if not p.is_dir()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}")
    for p in files:
        rel = p.relative_to(out)
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: not a plain file")
        elif p.stat().st_size > MAX_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes > 16 MiB")
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
        if not all(NAME_RE.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, . _ -")
    return problems


def _write_json(path: Path, value: Any) -> None:
    write_result(path, value)  # the harness's one writer (atomic)


def pack_runs(runs: Path, dest: Path) -> list[str]:
    """``dest`` (tar.gz) with the summary files of every run folder under ``runs``."""
    members = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for run in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
            for rel in RUN_FILES:
                f = run / rel
                if f.is_file():
                    name = f"{run.name}/{rel}"
                    tar.add(f, arcname=name)
                    members.append(name)
    if members:
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, dest)
    return members


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------
class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.t0 = time.monotonic()
        self._lock = threading.Lock()  # the summary and the files, with stages in parallel
        self._local = threading.local()  # each stage's own start time
        self.summary: dict[str, Any] = {
            "schema": 1,
            "dry_run": args.dry_run,
            "total_budget_s": args.total_s,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(PY).name, *sys.argv]),
            "stages": {},
            "data": {},
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("MPLBACKEND", "Agg")
        self.env = env

    # -- time ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def budget_for(self, stage: str, todo: list[str]) -> float:
        left = self.args.total_s - self.args.reserve_s - self.elapsed()
        share = SHARES[stage] / sum(SHARES[s] for s in todo)
        return max(0.0, left * share)

    # -- processes -------------------------------------------------------------------
    def run_process(self, stage: str, cmd: list[str], timeout: float) -> tuple[int | None, str | None]:
        """Run ``cmd`` (its own process group) with output to the stage's log; returns
        (exit code or None on timeout, error text)."""
        log = self.work / "logs" / f"{stage}.log"
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
            fh.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                fh.write(f"\n[gpu_run] {stage}: killed after {timeout:.0f} s\n")
                return None, f"timed out after {timeout:.0f} s"
        return rc, None if rc == 0 else f"exit code {rc}"

    # -- the stages ------------------------------------------------------------------
    def stage_env(self, budget: float) -> dict[str, Any]:
        smi = shutil.which("nvidia-smi")
        info: dict[str, Any] = {"nvidia_smi": None}
        if smi:
            try:
                info["nvidia_smi"] = subprocess.run(
                    [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.strip()
            except (OSError, subprocess.SubprocessError) as e:
                info["nvidia_smi"] = f"failed: {e}"
        code = (
            "import json, sys, importlib.metadata as md\n"
            "v = {}\n"
            "for d in ('jax','jaxlib','jax-cuda12-plugin','jax-cuda13-plugin','flax','optax',"
            "'orbax-checkpoint','numpy','torch','triton','pillow','matplotlib'):\n"
            "    try: v[d] = md.version(d)\n"
            "    except Exception: v[d] = None\n"
            "import unet_jax.train.steps, unet_jax.train.loop\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow','tensorflow_datasets'))\n"
            "import jax\n"
            "print('ENV_JSON ' + json.dumps({'versions': v, 'tensorflow_modules_imported': bad,"
            " 'backend': jax.default_backend(), 'devices': [str(d.device_kind) for d in jax.devices()],"
            " 'python': sys.version.split()[0]}))\n"
        )
        # At least a minute (importing jax, flax, orbax and torch's metadata on a fresh
        # machine); 10 on a CPU dry run, whose processes may share a loaded CPU.
        rc, err = self.run_process("env", [PY, "-c", code], max(budget, 600.0 if self.args.dry_run else 60.0))
        for line in (self.work / "logs" / "env.log").read_text().splitlines():
            if line.startswith("ENV_JSON "):
                info.update(json.loads(line[len("ENV_JSON ") :]))
        self.summary["environment"] = info
        if err:
            raise RuntimeError(err)
        if info.get("tensorflow_modules_imported"):
            raise RuntimeError(f"unet_jax imports TensorFlow: {info['tensorflow_modules_imported']}")
        return {"backend": info.get("backend"), "devices": info.get("devices")}

    def stage_throughput(self, budget: float) -> dict[str, Any]:
        dest = self.out / "throughput.json"
        if self.args.dry_run:
            extra = [
                "--presets",
                "seed,padded",
                "--size",
                "32",
                "--batches",
                "2",
                "--dtypes",
                "bfloat16",
                "--windows",
                "2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--matmul-size",
                "64",
                "--window-s",
                "0.01",
                "--model",
                TINY_MODEL,
            ]
        else:
            extra = [
                "--presets",
                "padded,seed",
                "--batches",
                "32,128",
                "--dtypes",
                "bfloat16",
                "--windows",
                "3",
                "--window-s",
                "0.4",
            ]
        # Rows start until 75% of the stage's time: a row takes up to a quarter of it.
        rc, err = self.run_process(
            "throughput",
            [PY, "-m", "benchmarks.throughput", *extra, "--budget-s", f"{0.75 * budget:.0f}", "--out", str(dest)],
            budget,
        )
        result = json.loads(dest.read_text()) if dest.is_file() else {}
        rows = [r for r in result.get("rows", []) if "derived" in r]
        left = budget - (self.elapsed() - self._local.start)
        if err and not rows and rc is not None and left >= 2 * self.args.min_stage_s:
            # The frameworks could not share the process (it failed, not timed out):
            # measure each in its own.
            for fw in ("jax", "torch"):
                part = self.work / f"throughput_{fw}.json"
                self.run_process(
                    "throughput",
                    [
                        PY,
                        "-m",
                        "benchmarks.throughput",
                        *extra,
                        "--frameworks",
                        fw,
                        "--dtypes",
                        "bfloat16",
                        "--budget-s",
                        f"{0.3 * left:.0f}",
                        "--out",
                        str(part),
                    ],
                    left / 2,
                )
            merged = {
                fw: json.loads((self.work / f"throughput_{fw}.json").read_text())
                for fw in ("jax", "torch")
                if (self.work / f"throughput_{fw}.json").is_file()
            }
            if merged:
                _write_json(dest, {"benchmark": "throughput", "separate_processes": merged, "first_attempt_error": err})
            raise RuntimeError(f"combined run failed ({err}); frameworks measured separately")
        if err:
            raise RuntimeError(f"{err} after {len(rows)} rows")
        errors = [
            f"{r['preset']}/{r['batch']}/{r['dtype']}: {r.get('jax_error') or r.get('torch_error')}"
            for r in rows
            if r.get("jax_error") or r.get("torch_error")
        ]
        if errors:
            raise RuntimeError("; ".join(errors)[:600])
        return {"rows": len(rows), "skipped": sum(1 for r in result.get("rows", []) if "skipped" in r)}

    def _train(self, stage: str, config: str, cache: str, budget: float) -> dict[str, Any]:
        run_dir = self.work / "runs" / stage.removeprefix("train_")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        # Cap: what the stage has, less start-up, compilation, final evaluation and plots
        # (on the H200, 2026-12-04: first epoch 55 s, the final evaluation over 80 s).
        overhead = 15.0 if self.args.dry_run else 150.0
        cap_min = max(budget - overhead, 0.25 * budget) / 60
        overrides = ["plots=True", "checkpoint_every=100000", f"max_train_minutes={cap_min:.4f}"]
        if self.args.dry_run:
            overrides += TINY_TRAIN
            self.summary["data"][stage] = "phantom (dry run)"
        elif cache and Path(cache).is_dir():
            overrides += [f"cache={cache}"]
            self.summary["data"][stage] = f"cache {cache}"
        else:
            overrides += ["data=None", "cache=None"]
            self.summary["data"][stage] = f"phantom (cache {cache!r} not found)"
        cmd = [PY, "-m", "unet_jax.cli", "train", "--config", config, "--out", str(run_dir), *overrides]
        rc, err = self.run_process(stage, cmd, budget + (30 if self.args.dry_run else 60))
        with self._lock:
            pack_runs(self.work / "runs", self.out / "runs.tar.gz")
        results = run_dir / "results.json"
        if not results.is_file():
            raise RuntimeError(err or "no results.json")
        res = json.loads(results.read_text())
        env = json.loads((run_dir / "environment.json").read_text())
        info = {
            "cap_minutes": round(cap_min, 3),
            "wall_time_s": round(env.get("wall_time_s", 0), 1),
            "epochs_run": res.get("epochs_run"),
            "best_epoch": res.get("best_epoch"),
            "stopped_early": res.get("stopped_early"),
            "stopped_by_time_cap": res.get("stopped_by_time_cap"),
            "test_training_resolution": res.get("test_training_resolution"),
            "test_native": _headline_metrics(res),
        }
        if err:
            raise RuntimeError(err)
        return info

    def stage_train_base(self, budget: float) -> dict[str, Any]:
        return self._train("train_base", "experiments/configs/base.py", self.args.cache, budget)

    def stage_train_report(self, budget: float) -> dict[str, Any]:
        return self._train("train_report", "experiments/configs/report.py", self.args.cache_rgb, budget)

    def stage_augment(self, budget: float) -> dict[str, Any]:
        dest = self.out / "augment.json"
        if self.args.dry_run:
            extra = [
                "--size",
                "32",
                "--phantom-images",
                "24",
                "--model",
                TINY_MODEL,
                "--batch",
                "2",
                "--train-steps",
                "2",
                "--repeats",
                "1",
            ]
        else:
            extra = ["--cache", self.args.cache, "--batch", "16", "--train-steps", "20", "--repeats", "3"]
        rc, err = self.run_process(
            "augment", [PY, "-m", "benchmarks.bench_data", "--augment-only", *extra, "--out", str(dest)], budget
        )
        if err:
            raise RuntimeError(err)
        r = json.loads(dest.read_text())
        return {
            k: r.get(k)
            for k in (
                "train_step_ms_no_augment",
                "train_step_ms_augment",
                "augment_overhead",
                "augment_share_of_step",
                "data",
            )
        }

    def stage_levers(self, budget: float) -> dict[str, Any]:
        dest = self.out / "levers.json"
        if self.args.dry_run:
            extra = [
                "--preset",
                "padded",
                "--size",
                "32",
                "--batch",
                "2",
                "--model",
                TINY_MODEL,
                "--windows",
                "2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--window-s",
                "0.01",
            ]
        else:
            extra = ["--preset", "padded", "--batch", "32", "--windows", "3", "--window-s", "0.4"]
            peak = _peak(self.out / "throughput.json")
            if peak:
                extra += ["--peak", str(peak)]
        rc, err = self.run_process(
            "levers",
            [
                PY,
                "-m",
                "benchmarks.cpu_levers",
                "model",
                *extra,
                "--budget-s",
                f"{0.8 * budget:.0f}",
                "--out",
                str(dest),
            ],
            budget,
        )
        r = json.loads(dest.read_text()) if dest.is_file() else {}
        done = {
            f"{k}/{n}": v.get("vs_baseline")
            for k in ("train", "infer")
            for n, v in r.get(k, {}).items()
            if "images_per_s" in v
        }
        failed = [f"{k}/{n}" for k in ("train", "infer") for n, v in r.get(k, {}).items() if "error" in v]
        if err or failed:
            raise RuntimeError(err or f"variants failed: {failed}")
        return {"vs_baseline": done}

    # -- the whole run ---------------------------------------------------------------
    def finish_files(self) -> None:
        with self._lock:
            self._finish_files()

    def _finish_files(self) -> None:
        logs = []
        for stage in STAGES:
            log = self.work / "logs" / f"{stage}.log"
            if log.is_file():
                logs.append(f"===== {stage} =====\n{_tail(log, self.args.log_lines)}\n")
        (self.out / "log.txt").write_text("".join(logs))
        pack_runs(self.work / "runs", self.out / "runs.tar.gz")
        for stray in self.out.glob("*.tmp"):
            stray.unlink()
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        self.summary["out_files"] = sorted(p.name for p in self.out.iterdir() if p.is_file())
        self.summary["out_problems"] = check_out_dir(self.out)
        _write_json(self.out / "summary.json", self.summary)

    def run(self, stages: list[str]) -> int:
        parallel = max(1, self.args.parallel)
        for stage in stages:  # the summary lists the stages in priority order
            self.summary["stages"][stage] = {"status": "pending"}
        if parallel == 1:
            todo = list(stages)
            for stage in stages:
                budget = self.budget_for(stage, todo)
                todo.remove(stage)
                self.run_stage(stage, budget)
        else:
            # Each stage's share of the whole budget (no stage waits for another's leftovers).
            left = self.args.total_s - self.args.reserve_s
            budgets = {s: left * SHARES[s] / sum(SHARES[t] for t in stages) * parallel for s in stages}
            order = sorted(stages, key=lambda s: -DRY_COST.get(s, 0))
            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                for future in [pool.submit(self.run_stage, s, budgets[s]) for s in order]:
                    future.result()
        self.finish_files()
        print(render_summary(self.summary, self.out))
        return 0 if all(r.get("status") == "ok" for r in self.summary["stages"].values()) else 1

    def run_stage(self, stage: str, budget: float) -> None:
        """One stage under ``budget`` seconds; its record in the summary, the files rewritten."""
        rec: dict[str, Any] = {"budget_s": round(budget, 1), "started_s": round(self.elapsed(), 1)}
        with self._lock:
            self.summary["stages"][stage] = rec
        if budget < self.args.min_stage_s:
            rec.update(status="skipped", reason=f"{budget:.0f} s left for it < {self.args.min_stage_s} s")
            self.finish_files()
            return
        self._local.start = self.elapsed()
        try:
            rec["result"] = getattr(self, f"stage_{stage}")(budget)
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a failed stage never stops the others
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        rec["duration_s"] = round(self.elapsed() - self._local.start, 1)
        self.finish_files()


def _peak(path: Path) -> float | None:
    try:
        return json.loads(path.read_text())["matmul_peak"]["bf16_peak_tflops"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """Test split at native resolution: Dice, IoU, pixel accuracy and HD95 over the lesion
    images (with the bootstrap 95% interval) and per class, the normal images' false
    positive rate, the image counts."""
    test = results.get("test") or {}
    out: dict[str, Any] = {
        "images": test.get("images"),
        "normal_false_positive_rate": test.get("normal_false_positive_rate"),
        "lesion_empty_prediction_rate": test.get("lesion_empty_prediction_rate"),
    }
    for metric in ("dice", "iou", "pixel_accuracy", "hd95"):
        d = test.get(metric)
        if not isinstance(d, dict):
            continue
        for group in ("lesion", "benign", "malignant"):
            out[f"{metric}_{group}"] = d.get(group)
        ci = (d.get("summary") or {}).get("lesion") or {}
        out[f"{metric}_lesion_ci"] = [ci.get("ci_low"), ci.get("ci_high")]
    return out


# --------------------------------------------------------------------------------------
# The one-screen summary
# --------------------------------------------------------------------------------------
def render_summary(summary: dict[str, Any], out: Path) -> str:
    lines = [
        f"gpu_run{' (dry run)' if summary.get('dry_run') else ''}: "
        f"{summary.get('elapsed_s', 0):.0f} s of {summary.get('total_budget_s')} s; "
        f"{', '.join(summary.get('environment', {}).get('devices', []) or ['?'])}"
    ]
    for name, rec in summary.get("stages", {}).items():
        status = rec.get("status", "?")
        detail = rec.get("error") or rec.get("reason") or ""
        lines.append(
            f"  {name:13s} {status:8s} {rec.get('duration_s', 0):6.1f} s / "
            f"{rec.get('budget_s', 0):5.0f} s  {detail[:90]}"
        )
    try:
        tp = json.loads((out / "throughput.json").read_text())
    except (OSError, ValueError):
        tp = {}
    if tp.get("rows"):
        lines.append(
            f"throughput ({tp.get('card')}, bf16 peak "
            f"{_fmt(tp.get('matmul_peak', {}).get('bf16_peak_tflops'), '{:.1f}')} TFLOP/s), "
            f"images/s: preset batch dtype | JAX scan / 1-step / PyTorch train = ratio, %peak "
            f"| JAX / PyTorch infer"
        )
        for r in tp["rows"]:
            head = f"  {r['preset']:7s} {r['batch']:4d} {r['dtype']:9s}"
            if "derived" not in r:
                lines.append(f"{head} {r.get('skipped') or r.get('jax_error') or r.get('torch_error') or '?'}"[:110])
                continue
            j, t, d = r.get("jax", {}), r.get("torch", {}), r["derived"]
            ips = lambda x, k: _fmt((x.get(k) or {}).get("images_per_s"), "{:.0f}")  # noqa: E731
            best = j.get(d.get("jax_train_headline") or "", {})
            share = best.get("share_of_bf16_peak")
            lines.append(
                f"{head} | {ips(j, 'train_scan')} / {ips(j, 'train_single')} / {ips(t, 'train')} = "
                f"{_fmt(d.get('ratio_train'), '{:.2f}x')}, "
                f"{_fmt(None if share is None else 100 * share, '{:.1f}%')} | "
                f"{ips(j, 'infer')} / {ips(t, 'infer')}"
            )
    for stage in ("train_base", "train_report"):
        r = summary.get("stages", {}).get(stage, {}).get("result")
        if r:
            m = r.get("test_native", {})
            lines.append(
                f"{stage}: {r['epochs_run']} epochs (best {r['best_epoch']}, capped "
                f"{r['stopped_by_time_cap']}), {r['wall_time_s']:.0f} s; test lesion Dice "
                f"{_fmt(m.get('dice_lesion'))} IoU {_fmt(m.get('iou_lesion'))}, normal FP "
                f"{_fmt(m.get('normal_false_positive_rate'), '{:.2f}')}"
            )
    r = summary.get("stages", {}).get("augment", {}).get("result")
    if r and r.get("augment_overhead") is not None:
        lines.append(
            f"augment: step {r['train_step_ms_no_augment']:.2f} ms -> "
            f"{r['train_step_ms_augment']:.2f} ms (+{100 * r['augment_overhead']:.1f}%)"
        )
    r = summary.get("stages", {}).get("levers", {}).get("result")
    if r and r.get("vs_baseline"):
        lines.append(
            "levers (x baseline): " + ", ".join(f"{k} {_fmt(v, '{:.2f}')}" for k, v in r["vs_baseline"].items())
        )
    lines.append(
        f"files in {out}: {', '.join(summary.get('out_files', []))}"
        + (f"; PROBLEMS: {summary['out_problems']}" if summary.get("out_problems") else "")
    )
    return "\n".join(lines)


def _fmt(v: Any, spec: str = "{:.3f}") -> str:
    return "-" if v is None else spec.format(v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu_out"))
    ap.add_argument("--work", default=None, help="run folders and logs (default /tmp/gpu_run_work)")
    ap.add_argument(
        "--total-s",
        type=float,
        default=None,
        help="budget of the whole run (default 480 s; dry run 1200 s: on a loaded CPU "
        "its stages are slow, and its test checks their wall time itself)",
    )
    ap.add_argument("--reserve-s", type=float, default=10.0, help="kept for the files at the end")
    ap.add_argument(
        "--min-stage-s",
        type=float,
        default=None,
        help="a stage with less time than this is skipped (default 20 s; 1 s dry run)",
    )
    ap.add_argument("--stages", default=",".join(STAGES), help="a subset, in priority order")
    ap.add_argument("--cache", default=os.environ.get("CACHE_GRAY", str(REPO / ".cache" / "busi256")))
    ap.add_argument("--cache-rgb", default=os.environ.get("CACHE_RGB", str(REPO / ".cache" / "busi256_rgb")))
    ap.add_argument("--log-lines", type=int, default=60, help="lines of each stage's output in log.txt")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (the CPU test)")
    ap.add_argument(
        "--parallel", type=int, default=None, help="stages run at a time, longest first (default 1; a dry run 2)"
    )
    args = ap.parse_args(argv)
    if args.total_s is None:
        args.total_s = 1200.0 if args.dry_run else 480.0
    if args.parallel is None:
        args.parallel = 2 if args.dry_run else 1
    if args.min_stage_s is None:
        args.min_stage_s = 1.0 if args.dry_run else 20.0
    if args.work is None:
        args.work = (
            str(Path(args.out).resolve().parent / (Path(args.out).name + "_work"))
            if args.dry_run
            else "/tmp/gpu_run_work"
        )
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; expected some of {list(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Driver(args).run(args.stages)


if __name__ == "__main__":
    sys.exit(main())
