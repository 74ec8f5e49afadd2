"""The strong protocol (experiments/configs/base.py) reduced to fit a 2-core CPU: 128x128 images,
a 16-wide padded U-Net instead of 64, 50 epochs, float32 (XLA:CPU gains nothing from
bfloat16). Everything else is the base protocol's: all three classes, the duplicate-aware
split, augmentation, BCE + Dice, AdamW with a cosine schedule, early stopping on
validation Dice.

Command (from the repository root; about 20 minutes on 2 cores):

    unet-jax train --config experiments/configs/base_cpu.py --out runs/base_cpu

Measured (2026-12-04, 2-core VM, two CPU devices, a whole epoch per dispatch, the XLA:CPU
flags that `unet-jax train` sets; 866 s, of which 50 epochs at 15.2 s each, then the test
evaluation and the inference recipe): best epoch 37 of 50; test split (93 images,
duplicate-aware) at native resolution with the recipe chosen on validation, lesion images
(77): Dice 0.724 [0.656, 0.792], IoU 0.636 [0.564, 0.697]; raw model output lesion Dice
0.727; normal images predicted empty 10 of 16. The same command took 1,161 s on 2026-12-03
(20.5 s per epoch; Dice 0.722) and 1,953 s on 2026-11-27 (one device, one step per
dispatch, 40.7 s per epoch; Dice 0.704). Details and the run files:
experiments/RESULTS.md, experiments/results/base_cpu/.
"""

import dataclasses

from base import get_config as base_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(
        base_config(),
        image_size=128,
        model={"features": 16},
        epochs=50,
        patience=20,
        warmup_epochs=2.0,
        dtype="float32",
    )
