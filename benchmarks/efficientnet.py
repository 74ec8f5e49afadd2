"""EfficientNet-Lite0 on the CPU path against its PyTorch reference (issue 29).

Two tables, in one process, PyTorch measured beside JAX on the same cores:

* ``depthwise``: one depthwise layer (batch 16, float32, NHWC / channels-last), forward
  and forward + both gradients for a fixed random output gradient: ``lax``'s grouped
  convolution, the project's shifted multiply-adds
  (:func:`unet_jax.layers.depthwise.depthwise_conv`) and PyTorch;
* ``encoder``: the whole encoder's training step (forward in training mode with batch
  statistics, backward, an SGD update) at batch 16 and 128 px (RGB, the reference model
  ``efficientnet_lite_pytorch`` with the released weights) and the U-Net preset's step
  against the 16-wide padded U-Net's (the cost per image of the pretrained encoder).

    python -m benchmarks.efficientnet --out benchmarks/results/efficientnet_cpu.json

Reports medians of :func:`benchmarks.harness.median_ms` (5 windows of 3 calls).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import environment, median_ms, write_result
from unet_jax.layers import resolve_padding
from unet_jax.layers.depthwise import depthwise_conv
from unet_jax.models import create_model
from unet_jax.models.efficientnet import EfficientNetLiteEncoder

# The shapes: (size, channels, kernel, stride) of depthwise layers at batch 16.
DEPTHWISE_SHAPES = ((64, 96, 3, 1), (32, 144, 3, 1), (16, 240, 3, 1), (16, 240, 5, 1), (64, 96, 3, 2))


def _jax_depthwise(kind: str, x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Any) -> jax.Array:
    if kind == "taps":
        return depthwise_conv(x, w, strides, pads)
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


def depthwise_rows(torch: Any, batch: int = 16) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    for size, channels, k, s in DEPTHWISE_SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, 1, channels)), jnp.float32)
        pads = resolve_padding("SAME", (size, size), (k, k), (s, s))
        row: dict[str, Any] = {"shape": f"{size}x{size}x{channels}", "kernel": k, "stride": s}
        out = _jax_depthwise("lax", x, w, (s, s), pads).shape
        # A random output gradient: with sum() as the loss it is all ones, which XLA folds
        # into the kernel gradient (a plain sum of the input), flattering the JAX rows.
        dy = jnp.asarray(rng.standard_normal(out), jnp.float32)
        for kind in ("lax", "taps"):
            fwd = jax.jit(lambda x, w, kind=kind: _jax_depthwise(kind, x, w, (s, s), pads))
            both = jax.jit(
                jax.grad(
                    lambda x, w, dy, kind=kind: jnp.sum(_jax_depthwise(kind, x, w, (s, s), pads) * dy), argnums=(0, 1)
                )
            )
            row[f"{kind}_forward_ms"] = median_ms(lambda: jax.block_until_ready(fwd(x, w)))
            row[f"{kind}_train_ms"] = median_ms(lambda: jax.block_until_ready(both(x, w, dy)))
        tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        tw = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous().requires_grad_()
        tdy = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        tx.requires_grad_()
        torch_pads = (*pads[1], *pads[0])

        def t_fwd() -> Any:
            with torch.no_grad():
                return torch.nn.functional.conv2d(
                    torch.nn.functional.pad(tx, torch_pads), tw, stride=s, groups=channels
                )

        def t_train() -> None:
            tx.grad = tw.grad = None
            y = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, torch_pads), tw, stride=s, groups=channels)
            y.backward(tdy)

        row["torch_forward_ms"] = median_ms(t_fwd)
        row["torch_train_ms"] = median_ms(t_train)
        row["taps_train_x_torch"] = round(row["taps_train_ms"] / row["torch_train_ms"], 2)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def _jax_step_ms(model: Any, batch: int, size: int, channels: int) -> float:
    x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, channels)), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    tx = optax.sgd(1e-3)
    state = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))

    @jax.jit
    def step(state: Any, x: jax.Array) -> Any:
        params, stats, opt = state

        def loss(p: Any) -> Any:
            out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            out = out["mask"] if isinstance(out, dict) else out
            leaves = out if isinstance(out, (tuple, list)) else (out,)
            return sum(jnp.mean(o.astype(jnp.float32) ** 2) for o in leaves), upd["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    box = [state]

    def run() -> None:
        box[0] = jax.block_until_ready(step(box[0], x))

    return median_ms(run)


def _torch_encoder_step_ms(torch: Any, batch: int, size: int) -> float:
    from efficientnet_lite_pytorch import EfficientNet

    from unet_jax.convert.efficientnet import find_lite0_checkpoint

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(find_lite0_checkpoint()))
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        feats = model.extract_features(x)
        (feats**2).mean().backward()
        opt.step()

    return median_ms(run)


def encoder_rows(torch: Any, batch: int = 16, size: int = 128) -> list[dict[str, Any]]:
    jax_ms = _jax_step_ms(EfficientNetLiteEncoder(in_channels=3), batch, size, 3)
    torch_ms = _torch_encoder_step_ms(torch, batch, size)
    unet_ms = _jax_step_ms(create_model("effnet_lite0_unet", in_channels=1, class_head=3), batch, size, 1)
    padded_ms = _jax_step_ms(create_model("padded", in_channels=1, features=16, class_head=3), batch, size, 1)
    return [
        {
            "row": f"encoder training step, batch {batch}, {size} px, RGB",
            "jax_ms": jax_ms,
            "torch_ms": torch_ms,
            "jax_x_torch": round(torch_ms / jax_ms, 2),
        },
        {
            "row": f"U-Net training step, batch {batch}, {size} px, grayscale, class head",
            "effnet_lite0_unet_ms": unet_ms,
            "padded16_ms": padded_ms,
            "cost_per_image_x_padded16": round(unet_ms / padded_ms, 2),
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/efficientnet_cpu.json")
    parser.add_argument("--tables", nargs="*", default=["depthwise", "encoder"], choices=["depthwise", "encoder"])
    args = parser.parse_args(argv)
    import torch  # the peer only; never a dependency of the package

    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {"environment": environment(torch, torch.device("cpu"))}
    if "depthwise" in args.tables:
        result["depthwise"] = depthwise_rows(torch)
    if "encoder" in args.tables:
        result["encoder"] = encoder_rows(torch)
    write_result(args.out, result)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
