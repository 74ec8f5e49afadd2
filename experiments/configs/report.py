"""The report's protocol, as its Keras notebook ran it, minus its test-set leakage.

The notebook: `seed` U-Net (3,145,361 trainable parameters), benign + malignant images
only, 80/20 split per class, 256x256 RGB divided by 255, binary cross-entropy, Adam 1e-3,
batch 32, 75 epochs, early stopping with patience 20. It early-stopped on its test split;
here validation comes out of the 80% training part (10% of it) and the test split is
touched once, at the end. The printed table has the report's columns (accuracy and loss,
training and testing) next to Dice and IoU, so a reader sees that the report's 0.9451
"accuracy" is pixel accuracy, not IoU.

Command (from the repository root; needs an accelerator for the full 75 epochs):

    unet-jax train --config experiments/configs/report.py --out runs/report

A CPU-sized run of the same protocol: experiments/configs/report_cpu.py.
"""

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        preset="seed",
        data="../shared/data",
        image_size=256,
        channels=3,
        classes="lesion",
        split="seed",
        val_fraction=0.1,
        augment=False,
        loss="bce",
        optimizer="adam",
        learning_rate=1e-3,
        schedule="constant",
        batch_size=32,
        epochs=75,
        patience=20,
        monitor="val/loss",
    )
