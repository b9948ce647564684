"""Structured logs for the loader: one logfmt line per event on stderr (``ts=... level=info event=... k=v``).

logfmt rather than JSON because the main reader is a person running ``kubectl logs`` on an init container, and
it is still machine-parseable. Credentials never reach this module: callers pass references and hosts only.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def _fmt(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class Logger:
    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self.stream: TextIO | None = stream or sys.stderr  # None: the process started with stderr closed
        self.levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}
        self.min = self.levels.get(level, 20)
        self._lock = threading.Lock()
        self.before_write: Callable[[], None] | None = None  # the progress bar clears its line first

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.levels[level] < self.min:
            return
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        parts = [f"ts={ts}", f"level={level}", f"event={_fmt(event)}"]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
        with self._lock:
            if self.before_write:
                self.before_write()
            if self.stream is None:
                return
            try:
                self.stream.write(" ".join(parts) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # nobody reads it any more (a closed pipe): the work goes on, as
                pass  # logging's own handlers do; the exit code and the termination log still say how it ended

    def debug(self, event: str, **f: Any) -> None:
        self._emit("debug", event, f)

    def info(self, event: str, **f: Any) -> None:
        self._emit("info", event, f)

    def warning(self, event: str, **f: Any) -> None:
        self._emit("warning", event, f)

    def error(self, event: str, **f: Any) -> None:
        self._emit("error", event, f)


class NullLogger(Logger):
    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        pass
