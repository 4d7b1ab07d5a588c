#!/usr/bin/env python3
"""What a TLS handshake costs nbdfs per connection.

    .venv/bin/python bench/tls_handshake.py [--count 50]

Starts nbdkit twice on loopback (plain, and --tls=require with certificates from
`nbdfs tls-init`) and times full NBD sessions (connect, handshake, NBD_OPT_GO,
NBD_CMD_DISC): plaintext; TLS building its SSL context each time (as a new `nbdfs list`
does); TLS with the context shared (as the connections of one mount do). It also reports
whether the server let a session be resumed (nbdkit 1.32 issues no session tickets).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from nbdfs.connection import probe_export
from nbdfs.pki import create
from nbdfs.session import TlsMode
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig


def start(port: int, tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    pidfile = tmp / f"{port}.pid"
    proc = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-P",
            str(pidfile),
            *args,
            "memory",
            "1M",
        ]
    )
    while not (pidfile.exists() and pidfile.read_text().strip()):
        time.sleep(0.02)
    return proc


async def timed(target: str, count: int, make: Callable[[], TlsConfig]) -> tuple[list[float], int]:
    times, resumed = [], 0
    for _ in range(count):
        tls = make()
        start = time.perf_counter()
        session = await probe_export(parse_target(target), tls, "")
        times.append((time.perf_counter() - start) * 1000)
        resumed += session.tls and bool(tls.sessions)
    return times, resumed


async def main(count: int, tmp: Path) -> None:
    pki = tmp / "pki"
    create(pki, ["127.0.0.1"])
    procs = [start(10951, tmp), start(10952, tmp, "--tls=require", f"--tls-certificates={pki}")]
    try:
        shared = TlsConfig(TlsMode.REQUIRE, str(pki))
        rows = [
            ("plaintext", "127.0.0.1:10951", lambda: TlsConfig()),
            (
                "TLS, new context each time",
                "127.0.0.1:10952",
                lambda: TlsConfig(TlsMode.REQUIRE, str(pki)),
            ),
            ("TLS, shared context (one mount)", "127.0.0.1:10952", lambda: shared),
        ]
        print(f"{'NBD session (connect .. GO .. DISC)':40} {'median ms':>10} {'p90 ms':>8}")
        for name, target, make in rows:
            times, _ = await timed(target, count, make)
            times.sort()
            print(f"{name:40} {statistics.median(times):10.2f} {times[int(len(times) * 0.9)]:8.2f}")
        print(f"sessions resumable (server issued a ticket): {bool(shared.sessions)}")
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        trio.run(main, args.count, Path(d))
    sys.exit(0)
