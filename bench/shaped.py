"""Shaped-network pull series (issue 10, "Performance"): what parallel ranges buy against a link like a real one.

On loopback two cores measure CPU. Here every byte from the registry crosses a throttling proxy of our own
(tests/support/throttle.py: a cap per connection and a first-byte latency per request) and, by default, a link
with an aggregate cap (tests/support/netns.py: tbf on a veth pair between two network namespaces we create):

    registry (127.0.0.1, root ns) <- proxy (listens in ns "-s") ==veth0 [tbf]==> veth1 (ns "-c") <- contenders

The contenders (model-loader at each --concurrency, oras-py, skopeo, aria2c, curl + openssl) run on the client
side of the link in interleaved rounds, each as a child process in a fresh output directory; every output is
hashed afterwards against the layer digests. Prints medians, MB/s, each contender's cap (what its connections
could reach: the link's rate, or its streams x the per-connection rate when that is lower), ratios and the
issue's goals with PASS/FAIL.

    .venv/bin/python bench/shaped.py                        # 4 x 64 MiB, 12.5 MB/s + 30 ms per connection, 400 mbit
    .venv/bin/python bench/shaped.py --files 1              # one 256 MiB file
    .venv/bin/python bench/shaped.py --size-mib 1024 --rounds 5     # bigger: ~20 min (4 files), ~30 min (1 file)
    .venv/bin/python bench/shaped.py --link-mbit 0          # no tbf, no namespaces, no root: the proxy on 127.0.0.1
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    CHUNK,
    Blob,
    Pusher,
    Run,
    compile_loader,
    generate_model,
    install_interrupt_handlers,
    remove,
    run_measured,
    scratch_dir,
)
from bench.pull import (  # noqa: E402
    ORAS_SNIPPET,
    REPO,
    TAG,
    _last_json,
    floor_script,
    loader_bin,
    table,
    verify_floor,
    warm_free_memory,
)
from tests.support import netns  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402
from tests.support.throttle import ConnRecord, Stats, ThrottleProxy  # noqa: E402

LOADER = "model-loader"
ORAS = "oras-py"
SKOPEO = "skopeo"
ARIA2 = "aria2c"
CURL = "curl + openssl"
PEERS = ("oras", "skopeo", "aria2", "curl")

TARGET_CAP = 0.9  # loader >= 0.9x the cap its connections could reach
TARGET_ORAS = 4.0  # loader >= 4x oras-py
TARGET_HEADROOM = 2.0  # the proxy unthrottled must run at >= 2x the sum of the caps of 16 connections

SKOPEO_PARALLEL = 6  # containers/image copies at most 6 layers at once (copy.Options.MaxParallelDownloads)
ARIA2_MAX_X = 16  # aria2c refuses -x above 16
HEADROOM_CONNS = 16


@dataclass(frozen=True)
class Phases:
    """Where a run's wall time went, from the proxy's view of its connections (times in seconds)."""

    first_byte: float  # spawn -> first byte of the weights: interpreter start, manifest, first request's latency
    transfer: float  # first -> last byte of the weights
    after: float  # last byte -> exit: hashing what is left, publishing, exiting
    tail: float  # time at the end when the streams still running could no longer fill the cap


def phases(records: list[ConnRecord], spawn: float, seconds: float, min_bytes: int, to_fill: int) -> Phases | None:
    """``to_fill``: how many streams it takes to reach the cap (the link's rate over the per-connection rate)."""
    big = [r for r in records if r.bytes_down >= min_bytes and r.first_down is not None and r.last_down is not None]
    if not big:
        return None
    first = min(r.first_down for r in big if r.first_down is not None)
    ends = sorted(r.last_down for r in big if r.last_down is not None)
    last = ends[-1]
    # Streams still running after the i-th end: len(ends) - i - 1; below `to_fill` from ends[len - to_fill] on.
    short_from = ends[max(0, len(ends) - to_fill)]
    return Phases(first - spawn, last - first, spawn + seconds - last, last - short_from)


@dataclass
class Contender:
    name: str
    argv: Callable[[Path], list[str]]  # output dir -> command line (before the namespace wrapper)
    files: Callable[[Path, Run], dict[str, Path]]  # digest -> the file holding it, after a run
    streams: int  # connections that carry the weights at once (for the cap)
    is_loader: bool = False
    check: Callable[[Path, Run], None] | None = None  # an extra check of the output
    runs: list[Run] = field(default_factory=list)
    proxy: list[Stats] = field(default_factory=list)
    proxy_cpu: list[float] = field(default_factory=list)
    phases: list[Phases] = field(default_factory=list)


# --- outputs ---------------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def by_title(layers: list[Blob], tree: Callable[[Path, Run], Path]) -> Callable[[Path, Run], dict[str, Path]]:
    return lambda out, run: {b.digest: tree(out, run) / b.name for b in layers}


def by_digest(layers: list[Blob], sub: str) -> Callable[[Path, Run], dict[str, Path]]:
    return lambda out, run: {b.digest: out / sub / "blobs/sha256" / b.digest.split(":", 1)[1] for b in layers}


def verify(c: Contender, out: Path, run: Run, layers: list[Blob]) -> None:
    """Every layer is where the contender puts it, and hashes to its digest."""
    for digest, path in c.files(out, run).items():
        if not path.is_file():
            raise RuntimeError(f"{c.name}: {path} is missing")
        got = sha256_file(path)
        if got != digest:
            raise RuntimeError(f"{c.name}: {path} hashes to {got}, want {digest}")
    if c.check:
        c.check(out, run)
    if len(c.files(out, run)) != len(layers):
        raise RuntimeError(f"{c.name}: {len(c.files(out, run))} outputs for {len(layers)} layers")


# --- command lines and the streams each keeps busy -----------------------------------------------------------------

def loader_streams(shards: list[Blob], concurrency: int) -> int:
    """How many ranges of the weights the loader fetches at once on slow connections: ``concurrency``, as long as
    the weights split into that many ranges of at least STEAL_MIN (loader.fetch: it starts with about half and
    splits running ranges while connections are slow)."""
    from loader.fetch import STEAL_MIN

    return min(concurrency, sum(max(1, b.size // STEAL_MIN) for b in shards))


def aria2_split(shards: list[Blob], total_conns: int) -> int:
    return max(1, min(ARIA2_MAX_X, total_conns // len(shards)))


def aria2_script(base_url: str, layers: list[Blob], shards: list[Blob], total_conns: int) -> str:
    """One aria2c per layer, all in parallel; the weight shards split into ranges (-x/-s), every file checked
    against its digest by aria2c itself (--checksum)."""
    k = aria2_split(shards, total_conns)
    lines = ["set -e"]
    for i, b in enumerate(layers):
        n = k if b in shards else 1
        lines.append(
            f"aria2c -q --allow-overwrite=true --auto-file-renaming=false --file-allocation=falloc "
            f"-x {n} -s {n} -k 1M --checksum=sha-256={b.digest.split(':', 1)[1]} -d . -o '{b.name}' "
            f"'{base_url}/v2/{REPO}/blobs/{b.digest}' & a{i}=$!")
    lines += [f"wait $a{i}" for i in range(len(layers))]
    return "\n".join(lines) + "\n"


def build_contenders(host: str, layers: list[Blob], shards: list[Blob], concurrencies: list[int],
                     peers: set[str], aria2_conns: int) -> list[Contender]:
    ref = f"{host}/{REPO}:{TAG}"
    base_url = f"http://{host}"
    out: list[Contender] = []

    def loader_tree(d: Path, run: Run) -> Path:
        res = _last_json(run.stdout)
        if res["cache_hit"]:
            raise RuntimeError("loader reported a cache hit on a cold cache")
        return Path(res["path"])

    for c in concurrencies:
        out.append(Contender(
            f"{LOADER} c={c}",
            lambda d, c=c: [loader_bin(), "pull", ref, "--cache", str(d / "cache"), "--output", "json",
                            "--progress", "none", "--plain-http", "--concurrency", str(c)],
            by_title(layers, loader_tree), loader_streams(shards, c), is_loader=True))
    if "oras" in peers:
        out.append(Contender(ORAS, lambda d: [sys.executable, "-c", ORAS_SNIPPET, ref, str(d)],
                             by_title(layers, lambda d, run: d), 1))
    if "skopeo" in peers:
        out.append(Contender(SKOPEO, lambda d: ["skopeo", "copy", "--retry-times", "0", "--src-tls-verify=false",
                                                f"docker://{ref}", f"oci:{d}/layout"],
                             by_digest(layers, "layout"), min(len(shards), SKOPEO_PARALLEL)))
    if "aria2" in peers:
        aria2 = aria2_script(base_url, layers, shards, aria2_conns)
        out.append(Contender(f"{ARIA2} -x{aria2_split(shards, aria2_conns)}", lambda d, s=aria2: ["bash", "-c", s],
                             by_title(layers, lambda d, run: d), aria2_split(shards, aria2_conns) * len(shards)))
    if "curl" in peers:
        curl = floor_script(base_url, layers)
        out.append(Contender(CURL, lambda d, s=curl: ["bash", "-c", s], by_title(layers, lambda d, run: d),
                             len(shards), check=verify_floor(layers)))
    return out


# --- the network -------------------------------------------------------------------------------------------------

@dataclass
class Net:
    proxy: ThrottleProxy
    link: netns.Link | None
    rate: float | None  # bytes/s per connection
    latency: float
    link_mbit: float | None

    @property
    def host(self) -> str:
        port = self.proxy.address[1]
        return f"{self.link.server_addr}:{port}" if self.link else f"127.0.0.1:{port}"

    def wrap(self, argv: list[str]) -> list[str]:
        return self.link.client_argv(argv) if self.link else argv

    @property
    def link_bytes(self) -> float | None:
        return self.link_mbit * 1e6 / 8 if self.link_mbit else None

    def cap(self, streams: int) -> float:
        """Bytes/s a contender keeping `streams` connections busy could reach: the lower of the link's rate and
        the streams' per-connection caps (inf when neither is set)."""
        caps = [x for x in (self.link_bytes, self.rate * streams if self.rate else None) if x]
        return min(caps) if caps else math.inf

    def to_fill(self, streams: int) -> int:
        """How many streams it takes to fill this contender's cap."""
        if self.link_bytes and self.rate:
            return min(streams, math.ceil(self.link_bytes / self.rate - 1e-9))
        return 1 if self.link_bytes else streams

    def describe(self) -> str:
        per = (f"{self.rate / 1e6:g} MB/s per connection" if self.rate else "no per-connection cap")
        link = (f"tbf {self.link_mbit:g} mbit ({self.link_bytes / 1e6:g} MB/s) between two network namespaces"
                if self.link_mbit else "no link cap (127.0.0.1)")
        return f"{per}, first-byte latency {self.latency * 1000:g} ms per request (proxy); {link}"


def curl_parallel(net: Net, work: Path, shards: list[Blob], conns: int, each: int) -> float:
    """`conns` curls at once, each fetching about `each` bytes to /dev/null on one kept-alive connection (a range
    of a shard, or a small shard several times): aggregate bytes/s."""
    lines, total = [], 0
    for j in range(conns):
        b = shards[j % len(shards)]
        url = f"'http://{net.host}/v2/{REPO}/blobs/{b.digest}'"
        if b.size >= each:
            args, total = f"-r 0-{each - 1} -o /dev/null {url}", total + each
        else:
            reps = math.ceil(each / b.size)
            args, total = " ".join([f"-o /dev/null {url}"] * reps), total + reps * b.size
        lines.append(f"curl -sSf {args} & p{j}=$!")
    script = "set -e\n" + "\n".join(lines) + "\n" + "\n".join(f"wait $p{j}" for j in range(conns)) + "\n"
    run = run_measured(net.wrap(["bash", "-c", script]), cwd=work)
    if run.returncode != 0:
        raise RuntimeError(f"calibration curls failed: {run.stderr[-1000:]}")
    return total / run.seconds


def calibrate(net: Net, work: Path, shards: list[Blob]) -> list[tuple[str, str, str, bool | None]]:
    """The proxy's headroom (no caps, no tbf, 16 connections) and the link as curl sees it (no per-connection
    caps, 4 connections). Restores the shaping after."""
    rows: list[tuple[str, str, str, bool | None]] = []
    net.proxy.set(rate=None, latency=0.0)
    try:
        if net.link:
            net.link.set_rate(None)
        got = curl_parallel(net, work, shards, HEADROOM_CONNS, 32 << 20)
        need = TARGET_HEADROOM * HEADROOM_CONNS * net.rate if net.rate else None
        rows.append((f"proxy pass-through, no caps, {HEADROOM_CONNS} connections" + (" over the veth" if net.link
                     else ""), f">= {need / 1e6:.0f} MB/s" if need else "-", f"{got / 1e6:.0f} MB/s",
                     got >= need if need else None))
        if net.link:
            net.link.set_rate(net.link_mbit)
            got = curl_parallel(net, work, shards, 4, 64 << 20)
            assert net.link_bytes is not None
            rows.append((f"link as 4 curls see it (tbf {net.link_mbit:g} mbit, no per-connection caps)",
                         f"nominal {net.link_bytes / 1e6:.0f} MB/s", f"{got / 1e6:.1f} MB/s "
                         f"({got / net.link_bytes:.2f}x)", None))
    finally:
        if net.link:
            net.link.set_rate(net.link_mbit)
        net.proxy.set(rate=net.rate, latency=net.latency)
    return rows


# --- the run -------------------------------------------------------------------------------------------------------

def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(c: Contender, net: Net, work: Path, label: str, layers: list[Blob], model_bytes: int,
            min_bytes: int) -> None:
    out = work / "out"
    remove(out)
    out.mkdir()
    os.sync()
    warm_free_memory(work, model_bytes + model_bytes // 4)
    net.proxy.reset_stats()
    cpu0 = cpu_self()  # this process only waits in wait4 meanwhile: what it spends is the proxy's
    try:
        spawn = time.monotonic()
        run = run_measured(net.wrap(c.argv(out)), cwd=out)
        cpu = cpu_self() - cpu0
        deadline = time.monotonic() + 2
        while net.proxy.stats().active and time.monotonic() < deadline:  # let the proxy see the closes
            time.sleep(0.01)
        stats = net.proxy.stats()
        ph = phases(net.proxy.records(), spawn, run.seconds, min_bytes, net.to_fill(c.streams))
        if run.returncode != 0:
            raise RuntimeError(f"{c.name} exited {run.returncode}:\n{run.stderr[-2000:]}{run.stdout[-1000:]}")
        verify(c, out, run, layers)
    finally:
        remove(out)
    c.runs.append(run)
    c.proxy.append(stats)
    c.proxy_cpu.append(cpu)
    if ph:
        c.phases.append(ph)
    where = (f"1st byte {ph.first_byte:4.2f} s, transfer {ph.transfer:5.2f} s, tail {ph.tail:4.2f} s, after "
             f"{ph.after:4.2f} s" if ph else "no weight stream seen")
    print(f"  {label:<9} {c.name:<20} {run.seconds:7.2f} s  {model_bytes / 1e6 / run.seconds:6.1f} MB/s  "
          f"conns {stats.connections:3d} (peak {stats.peak_active:2d})  relayed {stats.bytes_down / 1e6:4.0f} MB  "
          f"proxy CPU {cpu:4.2f} s  {where}", flush=True)


def median_s(c: Contender) -> float:
    return statistics.median(r.seconds for r in c.runs)


def summary_rows(contenders: list[Contender], net: Net, model_bytes: int) -> list[list[str]]:
    oras = next((c for c in contenders if c.name == ORAS), None)
    rows = [["contender", "streams", "peak conns", "cap MB/s", "median s", "MB/s", "x cap", "x oras-py",
             "1st byte s", "transfer MB/s", "tail s", "after s", "CPU s", "RSS MB", "proxy CPU s", "rounds (s)"]]
    for c in contenders:
        m = median_s(c)
        cap = net.cap(c.streams)
        rows.append([c.name, str(c.streams), str(max(s.peak_active for s in c.proxy)),
                     "-" if math.isinf(cap) else f"{cap / 1e6:.1f}", f"{m:.2f}", f"{model_bytes / 1e6 / m:.1f}",
                     "-" if math.isinf(cap) else f"{model_bytes / m / cap:.2f}",
                     f"{median_s(oras) / m:.2f}" if oras else "-",
                     *phase_cells(c, model_bytes),
                     f"{statistics.median(r.cpu_seconds for r in c.runs):.2f}",
                     f"{max(r.peak_rss_mb for r in c.runs):.0f}",
                     f"{statistics.median(c.proxy_cpu):.2f}",
                     " ".join(f"{r.seconds:.2f}" for r in c.runs)])
    return rows


def phase_cells(c: Contender, model_bytes: int) -> list[str]:
    if not c.phases:
        return ["-"] * 4
    med = statistics.median
    return [f"{med(p.first_byte for p in c.phases):.2f}", f"{model_bytes / 1e6 / med(p.transfer for p in c.phases):.1f}",
            f"{med(p.tail for p in c.phases):.2f}", f"{med(p.after for p in c.phases):.2f}"]


def target_rows(contenders: list[Contender], net: Net, model_bytes: int) -> list[tuple[str, str, str, bool]]:
    oras = next((c for c in contenders if c.name == ORAS), None)
    rows = []
    for c in (c for c in contenders if c.is_loader):
        m = median_s(c)
        cap = net.cap(c.streams)
        if not math.isinf(cap):
            ratio = model_bytes / m / cap
            rows.append((f"{c.name} vs its cap ({cap / 1e6:.1f} MB/s, {c.streams} streams)", f">= {TARGET_CAP}x",
                         f"{ratio:.2f}x", ratio >= TARGET_CAP))
        if oras:
            ratio = median_s(oras) / m
            ceiling = net.cap(c.streams) / net.cap(oras.streams)  # what the caps allow at best
            rows.append((f"{c.name} speed vs {ORAS}", f">= {TARGET_ORAS:g}x", f"{ratio:.2f}x"
                         + ("" if math.isnan(ceiling) else f" (caps allow {ceiling:.2f}x)"), ratio >= TARGET_ORAS))
    return rows


def parse_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give N or a comma list such as 8,16 (each at least 1)")
    return values


def parse_peers(text: str) -> set[str]:
    names = {v.strip() for v in text.split(",") if v.strip()}
    if names - set(PEERS):
        raise argparse.ArgumentTypeError(f"peers are {', '.join(PEERS)} (or 'none')")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="total size of the weight shards (default 256)")
    p.add_argument("--files", type=int, default=4, help="number of weight shards (default 4; 1: one large file)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per contender (default 3)")
    p.add_argument("--rate-mbs", type=float, default=12.5,
                   help="cap per connection and direction, MB/s (10^6 bytes); 0: none (default 12.5)")
    p.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency per request (default 30)")
    p.add_argument("--link-mbit", type=float, default=400.0,
                   help="aggregate link cap (tbf in network namespaces, needs root); 0: none, 127.0.0.1 (default 400)")
    p.add_argument("--concurrency", type=parse_list, default=[8, 16], help="loader --concurrency values (default 8,16)")
    p.add_argument("--peers", type=lambda t: set() if t == "none" else parse_peers(t), default=set(PEERS),
                   help=f"comma list of peers to run (default {','.join(PEERS)}; 'none': the loader only)")
    p.add_argument("--aria2-conns", type=int, default=8,
                   help="aria2c connections in all, split over the shards (-x/-s per file; default 8)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the proxy headroom and link measurements")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench", help="scratch space (default .bench/)")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.files < 1 or args.rounds < 1 or args.aria2_conns < 1:
        p.error("--size-mib, --files, --rounds and --aria2-conns must be at least 1")
    for tool in (["skopeo"] if "skopeo" in args.peers else []) + (["aria2c"] if "aria2" in args.peers else []):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed (apt-get install -y {'aria2' if tool == 'aria2c' else tool})")
    if args.link_mbit and (why := netns.available()):
        p.error(f"--link-mbit needs network namespaces: {why} (or run with --link-mbit 0)")

    install_interrupt_handlers()
    compile_loader()
    work = scratch_dir(args.workdir)
    reg = proxy = link = None
    try:
        if args.link_mbit:
            stale = netns.remove_stale()
            if stale:
                print(f"removed namespaces left by killed runs: {' '.join(stale)}")
        print(f"scratch {work}; free {shutil.disk_usage(work).free / 2**30:.0f} GiB; load {os.getloadavg()[0]:.2f}")
        layers = generate_model(work / "seed", args.size_mib, args.files)
        shards = layers[-args.files:]
        model_bytes = sum(b.size for b in layers)
        reg = start_registry(root=work / "registry" / "data")
        digest = Pusher(reg.url).push(REPO, TAG, layers)  # straight to the registry, not through the shaping
        if not args.keep:
            remove(work / "seed")

        rate = args.rate_mbs * 1e6 if args.rate_mbs > 0 else None
        latency = args.latency_ms / 1000
        if args.link_mbit:
            link = netns.Link(args.link_mbit).create()
            proxy = ThrottleProxy(reg.url, rate=rate, latency=latency, sock=link.listen()).start()
        else:
            proxy = ThrottleProxy(reg.url, rate=rate, latency=latency).start()
        net = Net(proxy, link, rate, latency, args.link_mbit or None)
        print(f"pushed {REPO}:{TAG}@{digest}: {len(layers)} layers, {model_bytes / 1e6:.0f} MB; "
              f"contenders pull {net.host}")
        print(f"network: {net.describe()}")

        checks = [] if args.no_calibrate else calibrate(net, work, shards)
        for what, goal, got, ok in checks:
            print(f"  calibration: {what}: {got} (goal {goal}){'' if ok is None else ' PASS' if ok else ' FAIL'}")

        min_bytes = max(2_000_000, min(b.size for b in shards) // 16)  # a connection carrying weights
        contenders = build_contenders(net.host, layers, shards, args.concurrency, args.peers, args.aria2_conns)
        for rnd in range(args.rounds):
            k = rnd % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                measure(c, net, work, f"round {rnd + 1}", layers, model_bytes, min_bytes)

        print()
        print(f"model: {args.files} x {args.size_mib / args.files:g} MiB weights + {len(layers) - args.files} config "
              f"files = {model_bytes / 1e6:.0f} MB; {args.rounds} interleaved rounds; network: {net.describe()}; "
              f"load at end {os.getloadavg()[0]:.2f}")
        if link:
            print("tbf at the end: " + " | ".join(ln.strip() for ln in link.qdisc().splitlines()[:2]))
        print(table(summary_rows(contenders, net, model_bytes)))
        print("streams: connections carrying the weights at once by the contender's own plan (loader: --concurrency, its "
              "ranges split while connections are slow; skopeo: <= 6 layers; aria2c: -x per shard; curl: one per shard); cap: the lower "
              "of the link rate and streams x the per-connection rate; x cap and MB/s count payload against the "
              "link's nominal rate (TCP/IP framing takes ~4% of it); x oras-py: oras-py s / contender s. "
              f"From the proxy's records of connections carrying >= {min_bytes / 1e6:.0f} MB: 1st byte: spawn to the "
              "first weight byte; transfer MB/s: model bytes over first to last weight byte; tail: time at the end when "
              "the streams still running could not fill the cap (fewer than cap / per-connection rate); after: last "
              "byte to exit.")
        print()
        trows = [(w, g, m, ok) for w, g, m, ok in checks if ok is not None] + target_rows(contenders, net, model_bytes)
        print(table([["target", "goal", "measured", "result"]]
                    + [[w, g, m, "PASS" if ok else "FAIL"] for w, g, m, ok in trows]))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if proxy is not None:
            proxy.stop()
        if link is not None:
            link.close()
        if reg is not None:
            reg.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            remove(work)


if __name__ == "__main__":
    sys.exit(main())
