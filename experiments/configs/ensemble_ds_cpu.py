"""The bundled ensemble with deep supervision (issue 19): experiments/configs/ensemble_cpu.py
with auxiliary heads on decoder levels 2 and 3 (nnU-Net's deep supervision, loss weights 1,
1/2, 1/4 normalised). On fold 0 it gave the best validation Dice of the training levers
(0.704 vs 0.677) at no extra wall time; this config trains it on every fold.

Command (from the repository root; about 60 minutes on 2 quiet cores; rerun to resume):

    unet-jax data prepare ../shared/data --out .cache/busi128 --size 128
    python3 experiments/cv.py --config experiments/configs/ensemble_ds_cpu.py --out runs/ensemble_ds \\
        --cache .cache/busi128

Measured results: experiments/RESULTS.md ("A segmenter that knows when there is no lesion").
"""

import dataclasses

from ensemble_cpu import get_config as ensemble_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    base = ensemble_config()
    return dataclasses.replace(base, model={**base.model, "deep_supervision": 2})
