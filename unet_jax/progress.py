"""Progress for the command line: a live bar on a terminal, a few plain lines in a log.

The library reports progress as event dicts and never prints (see unet_jax.train.loop):
``read`` and ``evaluate`` (``done`` of ``total`` images), ``start``, ``step`` (within an
epoch), ``epoch`` (its scores), ``init_from``, ``finishing`` and ``done``.
:class:`ProgressPrinter` renders them on a stream (stderr by default):

* on a terminal, a live ``rich`` progress bar (description, bar, count, elapsed time,
  scores so far) is redrawn in place, and replaced by one plain line when its loop ends;
* anywhere else (a file, a pipe, a CI log), plain lines only and no carriage return: the
  start, about every 10% and the end of an image loop; one line per epoch with its
  scores, and lines within an epoch only when it is long (at most one per
  ``step_interval_s`` seconds, at 10% marks).

Both forms end a loop with the same line, so a log reads the same either way.
"""

from __future__ import annotations

import atexit
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["ProgressPrinter"]

_TRAIN = ("loss", "dice", "accuracy")
_VAL = ("loss", "dice", "iou", "accuracy")


def _scores(event: dict[str, Any], prefix: str, names: tuple[str, ...]) -> str:
    # What the model's heads give: Dice for a segmenter, accuracy for a classifier.
    return " ".join(f"{n} {event[prefix + n]:.4f}" for n in names if prefix + n in event)


class ProgressPrinter:
    """Renders progress events on ``stream``; call it with each event, :meth:`close` at the
    end (or use it as a context manager) so that a live bar left by an error is removed.

    ``live``: the terminal form; default: whether ``stream.isatty()``.
    ``step_interval_s``: in the plain form, the least time between two lines within an
    epoch (0: a line at every 10% of every epoch).
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, step_interval_s: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty is not None and isatty())
        self.live = live
        self.step_interval_s = step_interval_s
        self.epochs = 0
        self._loop: tuple | None = None  # the loop being shown: (kind, total[, epoch])
        self._decile = -1  # plain form: the last 10% mark printed in that loop
        self._last_line = float("-inf")  # plain form: when the last line within an epoch was printed
        self._bar = None  # live form: the rich Progress on screen
        self._task = None

    # ---- events ---------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind in ("read", "evaluate"):
            verb = "reading" if kind == "read" else "evaluating"
            self._progress(
                (kind, event["total"]),
                f"{verb} images",
                event["done"],
                event["total"],
                "",
                f"{verb} images {event['done']}/{event['total']}",
                throttle=False,
            )
        elif kind == "start":
            self.epochs = event["epochs"]
            resumed = f", resuming after epoch {event['resumed_epoch']}" if event["resumed_epoch"] else ""
            self._line(
                f"train {event['train']} / val {event['val']} / test {event['test']} images, "
                f"{event['steps_per_epoch']} steps per epoch on {event['devices']} device(s){resumed}"
            )
        elif kind == "step":
            scores = _scores(event, "train/", _TRAIN)
            head = f"epoch {event['epoch']:>3}/{self.epochs}"
            self._progress(
                ("epoch", event["steps_per_epoch"], event["epoch"]),
                head,
                event["step"],
                event["steps_per_epoch"],
                scores,
                f"{head} step {event['step']}/{event['steps_per_epoch']} {scores}",
                throttle=True,
            )
        elif kind == "epoch":
            mark = " *" if event["improved"] else ""
            self._end(
                f"epoch {event['epoch']:>3}/{self.epochs} {_scores(event, 'train/', _TRAIN)} | val "
                f"{_scores(event, 'val/', _VAL)} ({event['epoch_time_s']:.1f}s){mark}"
            )
        elif kind == "init_from":
            self._line(f"initialised {event['parameters_copied']} parameter arrays from {event['path']}")
        elif kind == "finishing":
            self._line("evaluating the test split at native resolution, writing plots ...")

    # ---- loops ----------------------------------------------------------------------
    def _progress(
        self, loop: tuple, description: str, done: int, total: int, text: str, line: str, throttle: bool
    ) -> None:
        """Show ``done`` of ``total`` in ``loop``; the loop ends (one line) when done == total."""
        if loop != self._loop:
            self._stop()
            self._loop, self._decile = loop, -1
        if done >= total and not throttle:
            self._end(line)
            return
        if self.live:
            self._show(description, done, total, text)
            return
        decile = 10 * done // max(total, 1)
        if decile <= self._decile:
            return
        now = time.monotonic()
        if throttle and now - self._last_line < self.step_interval_s:
            return
        self._decile, self._last_line = decile, now
        self._print(line)

    def _end(self, line: str) -> None:
        """End the loop on screen with ``line``."""
        self._stop()
        self._loop = None
        self._last_line = time.monotonic()
        self._print(line)

    def _line(self, text: str) -> None:
        """A line outside any loop."""
        self._stop()
        self._loop = None
        self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    # ---- the live bar ---------------------------------------------------------------
    def _show(self, description: str, done: int, total: int, text: str) -> None:
        if self._bar is None:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[text]}"),
                console=console,
                transient=True,
                refresh_per_second=4,
            )
            self._task = self._bar.add_task(description, total=total, completed=done, text=text)
            self._bar.start()
            atexit.register(self._stop)  # an error that ends the program leaves no bar behind
        self._bar.update(self._task, description=description, completed=done, total=total, text=text)

    def _stop(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            atexit.unregister(self._stop)
            bar.stop()  # transient: the bar is erased

    def close(self) -> None:
        """Remove a bar still on screen (a loop that an error ended)."""
        self._stop()
        self._loop = None

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
