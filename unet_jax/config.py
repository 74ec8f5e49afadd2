"""One configuration object per run: every hyperparameter of a training run lives here.

A config file is a Python file defining ``get_config() -> TrainConfig`` (the files in
``experiments/``; variants import the base and override it). Command-line overrides are
``key=value`` strings; model fields are ``model.FIELD=value``. An unknown key, or a value
of the wrong type, is an error naming the key, the value and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import numbers
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "TrainConfig",
    "demo_config",
    "load_config",
    "config_to_dict",
    "config_from_dict",
    "field_types",
    "parse_value",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the run folder saves it as ``config.json``)."""

    # Model: a preset of unet_jax.models (any family: seed, padded, resnet34_unet,
    # resnet18_classifier, sam_vit_b, ...) and field overrides (e.g. {"dropout_rate": 0.1}).
    preset: str = "seed"
    model: dict = dataclasses.field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    # The U-Net's convolutions and up-convolutions in bfloat16 on the CPU's matrix units
    # (AMX) through oneDNN (unet_jax.layers.onednn, issue 32), the rest in `dtype`; the run
    # then takes one CPU device (oneDNN threads itself over the cores). "on": an error where
    # it cannot run; "auto": on where the CPU has AMX and the oneDNN build works; "off".
    cpu_bf16: Literal["off", "auto", "on"] = "off"
    # Parameters to start from: a converted .msgpack (unet-jax convert), an official PyTorch
    # .pth (SAM or a torchvision ResNet, converted on the fly), or a run / checkpoint folder.
    init_from: str | None = None
    freeze: tuple[str, ...] = ()  # top-level parameter groups kept fixed (e.g. SAM's image_encoder)

    # Data. data=None trains on a generated phantom dataset (the embedded default).
    data: str | None = None
    cache: str | None = None  # a folder written by `unet-jax data prepare` (faster than PNGs)
    image_size: int = 256
    channels: int = 1  # 1 grayscale, 3 RGB as the notebook
    classes: Literal["all", "lesion"] = "all"  # lesion: benign + malignant only (the notebook)
    split: Literal["stratified", "seed"] = "stratified"  # seed: the notebook's 80/20 protocol
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    manifest: str | None = None  # reuse a split manifest (JSON) instead of making one
    phantom_images: int = 120  # size of the generated dataset when data is None
    # Hard negatives: every normal (lesion-free) training image appears this many times per
    # epoch (each copy augmented on its own); 1 trains on the split as it is. Validation
    # and test splits are never repeated.
    normal_repeats: int = 1

    # Augmentation (unet_jax.data.AugmentConfig); augment=False trains on the images as read.
    augment: bool = True
    hflip: float = 0.5
    max_rotation_deg: float = 10.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.1
    contrast_min: float = 0.9
    contrast_max: float = 1.1
    gamma_min: float = 0.8
    gamma_max: float = 1.25

    # Loss.
    loss: Literal["bce", "dice", "bce_dice"] = "bce_dice"
    pos_weight: float | None = None
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    # Models with a classification output: cross-entropy on benign/malignant/normal. A
    # classifier's loss is the cross-entropy; a two-headed model adds class_weight x it.
    class_weight: float = 0.0
    # Box-prompted models (SAM): boxes from the ground-truth masks, each corner moved by up
    # to box_jitter x the image side during training (MedSAM's perturbation); none at eval.
    box_jitter: float = 0.05

    # Optimisation.
    # sgd: plain momentum SGD; its updates are proportional to the gradients, so runs that
    # differ only in float summation order (devices, processes) stay within rounding of each
    # other, where Adam's normalisation magnifies the rounding of near-zero gradients.
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4  # adamw only
    # Transfer learning: the pretrained ``encoder`` parameter group (resnet*/effnet* U-Nets)
    # learns at learning_rate x this (its own warm-up and schedule); 1 treats it as the rest.
    encoder_lr_scale: float = 1.0
    momentum: float = 0.9  # sgd only
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 0.0
    batch_size: int = 32
    epochs: int = 75
    grad_clip_norm: float | None = None
    # Exponential moving average of the weights (and batch-norm statistics), evaluated,
    # early-stopped on and deployed instead of the raw weights; 0 disables it. The decay
    # warms up as min(ema_decay, (1 + step) / (10 + step)) (TensorFlow's
    # ExponentialMovingAverage with num_updates), so early averages are not dominated by
    # the initialisation.
    ema_decay: float = 0.0

    # Early stopping on the validation split (never the test split).
    patience: int | None = 20  # epochs without improvement; None disables early stopping
    monitor: Literal["val/loss", "val/dice", "val/iou", "val/accuracy"] = "val/loss"
    restore_best: bool = True

    # Evaluation.
    threshold: float = 0.5
    eval_batch_size: int = 32
    # After training, choose the inference recipe (threshold, flip TTA, the "no lesion"
    # gate, component filtering, hole filling; unet_jax.inference) on the validation split
    # and save it with the best checkpoint; evaluate and predict then apply it.
    tune_inference: bool = True
    max_lesion_empty: float = 0.05  # the tuned recipe may leave at most this share of lesion images empty

    # Run.
    seed: int = 0
    # The bit generator behind dropout (and box jitter): jax.random's implementations. The
    # data order and augmentation always use threefry2x32 (unet_jax.train.steps.run_keys).
    dropout_prng: Literal["threefry2x32", "rbg", "unsafe_rbg"] = "threefry2x32"
    steps_per_dispatch: int = 0  # training steps per jitted call; 0: an epoch
    # The CPU split into this many JAX devices, the batch split over them (unet_jax.train.cpu;
    # set by `unet-jax train` before JAX starts); 0: two on a 2+ core host with even batch sizes.
    cpu_devices: int = 0
    checkpoint_every: int = 1  # epochs
    plots: bool = True
    distributed: bool = False  # one run as several processes (unet_jax.train.distributed)
    # Wall-time cap of the training phase (minutes since train() started): stops after the
    # epoch that reaches it, like early stopping (best checkpoint, test evaluation, results).
    max_train_minutes: float | None = None

    def __post_init__(self) -> None:
        # Every way in (a config file, config.json, an override, the Python API) meets the
        # same check: a value Python would merely accept (1.5 epochs, augment="no", a truthy
        # string) must not silently run something else.
        check_types(self)
        # A JSON round trip (config.json) gives lists; keep one canonical, hashable form
        # (model fields become static arguments of jitted functions).
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "model", {k: _as_tuples(v) for k, v in dict(self.model).items()})
        _check_ranges(self)
        _check_combinations(self)


