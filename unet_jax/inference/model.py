"""One loader of trained models: :func:`load` turns a run folder, an Orbax checkpoint folder
(``checkpoints/{best,latest}`` or a step folder), an exported folder (``unet-jax export``)
or, given no path, the bundled model into one :class:`LoadedModel`, with the inference
recipe saved beside it.

Orbax checkpoints hold the training state and a JSON ``meta`` item (the run's config), so a
checkpoint folder is enough to rebuild the model; the arrays are read and checked (shapes
against the model, finite values) before use. Exported folders (``format``
``unet_jax.exported/1``, written by :mod:`unet_jax.inference.export`) hold a ``model.json``
and one ``member_<i>.msgpack`` per ensemble member, each verified against its SHA-256. The
bundled model (``unet_jax/bundled/``) is such a folder inside the package.

Also here: the recipe files (``inference.json`` beside a checkpoint), and what evaluate and
predict apply and report (:func:`effective_recipe`, :func:`recipe_status`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import serialization

from unet_jax import metrics as M
from unet_jax._io import atomic_write
from unet_jax._keys import key_problems
from unet_jax.config import TrainConfig, config_from_dict
from unet_jax.inference.recipe import RAW, InferenceRecipe
from unet_jax.inference.storage import from_stored
from unet_jax.layers import onednn
from unet_jax.layers.lowering import load_table
from unet_jax.models import abstract_variables, build_model

__all__ = [
    "LATEST",
    "BEST",
    "FORMAT",
    "MODEL_FILE",
    "RECIPE_FILE",
    "NO_RECIPE",
    "LoadedModel",
    "load",
    "with_cpu_bf16",
    "with_tuned_lowering",
    "bundled_path",
    "is_exported",
    "find_checkpoint",
    "finished_steps",
    "read_meta",
    "restore_variables",
    "check_readable",
    "check_finite",
    "check_same_structure",
    "unreadable_checkpoint",
    "quiet_missing_metadata",
    "read_recipe",
    "read_recipe_file",
    "save_recipe",
    "recipe_status",
    "resolve_threshold",
    "effective_recipe",
]

LATEST, BEST = "latest", "best"
FORMAT = "unet_jax.exported/1"
MODEL_FILE = "model.json"
RECIPE_FILE = "inference.json"
NO_RECIPE = "raw model output, no tuned recipe"


class _NoMissingMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" warning: a step's ``state`` item has no
    ``_CHECKPOINT_METADATA`` of its own (the step folder has it), so every restore logged
    it, though nothing is wrong. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith("Metadata file does not exist"))


@contextlib.contextmanager
def quiet_missing_metadata() -> Iterator[None]:
    """While restoring: Orbax's harmless missing-metadata warning silenced (absl logs
    through Python's ``absl`` logger), nothing else."""
    logger, quiet = logging.getLogger("absl"), _NoMissingMetadataWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint's saved config, with its variables."""

    model: Any
    variables: dict[str, Any]
    config: TrainConfig
    step_dir: Path
    # The inference recipe saved with the checkpoint (threshold, TTA, gate, components);
    # RAW when none was tuned. Further members of an ensemble (same architecture): their
    # probabilities are averaged with the first's.
    recipe: InferenceRecipe = RAW
    members: tuple[dict[str, Any], ...] = ()
    # The file the recipe was read from (an inference.json, an export's model.json); None
    # when none was found: then, unless ``recipe`` was given otherwise, evaluate and
    # predict show the raw model output and say so.
    recipe_source: str | None = None

    @property
    def recipe_tuned(self) -> bool:
        """Whether a tuned recipe came with the model (else RAW: the model's own output)."""
        return self.recipe_source is not None or self.recipe != RAW

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.image_size, self.config.image_size

    @property
    def all_variables(self) -> tuple[dict[str, Any], ...]:
        return (self.variables, *self.members)


