"""The report's protocol (experiments/configs/report.py) reduced to fit a 2-core CPU: 128x128
images and 30 epochs instead of 256x256 and 75. Everything else is the notebook's.

Command (from the repository root):

    unet-jax train --config experiments/configs/report_cpu.py --out runs/report_cpu

Measured (2026-11-27, 2-core VM, 2,280 s; best epoch 29 of 30): the report's columns at
128x128, testing pixel "accuracy" 0.9302, loss 0.2090, Dice 0.4604, IoU 0.3752; test split
(104 lesion images) at native resolution: Dice 0.459 [0.387, 0.527], IoU 0.374 [0.311,
0.439], 19 lesion images predicted empty. Details: experiments/RESULTS.md,
experiments/results/report_cpu/.
"""

import dataclasses

from report import get_config as report_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(report_config(), image_size=128, epochs=30, patience=20)
