"""The one GPU command (benchmarks/gpu_run.sh -> gpu_run.py), run tiny on the CPU so that it
cannot rot between GPU runs, and the ingest command on what it returns."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from _data_helpers import make_cache_pair

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
    return importlib.import_module(f"benchmarks.{name}")  # the repository root is on sys.path (pytest's pythonpath)


gpu_run = _load("gpu_run")
gpu_carry = _load("gpu_carry")
ingest_gpu = _load("ingest_gpu")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``DRY_RUN=1 bash benchmarks/gpu_run.sh``: every stage, tiny, in its own process."""
    out = tmp_path_factory.mktemp("gpu_out")
    # The carried folder as packed for the device (no wheels): gpu_run.sh rebuilds its RGB cache.
    carry = tmp_path_factory.mktemp("carry") / ".gpu"
    gpu_carry.pack(*make_cache_pair(carry.parent), carry, wheels=False)
    # A generous budget: on a loaded CPU the stages are slow, and a stage cut short by its
    # share of the budget would fail this test for the machine's sake, not the code's.
    env = {
        **os.environ,
        "OUT": str(out),
        "DRY_RUN": "1",
        "GPU_CARRY": str(carry),
        "TOTAL_S": os.environ.get("GPU_RUN_DRY_TOTAL_S", "3000"),
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # bench_data.py calls optax directly, and optax's Adam raises a float to an int
        # step count, which strict promotion refuses (train_step runs it under standard).
        "JAX_NUMPY_DTYPE_PROMOTION": "standard",
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=3700
    )
    wall = time.monotonic() - t0
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return out, proc, summary, wall, carry


def test_dry_run_runs_every_stage_and_returns_the_files(dry_run):
    out, proc, summary, wall, carry = dry_run
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-4000:]}"
    assert (carry / gpu_carry.RGB / "arrays.npz").is_file()  # the wrapper unpacked the carried folder
    assert summary["dry_run"] is True
    assert list(summary["stages"]) == list(gpu_run.STAGES)
    for name, rec in summary["stages"].items():
        assert rec["status"] == "ok", (name, rec, log[-4000:])
        assert rec["duration_s"] >= 0 and rec["budget_s"] > 0
    # What comes back: the known files, within the device tool's limits.
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_run.OUT_FILES)
    assert gpu_run.check_out_dir(out) == [] and summary["out_problems"] == []
    # The one-screen summary is the end of the output.
    screen = proc.stdout.strip().splitlines()
    assert screen[0].startswith("gpu_run (dry run)") and screen[-1].startswith("files in ")
    assert len(screen) <= 40
    print(
        f"dry run: {wall:.1f} s wall; stages "
        + ", ".join(f"{k} {v['duration_s']} s" for k, v in summary["stages"].items())
    )


def test_dry_run_throughput_measures_both_frameworks_on_both_paths(dry_run):
    out = dry_run[0]
    tp = json.loads((out / "throughput.json").read_text())
    assert tp["matmul_peak"]["bf16_peak_tflops"] > 0
    rows = tp["rows"]
    assert [(r["preset"], r["dtype"]) for r in rows] == [("seed", "bfloat16"), ("padded", "bfloat16")]
    for r in rows:
        assert {"train_single", "train_scan", "infer"} <= set(r["jax"]), r
        assert {"train", "infer"} <= set(r["torch"]), r
        assert r["derived"]["ratio_train"] > 0
    assert all(p["param_counts"]["equal"] for p in tp["presets"].values())


def test_dry_run_training_stops_at_its_cap_and_still_evaluates(dry_run):
    out, _, summary, *_ = dry_run
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
        for run in ("base", "report"):
            for rel in (
                "config.json",
                "results.json",
                "metrics.jsonl",
                "plots/training_curves.png",
                "split.json",
                "environment.json",
            ):
                assert f"{run}/{rel}" in names
            results = json.loads(tar.extractfile(f"{run}/results.json").read())
            config = json.loads(tar.extractfile(f"{run}/config.json").read())
            assert results["stopped_by_time_cap"] is True and results["epochs_run"] == 1 < config["epochs"]
            assert results["best_epoch"] == 1 and results["test"]["resolution"] == "native"
        assert not any("checkpoints" in n or "tensorboard" in n for n in names)
    base = summary["stages"]["train_base"]["result"]
    assert base["stopped_by_time_cap"] and base["test_native"]["dice_lesion"] is not None
    assert json.loads(tarfile.open(out / "runs.tar.gz").extractfile("report/config.json").read())["channels"] == 3


