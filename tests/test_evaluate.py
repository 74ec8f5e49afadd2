"""`unet-jax evaluate` on small folders: what it says about the recipe it applies, and
which folders it takes (any subset of the classes)."""

from __future__ import annotations

import json
import shutil

import pytest
from _train_helpers import save_untrained_run

from unet_jax.cli import main
from unet_jax.data import write_phantom
from unet_jax.inference import NO_RECIPE, RECIPE_FILE, InferenceRecipe, load, recipe_status


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_untrained_run(tmp_path_factory.mktemp("evaluate") / "run", which=("latest", "best"))


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_data") / "busi"
    write_phantom(root, counts={"benign": 2, "malignant": 2, "normal": 1}, size=(32, 32), seed=2)
    return root


def _evaluate_json(checkpoint, data, capsys, *extra) -> dict:
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_no_tuned_recipe_is_said_in_the_output_and_the_report(run, busi, capsys):
    report = _evaluate_json(run, busi, capsys)
    assert report["recipe_tuned"] is False and report["recipe_description"].startswith(NO_RECIPE)
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(busi)]) == 0
    assert NO_RECIPE in capsys.readouterr().out
    raw = _evaluate_json(run, busi, capsys, "--raw")
    assert raw["recipe_tuned"] is False and NO_RECIPE not in raw["recipe_description"]


def test_a_tuned_recipe_is_named_and_a_latest_checkpoint_points_to_it(tmp_path, busi, capsys):
    run = save_untrained_run(tmp_path / "run", which=("latest", "best"))
    best = load(run / "checkpoints" / "best")
    (best.step_dir / RECIPE_FILE).write_text(json.dumps({"recipe": InferenceRecipe(threshold=0.3).to_dict()}))
    report = _evaluate_json(run, busi, capsys)
    assert report["recipe_tuned"] is True and RECIPE_FILE in report["recipe_description"]
    latest = load(run / "checkpoints" / "latest")
    assert not latest.recipe_tuned
    status = recipe_status(latest)
    assert status["description"].startswith(NO_RECIPE) and "the run's best checkpoint has one" in status["description"]


def test_a_lesion_only_folder_is_evaluated(run, busi, tmp_path, capsys):
    lesions = tmp_path / "lesions"
    shutil.copytree(busi, lesions)
    shutil.rmtree(lesions / "normal")
    report = _evaluate_json(run, lesions, capsys)
    assert report["images"]["normal"] == 0 and report["images"]["benign"] == 2
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(lesions)]) == 0  # the text report too
    assert "lesion_empty_prediction_rate: 0.0000 (0/4)" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(empty)]) == 2
    assert "no class folder; expected one or more of benign, malignant, normal" in capsys.readouterr().err
