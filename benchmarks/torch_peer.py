"""A PyTorch peer of the `seed` and `padded` U-Net presets, with a best-practice train step.

Same architecture as ``unet_jax.models.create_unet(preset)`` (read from
``unet_jax.models.PRESETS``, so the two cannot drift apart silently): identical widths,
convolutions per block, batch-norm settings, dropout placement, up-convolution kernels,
input channels and head. Parameter counts are checked equal to the JAX model's
(:func:`check_param_counts`; the benchmark calls it before timing anything).

Mapping of the settings:

* batch norm: Keras/Flax ``momentum m`` (running = m * running + (1 - m) * batch) is
  PyTorch ``momentum = 1 - m``; epsilon as is. (PyTorch's running variance is the unbiased
  one, Flax's the biased one: no effect on speed.)
* the seed preset's 3x3 stride-2 'SAME' transposed convolution is
  ``ConvTranspose2d(k=3, s=2, padding=1, output_padding=1)``: the same output size (2n)
  and FLOPs. TensorFlow/JAX place the odd kernel one pixel differently from PyTorch's
  padding convention, so weights are not interchangeable, but throughput is unaffected.
* the padded preset's 2x2 stride-2 up-convolution is ``ConvTranspose2d(k=2, s=2)``.
* dropout (seed: 0.2 after every pooling and every concatenation) is element-wise
  ``nn.Dropout``, as ``flax.linen.Dropout`` without broadcast dimensions.
* the head is a 1x1 convolution with bias producing logits.

Train step (PyTorch's best-practice recipe): ``torch.compile`` of forward + loss (the
backward graph is compiled by AOTAutograd), bf16 autocast (parameters float32),
channels-last memory format for model and input, ``cudnn.benchmark = True``, Adam
(lr 1e-3, eps 1e-7 as the project's optimiser; ``fused=True`` on CUDA), BCE-with-logits +
per-image soft Dice (smooth 1), the project's ``bce_dice`` loss, computed in float32.
When ``torch.compile`` fails (e.g. no working C++ compiler for Inductor on a CPU), the peer
falls back to eager mode and records the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TorchUNet",
    "make_peer",
    "peer_spec",
    "count_params",
    "jax_param_counts",
    "check_param_counts",
    "bce_dice_loss",
    "PeerRunner",
    "EXPECTED_COUNTS",
    "torch_flops",
]

# (trainable parameters, batch-norm buffers excluding num_batches_tracked) of the JAX presets.
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "seed": (3_145_361, 4_416),
    "padded": (31_036_481, 11_776),
}


def peer_spec(preset: str, **overrides: Any) -> dict[str, Any]:
    """The UNet fields of a JAX preset (``unet_jax.models.PRESETS``), with overrides."""
    from unet_jax.models import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    spec = {**PRESETS[preset], **overrides}
    if spec.get("padding", "SAME") != "SAME":
        raise NotImplementedError(
            f"preset {preset!r}: the PyTorch peer implements 'SAME' padding only, got {spec['padding']!r}"
        )
    return spec


class ConvBlock(nn.Sequential):
    """``num_convs`` x (Conv2d k x k 'same', optional BatchNorm2d, ReLU)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        num_convs: int,
        kernel_size: int,
        norm: str,
        use_bias: bool,
        bn_momentum: float,
        bn_epsilon: float,
    ) -> None:
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers.append(
                nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size, padding=kernel_size // 2, bias=use_bias)
            )
            if norm == "batch":
                # Keras/Flax momentum m  ->  PyTorch momentum 1 - m.
                layers.append(nn.BatchNorm2d(c_out, eps=bn_epsilon, momentum=1.0 - bn_momentum))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class TorchUNet(nn.Module):
    """``(N, C_in, H, W) -> (N, num_classes, H, W)`` logits; the fields of ``unet_jax.UNet``."""

    def __init__(
        self,
        *,
        features: int = 64,
        depth: int = 4,
        convs_per_block: int = 2,
        kernel_size: int = 3,
        padding: str = "SAME",
        norm: str = "batch",
        dropout_rate: float = 0.0,
        up_kernel: int = 2,
        in_channels: int = 1,
        num_classes: int = 1,
        use_bias: bool = True,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        **unused: Any,
    ) -> None:
        super().__init__()
        if padding != "SAME" or kernel_size % 2 == 0:
            raise NotImplementedError("TorchUNet: 'SAME' padding with an odd kernel only")
        ignored = set(unused) - {"dtype", "param_dtype"}
        if ignored:
            raise ValueError(f"TorchUNet: unknown field(s) {sorted(ignored)}")
        block = dict(
            num_convs=convs_per_block,
            kernel_size=kernel_size,
            norm=norm,
            use_bias=use_bias,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
        )
        self.depth = depth
        self.dropout_rate = dropout_rate
        self.enc = nn.ModuleList()
        c = in_channels
        for level in range(1, depth + 1):
            width = features * 2 ** (level - 1)
            self.enc.append(ConvBlock(c, width, **block))
            c = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(c, features * 2**depth, **block)
        c = features * 2**depth
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in range(depth, 0, -1):
            width = features * 2 ** (level - 1)
            if up_kernel % 2:  # odd kernel, 'SAME' -> output 2n
                up = nn.ConvTranspose2d(c, width, up_kernel, stride=2, padding=up_kernel // 2, output_padding=1)
            else:  # even kernel k: 'SAME' output 2n needs padding (k - 2) / 2
                up = nn.ConvTranspose2d(c, width, up_kernel, stride=2, padding=(up_kernel - 2) // 2)
            self.up.append(up)
            self.dec.append(ConvBlock(2 * width, width, **block))
            c = width
        self.drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.head = nn.Conv2d(c, num_classes, 1)
        for m in self.modules():  # He-normal (fan-in) as the JAX layers; zero bias
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_in" if isinstance(m, nn.Conv2d) else "fan_out", nonlinearity="relu"
                )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = self.drop(self.pool(x))
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(x)
            x = self.drop(torch.cat([x, skip], dim=1))  # channel order [up, skip], as JAX
            x = dec(x)
        return self.head(x).float()


def make_peer(preset: str, **overrides: Any) -> TorchUNet:
    return TorchUNet(**peer_spec(preset, **overrides))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, buffers excluding BatchNorm's num_batches_tracked)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    return trainable, buffers


def jax_param_counts(preset: str, size: int = 256, **overrides: Any) -> tuple[int, int]:
    """(params, batch_stats) element counts of the JAX preset, from an abstract init."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unet_jax.models import create_unet

    model = create_unet(preset, **overrides)
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def n(tree: Any) -> int:
        return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))

    return n(v["params"]), n(v.get("batch_stats", {}))


def check_param_counts(preset: str, **overrides: Any) -> dict[str, Any]:
    """Compare the peer's counts with the JAX model's (and, without overrides, with the
    recorded expected counts). Raises ``AssertionError`` on any mismatch."""
    with torch.device("meta"):
        peer = make_peer(preset, **overrides)
    torch_counts = count_params(peer)
    jax_counts = jax_param_counts(preset, **overrides)
    expected = None if overrides else EXPECTED_COUNTS.get(preset)
    ok = torch_counts == jax_counts and (expected is None or jax_counts == expected)
    result = {
        "preset": preset,
        "torch_trainable": torch_counts[0],
        "torch_buffers": torch_counts[1],
        "jax_params": jax_counts[0],
        "jax_batch_stats": jax_counts[1],
        "expected": None if expected is None else list(expected),
        "equal": ok,
    }
    if not ok:
        raise AssertionError(f"parameter counts differ for preset {preset!r}: {result}")
    return result


def torch_flops(preset: str, size: int, **overrides: Any) -> int:
    """Forward FLOPs per image by ``torch.utils.flop_counter`` (meta tensors, nothing
    computed): a cross-check of the analytic JAX-side count."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make_peer(preset, **overrides).eval()
        x = torch.empty(1, model.enc[0][0].in_channels, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# Loss and train/inference steps
# --------------------------------------------------------------------------------------
def bce_dice_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean BCE-with-logits + mean per-image soft Dice loss (the project's ``bce_dice``)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    p = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    inter = (p * masks).sum(dims)
    total = p.sum(dims) + masks.sum(dims)
    dice = (2.0 * inter + smooth) / (total + smooth)
    return bce + (1.0 - dice).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeerRunner:
    """A peer model with its optimiser, compiled train and inference callables.

    ``dtype``: ``"bfloat16"`` (autocast, float32 parameters) or ``"float32"``.
    ``compile``: ``True`` (raise if torch.compile fails), ``False``, or ``"auto"`` (try,
    fall back to eager and record why in ``compile_error``).
    """

    def __init__(
        self,
        preset: str,
        device: torch.device,
        dtype: str,
        *,
        compile: bool | str = "auto",
        compile_mode: str | None = None,
        channels_last: bool = True,
        **overrides: Any,
    ) -> None:
        self.device = device
        self.bf16 = dtype == "bfloat16"
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = make_peer(preset, **overrides).to(device)
        self.model = self.model.to(memory_format=self.memory_format)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, eps=1e-7, fused=fused)
        self.compile_requested = compile
        self.compile_mode = compile_mode
        self.compile_error: str | None = None
        self.compile_s: dict[str, float] = {}
        model, bf16, dev = self.model, self.bf16, device.type

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            return bce_dice_loss(logits, y)

        def infer(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                return model(x)

        self._eager = {"train": forward_loss, "infer": infer}
        self._fns = dict(self._eager)
        self.compiled = bool(compile)
        if compile:
            # A fresh Dynamo cache per runner: every benchmark row compiles its own static-
            # shape graphs (dynamic=False: no automatic dynamic batch dimension when the
            # next row changes the batch), and the per-function recompile limit (8) is never
            # reached, past which Dynamo would silently run eager.
            torch._dynamo.reset()
            kw: dict[str, Any] = {"dynamic": False}
            if compile_mode is not None:
                kw["mode"] = compile_mode
            self._fns = {k: torch.compile(f, **kw) for k, f in self._eager.items()}

    def to_input(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        """NHWC (the JAX layout) -> NCHW view; channels-last memory keeps NHWC in memory."""
        x = images_nhwc.to(self.device).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=self.memory_format)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._fns["train"](x, y)
        loss.backward()
        self.optimizer.step()
        return loss

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._fns["infer"](x)

    def _first_call(self, kind: str, call: Callable[[], Any]) -> Any:
        """Run ``call`` once (compiling on the first call); fall back to eager if allowed."""
        t0 = time.perf_counter()
        try:
            out = call()
            _sync(self.device)
        except Exception as e:  # noqa: BLE001 - any compiler failure
            if not self.compiled or self.compile_requested is True:
                raise
            self.compile_error = f"{type(e).__name__}: {str(e)[:800]}"
            self.compiled = False
            self._fns = dict(self._eager)
            torch._dynamo.reset()
            t0 = time.perf_counter()
            out = call()
            _sync(self.device)
        self.compile_s[kind] = time.perf_counter() - t0
        return out

    def train_callable(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
        """Warm up (compile) the train step and return ``run(n)``: n steps, synchronised."""
        self.model.train()
        self._first_call("train", lambda: self._train_step(x, y))

        def run(n: int) -> None:
            for _ in range(n):
                loss = self._train_step(x, y)
            _sync(self.device)
            del loss

        return run

    def infer_callable(self, x: torch.Tensor) -> Callable[[int], None]:
        """Warm up (compile) inference (eval mode) and return ``run(n)``."""
        self.model.eval()
        self._first_call("infer", lambda: self._infer(x))

        def run(n: int) -> None:
            for _ in range(n):
                out = self._infer(x)
            _sync(self.device)
            del out

        return run

    def info(self) -> dict[str, Any]:
        return {
            "compile_requested": self.compile_requested,
            "compiled": self.compiled,
            "compile_mode": self.compile_mode or "default",
            "compile_dynamic": False,
            "compile_error": self.compile_error,
            "warmup_s": {k: round(v, 2) for k, v in self.compile_s.items()},
            "autocast_bf16": self.bf16,
            "channels_last": self.channels_last,
            "optimizer": "Adam(lr=1e-3, eps=1e-7, fused=%s)" % (self.device.type == "cuda"),
        }


if __name__ == "__main__":  # python -m benchmarks.torch_peer: the parameter-count check
    for name in ("seed", "padded"):
        print(check_param_counts(name), "torch flops/image @256:", torch_flops(name, 256))
