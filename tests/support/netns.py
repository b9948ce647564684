"""An aggregate link cap: two network namespaces of our own joined by a veth pair, ``tbf`` on the server side.

::

    with Link(rate_mbit=400) as link:              # as root; both namespaces are removed on exit
        sock = link.listen()                       # a listening socket on link.server_addr, in the server side
        proxy = ThrottleProxy(registry.url, sock=sock).start()   # serves there, connects upstream from here
        subprocess.run(link.client_argv(["curl", f"http://{link.server_addr}:{port}/v2/"]))

Layout: namespace ``<prefix>-<pid>-<n>-s`` holds ``veth0`` (``server_addr``), namespace ``...-c`` holds ``veth1``
(``client_addr``); both have ``lo`` up. ``tbf`` shapes ``veth0``'s egress, i.e. everything the server side sends
to the client side: downloads. Nothing is created or changed in the root namespace (the veth pair is made
inside the namespaces), so the addresses cannot collide with the host's, and deleting the namespaces deletes
the pair. netem, fq and friends do not exist in this kernel (docs: /work/shared/FACTS.md): latency and per-
connection caps come from ``tests/support/throttle.py``.

A socket keeps the namespace it was created in, so ``listen()`` makes its socket in a short-lived thread that
entered the server namespace (``setns`` changes only the calling thread's namespace) and returns it to a
process that otherwise stays in the root namespace. Contenders run on the client side through
``nsenter --net=/run/netns/NAME``, which only switches the network namespace (``ip netns exec`` also remounts
/sys).

Namespaces are deleted by ``close()`` (and so on exit from ``with``, on Ctrl-C, and at interpreter exit through
atexit); ``remove_stale()`` deletes ones a killed process of ours left behind (its pid is in the name).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import re
import shutil
import socket
import subprocess
import threading

PREFIX = "mcshape"
CLONE_NEWNET = 0x40000000
_counter = itertools.count()


def available() -> str | None:
    """None when links can be made here, else why not (for pytest.skip and the benchmark's message)."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Deletes namespaces named by a process of ours that is gone (killed before it could clean up)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    gone = []
    for name in (line.split()[0] for line in out.splitlines() if line.strip()):
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-\d+-[sc]", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            gone.append(name)
    return gone


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf at ``rate_mbit``: a bucket of 10 ms of the rate (at least 32 KiB: one GSO packet passes whole), and a
    queue of 25 ms before drops."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes * 0.010))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "25ms"]


class Link:
    def __init__(self, rate_mbit: float | None, *, prefix: str = PREFIX, server_addr: str = "10.213.0.1",
                 client_addr: str = "10.213.0.2"):
        base = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self.server_ns = f"{base}-s"
        self.client_ns = f"{base}-c"
        self.server_addr = server_addr
        self.client_addr = client_addr
        self.rate_mbit = rate_mbit
        self._made: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def create(self) -> Link:
        why = available()
        if why:
            raise RuntimeError(f"cannot make a shaped link: {why}")
        atexit.register(self.close)
        try:
            for ns in (self.server_ns, self.client_ns):
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
            _run("ip", "-n", self.server_ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
                 "netns", self.client_ns)
            for ns, dev, addr in ((self.server_ns, "veth0", self.server_addr),
                                  (self.client_ns, "veth1", self.client_addr)):
                _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.set_rate(self.rate_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)
        atexit.unregister(self.close)

    def __enter__(self) -> Link:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- shaping -----------------------------------------------------------------------------------------------
    def set_rate(self, rate_mbit: float | None) -> None:
        """tbf at this rate on the server side's egress, or none (the veth's own speed) for None."""
        if rate_mbit is None:
            subprocess.run(["tc", "-n", self.server_ns, "qdisc", "del", "dev", "veth0", "root"], capture_output=True)
        else:
            _run("tc", "-n", self.server_ns, "qdisc", "replace", "dev", "veth0", "root", *tbf_args(rate_mbit))
        self.rate_mbit = rate_mbit

    def qdisc(self) -> str:
        """What tc reports for the shaped device (with its statistics: drops, overlimits)."""
        return subprocess.run(["tc", "-n", self.server_ns, "-s", "qdisc", "show", "dev", "veth0"],
                              capture_output=True, text=True).stdout.strip()

    # --- using it ----------------------------------------------------------------------------------------------
    def listen(self, port: int = 0, backlog: int = 128) -> socket.socket:
        """A listening TCP socket on ``server_addr`` inside the server namespace."""
        result: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.server_ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.server_ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.server_addr, port))
                s.listen(backlog)
                result.append(s)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                result.append(e)

        t = threading.Thread(target=make, name="netns-listen")  # the thread (and its namespace) ends here
        t.start()
        t.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def client_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run on the client side of the link."""
        return ["nsenter", f"--net=/run/netns/{self.client_ns}", "--", *argv]