def _check_ranges(config: TrainConfig) -> None:
    """Every numeric field in its range; the first one outside is a ValueError naming it."""
    checks = [
        ("image_size", config.image_size >= 1, "a positive integer"),
        ("channels", config.channels in (1, 3), "1 or 3"),
        ("batch_size", config.batch_size >= 1, "a positive integer"),
        ("eval_batch_size", config.eval_batch_size >= 1, "a positive integer"),
        ("epochs", config.epochs >= 0, "a positive integer (0: evaluate init_from as it is)"),
        ("learning_rate", config.learning_rate > 0, "a positive number"),
        ("val_fraction", 0 < config.val_fraction < 1, "a fraction in (0, 1)"),
        ("test_fraction", 0 <= config.test_fraction < 1, "a fraction in [0, 1)"),
        ("val_fraction + test_fraction", config.val_fraction + config.test_fraction < 1, "below 1"),
        ("threshold", 0 < config.threshold < 1, "in (0, 1)"),
        ("patience", config.patience is None or config.patience >= 1, "None or a positive integer"),
        (
            "max_train_minutes",
            config.max_train_minutes is None or config.max_train_minutes > 0,
            "None or a positive number of minutes",
        ),
        ("steps_per_dispatch", config.steps_per_dispatch >= 0, "0 (one epoch) or a positive integer"),
        ("cpu_devices", config.cpu_devices >= 0, "0 (auto) or a positive integer"),
        ("checkpoint_every", config.checkpoint_every >= 1, "a positive integer"),
        ("phantom_images", config.phantom_images >= 1, "a positive integer"),
        ("normal_repeats", config.normal_repeats >= 1, "a positive integer (1: no repeats)"),
        ("hflip", 0 <= config.hflip <= 1, "a probability in [0, 1]"),
        ("max_rotation_deg", config.max_rotation_deg >= 0, "a number of degrees >= 0"),
        ("scale_min", 0 < config.scale_min <= config.scale_max, "above 0 and at most scale_max"),
        ("brightness", config.brightness >= 0, "a number >= 0"),
        ("contrast_min", 0 < config.contrast_min <= config.contrast_max, "above 0 and at most contrast_max"),
        ("gamma_min", 0 < config.gamma_min <= config.gamma_max, "above 0 and at most gamma_max"),
        ("pos_weight", config.pos_weight is None or config.pos_weight > 0, "None or a positive number"),
        ("bce_weight", config.bce_weight >= 0, "a number >= 0"),
        ("dice_weight", config.dice_weight >= 0, "a number >= 0"),
        ("weight_decay", config.weight_decay >= 0, "a number >= 0"),
        ("encoder_lr_scale", config.encoder_lr_scale > 0, "a positive factor (1: the encoder as the rest)"),
        ("momentum", 0 <= config.momentum < 1, "a number in [0, 1)"),
        ("warmup_epochs", config.warmup_epochs >= 0, "a number of epochs >= 0"),
        ("grad_clip_norm", config.grad_clip_norm is None or config.grad_clip_norm > 0, "None or a positive number"),
        ("ema_decay", 0 <= config.ema_decay < 1, "0 (off) or a decay in (0, 1)"),
        ("class_weight", config.class_weight >= 0, "a number >= 0"),
        ("max_lesion_empty", 0 <= config.max_lesion_empty < 1, "a fraction in [0, 1)"),
        ("box_jitter", 0 <= config.box_jitter < 0.5, "a fraction of the image side in [0, 0.5)"),
        ("freeze", all(isinstance(n, str) and n for n in config.freeze), "a tuple of parameter group names"),
    ]
    for name, ok, expected in checks:
        if not ok:
            value = getattr(config, name, None) if "+" not in name else config.val_fraction + config.test_fraction
            raise ValueError(f"config {name} = {value!r}: expected {expected}")


