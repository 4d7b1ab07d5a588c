#!/usr/bin/env python3
"""nbdfs vs nbdfuse on the same nbdkit server, side by side, in one run, in four profiles.

    sudo .venv/bin/python bench/compare.py [--size 1G] [--rounds 3] [--runtime 8]
        [--profile loopback|link|tls|tls-link ...] [--only TEXT] [--delay MS] [--rate BITS]

For each profile, one nbdkit memory server filled with random data: *loopback*; *link*,
behind nbdkit's delay filter (every read and write answered 1 ms later); *tls* and
*tls-link*, the same with TLS required of both tools (certificates from nbdfs tls-init;
libnbd takes root's from /etc/pki/libnbd, which the run fills and restores). Each round
mounts the server with nbdfuse and with nbdfs (fresh mounts, page cache dropped before
every cold figure, and before a sequential row memory touched so that the page cache it
fills is backed by the host: back_free_memory, with the guest's free page reporting held
off meanwhile where it can be: held_page_reporting), alternating who goes first, and
measures: sequential read (dd bs=1M), sequential write + fsync (dd conv=fsync), 4 KiB
random read at queue depth 1 and 16
(fio, O_DIRECT, whole export), a warm re-read of a 64 MiB working set, and nbdcopy to
null as the raw NBD ceiling. In the loopback profiles (plain and TLS) also the two floors:
a pyfuse3 file system that does nothing (bench/pyfuse3_ceiling.py) and a minimal trio NBD
client (bench/client_latency.py --minimal, over TLS in the TLS profile), and, in the cold
random rows, nbdfs with --cache-size 0 (what the cache's first fill costs). In every
profile, in the sequential and cold random rows, the two floors composed
(bench/pyfuse3_forward.py: the no-op file system forwarding each read and write to minimal
NBD connections, TLS ones in the TLS profiles).

Prints one table per profile: medians, the nbdfs/nbdfuse ratio and its range over the
rounds, the issue's target for the row, the daemons' CPU per request or MiB, the floors,
where a sequential row's CPU time went (the daemon's own work and system calls, nbdkit,
dd; the CPUs' use; for reads, the rate the daemon's one thread and the whole chain's CPU
each allow), nbdfs's peak RSS and CPU seconds per GiB. A full run (all four
profiles, no --only) writes docs/bench.md and docs/bench.png (matplotlib, installed on
demand).

Needs root (page cache, /etc/pki/libnbd), nbdkit, nbdfuse, nbdcopy, fio.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
NBDFS = [sys.executable, "-m", "nbdfs"]
MiB = 1 << 20


def sh(*cmd: str, **kw: object) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout  # type: ignore[call-overload, no-any-return]


def machine() -> str:
    """The CPUs, how fast one of them encrypts with TLS's cipher (OpenSSL's AES-256-GCM on
    16 KiB records), and the Python that runs nbdfs and the floors: machines of the same
    kind here differ, the TLS rows most of all, and an interpreter built without
    profile-guided optimization costs every Python daemon ~1.3x the CPU per request."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    try:
        speed = subprocess.run(
            ["openssl", "speed", "-mr", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "1"],
            capture_output=True,
            text=True,
        ).stdout
    except OSError:  # (no openssl command)
        speed = ""
    rates = [line.split(":")[3] for line in speed.splitlines() if line.startswith("+F:")]
    aes = f", AES-256-GCM {float(rates[0]) / 1e9:.2f} GB/s per `openssl speed`" if rates else ""
    python = f"Python {platform.python_version()} from {sys.base_prefix}"
    return f"{os.cpu_count()} CPUs ({model}{aes}), {python}"


