"""The single-model bundle shipped until issue 19 (since then unet_jax/bundled is the fold
ensemble of experiments/configs/ensemble_cpu.py): the quality recipe (experiments/configs/final_cpu.py)
trained on all of the shared data, less a 15% validation part that early-stops it and
chooses its inference recipe. No test split: its expected quality is the cross-validated
estimate of the same recipe (experiments/RESULTS.md), not a number measured on itself.

Commands (from the repository root; the third wrote the package's bundled model then):

    unet-jax data prepare ../shared/data --out .cache/busi128 --size 128
    unet-jax train --config experiments/configs/bundle_cpu.py --out runs/bundle_cpu cache=.cache/busi128
    unet-jax export runs/bundle_cpu --out unet_jax/bundled --card unet_jax/bundled/MODEL_CARD.md --overwrite
"""

import dataclasses

from final_cpu import get_config as final_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(final_config(), test_fraction=0.0)
