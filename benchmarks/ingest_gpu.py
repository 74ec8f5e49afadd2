"""Take the files of one ``bash benchmarks/gpu_run.sh`` and put them where they belong.

    python3 -m benchmarks.ingest_gpu DIR            # DIR: the files that came back from $OUT

writes

* ``benchmarks/results/``: ``throughput_gpu.json``, ``augment_gpu.json``,
  ``levers_gpu.json``, ``gpu_run_summary.json`` (each only if DIR has it);
* ``experiments/results/base_gpu/`` and ``report_gpu/``: the run folders' summaries from
  ``runs.tar.gz`` (config, split, environment, metrics.jsonl, results.json, per-image test
  rows, training curves and test predictions), as the CPU runs' folders beside them;
* the tables between ``<!-- gpu:NAME:start -->`` and ``<!-- gpu:NAME:end -->`` in
  experiments/RESULTS.md (``targets``, ``throughput``, ``training``, ``augment``,
  ``levers``) and README.md (``targets``), each measured figure against its standing
  target (a stage that did not run leaves "not measured" in its rows).

A dry run's files (``summary.json`` says ``dry_run``) are refused unless
``--allow-dry-run`` (the test ingests one into a copy of the repository: ``--repo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from benchmarks.gpu_run import RUN_FILES, _headline_metrics

REPO = Path(__file__).resolve().parents[1]

RUN_NAMES = {"base": "base_gpu", "report": "report_gpu"}
RESULTS_MD_SECTIONS = ("targets", "throughput", "training", "augment", "levers")
README_SECTIONS = ("targets",)
NOTEBOOK_EPOCHS, NOTEBOOK_IMAGES = 75, 517


# --------------------------------------------------------------------------------------
# Marked sections
# --------------------------------------------------------------------------------------
def replace_section(text: str, name: str, body: str, source: str = "file") -> str:
    """``text`` with what lies between the ``gpu:NAME`` markers replaced by ``body``."""
    start, end = f"<!-- gpu:{name}:start -->", f"<!-- gpu:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{source}: expected one {start} ... {end} pair")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def _f(v: Any, spec: str = "{:.3f}") -> str:
    return "not measured" if v is None else spec.format(v)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------
def read_runs(tar_path: Path, repo: Path) -> dict[str, dict[str, Any]]:
    """Extract runs.tar.gz into experiments/results/<name>_gpu/ (flat, known files only)."""
    runs: dict[str, dict[str, Any]] = {}
    if not tar_path.is_file():
        return runs
    allowed = set(RUN_FILES)
    with tarfile.open(tar_path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        names = {PurePosixPath(m.name).parts[0] for m in members}
        for run in names & set(RUN_NAMES):
            dest = repo / "experiments" / "results" / RUN_NAMES[run]
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for m in members:
                parts = PurePosixPath(m.name).parts
                rel = "/".join(parts[1:])
                if parts[0] != run or rel not in allowed:
                    continue  # nothing outside the known layout is written
                data = tar.extractfile(m).read()
                (dest / PurePosixPath(rel).name).write_bytes(data)
            info: dict[str, Any] = {"folder": dest}
            for name in ("results.json", "environment.json", "config.json", "split.json"):
                if (dest / name).is_file():
                    info[name.removesuffix(".json")] = json.loads((dest / name).read_text())
            lines = (dest / "metrics.jsonl").read_text().splitlines() if (dest / "metrics.jsonl").is_file() else []
            info["metrics"] = [json.loads(x) for x in lines if x.strip()]
            runs[run] = info
    return runs


def notebook_estimate(run: dict[str, Any]) -> dict[str, Any]:
    """Wall time of the report run, and the notebook protocol's (75 epochs x 517 images)
    estimated from it: the run's fixed part (start-up, compilation, evaluation) plus its
    measured seconds per image-epoch times 75 x 517."""
    env, res, metrics = run.get("environment", {}), run.get("results", {}), run.get("metrics", [])
    wall = env.get("wall_time_s")
    split = run.get("split", {})
    n_train = None
    for key in ("train", "partitions"):
        part = split.get(key)
        if isinstance(part, list):
            n_train = len(part)
        elif isinstance(part, dict) and isinstance(part.get("train"), list):
            n_train = len(part["train"])
    epochs = res.get("epochs_run")
    train_s = sum(m.get("epoch_time_s", 0.0) for m in metrics)
    out = {"wall_time_s": wall, "epochs_run": epochs, "train_images": n_train, "train_s": round(train_s, 2)}
    if wall and epochs and n_train and train_s > 0:
        per = train_s / (epochs * n_train)
        out["estimate_75x517_s"] = round(wall - train_s + NOTEBOOK_EPOCHS * NOTEBOOK_IMAGES * per, 1)
    return out


def targets_table(summary: dict[str, Any], tp: dict[str, Any], runs: dict[str, Any], aug: dict[str, Any]) -> str:
    card = tp.get("card") or ", ".join(summary.get("environment", {}).get("devices", []) or []) or "?"
    lines = [
        f"Standing targets, measured by `bash benchmarks/gpu_run.sh` ({card}, "
        f"{summary.get('started_utc', '?')}{', DRY RUN: not a GPU figure' if summary.get('dry_run') else ''}):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    rows = {(r["preset"], r["batch"]): r for r in tp.get("rows", []) if r.get("dtype") == "bfloat16" and "derived" in r}
    for preset in ("seed", "padded"):
        for batch in (32, 128):
            r = rows.get((preset, batch))
            ratio = (r or {}).get("derived", {}).get("ratio_train")
            lines.append(
                f"| JAX train step >= 1.3x PyTorch (compile, bf16, channels-last), {preset}, "
                f"batch {batch} | {_f(ratio, '{:.2f}x')} | {_met(ratio, lambda v: v >= 1.3)} |"
            )
    for batch in (32, 128):
        r = rows.get(("padded", batch)) or {}
        j = r.get("jax", {})
        share = j.get(r.get("derived", {}).get("jax_train_headline") or "", {}).get("share_of_bf16_peak")
        lines.append(
            f"| padded training >= 55% of the bf16 matmul peak "
            f"({_f(tp.get('matmul_peak', {}).get('bf16_peak_tflops'), '{:.0f}')} TFLOP/s), batch {batch} | "
            f"{_f(None if share is None else 100 * share, '{:.1f}%')} | {_met(share, lambda v: v >= 0.55)} |"
        )
    est = notebook_estimate(runs["report"]) if "report" in runs else {}
    how = (
        f" (estimated from {est['epochs_run']} epochs x {est['train_images']} images in "
        f"{_f(est.get('wall_time_s'), '{:.1f}')} s)"
        if est.get("estimate_75x517_s") is not None
        else ""
    )
    lines.append(
        f"| notebook protocol (75 epochs x 517 images, 256x256) <= 30 s wall incl. compilation | "
        f"{_f(est.get('estimate_75x517_s'), '{:.1f} s')}{how} | "
        f"{_met(est.get('estimate_75x517_s'), lambda v: v <= 30)} |"
    )
    overhead = aug.get("augment_overhead")
    lines.append(
        f"| augmentation adds < 5% to a training step | "
        f"{_f(None if overhead is None else 100 * overhead, '{:+.1f}%')} | "
        f"{_met(overhead, lambda v: v < 0.05)} |"
    )
    m = _headline_metrics(runs["base"].get("results", {})) if "base" in runs else {}
    lines.append(
        f"| strong protocol: test lesion Dice >= 0.80 | {_f(m.get('dice_lesion'))} | "
        f"{_met(m.get('dice_lesion'), lambda v: v >= 0.80)} |"
    )
    lines.append(
        f"| strong protocol: test lesion IoU >= 0.70 | {_f(m.get('iou_lesion'))} | "
        f"{_met(m.get('iou_lesion'), lambda v: v >= 0.70)} |"
    )
    fp = m.get("normal_false_positive_rate")
    lines.append(
        f"| strong protocol: >= 90% of normal test images predicted empty | "
        f"{_f(None if fp is None else 100 * (1 - fp), '{:.0f}%')} | {_met(fp, lambda v: v <= 0.10)} |"
    )
    return "\n".join(lines)


def _met(value: Any, ok: Any) -> str:
    return "-" if value is None else ("yes" if ok(value) else "**no**")


def throughput_table(tp: dict[str, Any]) -> str:
    if not tp.get("rows"):
        return "Not measured yet on a GPU."
    peak = tp.get("matmul_peak", {})
    head = [
        "preset",
        "batch",
        "dtype",
        "JAX train img/s (scanned)",
        "JAX (1 step/dispatch)",
        "PyTorch train",
        "JAX/PyTorch",
        "TFLOP/s",
        "% bf16 peak",
        "JAX infer",
        "PyTorch infer",
        "JAX/PyTorch infer",
    ]
    lines = [
        f"{tp.get('card')}, {tp.get('time_utc')}, 256x256 unless noted, images/s (median of "
        f"{tp.get('args', {}).get('windows')} windows); bf16 matmul peak "
        f"{_f(peak.get('bf16_peak_tflops'), '{:.0f}')} TFLOP/s "
        f"(`benchmarks/results/throughput_gpu.json`):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def ips(d: dict[str, Any], k: str) -> str:
        return _f((d.get(k) or {}).get("images_per_s"), "{:.0f}")

    notes = [f"{r['preset']} {r['batch']} {r['dtype']}: {r['measured_in']}" for r in tp["rows"] if r.get("measured_in")]
    for r in tp["rows"]:
        if "skipped" in r or "derived" not in r:
            lines.append(
                f"| {r['preset']} | {r['batch']} | {r['dtype']} | skipped: "
                f"{r.get('skipped', r.get('jax_error', r.get('torch_error', '?')))} |" + " |" * 8
            )
            continue
        j, t, d = r.get("jax", {}), r.get("torch", {}), r["derived"]
        best = j.get(d.get("jax_train_headline") or "", {})
        share = best.get("share_of_bf16_peak")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["preset"],
                    str(r["batch"]),
                    r["dtype"] + ("" if r.get("size", 256) == 256 else f" @{r['size']}"),
                    ips(j, "train_scan"),
                    ips(j, "train_single"),
                    ips(t, "train"),
                    _f(d.get("ratio_train"), "{:.2f}x"),
                    _f(best.get("tflops"), "{:.1f}"),
                    _f(None if share is None else 100 * share, "{:.1f}%"),
                    ips(j, "infer"),
                    ips(t, "infer"),
                    _f(d.get("ratio_infer"), "{:.2f}x"),
                ]
            )
            + " |"
        )
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    return "\n".join(lines)


def training_table(runs: dict[str, Any]) -> str:
    if not runs:
        return "Not measured yet on a GPU."
    head = [
        "run",
        "epochs (best)",
        "stopped by",
        "wall s",
        "lesion Dice [95% CI]",
        "lesion IoU [95% CI]",
        "pixel acc.",
        "HD95 px",
        "normal FP",
        "test images",
    ]
    lines = [
        "Test split at native resolution, per image (`experiments/results/{base,report}_gpu/`):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for run in ("base", "report"):
        if run not in runs:
            continue
        if "results" not in runs[run]:
            lines.append(_unfinished_row(run, runs[run].get("metrics", [])))
            continue
        res, env = runs[run].get("results", {}), runs[run].get("environment", {})
        m = _headline_metrics(res)
        stop = (
            "time cap"
            if res.get("stopped_by_time_cap")
            else "early stopping"
            if res.get("stopped_early")
            else "last epoch"
        )

        def ci(metric: str) -> str:
            lo, hi = m.get(f"{metric}_lesion_ci") or [None, None]
            return f"{_f(m.get(f'{metric}_lesion'))} [{_f(lo)}, {_f(hi)}]"

        images = m.get("images") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{run} (`experiments/configs/{run}.py`)",
                    f"{res.get('epochs_run')} ({res.get('best_epoch')})",
                    stop,
                    _f(env.get("wall_time_s"), "{:.0f}"),
                    ci("dice"),
                    ci("iou"),
                    _f(m.get("pixel_accuracy_lesion")),
                    _f(m.get("hd95_lesion"), "{:.1f}"),
                    _f(m.get("normal_false_positive_rate"), "{:.2f}"),
                    str(images.get("overall", "-")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _unfinished_row(run: str, metrics: list[dict[str, Any]]) -> str:
    """A run stopped before its results.json: what its metrics.jsonl shows, and no test figure."""
    epochs = [m for m in metrics if "val/dice" in m]
    if epochs:
        best = max(epochs, key=lambda m: m["val/dice"])
        times = [m.get("epoch_time_s") or 0.0 for m in epochs]
        pace = f"first epoch {times[0]:.1f} s with compilation"
        if len(times) > 1:
            pace += f", then {statistics.median(times[1:]):.2f} s per epoch"
        seen = (
            f"stopped before results.json (the stage's time limit) after {len(epochs)} "
            f"epoch{'s' * (len(epochs) > 1)}; best validation Dice {best['val/dice']:.3f} "
            f"at epoch {best['epoch']}; {pace}"
        )
    else:
        seen = "stopped before its first epoch ended"
    cells = [f"{run} (`experiments/configs/{run}.py`)", f"{len(epochs)} (-)", seen] + ["not measured"] * 6 + ["-"]
    return "| " + " | ".join(cells) + " |"


def augment_table(aug: dict[str, Any]) -> str:
    if not aug:
        return "Not measured yet on a GPU."
    return (
        f"`seed` U-Net training step, batch {aug.get('batch')}, {aug.get('data')} on {aug.get('device')}: "
        f"{_f(aug.get('train_step_ms_no_augment'), '{:.2f}')} ms without augmentation, "
        f"{_f(aug.get('train_step_ms_augment'), '{:.2f}')} ms with it "
        f"({_f(None if aug.get('augment_overhead') is None else 100 * aug['augment_overhead'], '{:+.1f}%')}; "
        f"target < 5%); sampling + augmenting alone {_f(aug.get('augment_ms_per_batch'), '{:.2f}')} ms "
        f"per batch (`benchmarks/results/augment_gpu.json`)."
    )


def levers_table(lv: dict[str, Any]) -> str:
    if not lv.get("train") and not lv.get("infer"):
        return "Not measured yet on a GPU."
    lines = [
        f"`{lv.get('preset')}` at {lv.get('size')}x{lv.get('size')}, batch {lv.get('batch')}, baseline "
        f"{lv.get('dtype')} / scanned steps / donated / zero insertion / batch norm as trained, on "
        f"{lv.get('device')}; one switch per row (`benchmarks/results/levers_gpu.json`):",
        "",
        "| path | variant | images/s | x baseline | compile s | max abs diff vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("train", "infer"):
        for name, row in lv.get(kind, {}).items():
            if "images_per_s" not in row:
                lines.append(f"| {kind} | {name} | {row.get('skipped') or row.get('error', '?')[:80]} | | | |")
                continue
            lines.append(
                f"| {kind} | {name} | {row['images_per_s']:.0f} | {_f(row.get('vs_baseline'), '{:.2f}')} | "
                f"{_f(row.get('compile_s'), '{:.1f}')} | "
                f"{_f(row.get('max_abs_diff_vs_baseline'), '{:.2g}')} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
def ingest(src: Path, repo: Path, allow_dry_run: bool = False) -> dict[str, Any]:
    summary_path = src / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{str(src)!r} holds no summary.json; expected the files of benchmarks/gpu_run.sh")
    summary = json.loads(summary_path.read_text())
    if summary.get("dry_run") and not allow_dry_run:
        raise ValueError(
            f"{str(src)!r} holds a dry run's files (no GPU figures); pass --allow-dry-run "
            f"with --repo pointing to a copy to ingest it anyway"
        )

    def load(name: str) -> dict[str, Any]:
        p = src / name
        return json.loads(p.read_text()) if p.is_file() else {}

    tp, aug, lv = load("throughput.json"), load("augment.json"), load("levers.json")
    results_dir = repo / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dest in (
        ("summary.json", "gpu_run_summary.json"),
        ("throughput.json", "throughput_gpu.json"),
        ("augment.json", "augment_gpu.json"),
        ("levers.json", "levers_gpu.json"),
    ):
        if (src / name).is_file():
            shutil.copyfile(src / name, results_dir / dest)
            written.append(str((results_dir / dest).relative_to(repo)))
    runs = read_runs(src / "runs.tar.gz", repo)
    written += [str(r["folder"].relative_to(repo)) for r in runs.values()]

    sections = {
        "targets": targets_table(summary, tp, runs, aug),
        "throughput": throughput_table(tp),
        "training": training_table(runs),
        "augment": augment_table(aug),
        "levers": levers_table(lv),
    }
    for doc, names in (
        (repo / "experiments" / "RESULTS.md", RESULTS_MD_SECTIONS),
        (repo / "README.md", README_SECTIONS),
    ):
        text = doc.read_text()
        for name in names:
            text = replace_section(text, name, sections[name], str(doc))
        doc.write_text(text)
        written.append(str(doc.relative_to(repo)))
    return {"written": written, "sections": sections}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the folder holding summary.json etc.")
    ap.add_argument("--repo", default=str(REPO), help="repository root to update (default: this one)")
    ap.add_argument("--allow-dry-run", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = ingest(Path(args.src), Path(args.repo), args.allow_dry_run)
    except ValueError as e:
        print(f"ingest_gpu: {e}", file=sys.stderr)
        return 2
    print(out["sections"]["targets"])
    print("\nwrote: " + ", ".join(out["written"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
