"""Shared pieces of the training tests."""

from unet_jax.config import TrainConfig

# A run small enough for CI: 30 phantom images of 32x32, a 2-level 4-wide seed U-Net.
TINY = TrainConfig(
    preset="seed",
    model={"features": 4, "depth": 2},
    image_size=32,
    phantom_images=30,
    batch_size=4,
    eval_batch_size=8,
    epochs=3,
    patience=None,
    learning_rate=3e-3,
    seed=7,
    plots=False,
)


def overflow_batch_norm_after(monkeypatch, step: int) -> None:
    """Make the training loop's state hold inf in every batch-norm variance once it has
    taken more than ``step`` steps, the loss and metrics staying finite (a normalisation by
    an infinite variance gives zeros): what learning_rate=1e5 did to the batch statistics."""
    import jax
    import jax.numpy as jnp

    import unet_jax.train.loop as loop

    real = loop.train_steps

    def overflowing(*args, **kwargs):
        state, metrics = real(*args, **kwargs)
        if int(state.step) > step:
            inf = lambda path, x: jnp.full_like(x, jnp.inf) if path[-1].key == "var" else x  # noqa: E731
            state = state.replace(batch_stats=jax.tree_util.tree_map_with_path(inf, state.batch_stats))
        return state, metrics

    monkeypatch.setattr(loop, "train_steps", overflowing)


def save_untrained_run(run_dir, config: TrainConfig = TINY, poison: bool = False, which=("best",)):
    """A run folder holding ``config``'s freshly initialised (untrained) state as its
    checkpoint(s) ``which``, at step 0, as `unet-jax train` saves them: a loadable model in
    a second, without training. ``poison``: one NaN in the first parameter array."""
    import jax
    import jax.numpy as jnp

    from unet_jax.config import config_to_dict
    from unet_jax.models import build_model
    from unet_jax.train.checkpoint import CheckpointStore
    from unet_jax.train.state import create_train_state, make_optimizer

    state = create_train_state(
        build_model(config),
        make_optimizer(config, 5),
        jax.random.key(0, impl="rbg"),
        (1, config.image_size, config.image_size, config.channels),
    )
    if poison:  # as a damaged file or a diverged run leaves it
        leaves, tree = jax.tree.flatten(state.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        state = state.replace(params=jax.tree.unflatten(tree, leaves))
    store = CheckpointStore(run_dir)
    for name in which:
        store.save(name, state, {"config": config_to_dict(config), "loop": {}, "processes": 1})
    store.close()
    return run_dir