def test_dry_run_augment_and_levers(dry_run):
    out = dry_run[0]
    aug = json.loads((out / "augment.json").read_text())
    assert aug["train_step_ms_no_augment"] > 0 and aug["train_step_ms_augment"] > 0
    lv = json.loads((out / "levers.json").read_text())
    levers = _load("cpu_levers")
    assert set(lv["train"]) == set(levers.TRAIN_VARIANTS) and set(lv["infer"]) == set(levers.INFER_VARIANTS)
    for kind in ("train", "infer"):
        for name, row in lv[kind].items():
            assert row["images_per_s"] >= 0 and row["compile_s"] > 0, (kind, name, row)
    for name in ("fold_bn", "subpixel", "subpixel_fold_bn"):  # same numbers, bf16 rounding aside
        row = lv["infer"][name]
        assert row["max_abs_diff_vs_baseline"] <= 0.05 * max(row["max_abs_baseline"], 1.0)


def test_ingest_updates_results_and_tables(dry_run, tmp_path):
    out = dry_run[0]
    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    shutil.copy(REPO / "README.md", repo / "README.md")
    shutil.copy(REPO / "experiments" / "RESULTS.md", repo / "experiments" / "RESULTS.md")
    with pytest.raises(ValueError, match="dry run"):
        ingest_gpu.ingest(out, repo)
    assert ingest_gpu.main([str(out), "--repo", str(repo), "--allow-dry-run"]) == 0
    for name in ("throughput_gpu.json", "augment_gpu.json", "levers_gpu.json", "gpu_run_summary.json"):
        assert (repo / "benchmarks" / "results" / name).is_file()
    for run in ("base_gpu", "report_gpu"):
        folder = repo / "experiments" / "results" / run
        assert {"results.json", "metrics.jsonl", "config.json", "training_curves.png"} <= {
            p.name for p in folder.iterdir()
        }
    results_md = (repo / "experiments" / "RESULTS.md").read_text()
    readme = (repo / "README.md").read_text()
    assert "DRY RUN" in results_md and "DRY RUN" in readme
    assert "| seed | 2 | bfloat16 @32 |" in results_md
    assert "| base (`experiments/configs/base.py`) | 1 (1) | time cap |" in results_md
    assert "| train | subpixel |" in results_md and "| infer | fold_bn |" in results_md
    assert "JAX train step >= 1.3x PyTorch" in readme
    # Ingesting twice gives the same documents (the markers stay, the tables are replaced).
    ingest_gpu.main([str(out), "--repo", str(repo), "--allow-dry-run"])
    assert (repo / "experiments" / "RESULTS.md").read_text() == results_md
    # The repository's own documents carry every marker.
    for doc, names in (
        (REPO / "experiments" / "RESULTS.md", ingest_gpu.RESULTS_MD_SECTIONS),
        (REPO / "README.md", ingest_gpu.README_SECTIONS),
    ):
        text = doc.read_text()
        for name in names:
            ingest_gpu.replace_section(text, name, "x", str(doc))


def test_replace_section_needs_one_marker_pair():
    text = "a\n<!-- gpu:x:start -->\nold\n<!-- gpu:x:end -->\nb\n"
    assert ingest_gpu.replace_section(text, "x", "new") == "a\n<!-- gpu:x:start -->\nnew\n<!-- gpu:x:end -->\nb\n"
    with pytest.raises(ValueError, match="gpu:y:start"):
        ingest_gpu.replace_section(text, "y", "new")
    with pytest.raises(ValueError):
        ingest_gpu.replace_section(text + text, "x", "new")


