"""The quality recipe for a 2-core CPU (issue 10): the strong protocol's 16-wide padded U-Net
at 128x128 with a benign/malignant/normal head on its bottleneck (0.2 x cross-entropy),
stronger intensity and geometry augmentation, 22 epochs of AdamW with a cosine schedule,
early stopping on validation Dice. After training, the inference recipe (threshold,
flip test-time augmentation, the "no lesion here" gate, connected-component filtering,
hole filling) is chosen on the validation split only and saved with the checkpoint.

Command (from the repository root):

    unet-jax data prepare ../shared/data --out .cache/busi128 --size 128
    unet-jax train --config experiments/configs/final_cpu.py --out runs/final_cpu cache=.cache/busi128

Measured results (test split, native resolution) are in experiments/RESULTS.md.
"""

import dataclasses

from base import get_config as base_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(
        base_config(),
        image_size=128,
        model={"features": 16, "class_head": 3},
        class_weight=0.2,
        epochs=22,
        patience=10,
        warmup_epochs=1.0,
        dtype="float32",
        max_rotation_deg=15.0,
        scale_min=0.85,
        scale_max=1.2,
        brightness=0.15,
        contrast_min=0.75,
        contrast_max=1.3,
        gamma_min=0.7,
        gamma_max=1.4,
    )
