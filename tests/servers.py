"""Real NBD servers on free loopback ports, started and always stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The tool's path; skip when absent, but fail under CI, where every tool must be there."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") or os.environ.get("NBDFS_REQUIRE_TOOLS"):
            pytest.fail(
                f"{name} is not installed, and CI must run every test (run scripts/install)"
            )
        pytest.skip(f"{name} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, export: str | None = None, scheme: str = "nbd") -> str:
        from urllib.parse import quote

        base = f"{scheme}://127.0.0.1:{self.port}"
        return base if export is None else f"{base}/{quote(export, safe='')}"

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
                for _ in range(200):
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGKILL)


@contextlib.contextmanager
def _popen(cmd: Sequence[str], port: int, pidfile: Path | None = None) -> Iterator[Server]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    server = Server(port, proc)
    try:
        if pidfile is None:
            wait_listening(port, proc)
        else:
            wait_pidfile(pidfile, proc)
        yield server
    finally:
        server.kill()


def wait_pidfile(pidfile: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """nbdkit writes its -P file once it accepts connections; no probe connection needed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        if pidfile.exists() and pidfile.read_text().strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"server not ready after {timeout}s")


@contextlib.contextmanager
def nbdkit(*args: str, port: int | None = None, unix: Path | None = None) -> Iterator[Server]:
    """``nbdkit PLUGIN ARGS...`` in the foreground on 127.0.0.1 (or on Unix socket ``unix``)."""
    exe = require_tool("nbdkit")
    port = 0 if unix is not None else port or free_port()
    listen = ["-U", str(unix)] if unix is not None else ["-i", "127.0.0.1", "-p", str(port)]
    with tempfile.TemporaryDirectory() as tmp:
        pidfile = Path(tmp) / "nbdkit.pid"
        cmd = [exe, "--foreground", "--exit-with-parent", *listen, "-P", str(pidfile), *args]
        with _popen(cmd, port, pidfile) as server:
            yield server


def slow_flush_disk(disk: Path, flush: str) -> list[str]:
    """nbdkit arguments serving the file ``disk`` through the eval plugin, with the shell
    command ``flush`` as its flush (e.g. ``sleep 1``) and requests run in parallel, so
    writes go on while a flush takes its time (no filter can slow a flush down)."""
    return [
        "eval",
        f"get_size=stat -c %s {disk}",
        f"pread=dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={disk} seek=$4 oflag=seek_bytes conv=notrunc status=none",
        f"flush={flush}",
        "thread_model=echo parallel",
    ]


@contextlib.contextmanager
def qemu_nbd(image: Path, name: str, fmt: str = "qcow2", *extra: str) -> Iterator[Server]:
    """qemu-nbd serving ``image`` as export ``name``, to several clients, until stopped."""
    exe = require_tool("qemu-nbd")
    port = free_port()
    cmd = [
        exe,
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-x",
        name,
        "-f",
        fmt,
        "--persistent",
        "--shared=16",
        *extra,
        str(image),
    ]
    with _popen(cmd, port) as server:
        yield server


@contextlib.contextmanager
def nbd_server(
    tmp: Path, exports: dict[str, dict[str, str]], generic: dict[str, str] | None = None
) -> Iterator[Server]:
    """The reference nbd-server with one config section per export. It daemonizes."""
    exe = require_tool("nbd-server")
    port = free_port()
    lines = [
        "[generic]",
        f"port = {port}",
        "listenaddr = 127.0.0.1",
        "allowlist = true",
        "user = root",
        "group = root",
    ]
    lines += [f"{k} = {v}" for k, v in (generic or {}).items()]
    for name, opts in exports.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in opts.items()]
    config = tmp / "nbd-server.conf"
    config.write_text("\n".join(lines) + "\n")
    pidfile = tmp / "nbd-server.pid"
    subprocess.run(
        [exe, "-C", str(config), "-p", str(pidfile)], check=True, stdin=subprocess.DEVNULL
    )
    server = Server(port)
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                server.pid = int(pidfile.read_text())
                break
            time.sleep(0.05)
        wait_listening(port)
        yield server
    finally:
        server.kill()
