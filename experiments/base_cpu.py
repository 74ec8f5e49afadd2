"""The strong protocol (experiments/base.py) reduced to fit a 2-core CPU: 128x128 images,
a 16-wide padded U-Net instead of 64, 50 epochs, float32 (XLA:CPU gains nothing from
bfloat16). Everything else is the base protocol's: all three classes, the duplicate-aware
split, augmentation, BCE + Dice, AdamW with a cosine schedule, early stopping on
validation Dice.

Command (from the repository root; about 35 minutes on 2 cores):

    unet-jax train --config experiments/base_cpu.py --out runs/base_cpu

Measured (2026-11-27, 2-core VM, 1,953 s; stopped early at epoch 48, best 28): test split
(93 images, duplicate-aware) at native resolution, lesion images (77): Dice 0.704 [0.635,
0.773], IoU 0.613 [0.533, 0.680], pixel accuracy 0.946, HD95 88.2 px; normal images
predicted empty 8 of 16. Details and the run files: experiments/RESULTS.md,
experiments/results/base_cpu/.
"""

import dataclasses

from base import get_config as base_config  # noqa: F401  (experiments/ is on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(base_config(), image_size=128, model={"features": 16}, epochs=50, patience=20,
                               warmup_epochs=2.0, dtype="float32")
