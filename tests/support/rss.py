"""Peak RSS of a command, measured honestly from inside a large test process.

Linux folds the forking process's memory high-water mark into the child's ``ru_maxrss`` (the child's first mm
is a copy of the parent's, and exec keeps its high-water mark), so ``os.wait4`` on a child of pytest reports
pytest's own size. A small launcher, exec'd fresh, forks the command instead and reports its rusage.
"""

from __future__ import annotations

import json
import subprocess
import sys

_LAUNCHER = r"""
import json, os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}).encode())
"""


def run_measured(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to completion; return its CompletedProcess (stdout/stderr as bytes) and its peak RSS in MB."""
    import os

    r, w = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(w), *cmd], capture_output=True, pass_fds=(w,),
                              **kw)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        report = json.loads(f.read() or b'{"code": -1, "maxrss_kib": 0}')
    proc.returncode = report["code"]
    return proc, report["maxrss_kib"] * 1024 / 1e6
