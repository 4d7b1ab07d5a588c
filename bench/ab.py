#!/usr/bin/env python3
"""Paired A/B of two nbdfs builds on the same nbdkit server, in one run.

    sudo .venv/bin/python bench/ab.py BASE [NEW] [--rounds 6] [--runtime 5] [--only TEXT]
                                      [--delay MS] [--tls] [--base-pyfuse3 DIR]
                                      [--nbdfs-option=OPT ...]

BASE and NEW are git revisions (NEW defaults to the work tree as it is, uncommitted
changes included). Each is unpacked into a directory of its own and run with this venv's
Python and PYTHONPATH pointing at it. Every round mounts each build afresh (an empty
cache), drops the page cache (and before a sequential row touches memory, so that the
page cache it fills is backed by the host: compare.back_free_memory and
compare.held_page_reporting), and runs the same
job on each, alternating which goes first: 4 KiB random read at queue depth 1 and 16
(fio, O_DIRECT, whole export), a warm re-read of a 64 MiB set at depth 16, dd
sequential read (1 MiB) and sequential write + fsync. Prints, per row, the medians, the
NEW/BASE ratio of the medians and the range of the per-round ratios (the noise), and the
daemon's CPU time per request (from /proc) for each build (the warm row's cache fill
before its figure not counted).

``--base-pyfuse3 DIR``: run BASE with the ``pyfuse3`` package in DIR instead of the venv's
(e.g. the patch series without its newest patch, built with ``pip install --target DIR``):
an A/B of a pyfuse3 patch.

Needs root (to drop the page cache), nbdkit, fio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (
    MiB,
    back_free_memory,
    drop_caches,
    held_page_reporting,
    make_pki,
    nbdfs,
    parse_size,
    proc_stats,
    rows,
    server,
    sh,
    write_source,
)

ROOT = Path(__file__).resolve().parent.parent


def unpack(rev: str | None, into: Path) -> Path:
    """The tree of ``rev`` (None: the work tree, uncommitted changes included)."""
    into.mkdir()
    if rev is None:
        files = sh("git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "nbdfs")
        for name in files.split():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / name).read_bytes())
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "nbdfs"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base", help="git revision A (e.g. HEAD~3)")
    ap.add_argument("new", nargs="?", help="git revision B (default: the work tree)")
    ap.add_argument("--size", default="512M", help="export size (default 512M)")
    ap.add_argument(
        "--rounds", type=int, default=6, help="rounds (even: each build goes first as often)"
    )
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio figure")
    ap.add_argument("--only", metavar="TEXT", help="just the rows whose name contains TEXT")
    ap.add_argument(
        "--delay", type=float, metavar="MS", help="serve through nbdkit's delay filter (a link)"
    )
    ap.add_argument("--tls", action="store_true", help="over TLS (nbdfs tls-init certificates)")
    ap.add_argument(
        "--base-pyfuse3", type=Path, metavar="DIR", help="BASE runs the pyfuse3 package in DIR"
    )
    ap.add_argument(
        "--nbdfs-option", action="append", default=[], help="extra mount option, both builds"
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    names = {"A": args.base, "B": args.new or "work tree"}
    values: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    with (
        held_page_reporting() as reporting,
        tempfile.TemporaryDirectory() as tmp,
        write_source(size) as rnd,
    ):
        print(reporting, flush=True)
        work = Path(tmp)
        trees = {"A": unpack(args.base, work / "A"), "B": unpack(args.new, work / "B")}
        if args.base_pyfuse3:  # (first on BASE's PYTHONPATH)
            shutil.copytree(args.base_pyfuse3 / "pyfuse3", trees["A"] / "pyfuse3")
            names["A"] += f" with {args.base_pyfuse3}"
        for m in ("ma", "mb"):
            (work / m).mkdir()
        pki = make_pki(work) if args.tls else None
        extra = list(args.nbdfs_option) + (["--tls-certificates", str(pki)] if pki else [])
        with server(size, work, delay_ms=args.delay, tls=pki) as uri:
            for r in range(args.rounds):
                for name, unit, measure, prepare, moved in rows(size, args.runtime, rnd):
                    if args.only and args.only not in name:
                        continue
                    order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
                    for build in order:
                        drop_caches()
                        mnt = work / ("ma" if build == "A" else "mb")
                        with nbdfs(uri, mnt, extra, trees[build]) as (path, pid):
                            if unit == "MB/s":  # (the rows through the page cache)
                                back_free_memory(size)
                            if prepare is not None:
                                prepare(path)
                            cpu0, _ = proc_stats(pid)
                            value = measure(path)
                            cpu1, _ = proc_stats(pid)
                        # (per MiB moved, or per fio request)
                        requests = moved / MiB if moved else value * args.runtime
                        values.setdefault(name, {}).setdefault(build, []).append(value)
                        cpu.setdefault(name, {}).setdefault(build, []).append(
                            (cpu1 - cpu0) / max(requests, 1) * 1e6
                        )
                        print(f"round {r + 1}: {name:28} {build} {value:10.1f} {unit}", flush=True)
    print(f"\nA = {names['A']}, B = {names['B']}; {args.rounds} rounds, medians")
    print(f"{'row':28} {'A':>10} {'B':>10} {'B/A':>6}  {'per-round B/A':>14}  CPU us/req A, B")
    for name, per in values.items():
        a, b = statistics.median(per["A"]), statistics.median(per["B"])
        ratios = sorted(y / x for x, y in zip(per["A"], per["B"], strict=True) if x)
        ca, cb = (statistics.median(cpu[name][k]) for k in ("A", "B"))
        print(
            f"{name:28} {a:10.1f} {b:10.1f} {b / a:6.2f}  {ratios[0]:.2f}-{ratios[-1]:.2f}"
            f"       {ca:.0f}, {cb:.0f}"
        )


if __name__ == "__main__":
    main()