def cpu_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, in ticks: all of it, and what the host took (steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[7]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def back_free_memory(size: int) -> None:
    """Touch ``size`` bytes of memory and 512 MiB more, and free them, just before a
    figure that fills up to ``size`` bytes of page cache, so that the pages it fills are
    ones the host backs.

    A virtual machine that reports its free pages to the host (virtio-balloon free page
    reporting, as on the machine these figures come from) gives the memory drop_caches
    frees back to the host, and the next touch of each such page costs a fault in the
    host. A cold ``dd`` through either tool then ran at ~400 or at ~800 MB/s from one run
    to the next, whatever the tool or its settings: `perf` showed the FUSE reply's copy
    into the page cache at 74% of the daemon's CPU in a slow run, 13% in a fast one. The
    pages touched here are freed to the guest's allocator, which hands them out again
    first; :func:`held_page_reporting` keeps the guest from reporting them meanwhile.
    Elsewhere this costs a second or two and changes nothing.
    """
    bytearray(size + 512 * MiB)  # (zeroed: every page touched; freed at once)


PAGE_REPORTING_DELAY = Path("/sys/module/page_reporting/parameters/min_free_ms")


@contextlib.contextmanager
def held_page_reporting(ms: int = 120_000) -> Iterator[str]:
    """For the run, have the guest report to the host only pages free for ``ms`` (where
    its kernel has that setting; this one takes at most two minutes); yields a sentence
    saying what was done.

    The memory :func:`back_free_memory` touched and freed went back to the host about
    two seconds later (at once past 1 GiB waiting), often while the figure it was for
    still ran: the same sequential read, same build, then ran at ~1200 or ~2000 MB/s
    round to round, the daemon's system time per MiB doubling in the slow rounds
    (8 paired rounds, 1267-2034 MB/s; held off: 6 rounds, 1481-2120, forwarder 1836-2250).
    """
    if not PAGE_REPORTING_DELAY.exists():
        yield "no free page reporting delay to set here"
        return
    before = PAGE_REPORTING_DELAY.read_text().strip()
    try:
        PAGE_REPORTING_DELAY.write_text(f"{ms}\n")
    except OSError as e:
        yield f"free page reporting left as it is (min_free_ms {ms}: {e.strerror})"
        return
    try:
        yield (
            f"free page reporting held off for pages free under {ms // 1000} s"
            f" (min_free_ms {before} -> {ms}, restored after)"
        )
    finally:
        PAGE_REPORTING_DELAY.write_text(f"{before}\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not m:
        raise SystemExit(f"bad size {text}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


@contextlib.contextmanager
def server(
    size: int,
    work: Path,
    rate: str | None = None,
    delay_ms: float | None = None,
    tls: Path | None = None,
) -> Iterator[str]:
    """nbdkit memory SIZE filled with random data; yields its URI (nbds://... with ``tls``,
    the certificate directory: TLS required of nbdfs and nbdfuse, plaintext allowed only
    for the nbdcopy that fills it)."""
    port = free_port()
    pidfile = work / "nbdkit.pid"
    # A link of `rate` bits/s: nbdkit's rate filter, with a short burst allowance so an
    # idle gap between figures does not buy the next one seconds at full speed.
    link = ["--filter=rate"] if rate else []
    link_args = [f"rate={rate}", "burstiness=0.2"] if rate else []
    if delay_ms:  # a distant server: every read and write answered this much later
        link.append("--filter=delay")
        link_args += [f"delay-read={delay_ms}ms", f"delay-write={delay_ms}ms"]
    proc = subprocess.Popen(
        [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-P",
            str(pidfile),
            *(["--tls=on", f"--tls-certificates={tls}"] if tls else []),
            *link,
            "memory",
            str(size),
            *link_args,
        ]
    )
    try:
        while not (pidfile.exists() and pidfile.read_text().strip()):
            time.sleep(0.05)
        uri = f"nbd://127.0.0.1:{port}"
        rnd = work / "random.img"
        sh("dd", "if=/dev/urandom", f"of={rnd}", "bs=1M", f"count={size // MiB}", "status=none")
        sh("nbdcopy", str(rnd), uri)
        rnd.unlink()
        yield f"nbds://127.0.0.1:{port}" if tls else uri
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def write_source(size: int) -> Iterator[Path]:
    """The random bytes the sequential write row's dd copies (up to 256 MiB of ``size``), in
    memory (/dev/shm): the page cache is dropped before every figure, and a source on
    disk put a disk read of each MiB into the row, for every tool (and made whichever went
    first the slower)."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    rnd = shm / "write.img"
    try:
        sh("dd", "if=/dev/urandom", f"of={rnd}", "bs=1M", f"count={min(size // MiB, 256)}")
        yield rnd
    finally:
        shutil.rmtree(shm)


def make_pki(work: Path) -> Path:
    """Certificates for a TLS run (``nbdfs tls-init``), for the server at 127.0.0.1."""
    pki = work / "pki"
    sh(*NBDFS, "tls-init", str(pki), "--host", "127.0.0.1", cwd=ROOT)
    return pki


def unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    for _ in range(100):
        if str(path) not in Path("/proc/self/mounts").read_text():
            return
        time.sleep(0.05)
    subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


@contextlib.contextmanager
def nbdfuse(uri: str, mnt: Path) -> Iterator[tuple[Path, int]]:
    pidfile = mnt.parent / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt), uri])
    try:
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None:
                raise SystemExit("nbdfuse failed to start")
            time.sleep(0.05)
        yield mnt / "nbd", int(pidfile.read_text())
    finally:
        unmount(mnt)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@contextlib.contextmanager
def nbdfs(
    uri: str, mnt: Path, extra: list[str], tree: Path | None = None
) -> Iterator[tuple[Path, int]]:
    """nbdfs mounted (this checkout's, or the nbdfs/ package under ``tree``)."""
    env = None if tree is None else {"PYTHONPATH": str(tree), "PATH": os.environ["PATH"]}
    # (cwd: not the checkout when another tree is asked for, whose nbdfs/ would come first)
    subprocess.run(
        [*NBDFS, "mount", *extra, uri + "/", str(mnt)], check=True, cwd=tree or ROOT, env=env
    )
    pid = int(sh("pgrep", "-f", f"nbdfs mount .* {mnt}$").split()[0])
    try:
        yield mnt / "%default%", pid
    finally:
        unmount(mnt)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


@contextlib.contextmanager
def floor_fs(script: str, argv: list[str], mnt: Path) -> Iterator[tuple[Path, int]]:
    """One of the floors' file systems (bench/SCRIPT MNT ARGV...), mounted as nbdfs is."""
    from nbdfs.mount import raise_read_ahead

    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), str(mnt), *argv])
    try:
        while f" {mnt} " not in Path("/proc/self/mounts").read_text():
            if proc.poll() is not None:
                raise SystemExit(f"bench/{script} failed to start")
            time.sleep(0.05)
        raise_read_ahead(str(mnt))  # as nbdfs does: FUSE reads of up to 1 MiB
        yield mnt / "f", proc.pid
    finally:
        unmount(mnt)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def ceiling(uri: str, mnt: Path, size: int) -> contextlib.AbstractContextManager[tuple[Path, int]]:
    """The no-op pyfuse3 file system (bench/pyfuse3_ceiling.py); ``uri`` is not used."""
    return floor_fs("pyfuse3_ceiling.py", [str(size)], mnt)


def floor_uri(uri: str, certificates: Path | None) -> str:
    """The URI the floors' minimal clients connect to (over TLS with ``certificates``)."""
    return f"{uri}/?tls-certificates={certificates}" if certificates else uri + "/"


def forward(
    uri: str, mnt: Path, certificates: Path | None = None
) -> contextlib.AbstractContextManager[tuple[Path, int]]:
    """The no-op file system forwarding each read to one minimal NBD connection
    (bench/pyfuse3_forward.py): the two floors composed."""
    return floor_fs("pyfuse3_forward.py", [floor_uri(uri, certificates)], mnt)


def dd_rate(*args: str) -> float:
    """Bytes per second that dd reports."""
    out = subprocess.run(["dd", *args], check=True, capture_output=True, text=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    assert m, out
    return int(m.group(1)) / float(m.group(2))


def fio_iops(path: Path, depth: int, runtime: int, size: str, rw: str = "randread") -> float:
    out = sh(
        "fio",
        "--name=b",
        f"--filename={path}",
        f"--rw={rw}",
        "--bs=4k",
        "--direct=1",
        "--ioengine=libaio",
        f"--iodepth={depth}",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        "--output-format=json",
        "--invalidate=0",
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read"]["iops"])


def proc_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds used by a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds used and peak RSS in bytes of a process."""
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return sum(proc_times(pid)), int(hwm.group(1)) * 1024 if hwm else 0


@dataclasses.dataclass(frozen=True)
class CpuSplit:
    """Where the machine's CPU time went during a sequential row, in microseconds per MiB:
    the daemon's own work (Python, libfuse) and its system calls (reading: the socket's copy
    in, the reply's copy into the page cache; writing: FUSE's copy of dd's data in, the
    socket's copy out), the server's, and dd's; and how busy the CPUs were (a fraction)."""

    user: float
    kernel: float
    server: float
    reader: float
    busy: float

    @staticmethod
    def sample(pid: int, server_pid: int) -> list[float]:
        """The counters :meth:`between` two samples compares."""
        user, kernel = proc_times(pid)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # (dd, once it has exited)
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = ticks[3] + ticks[4]
        server = sum(proc_times(server_pid))
        return [
            user,
            kernel,
            server,
            reaped.ru_utime + reaped.ru_stime,
            sum(ticks) - idle,
            sum(ticks),
        ]

    @classmethod
    def between(cls, before: list[float], after: list[float], mib: float) -> CpuSplit:
        d = [b - a for a, b in zip(before, after, strict=True)]
        per = 1e6 / mib
        return cls(d[0] * per, d[1] * per, d[2] * per, d[3] * per, d[4] / d[5] if d[5] else 0)


class Row(NamedTuple):
    name: str
    unit: str
    measure: Callable[[Path], float]
    # what readies a fresh mount for the measurement (not counted in its CPU per request)
    prepare: Callable[[Path], object] | None = None
    moved: int = 0  # the bytes a sequential (MB/s) row reads or writes


SEQ_READ = "seq read (dd 1M, cold)"
SEQ_WRITE = "seq write + fsync (dd 1M)"


def rows(size: int, runtime: int, rnd: Path) -> list[Row]:
    n = size // MiB
    wn = min(n, 256)
    return [
        Row(
            SEQ_READ,
            "MB/s",
            lambda f: dd_rate(f"if={f}", "of=/dev/null", "bs=1M", f"count={n}") / 1e6,
            moved=n * MiB,
        ),
        Row(
            SEQ_WRITE,
            "MB/s",
            lambda f: (
                dd_rate(f"if={rnd}", f"of={f}", "bs=1M", f"count={wn}", "conv=notrunc,fsync") / 1e6
            ),
            moved=wn * MiB,
        ),
        Row("4K rand read QD1 (cold)", "IOPS", lambda f: fio_iops(f, 1, runtime, f"{n}M")),
        Row("4K rand read QD16 (cold)", "IOPS", lambda f: fio_iops(f, 16, runtime, f"{n}M")),
        Row(
            "4K warm re-read, 64M set",
            "IOPS",
            lambda f: fio_iops(f, 16, runtime, "64M"),
            lambda f: fio_iops(f, 16, 2, "64M"),  # (fills the cache: over a link, misses)
        ),
    ]


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    title: str
    delay_ms: float | None  # nbdkit's delay filter on reads and writes: a distant server
    tls: bool
    targets: dict[str, float]  # row -> the nbdfs/nbdfuse ratio to reach (issue: round 2)


LOOPBACK_TARGETS = {"seq read": 1.5, "seq write": 1.0, "QD1": 0.7, "QD16": 0.6, "warm": 1.5}
LINK_TARGETS = {"seq read": 3.0, "seq write": 1.5, "QD1": 1.0, "QD16": 2.0, "warm": 20.0}
PROFILES = {
    "loopback": Profile("loopback", "loopback (nbdkit memory)", None, False, LOOPBACK_TARGETS),
    "link": Profile("link", "1 ms link (nbdkit delay filter)", 1.0, False, LINK_TARGETS),
    "tls": Profile("tls", "TLS, loopback", None, True, LOOPBACK_TARGETS),
    "tls-link": Profile("tls-link", "TLS, 1 ms link", 1.0, True, LINK_TARGETS),
}


def target_for(profile: Profile, row: str) -> float | None:
    keys = sorted(profile.targets, key=len, reverse=True)  # ("QD16" before "QD1")
    return next((profile.targets[k] for k in keys if k in row), None)


@dataclasses.dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    units: dict[str, str] = dataclasses.field(default_factory=dict)
    # row -> tool -> CPU microseconds per request (IOPS rows) or per MiB (MB/s rows)
    cpu: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    rss: list[int] = dataclasses.field(default_factory=list)
    minimal_client: list[float] = dataclasses.field(default_factory=list)  # CPU us per read
    # sequential row -> tool -> each round's CpuSplit
    seq_split: dict[str, dict[str, list[CpuSplit]]] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def libnbd_certificates(pki: Path) -> Iterator[None]:
    """nbdfuse and nbdcopy (libnbd) take root's certificates from /etc/pki/libnbd only: put
    the run's there, and put back whatever was there before."""
    home = Path("/etc/pki/libnbd")
    saved = home.with_name("libnbd.bench-saved")
    if home.exists():
        home.rename(saved)
    home.mkdir(parents=True)
    try:
        for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            shutil.copy2(pki / name, home / name)
        yield
    finally:
        shutil.rmtree(home)
        if saved.exists():
            saved.rename(home)


def minimal_client_cpu(uri: str) -> float:
    """CPU microseconds per 4 KiB read at depth 16 of bench/client_latency.py --minimal."""
    out = sh(
        sys.executable,
        str(ROOT / "bench" / "client_latency.py"),
        uri,
        "--size",
        "4096",
        "--depth",
        "16",
        "--count",
        "20000",
        "--minimal",
        cwd=ROOT,
    )
    m = re.search(r"CPU\s+([\d.]+) us per read", out)
    assert m, out
    return float(m.group(1))


def run_profile(profile: Profile, args: argparse.Namespace, work: Path, rnd: Path) -> Results:
    size = parse_size(args.size)
    res = Results()
    pki = make_pki(work) if profile.tls and not (work / "pki").exists() else work / "pki"
    certificates = pki if profile.tls else None
    extra = list(args.nbdfs_option) + (["--tls-certificates", str(pki)] if certificates else [])
    libnbd_pki = libnbd_certificates(pki) if certificates else contextlib.nullcontext()
    # (over TLS too: the no-op has no network, but nbdfuse's figures it is set against do;
    # the minimal client and the forwarder then speak TLS as nbdfs does)
    ceiling_too = args.ceiling and profile.delay_ms is None
    with (
        libnbd_pki,
        server(size, work, args.rate, profile.delay_ms, certificates) as uri,
    ):
        server_pid = int((work / "nbdkit.pid").read_text())
        for r in range(args.rounds):
            start = time.monotonic()
            sh("nbdcopy", uri, "null:")
            res.values.setdefault(RAW, {}).setdefault("nbdcopy", []).append(
                size / (time.monotonic() - start) / 1e6
            )
            res.units[RAW] = "MB/s"
            if ceiling_too:
                res.minimal_client.append(minimal_client_cpu(floor_uri(uri, certificates)))
            for name, unit, measure, prepare, moved in rows(size, args.runtime, rnd):
                if args.only and args.only not in name:
                    continue
                res.units[name] = unit
                order: list[tuple[str, Callable[..., Any], tuple[object, ...]]] = [
                    ("nbdfuse", nbdfuse, ()),
                    ("nbdfs", nbdfs, (extra,)),
                ]
                if ceiling_too:
                    order.append((NOOP, ceiling, (size,)))
                # (the forwarder in every profile, over the link too: the floor of a
                # daemon whose requests wait on it; in the sequential rows it has no
                # read-ahead of its own, only the kernel's, raised to 1 MiB as nbdfs's)
                if args.ceiling and ("QD" in name or "seq " in name):
                    order.append((FORWARD, forward, (certificates,)))
                if ceiling_too and "cold" in name and "rand" in name:  # the cache's first fill
                    order.append((NOCACHE, nbdfs, ([*extra, "--cache-size", "0"],)))
                if r % 2:
                    order.reverse()  # alternate who goes first
                for tool, mount, more in order:
                    drop_caches()
                    mnt = work / MOUNT_DIRS[tool]
                    with mount(uri, mnt, *more) as (path, pid):
                        if unit == "MB/s":  # (the rows through the page cache)
                            back_free_memory(size)
                        if prepare is not None:
                            prepare(path)
                        before = CpuSplit.sample(pid, server_pid) if moved else None
                        cpu0, _ = proc_stats(pid)
                        value = measure(path)
                        cpu1, hwm = proc_stats(pid)
                        if before is not None:
                            after = CpuSplit.sample(pid, server_pid)
                            res.seq_split.setdefault(name, {}).setdefault(tool, []).append(
                                CpuSplit.between(before, after, moved / MiB)
                            )
                    res.values.setdefault(name, {}).setdefault(tool, []).append(value)
                    if unit == "MB/s":
                        per = (cpu1 - cpu0) / (moved / MiB) * 1e6
                    else:
                        per = (cpu1 - cpu0) / (value * args.runtime) * 1e6
                    res.cpu.setdefault(name, {}).setdefault(tool, []).append(per)
                    if tool == "nbdfs":
                        res.rss.append(hwm)
                    print(
                        f"{profile.name} round {r + 1}: {name:28} {tool:13} {value:10.1f} {unit}",
                        flush=True,
                    )
    return res


RAW = "nbdcopy to null (raw NBD)"
NOOP = "no-op pyfuse3"
FORWARD = "forwarder"
NOCACHE = "nbdfs --cache-size 0"
MOUNT_DIRS = {"nbdfuse": "a", "nbdfs": "b", NOOP: "c", FORWARD: "d", NOCACHE: "e"}  # (in work dir)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1G", help="export size (default 1G)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds; medians are reported (default 3)"
    )
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio figure (default 8)")
    ap.add_argument("--nbdfs-option", action="append", default=[], help="extra nbdfs mount option")
    ap.add_argument(
        "--profile",
        action="append",
        choices=list(PROFILES),
        help="run this profile (repeatable; default: all four, and write docs/bench.md)",
    )
    ap.add_argument(
        "--rate",
        metavar="BITS",
        help="also serve through nbdkit's rate filter, as over a link of BITS/s (e.g. 1G);"
        " shows what the bytes each tool fetches cost; no files written",
    )
    ap.add_argument(
        "--delay",
        type=float,
        metavar="MS",
        help="the link profiles' delay (default 1 ms); no files written if not 1",
    )
    ap.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the floors (the no-op pyfuse3 file system, bench/pyfuse3_ceiling.py,"
        " the minimal client of bench/client_latency.py, the forwarder of"
        " bench/pyfuse3_forward.py)",
    )
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument(
        "--only",
        metavar="TEXT",
        help="run just the rows whose name contains TEXT (e.g. 'seq read'); no files written",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the page cache must be dropped before cold figures")
    for tool in ("nbdkit", "nbdfuse", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/install")
    profiles = [PROFILES[p] for p in args.profile or PROFILES]
    if args.delay is not None:
        profiles = [
            dataclasses.replace(p, delay_ms=args.delay) if p.delay_ms else p for p in profiles
        ]
    size = parse_size(args.size)
    sections = []
    results: dict[str, Results] = {}
    host = machine()  # (before the run: on quiet CPUs)
    print(host, flush=True)
    ticks0 = cpu_ticks()
    with (
        held_page_reporting() as reporting,
        tempfile.TemporaryDirectory() as tmp,
        write_source(size) as rnd,
    ):
        print(reporting, flush=True)
        work = Path(tmp)
        for sub in MOUNT_DIRS.values():
            (work / sub).mkdir()
        for profile in profiles:
            results[profile.name] = res = run_profile(profile, args, work, rnd)
            sections.append(report(profile, res))
            print("\n" + sections[-1] + "\n", flush=True)
    total, steal = (b - a for a, b in zip(ticks0, cpu_ticks(), strict=True))
    print(f"steal time (the host's share of the CPUs) during the run: {steal / total:.1%}")
    partial = args.only or args.rate or args.profile or (args.delay not in (None, 1.0))
    if partial:
        return
    head = (
        f"# nbdfs vs nbdfuse\n\n{time.strftime('%Y-%m-%d')}, {host},"
        f" `bench/compare.py --size {args.size} --rounds {args.rounds} --runtime"
        f" {args.runtime}`: medians of {args.rounds} rounds; every cold figure from a fresh"
        " mount with the page cache dropped, and the sequential rows' page cache in memory"
        f" the host backs (back_free_memory; {reporting}). The host took"
        f" {steal / total:.1%} of the CPUs' time during the run (steal time): on a shared"
        " virtual machine, read every figure with its range.\n"
    )
    notes = (
        "\n- *range*: the lowest and highest nbdfs/nbdfuse ratio of one round (the tools"
        " measured back to back): how much of a ratio is noise.\n"
        "- *target*: the ratio the performance issue sets for the row; *CPU*: the daemon's"
        " CPU time per request (IOPS rows) or per MiB (MB/s rows), nbdfs then nbdfuse.\n"
        f"- *{NOOP}*: bench/pyfuse3_ceiling.py, a pyfuse3 file system that answers from memory"
        " without any network, as a ratio to nbdfuse: the most any pyfuse3 daemon reaches"
        " on this machine.\n"
        f"- *{FORWARD}*: bench/pyfuse3_forward.py, the same file system forwarding each read"
        " to one minimal NBD connection and each write and fsync to another (no cache, no"
        " checks, no read-ahead but the kernel's): the least a pyfuse3 + trio NBD daemon does,"
        " so the most one reaches here per request (with read-ahead of its own, a daemon can"
        " beat it on sequential reads over a link).\n"
        f"- *{NOCACHE}*: nbdfs with its block cache off, in the cold random rows: the cost of"
        " the cache's first fill, which every cold figure pays.\n"
    )
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench.md").write_text(head + "\n" + "\n\n".join(sections) + "\n" + notes)
    if not args.no_chart:
        chart({p.name: results[p.name] for p in profiles}, profiles, ROOT / "docs" / "bench.png")


def seq_split_notes(res: Results) -> list[str]:
    """Where a sequential row's CPU time went, each tool's, and what that leaves. Reading:
    the rate a daemon doing no user-space work at all would reach with the CPUs as busy as
    they were (its system calls, the server and dd unchanged). Writing, where dd's writes
    reach the daemon one at a time: how long each MiB took, against that CPU time."""
    lines = []
    for row, what, kernel in (
        (SEQ_READ, "Seq read", "the socket's copy in, the reply's copy into the page cache"),
        (SEQ_WRITE, "Seq write + fsync", "FUSE's copy of dd's data in, the socket's copy out"),
    ):
        fuse = res.values.get(row, {}).get("nbdfuse")
        for tool in ("nbdfs", "nbdfuse", FORWARD):
            splits = res.seq_split.get(row, {}).get(tool)
            if not splits:
                continue
            m = {
                f.name: statistics.median(getattr(s, f.name) for s in splits)
                for f in dataclasses.fields(CpuSplit)
            }
            line = (
                f"- {what}, where the CPU time per MiB went with {tool}: the daemon's own work"
                f" {m['user']:.0f} us, its system calls {m['kernel']:.0f} us ({kernel}),"
                f" nbdkit {m['server']:.0f} us, dd {m['reader']:.0f} us; the"
                f" {os.cpu_count()} CPUs {m['busy']:.0%} busy."
            )
            others = m["kernel"] + m["server"] + m["reader"]
            daemon = m["user"] + m["kernel"]  # (its one thread's, per MiB)
            rate = statistics.median(res.values[row][tool])  # (MB/s: bytes per us)
            if row == SEQ_WRITE:
                line += (
                    f" Each MiB took {MiB / rate:.0f} us; those four parts add up to"
                    f" {m['user'] + others:.0f} us of CPU."
                )
            elif tool == "nbdfs" and fuse and others:
                bound = m["busy"] * (os.cpu_count() or 1) * MiB / others  # (MB/s: us per MiB)
                line += (
                    f" The rest alone, at that use of the CPUs, would take a daemon with no"
                    f" user-space work at all to {bound:.0f} MB/s"
                    f" ({bound / statistics.median(fuse):.2f}x nbdfuse)."
                )
            if row == SEQ_READ and tool in ("nbdfs", FORWARD) and fuse:
                # The two ceilings of a single-threaded daemon's rate: its own thread's CPU
                # per MiB, and the whole chain's over all the CPUs.
                whole = (os.cpu_count() or 1) * MiB / (m["user"] + others)
                line += (
                    f" Its thread was busy {daemon * rate / MiB:.0%} of the time, so alone it"
                    f" allows at most {MiB / daemon:.0f} MB/s; the whole cost, with every"
                    f" CPU busy all the time, at most {whole:.0f} MB/s"
                    f" ({whole / statistics.median(fuse):.2f}x nbdfuse)."
                )
            lines.append(line)
    return lines


def report(profile: Profile, res: Results) -> str:
    floors = any(t in per for per in res.values.values() for t in (NOOP, FORWARD, NOCACHE))
    lines = [
        f"## {profile.title}",
        "",
        "| workload | unit | nbdfuse | nbdfs | nbdfs/nbdfuse | range | target | met |"
        " CPU nbdfs, nbdfuse |"
        + (f" {NOOP} / nbdfuse | {FORWARD} / nbdfuse | {NOCACHE} / nbdfuse |" if floors else ""),
        "|---|---|---:|---:|---:|---:|---:|:-:|---:|" + ("---:|---:|---:|" if floors else ""),
    ]
    raw = statistics.median(res.values.get(RAW, {}).get("nbdcopy", [0]))
    for name, per in res.values.items():
        if name == RAW:
            continue
        a, b = statistics.median(per["nbdfuse"]), statistics.median(per["nbdfs"])
        target = target_for(profile, name)
        met = "" if target is None else ("yes" if b / a >= target else "**no**")
        ca, cb = (statistics.median(res.cpu[name][t]) for t in ("nbdfuse", "nbdfs"))
        line = (
            f"| {name} | {res.units[name]} | {a:.0f} | {b:.0f} | {b / a:.2f} | {_spread(per)} |"
            f" {'' if target is None else f'{target:g}'} | {met} | {cb:.0f}, {ca:.0f} |"
        )
        if floors:
            line += "".join(
                f" {statistics.median(per[t]) / a:.2f} |" if t in per else " |"
                for t in (NOOP, FORWARD, NOCACHE)
            )
        lines.append(line)
    lines.append("")
    seq_row = res.values.get(SEQ_READ, {})
    seq = seq_row.get("nbdfs")
    if seq and raw:
        forwarded = seq_row.get(FORWARD)
        lines.append(
            f"- Raw NBD ceiling (nbdcopy to null): {raw:.0f} MB/s; nbdfs sequential read is"
            f" {statistics.median(seq) / raw:.0%} of it (target: at least 50%)"
            + (f"; the forwarder's {statistics.median(forwarded) / raw:.0%}." if forwarded else ".")
        )
    lines += seq_split_notes(res)
    qd16 = "4K rand read QD16 (cold)"
    if res.minimal_client and qd16 in res.cpu and NOOP in res.cpu[qd16]:
        noop_cpu = statistics.median(res.cpu[qd16][NOOP])
        client_cpu = statistics.median(res.minimal_client)
        ours = statistics.median(res.cpu[qd16]["nbdfs"])
        bound = 1.3 * (noop_cpu + client_cpu)
        lines.append(
            f"- CPU per cold 4 KiB read at QD16: nbdfs {ours:.0f} us; floors: the no-op pyfuse3"
            f" file system {noop_cpu:.0f} us + a minimal trio NBD client (bench/client_latency.py"
            f" --minimal) {client_cpu:.0f} us; target at most 1.3x their sum, {bound:.0f} us:"
            f" {'met' if ours <= bound else '**not met**'}."
        )
        if FORWARD in res.cpu[qd16]:
            composed = statistics.median(res.cpu[qd16][FORWARD])
            lines.append(
                f"- The two floors composed ({FORWARD}, bench/pyfuse3_forward.py: the no-op"
                f" file system forwarding each read to one minimal NBD connection) cost"
                f" {composed:.0f} us per read ({composed / (noop_cpu + client_cpu):.2f}x their"
                f" sum); nbdfs costs {ours / composed:.2f}x that."
                + (
                    f" The floors composed already cost more than the target allows"
                    f" ({bound:.0f} us): it is ruled out."
                    if composed > bound and ours > bound
                    else ""
                )
            )
    for name in ("4K rand read QD1 (cold)", qd16):
        if NOCACHE not in res.cpu.get(name, {}):
            continue
        ratio = statistics.median(res.values[name][NOCACHE]) / statistics.median(
            res.values[name]["nbdfuse"]
        )
        without, with_ = (statistics.median(res.cpu[name][t]) for t in (NOCACHE, "nbdfs"))
        lines.append(
            f"- {name} without the block cache ({NOCACHE}): {ratio:.2f}x nbdfuse, CPU per"
            f" read {without:.0f} us against {with_:.0f} us with it: what filling an empty cache"
            " costs (every block it keeps is memory the daemon touches for the first time;"
            " docs/architecture.md, step 5)."
        )
    # CPU seconds per GiB: the sequential rows' microseconds per MiB, times 1024 / 1e6
    per_gib = [
        us * 1024 / 1e6
        for name, unit in res.units.items()
        if unit == "MB/s" and name in res.cpu
        for us in res.cpu[name]["nbdfs"]
    ]
    if res.rss and per_gib:
        lines.append(
            f"- nbdfs peak RSS {max(res.rss) / MiB:.0f} MiB (cache 256 MiB; target at most"
            f" cache + 80 MiB); CPU seconds per GiB moved (sequential rows):"
            f" {statistics.median(per_gib):.2f}."
        )
    return "\n".join(lines)


def _spread(per: dict[str, list[float]]) -> str:
    ratios = [b / a for a, b in zip(per["nbdfuse"], per["nbdfs"], strict=True) if a]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def chart(results: dict[str, Results], profiles: list[Profile], out: Path) -> None:
    """One panel per profile: nbdfs/nbdfuse per row, with the row's target marked."""
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(profiles), 1, figsize=(8, 2.4 * len(profiles)), squeeze=False)
    for ax, profile in zip(axes[:, 0], profiles, strict=True):
        res = results[profile.name]
        names = [n for n in res.values if n != RAW]
        ratios = [
            statistics.median(res.values[n]["nbdfs"]) / statistics.median(res.values[n]["nbdfuse"])
            for n in names
        ]
        targets = [target_for(profile, n) or 0.0 for n in names]
        colours = ["#2a7" if r >= t else "#c44" for r, t in zip(ratios, targets, strict=True)]
        bars = ax.barh(names, ratios, color=colours)
        ax.scatter(targets, names, marker="|", s=300, color="black", zorder=3, label="target")
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], padding=3)
        ax.set_title(profile.title, fontsize=10, loc="left")
        ax.invert_yaxis()
        ax.set_xscale("log")
    axes[-1, 0].set_xlabel("nbdfs / nbdfuse (higher is better; | marks the target)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
