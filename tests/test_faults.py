"""Real faults against real servers: restarts, stalls, errors, a server gone for good.

Each row of docs/faults.md is one test here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import NBDFS, run_nbdfs
from .mounts import mounted
from .servers import Server, free_port, nbdkit, slow_flush_disk

pytestmark = pytest.mark.fuse
MiB = 1 << 20


def make_disk(tmp: Path, size: int) -> Path:
    exports = tmp / "exports"
    exports.mkdir(exist_ok=True)
    (exports / "disk").write_bytes(bytes(size))
    return exports


class Restartable:
    """An nbdkit that a test can SIGKILL and start again on the same port."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.port = free_port()
        self._stack = contextlib.ExitStack()
        self.server: Server = self._stack.enter_context(nbdkit(*args, port=self.port))

    def kill(self) -> None:
        self.server.kill(signal.SIGKILL)
        self._stack.close()

    def start(self) -> None:
        self.server = self._stack.enter_context(nbdkit(*self.args, port=self.port))

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def writeback(exports: Path, *tls: str, pause: Path | None = None) -> Iterator[Restartable]:
    """nbdkit whose cache holds writes until NBD_CMD_FLUSH: a restart loses them. With
    ``pause`` (a control socket), the pause filter below the cache: paused, its writing
    back, and so a flush, waits."""
    below = ["--filter=pause"] if pause else []
    control = [f"pause-control={pause}"] if pause else []
    srv = Restartable(
        *tls, "--filter=cache", *below, "file", f"dir={exports}", "cache=writeback", *control
    )
    try:
        yield srv
    finally:
        srv.close()


