"""The command line's progress: a live bar on a terminal, a few plain lines in a file or pipe."""

from __future__ import annotations

import io

import pytest

from unet_jax.progress import ProgressPrinter


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def read(printer: ProgressPrinter, total: int, upto: int | None = None) -> None:
    for done in range(1, (upto or total) + 1):
        printer({"kind": "read", "done": done, "total": total})


def epochs(printer: ProgressPrinter, n: int, steps: int = 100, chunk: int = 5) -> None:
    printer(
        {
            "kind": "start",
            "epochs": n,
            "steps_per_epoch": steps,
            "resumed_epoch": 0,
            "train": 400,
            "val": 80,
            "test": 80,
            "devices": 1,
        }
    )
    for epoch in range(1, n + 1):
        for step in range(chunk, steps, chunk):
            printer(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "step": step,
                    "steps_per_epoch": steps,
                    "train/loss": 0.5,
                    "train/dice": 0.25,
                }
            )
        printer(
            {
                "kind": "epoch",
                "epoch": epoch,
                "train/loss": 0.5,
                "train/dice": 0.25,
                "val/loss": 0.75,
                "val/dice": 0.125,
                "val/iou": 0.0625,
                "epoch_time_s": 2.0,
                "improved": epoch == 1,
            }
        )


def test_a_log_gets_a_few_plain_lines_for_a_long_read():
    stream = io.StringIO()
    read(ProgressPrinter(stream), 156)
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 3 <= len(lines) <= 12, lines  # start, about every 10%, end
    assert lines[0] == "reading images 1/156" and lines[-1] == "reading images 156/156"
    assert lines == [f"reading images {d}/156" for d in sorted({1, *(-(-156 * k // 10) for k in range(1, 11))})]


def test_a_short_read_prints_each_image_at_most_once():
    stream = io.StringIO()
    printer = ProgressPrinter(stream)
    read(printer, 3)
    read(printer, 3)  # a second pass (data check reads twice) starts over
    assert stream.getvalue().splitlines() == [f"reading images {d}/3" for d in (1, 2, 3)] * 2


def test_a_log_gets_one_line_per_epoch_and_few_within_one():
    stream = io.StringIO()
    epochs(ProgressPrinter(stream), 3)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "train 400 / val 80 / test 80 images, 100 steps per epoch on 1 device(s)"
    ends = [line for line in lines if " | val " in line]
    assert ends == [
        f"epoch   {e}/3 loss 0.5000 dice 0.2500 | val loss 0.7500 dice 0.1250 iou 0.0625 (2.0s)"
        + (" *" if e == 1 else "")
        for e in (1, 2, 3)
    ]
    # Steps: these epochs are quick, so only the first one shows that training started.
    assert [line for line in lines if " step " in line] == ["epoch   1/3 step 5/100 loss 0.5000 dice 0.2500"]
    # A long epoch (no least interval here) shows about every 10%.
    stream = io.StringIO()
    epochs(ProgressPrinter(stream, step_interval_s=0), 2)
    steps = [line for line in stream.getvalue().splitlines() if " step " in line]
    assert len(steps) == 2 * 10 and steps[0].startswith("epoch   1/2 step 5/100") and "step 90/100" in steps[9]


def test_a_terminal_gets_a_live_bar_and_the_same_final_lines():
    stream = FakeTerminal()
    with ProgressPrinter(stream) as printer:
        assert printer.live
        read(printer, 156)
        epochs(printer, 2, steps=20)
    text = stream.getvalue()
    assert "\x1b[2K" in text and "━" in text  # a bar, redrawn in place (erase line)
    assert "reading images 156/156\n" in text
    assert "epoch   2/2 loss 0.5000 dice 0.2500 | val loss 0.7500" in text
    plain = io.StringIO()
    with ProgressPrinter(plain) as printer:
        read(printer, 156)
    assert not plain.getvalue().count("\x1b")


def test_an_interrupted_loop_leaves_no_bar_behind():
    stream = FakeTerminal()
    printer = ProgressPrinter(stream)
    read(printer, 156, upto=40)
    assert printer._bar is not None
    printer.close()
    assert printer._bar is None
    assert stream.getvalue().endswith("\x1b[?25h\r\x1b[1A\x1b[2K")  # cursor shown, bar erased
    printer({"kind": "finishing"})
    assert stream.getvalue().endswith("\x1b[2Kevaluating the test split at native resolution, writing plots ...\n")


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_data_commands_print_plain_reading_lines_in_a_log(tmp_path, capsys, command):
    from unet_jax.cli import main
    from unet_jax.data.phantom import write_phantom

    write_phantom(tmp_path / "p", {"benign": 12, "malignant": 8, "normal": 4}, size=(16, 16))
    extra = ["--out", str(tmp_path / "c"), "--size", "16"] if command == "prepare" else []
    assert main(["data", command, str(tmp_path / "p"), *extra]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "reading images 24/24" in err
    assert 3 <= len(err.splitlines()) <= 2 * 12  # `data check` reads twice
