"""Shared pieces of the training tests."""

from unet_jax.config import TrainConfig

# A run small enough for CI: 30 phantom images of 32x32, a 2-level 4-wide seed U-Net.
TINY = TrainConfig(
    preset="seed", model={"features": 4, "depth": 2}, image_size=32, phantom_images=30,
    batch_size=4, eval_batch_size=8, epochs=3, patience=None, learning_rate=3e-3, seed=7, plots=False,
)