def test_out_dir_rules(tmp_path):
    ok = tmp_path / "ok"
    (ok / "a" / "b").mkdir(parents=True)
    (ok / "a" / "b" / "f.json").write_text("{}")
    assert gpu_run.check_out_dir(ok) == []
    too_many = tmp_path / "many"
    too_many.mkdir()
    for i in range(9):
        (too_many / f"f{i}.txt").write_text("x")
    assert any("9 files > 8" in p for p in gpu_run.check_out_dir(too_many))
    deep = tmp_path / "deep"
    (deep / "a" / "b" / "c").mkdir(parents=True)
    (deep / "a" / "b" / "c" / "f").write_text("x")
    assert any("folders down" in p for p in gpu_run.check_out_dir(deep))
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "f.bin", "wb") as fh:
        fh.truncate(16 * 2**20 + 1)
    (big / "bad name.txt").write_text("x")
    problems = gpu_run.check_out_dir(big)
    assert any("16 MiB" in p for p in problems) and any("bad name.txt" in p for p in problems)


def test_a_failed_stage_does_not_stop_the_others_and_short_budgets_skip(tmp_path, monkeypatch, capsys):
    # One stage at a time, as on a GPU (a dry run's default is two).
    args = gpu_run.parse_args(
        [
            "--dry-run",
            "--out",
            str(tmp_path / "out"),
            "--stages",
            "env,augment,levers",
            "--total-s",
            "1000",
            "--reserve-s",
            "0",
            "--min-stage-s",
            "100",
            "--parallel",
            "1",
        ]
    )
    driver = gpu_run.Driver(args)

    def boom(budget):
        raise RuntimeError("no device")

    def slow(budget):
        driver.t0 -= 1000  # as if the whole budget went here
        (driver.out / "augment.json").write_text("{}")
        return {"fine": True}

    monkeypatch.setattr(driver, "stage_env", boom)
    monkeypatch.setattr(driver, "stage_augment", slow)
    assert driver.run(args.stages) == 1
    summary = json.loads((driver.out / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["env"]["status"] == "failed" and "no device" in stages["env"]["error"]
    assert stages["augment"]["status"] == "ok" and stages["augment"]["result"] == {"fine": True}
    assert stages["levers"]["status"] == "skipped"
    assert {"summary.json", "augment.json", "log.txt"} <= {p.name for p in driver.out.iterdir()}
    assert "env           failed" in capsys.readouterr().out


def test_budget_shares_follow_priority():
    args = gpu_run.parse_args(["--out", "/tmp/unused_gpu_out", "--total-s", "480", "--reserve-s", "0"])
    driver = gpu_run.Driver.__new__(gpu_run.Driver)
    driver.args, driver.t0 = args, time.monotonic()
    todo = list(gpu_run.STAGES)
    budgets = {s: driver.budget_for(s, todo) for s in todo}
    assert abs(sum(budgets.values()) - 480) < 1
    assert budgets["throughput"] > budgets["train_base"] > budgets["train_report"] > budgets["augment"]


def test_parallel_stages_overlap_keep_their_order_and_their_failures_apart(tmp_path, monkeypatch, capsys):
    args = gpu_run.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--stages", "env,augment,levers"])
    assert args.parallel == 2 and gpu_run.parse_args(["--out", str(tmp_path / "o")]).parallel == 1
    driver = gpu_run.Driver(args)
    running, overlap = [], []

    def stage(name, fail=False):
        def run(budget):
            running.append(name)
            overlap.append(len(running))
            time.sleep(0.3)
            running.remove(name)
            if fail:
                raise RuntimeError(f"{name} broke")
            return {"name": name}

        return run

    for name in ("env", "augment", "levers"):
        monkeypatch.setattr(driver, f"stage_{name}", stage(name, fail=name == "augment"))
    t0 = time.monotonic()
    assert driver.run(args.stages) == 1
    assert time.monotonic() - t0 < 0.85 and max(overlap) == 2  # three 0.3 s stages, two at a time
    stages = json.loads((driver.out / "summary.json").read_text())["stages"]
    assert list(stages) == ["env", "augment", "levers"]
    assert stages["augment"]["status"] == "failed" and "augment broke" in stages["augment"]["error"]
    assert stages["env"]["result"] == {"name": "env"} and stages["levers"]["status"] == "ok"