def load(path: str | Path | None = None, expect: dict[str, Any] | None = None) -> LoadedModel:
    """The model at ``path``: a run folder (its best, else latest checkpoint), a
    ``checkpoints/{best,latest}`` or step folder, or an exported folder; the bundled model
    when ``path`` is None.

    ``expect``: model fields the caller requires (e.g. ``{"preset": "padded"}``); a
    checkpoint of another architecture is a ``ValueError`` saying what differs.
    """
    if path is None:
        path = bundled_path()
        if not is_exported(path):
            raise ValueError(
                f"no bundled model in {str(path)!r}; expected {MODEL_FILE} there (reinstall the "
                f"package, or pass --checkpoint)"
            )
    if is_exported(path):
        loaded = _load_exported(path)
        _check_expected(loaded.config, expect, Path(path))
        return loaded
    if Path(path).is_dir() and any(Path(path).glob("member_*.msgpack")):  # an export that lost its model.json
        raise ValueError(
            f"exported model {str(path)!r} has no {MODEL_FILE}: {str(Path(path) / MODEL_FILE)!r} does "
            f"not exist; expected the file written by `unet-jax export` beside its member_*.msgpack"
        )
    return _load_orbax(find_checkpoint(path), expect)


def with_tuned_lowering(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its convolutions on this machine's tuned lowerings (``lowering='auto'``:
    per layer and batch size, the fastest of :mod:`unet_jax.layers.lowering` in the table
    that ``python -m benchmarks.cpu_conv tune`` writes), when it runs on the CPU backend,
    its model has a ``lowering`` field left at ``'lax'``, and such a table exists;
    ``loaded`` itself otherwise. The same parameters and, up to float32 rounding, the same
    outputs (tests/test_lowering.py). Inference only: some lowerings are reverse-mode only.
    """
    if jax.default_backend() != "cpu" or getattr(loaded.model, "lowering", None) != "lax" or load_table() is None:
        return loaded
    return dataclasses.replace(loaded, model=loaded.model.clone(lowering="auto"))


def with_cpu_bf16(loaded: LoadedModel, setting: str) -> LoadedModel:
    """``loaded`` with its U-Net convolutions and up-convolutions in bfloat16 on the CPU's
    AMX units through oneDNN (:func:`unet_jax.layers.onednn.use_onednn`: ``'on'``,
    ``'auto'`` where the CPU has AMX and oneDNN builds; ``'off'`` returns ``loaded``), for
    a model with those fields. The same parameters; outputs within bfloat16 rounding
    (the bundled model's masks: experiments/RESULTS.md, "bfloat16 on the CPU's matrix units")."""
    if not onednn.use_onednn(setting):
        return loaded
    fields = {k: "onednn" for k in ("lowering", "up_method") if hasattr(loaded.model, k)}
    return dataclasses.replace(loaded, model=loaded.model.clone(**fields)) if fields else loaded


def _load_orbax(step_dir: Path, expect: dict[str, Any] | None) -> LoadedModel:
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise ValueError(f"checkpoint {str(step_dir)!r} has no saved config; expected one written by `unet-jax train`")
    config = config_from_dict(meta["config"], source=f"{step_dir}/meta")
    _check_expected(config, expect, step_dir)
    model = build_model(config)
    abstract = abstract_variables(model, config)
    variables = restore_variables(step_dir, abstract)
    recipe_file = step_dir / RECIPE_FILE
    return LoadedModel(
        model,
        variables,
        config,
        step_dir,
        read_recipe(step_dir),
        recipe_source=str(recipe_file) if recipe_file.is_file() else None,
    )


def _check_expected(config: TrainConfig, expect: dict[str, Any] | None, where: Path) -> None:
    for key, value in (expect or {}).items():
        if getattr(config, key) != value:
            raise ValueError(
                f"checkpoint {str(where)!r} holds {key}={getattr(config, key)!r}; expected {key}={value!r}"
            )


def check_readable(step_dir: Path) -> None:
    """Read every stored value of the checkpoint's state (plain TensorStore reads, no event
    loop) before Orbax restores it; a damaged file is a ValueError naming the checkpoint.

    Orbax reads the arrays concurrently on an event loop that it closes at the first
    error: the reads still in flight then fail into the closed loop, and print
    "RuntimeError: Event loop is closed" tracebacks after the clean error. Found here, the
    damage stops the restore before any of those reads starts (the price: the state is
    read twice, the second time from the page cache).
    """
    state = step_dir / "state"
    if not (state / "manifest.ocdbt").is_file():
        return  # not an OCDBT checkpoint: Orbax reports what it finds
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{state}/"}}).result()
        for read in [store.read(key) for key in store.list().result()]:
            read.result()
    except Exception as err:  # tensorstore raises ValueError, IndexError, ... for damaged files
        raise unreadable_checkpoint(step_dir, err) from err


def unreadable_checkpoint(step_dir: Path, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(
        f"checkpoint {str(step_dir)!r} could not be read ({type(err).__name__}: {first[:200]}); "
        f"expected a complete checkpoint written by `unet-jax train`: delete that folder to fall back "
        f"on another checkpoint, or train again into a new --out folder"
    )


def finished_steps(folder: str | os.PathLike) -> list[Path]:
    """The complete step folders of ``folder`` (``checkpoints/latest`` or ``best``), oldest
    first; orbax's temporary folders of an interrupted save are not among them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "meta").is_dir()),
        key=lambda p: int(p.name),
    )


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder for ``path``: a run folder (its best, else latest checkpoint), a
    ``checkpoints/{best,latest}`` folder, or a step folder itself."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; expected a run folder or a checkpoint folder")
    path = path.absolute()  # Orbax refuses relative paths
    candidates = []
    if (path / "meta").is_dir():
        return path
    for base in (path / "checkpoints" / BEST, path / "checkpoints" / LATEST, path):
        steps = finished_steps(base)
        if steps:
            candidates.append(steps[-1])
            break
    if not candidates:
        raise ValueError(
            f"no checkpoint found in {str(path)!r}; expected a run folder with checkpoints/best or "
            f"checkpoints/latest, or a checkpoint step folder"
        )
    return candidates[0]


def read_meta(step_dir: Path) -> dict[str, Any]:
    files = [p for p in (step_dir / "meta").iterdir() if p.is_file() and not p.name.startswith(".")]
    for f in files:
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    raise ValueError(f"checkpoint {str(step_dir)!r} has no readable meta JSON")


def restore_variables(step_dir: Path, abstract_variables: dict[str, Any]) -> dict[str, Any]:
    """Parameters and batch statistics of a checkpoint (their moving average when the run
    kept one), checked against
    ``abstract_variables`` (the model's ``init`` shapes); a different architecture is a
    ``ValueError`` naming what differs."""
    check_readable(step_dir)
    try:
        with quiet_missing_metadata(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            target = _local_target(step_dir)
            restored = checkpointer.restore(step_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as err:  # orbax/tensorstore raise several types for damaged files
        raise unreadable_checkpoint(step_dir, err) from err
    # A run with a moving average of its weights (config ema_decay) deploys the average.
    source = restored["state"].get("ema") or restored["state"]
    saved = {k: source.get(k) or {} for k in ("params", "batch_stats")}
    wanted = {k: abstract_variables.get(k, {}) for k in ("params", "batch_stats")}
    check_same_structure(saved, wanted, step_dir)
    check_finite(saved, step_dir)
    return saved


def check_finite(variables: Any, source: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise ValueError naming ``source`` and the first parameter path whose array holds
    NaN or inf: such weights predict nonsense (e.g. an empty mask everywhere) without any
    error of their own. ``variables`` is a tree of host or single-device arrays."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            bad.append(
                (
                    jax.tree_util.keystr(path, simple=True, separator="/"),
                    int(arr.size - np.isfinite(arr).sum()),
                    arr.size,
                )
            )
    if bad:
        name, count, size = bad[0]
        raise ValueError(
            f"{what} {str(source)!r} holds non-finite weights (NaN or inf) in {len(bad)} parameter "
            f"array(s), e.g. {name} ({count} of {size} values); expected finite weights: the file is "
            f"damaged, or was saved from a diverged run"
        )


def _local_target(step_dir: Path) -> Any:
    """The saved state's shapes and dtypes, placed on this process's first device: a
    checkpoint written by a run on several devices or processes (another topology) is
    then read by one process alone."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(Path(step_dir) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(m: Any) -> Any:
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
        return m

    return jax.tree.map(leaf, tree)


def check_same_structure(saved: Any, wanted: Any, step_dir: Path) -> None:
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}

    problems = key_problems(shapes(saved), shapes(wanted), limit=3)
    if problems:
        raise ValueError(
            f"checkpoint {str(step_dir)!r} was saved from a different architecture: " + "; ".join(problems)
        )


def is_exported(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def _read_member(file: Path, digest: str | None) -> dict[str, Any]:
    """One member's variables; its bytes checked against ``digest`` (SHA-256) when given."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ValueError(
            f"exported model member {str(file)!r} could not be read ({err}); expected the file "
            f"written by `unet-jax export`"
        ) from err
    if digest is not None and (actual := hashlib.sha256(data).hexdigest()) != digest:
        raise ValueError(
            f"exported model member {str(file)!r} is damaged: its SHA-256 is {actual}, "
            f"{MODEL_FILE} records {digest}; expected the file written by `unet-jax export`"
        )
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as err:  # truncated or corrupt msgpack
        raise ValueError(
            f"exported model member {str(file)!r} could not be read ({type(err).__name__}: "
            f"{str(err)[:200]}); expected the file written by `unet-jax export`"
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(
            f"exported model member {str(file)!r} holds {type(raw).__name__}; expected the "
            f"variables written by `unet-jax export`"
        )
    return {"params": raw.get("params", {}), "batch_stats": raw.get("batch_stats", {})}


def _digests(info: dict[str, Any], source: Path) -> dict[str, str]:
    """``member_sha256`` of model.json ({} for an export written before it existed)."""
    digests = info.get("member_sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ValueError(
            f"exported model {str(source)!r} has member_sha256={digests!r}; expected an object "
            f"mapping each member file to its SHA-256 (hex)"
        )
    missing = [name for name in info["members"] if name not in digests]
    if digests and missing:
        raise ValueError(
            f"exported model {str(source)!r} records no SHA-256 for member(s) {missing}; expected one per member file"
        )
    return digests


def _load_exported(path: str | os.PathLike) -> LoadedModel:
    """An exported folder's model, parameters in float32."""
    path = Path(path).absolute()
    source = path / MODEL_FILE
    try:
        info = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"exported model {str(source)!r} could not be read ({err}); expected the JSON written by `unet-jax export`"
        ) from err
    if info.get("format") != FORMAT:
        raise ValueError(f"exported model {str(source)!r} has format {info.get('format')!r}; expected {FORMAT!r}")
    config = config_from_dict(info["config"], source=str(source))
    model = build_model(config)
    abstract = abstract_variables(model, config)
    template = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    digests = _digests(info, source)
    members = []
    for name in info["members"]:
        file = path / name
        raw = _read_member(file, digests.get(name))
        try:
            raw = from_stored(raw)  # int8 kernels dequantised; every leaf float32
        except ValueError as err:
            raise ValueError(f"exported model member {str(file)!r}: {err}") from None
        check_same_structure(raw, template, file)
        check_finite(raw, file, "exported model member")
        members.append(raw)
    recipe = InferenceRecipe.from_dict(info.get("inference", {}), source=str(source))
    tuned = info.get("inference_tuned", recipe != RAW)  # absent from exports written before it
    return LoadedModel(
        model,
        members[0],
        config,
        path,
        recipe,
        tuple(members[1:]),
        recipe_source=str(source) if tuned is True else None,
    )


def bundled_path() -> Path:
    """The folder of the model shipped inside the package."""
    return Path(str(resources.files("unet_jax") / "bundled"))


def read_recipe(step_dir: Path) -> InferenceRecipe:
    """The recipe saved beside a checkpoint (``<step>/inference.json``), else RAW."""
    path = Path(step_dir) / RECIPE_FILE
    return read_recipe_file(path) if path.is_file() else RAW


def read_recipe_file(path: str | Path) -> InferenceRecipe:
    """The recipe in ``path``: an ``inference.json`` as `unet-jax train` or
    experiments/oof.py writes it (``{"recipe": {...}, ...}``), or a bare recipe object."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(
            f"inference recipe {str(path)!r} could not be read ({err}); expected an inference.json file"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"inference recipe {str(path)!r} is not valid JSON ({err}); expected the file "
            f"written by `unet-jax train` (delete it to use the raw model output)"
        ) from err
    if not isinstance(values, dict):
        raise ValueError(f"inference recipe {str(path)!r} holds {type(values).__name__}; expected a JSON object")
    return InferenceRecipe.from_dict(values.get("recipe", values), source=str(path))


def save_recipe(
    loaded: LoadedModel, recipe: InferenceRecipe, report: dict[str, Any] | None = None, run_dir: Path | None = None
) -> None:
    """Write the recipe (and its validation report) beside the checkpoint, and a copy in
    the run folder for reading."""
    text = json.dumps(M.to_jsonable({"recipe": recipe.to_dict(), "validation": report}), indent=2) + "\n"
    for folder in {Path(loaded.step_dir), *(() if run_dir is None else (Path(run_dir),))}:
        atomic_write(folder / RECIPE_FILE, lambda tmp: Path(tmp).write_text(text))


def recipe_status(loaded: LoadedModel, raw: bool = False) -> dict[str, Any]:
    """What evaluate and predict apply, for their output and report: ``tuned`` (a tuned
    recipe is applied), ``source`` (its file) and ``description`` (a sentence; with no
    recipe found it says "raw model output, no tuned recipe" and where one was looked for)."""
    if raw:
        return {"tuned": False, "source": None, "description": "raw model output (requested)"}
    if loaded.recipe_tuned:
        return {
            "tuned": True,
            "source": loaded.recipe_source,
            "description": f"tuned recipe{f' from {loaded.recipe_source}' if loaded.recipe_source else ''}: "
            f"{loaded.recipe.describe()}",
        }
    where = Path(loaded.step_dir)
    hint = ""
    if where.parent.name == LATEST and any(
        (s / RECIPE_FILE).is_file() for s in finished_steps(where.parent.parent / BEST)
    ):
        hint = f"; the run's best checkpoint has one: pass the run folder {str(where.parent.parent.parent)!r}"
    return {"tuned": False, "source": None, "description": f"{NO_RECIPE} (no {RECIPE_FILE} with {str(where)!r}{hint})"}


def resolve_threshold(loaded: LoadedModel, threshold: float | None) -> float:
    """``threshold``, or the checkpoint's own when None; a value outside (0, 1) is an error
    (at 0 or 1 every pixel, or none, would be predicted a lesion)."""
    t = loaded.config.threshold if threshold is None else threshold
    if not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ValueError(f"threshold {t!r}: expected a probability in (0, 1), e.g. 0.5")
    return float(t)


def effective_recipe(
    loaded: LoadedModel, threshold: float | None = None, flip_tta: bool | None = None, raw: bool = False
) -> InferenceRecipe:
    """The recipe evaluate/predict apply: the checkpoint's own (RAW with the config's
    threshold when ``raw``), with an explicit threshold or TTA choice laid over it."""
    recipe = dataclasses.replace(RAW, threshold=loaded.config.threshold) if raw else loaded.recipe
    if threshold is not None:
        recipe = dataclasses.replace(recipe, threshold=resolve_threshold(loaded, threshold))
    if flip_tta is not None:
        recipe = dataclasses.replace(recipe, flip_tta=bool(flip_tta))
    return recipe
