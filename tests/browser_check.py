"""Open the two ``report.html`` pages in headless Chromium and check them as a reader would.

Run by ``.ci/run`` after the test suite (not collected by pytest: it needs Debian's
``chromium``, which ``.ci/run`` installs when missing)::

    python3 tests/browser_check.py [--keep DIR] [--chromium PATH]

It writes a phantom BUSI folder (benign 3, malignant 2, normal 2; 160x200 pixels), runs
``unet-jax predict`` on its images (one input named ``a<b&c.png``) and ``unet-jax evaluate
--report`` on the folder with the bundled model, opens each report and checks:

- it renders: the title, one body row per image, every thumbnail decoded by the browser;
- a click on a numeric column header (a real mouse event at the button's centre) sorts the
  rows ascending, a second click descending, and the rows' order changes;
- the evaluate report lists its cases from the worst Dice to the best before any click;
- the console shows no error and no exception was thrown;
- a screenshot is not blank (its pixels vary, with more than a few colours).

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON): no WebSocket client and no browser download.
Exits 0 when every check passes, 1 with one line per failed check otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TIMEOUT_S = 60.0
PHANTOM_COUNTS = ("--counts", "3", "2", "2")  # benign, malignant, normal


class Chromium:
    """A headless Chromium and one page of it, driven by DevTools protocol messages."""

    def __init__(self, binary: str, profile: str) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # the child's fds 3 (commands in) and 4 (replies out)
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        metrics = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=True)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its DevTools pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send one command; return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for n, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(n)
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        self.wait_event("Page.loadEventFired")

    def click(self, selector: str) -> None:
        """A real left click (pressed, released) at the centre of ``selector``'s element."""
        x, y = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            event = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            self.call("Input.dispatchMouseEvent", event, session=True)

    def console_errors(self) -> list[str]:
        """Errors logged, console.error/assert calls and uncaught exceptions so far."""
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                errors.append(str(p["exceptionDetails"].get("exception", p["exceptionDetails"])))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text", ""))
        return errors

    def screenshot(self) -> np.ndarray:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def unet_jax(*args: str) -> None:
    """``unet-jax ARGS`` in a child process (this one forks Chromium: it must not hold JAX's
    threads), from the unet_jax that this script imports."""
    done = subprocess.run([sys.executable, "-m", "unet_jax.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"unet-jax {args[0]} failed (exit code {done.returncode}):\n{done.stderr[-2000:]}")


def make_reports(work: Path) -> tuple[Path, Path, int]:
    """A phantom folder, then predict's and evaluate's reports of it (bundled model).
    Returns (predict report, evaluate report, images)."""
    data = work / "phantom"
    unet_jax("data", "phantom", "--out", str(data), "--size", "160", "200", "--seed", "3", *PHANTOM_COUNTS)
    images = sorted(p for p in data.rglob("*.png") if "_mask" not in p.name)
    odd = work / "inputs" / "a<b&c.png"  # an escaped name in the table
    odd.parent.mkdir()
    shutil.copy(images[0], odd)
    inputs = [odd, *images[1:]]
    unet_jax("predict", *map(str, inputs), "--out", str(work / "predict"))
    unet_jax("evaluate", "--data", str(data), "--report", str(work / "evaluate"))
    return work / "predict" / "report.html", work / "evaluate" / "report.html", len(inputs)


_ROWS = "Array.from(document.querySelectorAll({table} + ' tbody tr'))"


def column(page: Chromium, table: str, index: int) -> list[str]:
    """The ``data-sort`` keys of one column, in the rows' current order."""
    rows = _ROWS.format(table=json.dumps(table))
    return page.evaluate(f"{rows}.map(r => r.cells[{index}].getAttribute('data-sort'))")


def check_sorting(page: Chromium, table: str, header: str) -> list[str]:
    """Click the numeric ``header`` twice: ascending, then descending, and the order changed."""
    names = page.evaluate(
        f"Array.from(document.querySelectorAll({json.dumps(table + ' thead th')})).map(t => t.textContent)"
    )
    index = names.index(header)
    before = column(page, table, index)
    first_cells = column(page, table, 1)
    expected = sorted((float(k) for k in before if k), key=float)
    failures = []
    page.click(f"{table} thead th:nth-child({index + 1}) button")
    ascending = column(page, table, index)
    page.click(f"{table} thead th:nth-child({index + 1}) button")
    descending = column(page, table, index)
    if [float(k) for k in ascending if k] != expected:
        failures.append(f"{table}: a click on {header!r} did not sort ascending: {ascending}")
    if [float(k) for k in descending if k] != expected[::-1]:
        failures.append(f"{table}: a second click on {header!r} did not sort descending: {descending}")
    if ascending == before and descending == before:
        failures.append(f"{table}: clicks on {header!r} left the rows' order as it was")
    if sorted(column(page, table, 1)) != sorted(first_cells):
        failures.append(f"{table}: sorting lost or duplicated rows")
    return failures


def check_page(page: Chromium, path: Path, title: str, table: str, rows: int, header: str, shot: Path) -> list[str]:
    """Render ``path``; check its title, rows, images, sorting, console and a screenshot."""
    page.open(path)
    failures = []
    if page.evaluate("document.title") != title:
        failures.append(f"{path}: title {page.evaluate('document.title')!r}, expected {title!r}")
    shown = page.evaluate(f"document.querySelectorAll({json.dumps(table + ' tbody tr')}).length")
    if shown != rows:
        failures.append(f"{path}: {shown} rows in {table}, expected {rows}")
    loaded = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
    if loaded != rows:
        failures.append(f"{path}: {loaded} thumbnails decoded by the browser, expected {rows}")
    if table == "#cases":  # worst Dice first, before any click
        dice = [float(k) for k in column(page, table, 3)]
        if dice != sorted(dice):
            failures.append(f"{path}: cases not from the worst Dice to the best: {dice}")
    failures += check_sorting(page, table, header)
    failures += [f"{path}: console error: {e}" for e in page.console_errors()]
    page.evaluate("window.scrollTo(0, 0)")
    image = page.screenshot()
    Image.fromarray(image).save(shot)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    if image.std() < 10 or colours < 50:
        failures.append(f"{path}: the screenshot looks blank (std {image.std():.1f}, {colours} colours; {shot})")
    return failures


def run(work: Path, binary: str) -> list[str]:
    predict_report, evaluate_report, n = make_reports(work)
    page = Chromium(binary, str(work / "profile"))
    try:
        failures = check_page(
            page, predict_report, "unet-jax predict: report", "#table", n, "max_probability", work / "predict.png"
        )
        failures += check_page(
            page, evaluate_report, "unet-jax evaluate: report", "#cases", n, "IoU", work / "evaluate.png"
        )
    finally:
        page.close()
    return failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", default=None, help="work in this folder and keep it (reports, screenshots)")
    p.add_argument("--chromium", default=shutil.which("chromium"), help="the browser (default: chromium on PATH)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.chromium:
        print("browser check: error: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="unet-jax-browser-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        failures = run(work, args.chromium)
    for failure in failures:
        print(f"browser check: FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("browser check: predict and evaluate reports render, sort on click, log no error, screenshots not blank")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
