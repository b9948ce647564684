"""Progress: periodic logfmt lines in a pod log, a redrawn bar on a terminal; and the log format itself."""

from __future__ import annotations

import io
import re
import time

from loader.log import Logger
from loader.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(prog: Progress, total: int, steps: int, pause: float) -> None:
    for _ in range(steps):
        prog.add(total // steps)
        time.sleep(pause)


def test_log_mode_prints_percent_rate_and_eta_lines():
    out = io.StringIO()
    log = Logger(out)
    with Progress(log, "r.io/m:v1", total=1000, mode="auto", interval=0.02, stream=io.StringIO()) as prog:
        assert prog.mode == "log"  # not a terminal
        feed(prog, 1000, 10, 0.01)
        time.sleep(0.05)
    lines = [line for line in out.getvalue().splitlines() if "event=progress" in line]
    assert lines, out.getvalue()
    for line in lines:
        assert re.search(r"level=info event=progress ref=r\.io/m:v1 percent=[0-9.]+ done_mb=[0-9.]+ total_mb=0\.0"
                         r" mbps=[0-9.]+( eta_s=[0-9]+)?$", line), line
    assert "percent=100.0" in lines[-1]


def test_bar_mode_redraws_one_line_and_clears_before_log_lines():
    tty = Tty()
    log = Logger(tty)
    with Progress(log, "r.io/m:v1", total=2_000_000, mode="auto", stream=tty) as prog:
        assert prog.mode == "bar"
        prog.add(1_000_000)
        time.sleep(0.3)
        log.warning("fetch.retry", ref="r.io/m:v1")
        prog.add(1_000_000)
        time.sleep(0.3)
    text = tty.getvalue()
    assert "\r" in text and "[###############...............]  50.0%" in text
    assert "100.0%" in text
    # a log line never lands in the middle of the bar: the bar line is cleared first
    assert "\r\x1b[2Kts=" in text
    assert text.endswith("\r\x1b[2K")


def test_logfmt_quotes_values_and_skips_none():
    out = io.StringIO()
    Logger(out).info("ev", a="x y", b=None, c='say "hi"', d=3)
    line = out.getvalue().strip()
    assert line.endswith('level=info event=ev a="x y" c="say \\"hi\\"" d=3')
