"""``unet-jax predict`` on native-size images: time per image against pixel count (issue 30).

    python -m benchmarks.predict_native [--sides 512 1024 2048 4096] [--windows 3] [--out FILE]

Synthetic 8-bit grayscale square images (speckle with a dark elliptical "lesion" of a
quarter of the side, so that the masks, components and overlays are not trivial) of each
side. The bundled model is loaded once. Timed (harness.time_windows: ``--windows`` windows of
one image after an untimed warm-up, medians):

  predict_s          predict_files on one image: read, network at the model's size, the
                     recipe at native size, mask, overlay and table written
  us_per_pixel       predict_s per pixel (flat when time grows linearly with pixel count)
  peak_rss_mb        the process's peak resident memory after that side (ru_maxrss)

and the post-processing alone at ``--post-side`` (default 1024x1024): the recipe's native
mask from the model-resolution probabilities (recipe_mask), the gate, and the mask's
8-connected components (harness.median_ms). Writes benchmarks/results/predict_native.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import REPO, environment, median_ms, time_windows, write_result
from unet_jax.data.busi import preprocess_image
from unet_jax.inference import connected_components, gate_decision, load, predict_outputs, recipe_mask
from unet_jax.predict import predict_files


def synthetic_image(side: int, seed: int = 0) -> np.ndarray:
    """uint8 (side, side): speckle around 150 with a dark ellipse (a lesion) at the centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:side, :side]
    c, a, b = side / 2, side / 8, side / 12
    lesion = ((yy - c) / b) ** 2 + ((xx - c) / a) ** 2 <= 1.0
    pixels = rng.normal(150.0, 25.0, (side, side)).astype(np.float32)
    pixels[lesion] *= 0.3
    return np.clip(pixels, 0, 255).astype(np.uint8)


def time_predict(loaded, folder: Path, side: int, windows: int) -> dict:
    image = folder / f"native_{side}.png"
    Image.fromarray(synthetic_image(side)).save(image)
    out = folder / f"pred_{side}"
    rows: list = []

    def predict(_: int) -> None:
        rows[:] = predict_files(loaded, [image], out)

    predict(1)  # warm-up: compilation, caches
    seconds = time_windows(predict, 1, windows)
    s = statistics.median(seconds)
    return {
        "side": side,
        "pixels": side * side,
        "predict_s": s,
        "us_per_pixel": s / (side * side) * 1e6,
        "window_s": seconds,
        "lesion_fraction": rows[0].lesion_fraction,
        "components": rows[0].components,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def time_post(loaded, side: int, windows: int) -> dict:
    """The recipe at native size and the components count, from one model output."""
    x = preprocess_image(Image.fromarray(synthetic_image(side)), loaded.input_size, loaded.config.channels)
    probs, classes = predict_outputs(loaded, x[None], loaded.recipe.flip_tta, batch_size=1)
    prob, class_prob = probs[0], None if classes is None else classes[0]

    def post() -> None:
        mask = recipe_mask(prob, class_prob, loaded.recipe, (side, side))
        gate_decision(loaded.recipe, prob, class_prob)
        connected_components(mask)

    return {"side": side, "post_ms": median_ms(post, windows=windows, calls=3), "recipe": loaded.recipe.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--post-side", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict_native.json"))
    args = parser.parse_args()
    loaded = load(None)
    with tempfile.TemporaryDirectory(prefix="unet-jax-native-") as tmp:
        rows = [time_predict(loaded, Path(tmp), side, args.windows) for side in args.sides]
    post = time_post(loaded, args.post_side, args.windows)
    result = {
        "command": "python -m benchmarks.predict_native",
        "model": "bundled",
        "rows": rows,
        "post_processing": post,
        "environment": environment(None, None),
    }
    write_result(args.out, result)
    for r in rows:
        print(
            f"{r['side']}x{r['side']}: predict {r['predict_s']:.3f} s ({r['us_per_pixel']:.3f} us/pixel), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    print(f"post-processing at {post['side']}x{post['side']}: {post['post_ms']:.1f} ms -> {args.out}")


if __name__ == "__main__":
    main()