def _check_combinations(config: TrainConfig) -> None:
    """Combinations that would silently do something other than what they say."""
    if config.split == "seed" and config.classes != "lesion" and config.manifest is None:
        raise ValueError(
            f"config split = 'seed' with classes = {config.classes!r}: the notebook's seed protocol "
            f"splits benign and malignant images only; expected classes = 'lesion' "
            f"(or split = 'stratified' to keep the normal images)"
        )
    if config.epochs == 0 and config.init_from is None:
        raise ValueError(
            "config epochs = 0 evaluates the parameters of init_from without training; "
            "expected init_from (e.g. a converted SAM checkpoint) or epochs >= 1"
        )
    if config.loss == "bce_dice" and config.bce_weight == 0 and config.dice_weight == 0:
        raise ValueError("config bce_weight = 0 and dice_weight = 0: the loss would be 0; expected a positive weight")
    if config.loss == "dice" and config.pos_weight is not None:
        raise ValueError(
            f"config pos_weight = {config.pos_weight!r} with loss = 'dice': pos_weight weighs the BCE "
            f"term only; expected loss = 'bce' or 'bce_dice', or pos_weight = None"
        )


def check_types(config: TrainConfig) -> None:
    """Raise ValueError ("config KEY = VALUE: expected ...") unless every field of
    ``config`` has its annotated type. Numbers become plain Python ints and floats (an int
    in a float field, a NumPy scalar), so that config.json reads back the same.

    Strict where Python is lenient: a bool is not an int, a float is not an int, a string
    is not a bool (``bool("no")`` is true), a string is not a tuple of names.
    """
    for name, annotation in field_types().items():
        value = getattr(config, name)
        if not _has_type(value, annotation):
            raise ValueError(f"config {name} = {value!r}: expected {_describe(annotation)}")
        if _accepts(annotation, float) and _is_real(value):
            object.__setattr__(config, name, float(value))
        elif _accepts(annotation, int) and _is_int(value):
            object.__setattr__(config, name, int(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _accepts(annotation: Any, kind: type) -> bool:
    return annotation is kind or kind in typing.get_args(annotation)


def _has_type(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_real(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is tuple:  # tuple[str, ...]; a JSON round trip gives a list
        return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
    return True


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list, each item {_describe(args[0])}"
    return {
        bool: "true or false (a bool)",
        int: "an integer (int)",
        float: "a number (float)",
        str: "a string",
        dict: "a dict of model field names to values",
    }.get(annotation, str(annotation))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def demo_config() -> TrainConfig:
    """The README's main job: a small U-Net on generated phantom data, minutes on 2 CPU cores."""
    return TrainConfig(
        preset="padded",
        model={"features": 16, "class_head": 3},
        class_weight=0.2,
        image_size=64,
        channels=1,
        phantom_images=160,
        loss="bce_dice",
        batch_size=16,
        epochs=20,
        patience=None,
        monitor="val/dice",
        schedule="cosine",
        warmup_epochs=1.0,
        learning_rate=3e-3,
    )


@functools.cache
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a dict (e.g. a run's saved ``config.json``); unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(values, dict):
        raise ValueError(f"{source}: holds a {type(values).__name__}; expected a JSON object of config keys")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; known keys: {sorted(fields)}")
    try:
        return TrainConfig(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def load_config(path: str | os.PathLike | None) -> TrainConfig:
    """The ``get_config()`` of a Python config file, or of a run's ``config.json``; None: defaults."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"config file {str(path)!r} does not exist; expected a .py file with get_config() or a config.json"
        )
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"config file {str(path)!r} is not valid JSON ({err}); expected a run's config.json"
            ) from err
        return config_from_dict(values, source=f"config file {str(path)!r}")
    try:
        get_config = _get_config_of(path)
        config = get_config() if get_config is not None else None
    except ValueError as err:  # a value TrainConfig refused: say in which file
        raise ValueError(f"config file {str(path)!r}: {err}") from err
    except TypeError as err:  # TrainConfig(epochz=3) or dataclasses.replace(base, epochz=3)
        unknown = re.search(r"TrainConfig\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise ValueError(
            f"config file {str(path)!r}: unknown config key {unknown[1]!r}; known keys: {sorted(field_types())}"
        ) from err
    if get_config is None:
        raise ValueError(f"config file {str(path)!r} defines no get_config(); expected get_config() -> TrainConfig")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{str(path)!r}: get_config() returned {type(config).__name__}; expected TrainConfig")
    return config


def _get_config_of(path: Path) -> Any:
    """The ``get_config`` function of the Python file ``path`` (None if it has none)."""
    spec = importlib.util.spec_from_file_location(f"unet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # Variants import their base config from the same folder.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(path.resolve().parent))
    return getattr(module, "get_config", None)


def parse_value(key: str, text: str, annotation: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string
    if value is None or text in ("None", "none", "null"):
        allowed = typing.get_args(annotation)
        if annotation is not Any and type(None) not in allowed:
            raise ValueError(f"override {key}={text!r}: {key} cannot be None")
        return None
    return _coerce(key, text, value, annotation)


def _coerce(key: str, text: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"override {key}={text!r}: expected one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, text, value, option)
            except ValueError:
                continue
        raise ValueError(f"override {key}={text!r}: expected {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ValueError(f"override {key}={text!r}: expected true or false")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str:
        return str(value) if not isinstance(value, str) else value
    if annotation is dict and isinstance(value, dict):
        return value
    if origin is tuple:
        # freeze=image_encoder,prompt_encoder (bare words) or a Python tuple/list literal.
        items = [w.strip() for w in value.split(",") if w.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            element = args[0] if args else Any
            return tuple(_coerce(key, text, item, element) for item in items)
        raise ValueError(f"override {key}={text!r}: expected comma-separated values")
    if annotation is Any:
        return value
    raise ValueError(f"override {key}={text!r}: expected {getattr(annotation, '__name__', annotation)}")
