"""Progress of a pull: a live bar on a terminal, a logfmt line every few seconds in a pod log.

The byte counter is updated by every download worker; a single reporter thread reads it, so workers never
block on output.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from loader.log import Logger


class Progress:
    def __init__(self, log: Logger, label: str, total: int, already: int = 0, mode: str = "auto",
                 interval: float = 5.0, stream: TextIO | None = None) -> None:
        self.log = log
        self.label = label
        self.total = total
        self.done = already
        self._start_done = already
        self.stream: TextIO | None = stream or sys.stderr  # None: the process started with stderr closed
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        if mode == "bar" and self.stream is None:
            mode = "none"
        self.mode = mode
        self.interval = interval if mode == "log" else 0.2
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread: threading.Thread | None = None
        self._bar_shown = False

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def __enter__(self) -> Progress:
        if self.mode in ("bar", "log") and self.total:
            if self.mode == "bar":
                self.log.before_write = self._clear
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.mode == "bar":
            self._clear()
            self.log.before_write = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            done = self.done
        elapsed = max(1e-6, time.monotonic() - self._t0)
        rate = (done - self._start_done) / elapsed
        left = max(0, self.total - done)
        return {
            "percent": round(100.0 * done / self.total, 1) if self.total else 100.0,
            "done_mb": round(done / 1e6, 1),
            "total_mb": round(self.total / 1e6, 1),
            "mbps": round(rate / 1e6, 1),
            "eta_s": round(left / rate) if rate > 0 else None,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = self.snapshot()
            if self.mode == "log":
                self.log.info("progress", ref=self.label, **s)
            else:
                self._draw(s)

    def _draw(self, s: dict[str, Any]) -> None:
        width = 30
        filled = int(width * s["percent"] / 100)
        eta = f"{s['eta_s']}s" if s["eta_s"] is not None else "?"
        line = (f"\r{self.label[:40]:40} [{'#' * filled}{'.' * (width - filled)}] {s['percent']:5.1f}% "
                f"{s['done_mb']:.0f}/{s['total_mb']:.0f} MB {s['mbps']:.0f} MB/s ETA {eta}")
        assert self.stream is not None  # bar mode only with a stream (__init__)
        self.stream.write(line)
        self.stream.flush()
        self._bar_shown = True

    def _clear(self) -> None:
        if self._bar_shown:
            assert self.stream is not None  # drawn, so there is one
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._bar_shown = False
