"""Before the mount is up: every wait bounded, every option checked, every error one line."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdfs.cli import check_mountpoint
from nbdfs.errors import NbdError

from .conftest import NBDFS, run_nbdfs
from .servers import nbdkit


@contextlib.contextmanager
def peer(behaviour: str) -> Iterator[str]:
    """A purpose-built peer no real server is: ``silent`` accepts and never speaks,
    ``trickle`` sends "NBDMAGIC" one byte a second."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            if behaviour == "trickle":
                threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    def trickle(conn: socket.socket) -> None:
        for byte in b"NBDMAGIC":
            if stop.wait(1):
                return
            with contextlib.suppress(OSError):
                conn.send(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("behaviour", ["silent", "trickle"])
@pytest.mark.parametrize("command", ["list", "mount"])
def test_a_peer_that_never_finishes_the_handshake_times_out(
    tmp: Path, behaviour: str, command: str
) -> None:
    with peer(behaviour) as address:
        args = [command, "--timeout", "2", address] + ([str(tmp)] if command == "mount" else [])
        start = time.monotonic()
        proc = run_nbdfs(*args, check=False, timeout=30)
        took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "within 2s" in proc.stderr, proc.stderr
    assert "server's greeting" in proc.stderr, proc.stderr
    assert took < 10


BAD_OPTIONS = [
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["-o", "timeout=nan"], "--timeout"),
    (["--uid", "-1"], "--uid"),
    (["--uid", "1099511627776"], "--uid"),
    (["-o", "uid=4294967295"], "--uid"),
    (["--gid", "x"], "--gid"),
    (["--refresh", "nan"], "--refresh"),
    (["--poll-max", "inf"], "--poll-max"),
    (["--cache-size", "infG"], "bad size"),
    (["--cache-size", "nan"], "bad size"),
    (["-C", "0"], "--connections"),
    (["-o", "connections=many"], "--connections"),
    (["-o", "connections"], "needs a value"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
def test_a_bad_option_is_one_line_and_exit_2(tmp: Path, options: list[str], named: str) -> None:
    proc = run_nbdfs("mount", *options, "127.0.0.1:1", str(tmp), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("nbdfs: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert named in proc.stderr


def test_a_log_file_that_cannot_be_written_is_one_line(tmp: Path) -> None:
    proc = run_nbdfs(
        "mount", "--log-file", "/nonexistent/dir/log", "127.0.0.1:1", str(tmp), check=False
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot write the log file /nonexistent/dir/log" in proc.stderr


def test_foreground_honours_the_log_file(tmp: Path) -> None:
    log = tmp / "fg.log"
    with nbdkit("memory", "1M") as srv:
        mnt = tmp / "mnt"
        mnt.mkdir()
        with subprocess.Popen(
            [*NBDFS, "mount", "-f", "-v", "--log-file", str(log), srv.address, str(mnt)],
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                for _ in range(200):
                    if (mnt / "%default%").exists():
                        break
                    time.sleep(0.05)
                assert (mnt / "%default%").exists()
                proc.terminate()
                _, err = proc.communicate(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert proc.returncode == 0 and err == ""
    assert "mounted 1 export(s)" in log.read_text()


def test_a_mountpoint_behind_a_closed_directory_is_not_called_missing(tmp: Path) -> None:
    closed = tmp / "closed"
    (closed / "mnt").mkdir(parents=True)
    closed.chmod(0o700)
    tmp.chmod(0o755)
    tmp.parent.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # as nobody, who may not enter the directory
        code = 3
        try:
            os.setresuid(65534, 65534, 65534)
            check_mountpoint("closed/mnt", str(closed / "mnt"))
        except NbdError as exc:
            code = 0 if "permission denied" in str(exc) and "exist" not in str(exc) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
