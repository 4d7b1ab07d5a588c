"""Real FUSE mounts and loop devices for tests, always torn down, even when a test fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .conftest import run_nbdfs
from .servers import require_tool


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def unmount(path: Path) -> None:
    if not _mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
    for _ in range(100):
        if not _mounted(path):
            return
        time.sleep(0.05)


def _daemon_pids(path: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"nbdfs mount .* {path}$"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


@contextlib.contextmanager
def mounted(
    target: str, mountpoint: Path, *options: str, log: Path | None = None
) -> Iterator[Path]:
    """``nbdfs mount TARGET MOUNTPOINT`` (daemonized), unmounted and waited for afterwards."""
    require_tool("fusermount3")
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.parent / f"{mountpoint.name}.log"
    run_nbdfs("mount", "-v", "--log-file", str(log), *options, target, str(mountpoint))
    try:
        assert _mounted(mountpoint), "nbdfs mount exited 0 but nothing is mounted"
        yield mountpoint
    finally:
        pids = _daemon_pids(mountpoint)
        unmount(mountpoint)
        deadline = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)


@contextlib.contextmanager
def loop_device(file: Path, *options: str) -> Iterator[str]:
    require_tool("losetup")
    dev = subprocess.run(
        ["losetup", "-f", "--show", *options, str(file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def fs_mounted(dev: str, path: Path, *options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, dev, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
