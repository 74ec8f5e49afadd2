"""The bundled ensemble's recipe (issue 19): experiments/configs/final_cpu.py on a longer schedule
(36 epochs of AdamW + cosine instead of 22: validation Dice was still rising at epoch 20 of
22), trained once per cross-validation fold. No recipe is tuned per fold and no plots are
drawn: the inference recipe is chosen afterwards on the pooled out-of-fold outputs of all
folds (experiments/cv.py --oof), and the fold models together are the bundled model.

Command (from the repository root; about 80 minutes on 2 cores; rerun to resume):

    unet-jax data prepare ../shared/data --out .cache/busi128 --size 128
    python3 experiments/cv.py --config experiments/configs/ensemble_cpu.py --out runs/ensemble \\
        --cache .cache/busi128

Measured results: experiments/RESULTS.md ("A segmenter that knows when there is no lesion").
"""

import dataclasses

from final_cpu import get_config as final_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(final_config(), epochs=36, patience=36, tune_inference=False, plots=False)
