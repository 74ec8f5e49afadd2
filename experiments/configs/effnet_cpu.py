"""EfficientNet-Lite0 with its released ImageNet weights under a U-Net decoder (issue 29),
fine-tuned at 128x128 on the 2-core CPU and judged on all five cross-validation folds.

What is fine-tuned and how (the transfer-learning recipe; each choice is a config field):

* ``init_from="imagenet"``: the encoder starts from EfficientNet-Lite0's ImageNet weights
  (the RGB stem summed over its three channels for grayscale ultrasound: exactly the RGB
  network on the image replicated, at a third of the stem's cost); the decoder and heads
  start from their initialisers;
* discriminative learning rates: AdamW at 1e-3 for the new decoder and heads, 0.1x that
  (``encoder_lr_scale``) for the pretrained encoder, both warmed up linearly over 2 epochs
  and then cosine-decayed to 0 (no frozen epochs: the warm-up keeps the first, random
  decoder gradients from wrecking the encoder, as in ULMFiT/timm fine-tuning);
* batch norm: trained in batch-statistics mode everywhere, the encoder's running
  statistics starting from ImageNet's and following BUSI's with TensorFlow's momentum
  (0.99, ~70-step half-life; an epoch is ~28 steps), synchronised over the two CPU devices
  (batch 16);
* the rest is the bundled ensemble's recipe (experiments/configs/ensemble_cpu.py): 128 px,
  a benign/malignant/normal head (here on the encoder's 1280-channel head, 0.2 x
  cross-entropy), the same augmentation, BCE + Dice, no per-fold recipe (chosen out of
  fold by experiments/oof.py).

Commands (from the repository root; rerun to resume):

    unet-jax data prepare ../shared/data --out .cache/busi128 --size 128
    python3 experiments/cv.py --config experiments/configs/effnet_cpu.py --out runs/effnet \\
        --cache .cache/busi128
    python3 experiments/oof.py --cv runs/effnet --data ../shared/data --out experiments/results/effnet_cpu

Measured results: experiments/RESULTS.md ("Pretrained features under the shipped model");
160 px: the same commands on `.cache/busi160` with `--set image_size=160` (out
`runs/effnet160`, results `experiments/results/effnet160_cpu`); the encoder at 0.5x with
`--set image_size=160 encoder_lr_scale=0.5` (results `experiments/results/effnet160lr05_cpu`:
nested lesion Dice 0.726 [0.700, 0.750], the best so far, inside the bundle's interval).
"""

import dataclasses

from ensemble_cpu import get_config as ensemble_config  # noqa: F401  (load_config puts experiments/configs/ on sys.path)

from unet_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(
        ensemble_config(),
        preset="effnet_lite0_unet",
        model={"class_head": 3},
        init_from="imagenet",
        encoder_lr_scale=0.1,
        warmup_epochs=2.0,
        epochs=25,
        patience=25,
    )