def test_unflushed_writes_survive_a_server_restart(tmp: Path) -> None:
    exports = make_disk(tmp, 16 * MiB)
    data = os.urandom(8 * MiB)
    with (
        writeback(exports) as srv,
        mounted(srv.server.address, tmp / "mnt", "--timeout", "30") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            for i in range(0, len(data), MiB):
                os.pwrite(fd, data[i : i + MiB], i)
            # The writes were acknowledged but sit in the server's volatile cache.
            assert (exports / "disk").read_bytes()[: len(data)] != data
            srv.kill()
            srv.start()
            os.fsync(fd)  # replays the journal on a new connection, then flushes
        finally:
            os.close(fd)
        assert (exports / "disk").read_bytes()[: len(data)] == data
        assert b"replaying" in (tmp / "mnt.log").read_bytes()


def test_a_flush_cut_short_by_the_server_s_death_replays_the_journal(tmp: Path) -> None:
    """fsync's NBD_CMD_FLUSH is on the wire when the server dies with the writes in its
    volatile cache: the journal is replayed on a new connection and flushed, never
    forgotten as if that flush had happened (before: fsync succeeded and the writes were
    gone)."""
    exports = make_disk(tmp, 16 * MiB)
    data = os.urandom(4 * MiB)
    control = tmp / "pause.sock"
    errors: list[BaseException] = []
    with (
        writeback(exports, pause=control) as srv,
        mounted(srv.server.address, tmp / "mnt", "--timeout", "30") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            for i in range(0, len(data), MiB):
                os.pwrite(fd, data[i : i + MiB], i)
            PauseControl(control).send(b"p")

            def sync() -> None:
                try:
                    os.fsync(fd)
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=sync)
            thread.start()
            time.sleep(0.5)  # the flush is sent and held
            srv.kill()
            control.unlink(missing_ok=True)
            srv.start()
            thread.join(60)
            assert not thread.is_alive()
        finally:
            os.close(fd)
    assert not errors, errors
    assert (exports / "disk").read_bytes()[: len(data)] == data
    assert b"replaying" in (tmp / "mnt.log").read_bytes()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_server_killed_mid_write_and_restarted(tmp: Path, tls: bool) -> None:
    """Over TLS too: the sessions (ssl.SSLSocket on the descriptor) break mid-record, and
    new ones replay the journal."""
    exports = make_disk(tmp, 64 * MiB)
    data = os.urandom(48 * MiB)
    errors: list[BaseException] = []
    progress = threading.Event()
    server_tls: list[str] = []
    client_tls: list[str] = []
    if tls:
        pki = tmp / "pki"
        run_nbdfs("tls-init", str(pki), "--host", "127.0.0.1")
        server_tls = ["--tls=require", f"--tls-certificates={pki}"]
        client_tls = ["--tls=require", "--tls-certificates", str(pki)]
    with (
        writeback(exports, *server_tls) as srv,
        mounted(srv.server.address, tmp / "mnt", "--timeout", "30", *client_tls) as mnt,
    ):

        def writer() -> None:
            try:
                fd = os.open(mnt / "disk", os.O_WRONLY)
                try:
                    for i in range(0, len(data), MiB):
                        os.pwrite(fd, data[i : i + MiB], i)
                        if i >= 8 * MiB:
                            progress.set()
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        assert progress.wait(30)
        srv.kill()
        time.sleep(1)  # the server is away for a while
        srv.start()
        thread.join(120)
        assert not thread.is_alive()
        assert not errors, errors
        assert (exports / "disk").read_bytes()[: len(data)] == data


def test_error_filter_never_returns_wrong_bytes(tmp: Path) -> None:
    exports = make_disk(tmp, 4 * MiB)
    block = 64 * 1024
    expected = {i: os.urandom(block) for i in range(64)}
    with (
        nbdkit(
            "--filter=error",
            "file",
            f"dir={exports}",
            "error-pread-rate=0.2",
            "error-pwrite-rate=0.2",
        ) as srv,
        mounted(srv.address, tmp / "mnt", "--cache-size=0") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
        written = set()
        try:
            buf = bytearray(block)
            for i, chunk in expected.items():
                try:
                    os.pwrite(fd, chunk, i * block)
                    written.add(i)
                except OSError as exc:
                    assert exc.errno == errno.EIO
            failures = 0
            for _ in range(3):
                for i in written:
                    try:
                        n = os.preadv(fd, [buf], i * block)
                        assert n == block and bytes(buf) == expected[i]
                    except OSError as exc:
                        assert exc.errno == errno.EIO
                        failures += 1
        finally:
            os.close(fd)
    assert 0 < len(written) < 64 and failures > 0  # the filter really injected errors
    on_disk = (exports / "disk").read_bytes()
    for i in written:
        assert on_disk[i * block : (i + 1) * block] == expected[i]


def test_eshutdown_means_reconnect_and_retry(tmp: Path) -> None:
    exports = make_disk(tmp, 4 * MiB)
    data = os.urandom(2 * MiB)
    with (
        nbdkit(
            "--filter=error",
            "file",
            f"dir={exports}",
            "error-pwrite=ESHUTDOWN",
            "error-pwrite-rate=0.3",
        ) as srv,
        mounted(srv.address, tmp / "mnt") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            for i in range(0, len(data), 65536):
                assert os.pwrite(fd, data[i : i + 65536], i) == 65536
            os.fsync(fd)
        finally:
            os.close(fd)
        log = (tmp / "mnt.log").read_text()
    assert "shutting down" in log
    assert (exports / "disk").read_bytes()[: len(data)] == data


class PauseControl:
    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, command: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.path))
            s.sendall(command)
            assert s.recv(1) == command.upper()


def test_stalled_server_gives_eio_after_timeout_and_recovers(tmp: Path) -> None:
    control = tmp / "pause.sock"
    with nbdkit("--filter=pause", "memory", "4M", f"pause-control={control}") as srv:
        pause = PauseControl(control)
        with mounted(srv.address, tmp / "mnt", "--timeout", "2", "--cache-size=0") as mnt:
            path = mnt / "%default%"
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                buf = bytearray(4096)
                os.pwrite(fd, b"a" * 4096, 0)
                pause.send(b"p")
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    os.preadv(fd, [buf], 0)
                assert info.value.errno == errno.EIO
                assert time.monotonic() - start < 10
                # The mount still answers from its own state.
                assert os.listdir(mnt) == ["%default%"] and path.stat().st_size == 4 * MiB
                os.statvfs(mnt)
                pause.send(b"r")
                assert os.preadv(fd, [buf], 0) == 4096 and bytes(buf) == b"a" * 4096
            finally:
                os.close(fd)


def test_an_fsync_after_one_that_timed_out_still_flushes(tmp: Path) -> None:
    """A flush that outlives --timeout fails fsync with EIO and keeps the writes unflushed:
    the next fsync must send NBD_CMD_FLUSH again (before: the timed-out flush had taken its
    connection off the dirty list, so the next fsync sent nothing, forgot the writes and
    succeeded)."""
    disk, stall, flushes = tmp / "disk.img", tmp / "stall", tmp / "flushes"
    disk.write_bytes(bytes(4 * MiB))
    flushes.touch()
    with (
        nbdkit(
            *slow_flush_disk(disk, f"echo >> {flushes}; if [ -e {stall} ]; then sleep 4; fi")
        ) as srv,
        mounted(srv.address, tmp / "mnt", "--timeout", "1") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
            stall.touch()
            with pytest.raises(OSError) as info:
                os.fsync(fd)
            assert info.value.errno == errno.EIO
            stall.unlink()
            before = flushes.read_text().count("\n")
            os.fsync(fd)
            assert flushes.read_text().count("\n") > before
        finally:
            os.close(fd)


def test_a_slow_server_within_the_timeout_is_waited_for(tmp: Path) -> None:
    """Replies taking a second, with --timeout 3: slow is not stalled, nothing times out
    (the watchdog that bounds each reply must not fire early)."""
    with (
        nbdkit("--filter=delay", "memory", "4M", "delay-read=1") as srv,
        mounted(srv.address, tmp / "mnt", "--timeout", "3", "--cache-size=0") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = bytearray(4096)
            for off in (0, 8192, 16384):
                assert os.preadv(fd, [buf], off) == 4096
        finally:
            os.close(fd)
        status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
        assert status["exports"][0]["timeouts"] == 0 and status["exports"][0]["errors"] == 0


def test_server_gone_for_good_gives_eio_and_unmount_works(tmp: Path) -> None:
    with nbdkit("memory", "4M") as srv:
        mnt_cm = mounted(srv.address, tmp / "mnt", "--timeout", "2", "--cache-size=0")
        mnt = mnt_cm.__enter__()
        try:
            fd = os.open(mnt / "%default%", os.O_RDWR | os.O_DIRECT)
            buf = bytearray(4096)
            assert os.preadv(fd, [buf], 0) == 4096
            srv.kill(signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                os.preadv(fd, [buf], 8192)
            assert info.value.errno == errno.EIO and time.monotonic() - start < 10
            os.close(fd)
        finally:
            mnt_cm.__exit__(None, None, None)
    with open("/proc/self/mounts") as f:
        assert str(mnt) not in f.read()


def test_enospc_from_a_full_server(tmp: Path) -> None:
    with nbdkit("full", "1M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        fd = os.open(mnt / "%default%", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 4096, 0)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert (mnt / "%default%").read_bytes() == bytes(MiB)


def test_export_replaced_by_a_different_one_is_refused(tmp: Path) -> None:
    port = free_port()
    with (
        nbdkit("memory", "4M", port=port) as srv,
        mounted(srv.address, tmp / "mnt", "--timeout", "5", "--cache-size=0") as mnt,
    ):
        fd = os.open(mnt / "%default%", os.O_RDWR | os.O_DIRECT)
        try:
            buf = bytearray(4096)
            assert os.preadv(fd, [buf], 0) == 4096
            srv.kill(signal.SIGKILL)
            with nbdkit("memory", "8M", port=port):
                with pytest.raises(OSError) as info:
                    os.preadv(fd, [buf], 0)
                assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert "changed on the server" in (tmp / "mnt.log").read_text()


def _direct_buffer(fill: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    buf.write(fill * (MiB // len(fill)))
    return buf


def test_replay_never_writes_an_older_write_over_a_newer_fua_one(tmp: Path) -> None:
    """dd oflag=direct of A, then dd oflag=direct,dsync of B at the same offset, then the
    server restarts: the replay of the unflushed A must not land over the durable B."""
    exports = make_disk(tmp, 4 * MiB)
    srv = Restartable("file", f"dir={exports}")
    try:
        with mounted(srv.server.address, tmp / "mnt", "--timeout", "30") as mnt:
            path = mnt / "disk"
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            try:
                assert os.pwrite(fd, _direct_buffer(b"A"), 0) == MiB
            finally:
                os.close(fd)
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
            try:
                assert os.pwrite(fd, _direct_buffer(b"B"), 0) == MiB
            finally:
                os.close(fd)
            assert (exports / "disk").read_bytes()[:MiB] == b"B" * MiB
            srv.kill()
            srv.start()
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                buf = _direct_buffer(b"\0")
                assert os.preadv(fd, [buf], 0) == MiB  # reconnects (and replays)
                assert buf[:] == b"B" * MiB
                os.fsync(fd)
            finally:
                os.close(fd)
            assert (exports / "disk").read_bytes()[:MiB] == b"B" * MiB
    finally:
        srv.close()


@pytest.mark.parametrize("cache", ["0", "64M"])
# (nbdkit 1.32 sends EOVERFLOW and ENOTSUP from a read as EINVAL, so these four)
@pytest.mark.parametrize("code", ["EPERM", "ENOSPC", "EINVAL", "ENOMEM"])
def test_a_read_error_keeps_its_errno_through_the_cache(tmp: Path, code: str, cache: str) -> None:
    with (
        nbdkit("--filter=error", "memory", "4M", f"error={code}", "error-pread-rate=100%") as srv,
        mounted(srv.address, tmp / "mnt", f"--cache-size={cache}") as mnt,
    ):
        path = mnt / "%default%"
        for flags in (os.O_RDONLY | os.O_DIRECT, os.O_RDONLY):
            fd = os.open(path, flags)
            try:
                for offset in (0, 1 << 20):  # a random read, then a sequential one
                    with pytest.raises(OSError) as info:
                        os.preadv(fd, [_direct_buffer(b"\0")], offset)
                    assert info.value.errno == getattr(errno, code), info.value.strerror
            finally:
                os.close(fd)


def test_unmount_with_unflushed_data_and_the_server_gone_says_so(tmp: Path) -> None:
    """`nbdfs umount` flushes first and, when that fails, keeps the mount and says why; an
    unmount that goes ahead anyway ends the daemon with status 1 and a line on stderr."""
    exports = make_disk(tmp, 4 * MiB)
    mnt = tmp / "mnt"
    mnt.mkdir()
    with writeback(exports) as srv:
        cmd = [*NBDFS, "mount", "-f", "--timeout", "2", srv.server.address, str(mnt)]
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
            try:
                for _ in range(200):
                    if (mnt / "disk").exists():
                        break
                    time.sleep(0.05)
                fd = os.open(mnt / "disk", os.O_WRONLY | os.O_DIRECT)
                try:
                    assert os.pwrite(fd, _direct_buffer(b"u"), 0) == MiB
                finally:
                    os.close(fd)
                srv.kill()
                refused = run_nbdfs("umount", str(mnt), check=False, timeout=60)
                assert refused.returncode == 1, refused.stderr
                assert refused.stderr.count("\n") == 1
                assert "not unmounting" in refused.stderr and "1.0 MiB" in refused.stderr
                assert (mnt / "disk").exists()  # still mounted
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
                _, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert proc.returncode == 1
    assert "final flush failed: 1048576 bytes of export 'disk' may be lost" in err, err


def test_a_different_disk_behind_the_same_name_fails_the_export(tmp: Path) -> None:
    """Restarted with another file of the same size, while 1 MiB was unflushed: nothing is
    replayed into it, and every read (cached or not), write and fsync fails with EIO."""
    exports = make_disk(tmp, 4 * MiB)
    (exports / "disk").write_bytes(os.urandom(4 * MiB))
    with (
        writeback(exports) as srv,
        mounted(srv.server.address, tmp / "mnt", "--timeout", "10") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
        try:
            buf = _direct_buffer(b"\0")
            assert os.preadv(fd, [buf], 0) == MiB  # cached now
            assert os.pwrite(fd, _direct_buffer(b"w"), 2 * MiB) == MiB  # unflushed
            srv.kill()
            other = os.urandom(4 * MiB)
            (exports / "disk").write_bytes(other)
            srv.start()
            for offset in (MiB, 0):  # not cached, then cached
                with pytest.raises(OSError) as info:
                    os.preadv(fd, [buf], offset)
                assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as info:
                os.pwrite(fd, _direct_buffer(b"x"), 3 * MiB)
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as info:
                os.fsync(fd)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (exports / "disk").read_bytes() == other  # nothing replayed or written into it
        log = (tmp / "mnt.log").read_text()
        assert "changed on the server while it was disconnected" in log
        assert "remount" in log and "replaying" not in log
