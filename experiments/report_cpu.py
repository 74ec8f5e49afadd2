"""The report's protocol (experiments/report.py) reduced to fit a 2-core CPU: 128x128
images and 30 epochs instead of 256x256 and 75. Everything else is the notebook's.

Command (from the repository root):

    unet-jax train --config experiments/report_cpu.py --out runs/report_cpu

Measured results are in experiments/RESULTS.md.
"""

import dataclasses

from report import get_config as report_config  # noqa: F401  (experiments/ is on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(report_config(), image_size=128, epochs=30, patience=20)
