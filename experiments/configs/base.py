"""The strong protocol: all three classes, a duplicate-aware train/validation/test split of
the shared BUSI data, augmentation, BCE + Dice, the 64-wide padded U-Net, AdamW with a
cosine schedule, early stopping on validation Dice.

Command (from the repository root, on an accelerator; about 40 MB of data on the device):

    unet-jax data prepare ../shared/data --out .cache/busi256
    unet-jax train --config experiments/configs/base.py --out runs/base cache=.cache/busi256

Targets, not results (no accelerator run yet): mean per-image Dice >= 0.80 and IoU >= 0.70
on the lesion images of the test split, and >= 90% of normal test images predicted empty.
benchmarks/gpu_run.sh trains this config first when a GPU is at hand; until then the
measured numbers are those of its CPU reduction, experiments/configs/base_cpu.py (Dice 0.704).
"""

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        preset="padded",
        data="../shared/data",
        image_size=256,
        channels=1,
        classes="all",
        split="stratified",
        val_fraction=0.15,
        test_fraction=0.15,
        augment=True,
        loss="bce_dice",
        optimizer="adamw",
        learning_rate=1e-3,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=3.0,
        batch_size=16,
        epochs=150,
        patience=40,
        monitor="val/dice",
        dtype="bfloat16",
    )
