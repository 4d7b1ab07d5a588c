#!/usr/bin/env python3
"""nbdfs vs nbdfuse on the same nbdkit server, side by side, in one run.

    sudo .venv/bin/python bench/compare.py [--size 1G] [--rounds 3] [--runtime 8]
                                           [--only TEXT] [--rate BITS] [--delay MS]

Starts one nbdkit memory server filled with random data, then for each round mounts it
with nbdfuse and with nbdfs (fresh mounts, page cache dropped before every cold figure)
and measures, alternating the two: sequential read (dd bs=1M), sequential write + fsync
(dd conv=fsync), 4 KiB random read at queue depth 1 and 16 (fio, O_DIRECT), a warm
re-read of a 64 MiB working set (fio, O_DIRECT, after one pass), and nbdcopy to
/dev/null as the raw NBD ceiling. Prints medians and the nbdfs/nbdfuse ratio per row,
nbdfs's peak RSS and CPU seconds per GiB moved, and writes docs/bench.png (matplotlib,
installed on demand) and docs/bench.md.

Needs root (to drop the page cache), nbdkit, nbdfuse, nbdcopy, fio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NBDFS = [sys.executable, "-m", "nbdfs"]
MiB = 1 << 20


def sh(*cmd: str, **kw: object) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout  # type: ignore[call-overload, no-any-return]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


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
def ceiling(uri: str, mnt: Path, size: int) -> Iterator[tuple[Path, int]]:
    """The no-op pyfuse3 file system (bench/pyfuse3_ceiling.py); ``uri`` is not used."""
    from nbdfs.mount import raise_read_ahead

    script = ROOT / "bench" / "pyfuse3_ceiling.py"
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(size)])
    try:
        while f" {mnt} " not in Path("/proc/self/mounts").read_text():
            if proc.poll() is not None:
                raise SystemExit("the no-op pyfuse3 file system failed to start")
            time.sleep(0.05)
        raise_read_ahead(str(mnt))  # as nbdfs does: FUSE reads of up to 1 MiB
        yield mnt / "f", proc.pid
    finally:
        unmount(mnt)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


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


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds used and peak RSS in bytes of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return cpu, int(hwm.group(1)) * 1024 if hwm else 0


Row = tuple[str, str, Callable[[Path], float]]


def rows(size: int, runtime: int, rnd: Path) -> list[Row]:
    n = size // MiB
    wn = min(n, 256)
    return [
        (
            "seq read (dd 1M, cold)",
            "MB/s",
            lambda f: dd_rate(f"if={f}", "of=/dev/null", "bs=1M", f"count={n}") / 1e6,
        ),
        (
            "seq write + fsync (dd 1M)",
            "MB/s",
            lambda f: (
                dd_rate(f"if={rnd}", f"of={f}", "bs=1M", f"count={wn}", "conv=notrunc,fsync") / 1e6
            ),
        ),
        ("4K rand read QD1 (cold)", "IOPS", lambda f: fio_iops(f, 1, runtime, f"{n}M")),
        ("4K rand read QD16 (cold)", "IOPS", lambda f: fio_iops(f, 16, runtime, f"{n}M")),
        (
            "4K warm re-read, 64M set",
            "IOPS",
            lambda f: (fio_iops(f, 16, 2, "64M"), fio_iops(f, 16, runtime, "64M"))[1],
        ),
    ]


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
        "--rate",
        metavar="BITS",
        help="serve through nbdkit's rate filter, as over a link of BITS/s (e.g. 1G);"
        " shows what the bytes each tool fetches cost; no files written",
    )
    ap.add_argument(
        "--delay",
        type=float,
        metavar="MS",
        help="serve through nbdkit's delay filter: every read and write answered MS later,"
        " as from a distant server; no files written",
    )
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure a pyfuse3 file system that does nothing (bench/pyfuse3_ceiling.py):"
        " the fastest any pyfuse3 daemon can be here",
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
    size = parse_size(args.size)
    results: dict[str, dict[str, list[float]]] = {}
    units: dict[str, str] = {}
    rss: list[int] = []
    cpu_per_gib: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for sub in "abc":
            (work / sub).mkdir()
        rnd = work / "write.img"
        sh(
            "dd",
            "if=/dev/urandom",
            f"of={rnd}",
            "bs=1M",
            f"count={min(size // MiB, 256)}",
            "status=none",
        )
        with server(size, work, args.rate, args.delay) as uri:
            for r in range(args.rounds):
                raw = []
                for _ in range(1):
                    start = time.monotonic()
                    sh("nbdcopy", uri, "null:")
                    raw.append(size / (time.monotonic() - start) / 1e6)
                results.setdefault("nbdcopy to null (raw NBD)", {}).setdefault(
                    "nbdcopy", []
                ).extend(raw)
                units["nbdcopy to null (raw NBD)"] = "MB/s"
                for name, unit, measure in rows(size, args.runtime, rnd):
                    if args.only and args.only not in name:
                        continue
                    units[name] = unit
                    order: list[tuple[str, Callable[..., Any], tuple[object, ...]]] = [
                        ("nbdfuse", nbdfuse, ()),
                        ("nbdfs", nbdfs, (args.nbdfs_option,)),
                    ]
                    if args.ceiling:
                        order.append(("no-op pyfuse3", ceiling, (size,)))
                    if r % 2:
                        order.reverse()  # alternate who goes first
                    for tool, mount, extra in order:
                        drop_caches()
                        mnt = work / {"nbdfuse": "a", "nbdfs": "b"}.get(tool, "c")
                        with mount(uri, mnt, *extra) as (path, pid):
                            cpu0, _ = proc_stats(pid)
                            value = measure(path)
                            cpu1, hwm = proc_stats(pid)
                        results.setdefault(name, {}).setdefault(tool, []).append(value)
                        if tool == "nbdfs":
                            rss.append(hwm)
                            if unit == "MB/s":
                                moved = size if "read" in name else min(size, 256 * MiB)
                                cpu_per_gib.append((cpu1 - cpu0) / (moved / (1 << 30)))
                        print(f"round {r + 1}: {name:30} {tool:8} {value:12.1f} {unit}", flush=True)
    if args.only or args.rate or args.delay:
        for name, per in results.items():
            a, b = (statistics.median(per.get(t, [0])) for t in ("nbdfuse", "nbdfs"))
            if a and b:
                print(
                    f"{name}: nbdfuse {a:.0f}, nbdfs {b:.0f}, ratio {b / a:.2f}"
                    f" (rounds {_spread(per)}){_ceiling_text(per)}"
                )
        return
    table = report(results, units, rss, cpu_per_gib)
    print()
    print(table)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench.md").write_text(table + "\n")
    if not args.no_chart:
        chart(results, units, ROOT / "docs" / "bench.png")


def report(
    results: dict[str, dict[str, list[float]]],
    units: dict[str, str],
    rss: list[int],
    cpu: list[float],
) -> str:
    lines = [
        f"nbdfs vs nbdfuse, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, medians of {len(rss) // 5 or 1} rounds",
        "",
        "| workload | unit | nbdfuse | nbdfs | nbdfs/nbdfuse | range over rounds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    noop = any("no-op pyfuse3" in per for per in results.values())
    if noop:
        lines[-2] += " no-op pyfuse3 / nbdfuse |"
        lines[-1] += "---:|"
    raw = statistics.median(results.get("nbdcopy to null (raw NBD)", {}).get("nbdcopy", [0]))
    for name, per in results.items():
        if "nbdcopy" in per:
            lines.append(f"| {name} | MB/s | | | raw ceiling {raw:.0f} | |" + " |" * noop)
            continue
        a, b = statistics.median(per["nbdfuse"]), statistics.median(per["nbdfs"])
        line = f"| {name} | {units[name]} | {a:.0f} | {b:.0f} | {b / a:.2f} | {_spread(per)} |"
        if noop:
            line += f" {statistics.median(per.get('no-op pyfuse3', [0])) / a:.2f} |"
        lines.append(line)
    seq = statistics.median(results["seq read (dd 1M, cold)"]["nbdfs"])
    lines += [
        "",
        f"- nbdfs sequential read is {seq / raw:.0%} of the raw nbdcopy figure.",
        f"- nbdfs peak RSS: {max(rss) / MiB:.0f} MiB.",
        f"- nbdfs CPU time per GiB moved (sequential rows): {statistics.median(cpu):.2f} s.",
        "- Range: the lowest and highest nbdfs/nbdfuse ratio of one round (the two tools",
        "  measured back to back), which shows how much of a ratio is noise.",
    ]
    if noop:
        lines += [
            "- No-op pyfuse3: bench/pyfuse3_ceiling.py, a pyfuse3 file system that answers from",
            "  memory without any network: the most any pyfuse3 daemon can reach on this machine.",
        ]
    return "\n".join(lines)


def _ceiling_text(per: dict[str, list[float]]) -> str:
    if "no-op pyfuse3" not in per:
        return ""
    c, a = statistics.median(per["no-op pyfuse3"]), statistics.median(per["nbdfuse"])
    return f"; no-op pyfuse3 {c:.0f}, {c / a:.2f}x nbdfuse"


def _spread(per: dict[str, list[float]]) -> str:
    ratios = [b / a for a, b in zip(per["nbdfuse"], per["nbdfs"], strict=True) if a]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def chart(results: dict[str, dict[str, list[float]]], units: dict[str, str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    names = [n for n in results if "nbdcopy" not in results[n]]
    ratios = [
        statistics.median(results[n]["nbdfs"]) / statistics.median(results[n]["nbdfuse"])
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bars = ax.barh(names, ratios, color=["#2a7" if r >= 1 else "#c44" for r in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], padding=3)
    ax.set_xlabel("nbdfs / nbdfuse (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
