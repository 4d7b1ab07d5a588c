"""Discard, zeroing and holes through the pyfuse3 patch series (contrib/pyfuse3), against
real servers: what reaches the server is read from nbdkit's log filter, holes are compared
with nbdinfo --map of the same export."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from .mounts import fs_mounted, loop_device, mounted
from .servers import nbd_server, nbdkit, qemu_nbd, require_tool

pytestmark = pytest.mark.fuse
MiB = 1 << 20
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE = 0x01, 0x02, 0x10, 0x08
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(autouse=True)
def _patched_pyfuse3() -> None:
    for name in ("fallocate", "lseek", "max_background"):
        if not hasattr(pyfuse3.Operations, name):
            pytest.fail(f"pyfuse3 lacks {name}: run scripts/install (contrib/pyfuse3)")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def events(log: Path, kind: str) -> list[tuple[int, int, str]]:
    """(offset, count, the rest) of each request of ``kind`` (Trim, Zero, Write) logged."""
    out = []
    for line in log.read_text().splitlines():
        m = re.search(rf" {kind} id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)(.*)", line)
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    return out


@contextlib.contextmanager
def logged_memory(tmp_path: Path, size: str, *options: str) -> Iterator[tuple[Path, Path]]:
    """nbdkit memory SIZE behind its log filter, mounted: (mountpoint, the log)."""
    log = tmp_path / "nbdkit.log"
    with (
        nbdkit("--filter=log", "memory", size, f"logfile={log}") as srv,
        mounted(srv.address, tmp_path / "mnt", *options) as mnt,
    ):
        yield mnt, log


def filled(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def test_punch_hole_and_zero_range_reach_the_server_and_read_back_as_zeros(tmp_path: Path) -> None:
    with logged_memory(tmp_path, "16M") as (mnt, log):
        path = mnt / "%default%"
        filled(path, 8 * MiB)
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, MiB, MiB)
            fallocate(fd, ZERO_RANGE | KEEP_SIZE, 3 * MiB + 100, 300000)  # unaligned edges
            assert os.pread(fd, MiB, MiB) == bytes(MiB)
            assert os.pread(fd, 300000, 3 * MiB + 100) == bytes(300000)
            assert os.pread(fd, 100, 3 * MiB) != bytes(100)  # the bytes before it are kept
            with pytest.raises(OSError) as info:
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 15 * MiB, 2 * MiB)  # past the end
            assert info.value.errno == 22  # EINVAL, as a block device
            with pytest.raises(OSError) as info:
                fallocate(fd, COLLAPSE_RANGE, 0, MiB)
            assert info.value.errno == 95  # EOPNOTSUPP
            fallocate(fd, 0, 0, MiB)  # allocation inside the disk: nothing to do
        finally:
            os.close(fd)
        assert [(o, n) for o, n, _ in events(log, "Trim")] == [(MiB, MiB)]
        zeros = events(log, "Zero")
        assert zeros and zeros[0][0] >= 3 * MiB + 100 and "fua=0" in zeros[0][2]


def test_an_o_dsync_handle_trims_with_fua(tmp_path: Path) -> None:
    with logged_memory(tmp_path, "4M") as (mnt, log):
        fd = os.open(mnt / "%default%", os.O_RDWR | os.O_DSYNC)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, MiB)
        finally:
            os.close(fd)
    (trim,) = events(log, "Trim")
    assert "fua=1" in trim[2]


def test_fstrim_on_ext4_over_a_loop_device_trims_at_the_server(tmp_path: Path) -> None:
    require_tool("fstrim")
    log = tmp_path / "nbdkit.log"
    with (
        nbdkit("--filter=log", "memory", "128M", f"logfile={log}") as srv,
        mounted(srv.address, tmp_path / "mnt") as mnt,
        loop_device(mnt / "%default%", "--direct-io=on") as dev,
    ):
        subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", dev], check=True)
        before = len(events(log, "Trim"))
        with fs_mounted(dev, tmp_path / "ext4") as fsdir:
            out = subprocess.run(["fstrim", "-v", str(fsdir)], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            trimmed = int(re.search(r"\((\d+) bytes\)", out.stdout).group(1))  # type: ignore[union-attr]
        trims = events(log, "Trim")[before:]
    assert trimmed > 64 * MiB and sum(n for _, n, _ in trims) >= trimmed // 2, (trimmed, len(trims))


def test_a_trim_on_qcow2_behind_qemu_nbd_shrinks_its_allocation(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    with (
        qemu_nbd(image, "disk", "qcow2", "--discard=unmap") as srv,
        mounted(srv.address, tmp_path / "mnt") as mnt,
    ):
        filled(mnt / "disk", 16 * MiB)
        allocated = _allocated(image)
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 16 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert _allocated(image) < allocated - 8 * MiB


def _allocated(image: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(e["length"] for e in json.loads(out.stdout) if e["data"])


def _nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True
    )
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in json.loads(out.stdout)]


def _seek_map(path: Path, size: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is a hole) from SEEK_DATA / SEEK_HOLE, extents merged."""
    out: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole > pos:
                out.append((pos, hole - pos, False))
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA) if hole < size else size
            except OSError:
                data = size
            if data > hole:
                out.append((hole, data - hole, True))
            pos = data
    finally:
        os.close(fd)
    return out


def _merged(extents: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for o, n, h in extents:
        if out and out[-1][2] == h and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, h)
        else:
            out.append((o, n, h))
    return out


@pytest.mark.parametrize("server", ["nbdkit-memory", "qemu-nbd-qcow2"])
def test_seek_data_and_seek_hole_match_nbdinfo_map(tmp_path: Path, server: str) -> None:
    size = 64 * MiB
    if server == "nbdkit-memory":
        cm = nbdkit("memory", "64M")
        name = "%default%"
    else:
        image = tmp_path / "sparse.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
        cm = qemu_nbd(image, "disk", "qcow2")
        name = "disk"
    with cm as srv, mounted(srv.address, tmp_path / "mnt") as mnt:
        path = mnt / name
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)
            buf.write(b"d" * MiB)
            for off in (0, 5 * MiB, 6 * MiB, 40 * MiB):  # data in a sea of holes
                os.pwrite(fd, buf, off)
        finally:
            os.close(fd)
        uri = srv.uri("" if name == "%default%" else name)
        assert _merged(_seek_map(path, size)) == _merged(_nbdinfo_map(uri))


def test_qemu_img_convert_of_a_mostly_empty_export_reads_only_its_data(tmp_path: Path) -> None:
    """qemu-img asks SEEK_DATA/SEEK_HOLE of a raw file, so a 1 GiB export holding 1 MiB of
    data costs about 1 MiB from the server."""
    with logged_memory(tmp_path, "1G", "--cache-size=0") as (mnt, log):
        fd = os.open(mnt / "%default%", os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)
            buf.write(os.urandom(MiB))
            os.pwrite(fd, buf, 512 * MiB)
        finally:
            os.close(fd)
        before = sum(n for _, n, _ in events(log, "Read"))
        copy = tmp_path / "copy.img"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(mnt / "%default%"), str(copy)],
            check=True,
        )
        read = sum(n for _, n, _ in events(log, "Read")) - before
    assert copy.stat().st_size == 1 << 30
    assert read < 16 * MiB, f"{read} bytes read for 1 MiB of data"
    with open(copy, "rb") as f:
        f.seek(512 * MiB)
        assert f.read(MiB) == bytes(buf)


def test_cp_sparse_and_du_see_the_allocation_block_status_reports(tmp_path: Path) -> None:
    """cp --sparse and tar -S seek for data only in a file whose st_blocks says it is
    sparse: nbdfs reports the allocated bytes block status gives, from the moment the file
    is opened, kept true by writes and trims. A 1 GiB export holding 2 MiB of data then
    costs cp about 2 MiB from the server, and du shows 2 MiB."""
    with logged_memory(tmp_path, "1G") as (mnt, log):
        path = mnt / "%default%"
        data = os.urandom(MiB)
        with open(path, "r+b") as f:
            for offset in (0, 700 * MiB):
                f.seek(offset)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        assert os.stat(path).st_blocks * 512 == 2 * MiB
        before = sum(n for _, n, _ in events(log, "Read"))
        copy = tmp_path / "copy.img"
        subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
        read = sum(n for _, n, _ in events(log, "Read")) - before
        assert read < 16 * MiB, f"cp read {read} bytes for 2 MiB of data"
        assert copy.stat().st_blocks * 512 < 4 * MiB  # (its holes are holes)
        with open(copy, "rb") as f:
            f.seek(700 * MiB)
            assert f.read(MiB) == data
        # A trim gives the space back, and du sees it at once.
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, MiB)
            assert os.fstat(fd).st_blocks * 512 == MiB
        finally:
            os.close(fd)
        du = subprocess.run(["du", "-B1", str(path)], capture_output=True, text=True, check=True)
        assert du.stdout.split()[0] == str(MiB)


def test_a_server_without_trim_zeroes_or_block_status(tmp_path: Path) -> None:
    """nbd-server 3.24 without trim offers none of the three: punching a hole fails as on a
    disk without discard, zeroing writes zeros, and the file is all data."""
    (tmp_path / "img").write_bytes(os.urandom(4 * MiB))
    with (
        nbd_server(tmp_path, {"disk": {"exportname": str(tmp_path / "img")}}) as srv,
        mounted(srv.address, tmp_path / "mnt") as mnt,
    ):
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, MiB)
            assert info.value.errno == 95
            fallocate(fd, ZERO_RANGE | KEEP_SIZE, MiB, MiB)
            assert os.pread(fd, MiB, MiB) == bytes(MiB)
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * MiB
            assert os.lseek(fd, 2 * MiB, os.SEEK_DATA) == 2 * MiB
        finally:
            os.close(fd)
    assert (tmp_path / "img").read_bytes()[MiB : 2 * MiB] == bytes(MiB)


def test_the_kernel_keeps_more_than_twelve_requests_in_flight(tmp_path: Path) -> None:
    connections = Path("/sys/fs/fuse/connections")
    if " fusectl " not in Path("/proc/self/mounts").read_text():
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=True)
    with nbdkit("memory", "4M") as srv, mounted(srv.address, tmp_path / "mnt") as mnt:
        dev = os.stat(mnt).st_dev
        entry = connections / str(dev)
        assert int((entry / "max_background").read_text()) == 64
        assert int((entry / "congestion_threshold").read_text()) == 48


def test_nbdkit_without_zeroes_or_extents_gets_the_fallbacks(tmp_path: Path) -> None:
    log = tmp_path / "nbdkit.log"
    with (
        nbdkit(
            "--filter=log",
            "--filter=nozero",
            "--filter=noextents",
            "memory",
            "4M",
            "zeromode=none",
            f"logfile={log}",
        ) as srv,
        mounted(srv.address, tmp_path / "mnt") as mnt,
    ):
        path = mnt / "%default%"
        filled(path, 4 * MiB)
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, ZERO_RANGE | KEEP_SIZE, MiB, MiB)
            assert os.pread(fd, MiB, MiB) == bytes(MiB)
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * MiB  # all data
            assert os.lseek(fd, MiB, os.SEEK_DATA) == MiB
        finally:
            os.close(fd)
        assert not events(log, "Zero") and not events(log, "Extents")
        assert any(o <= MiB < o + n for o, n, _ in events(log, "Write"))


def test_a_trim_after_an_unflushed_write_survives_a_restart(tmp_path: Path) -> None:
    """Write, trim the same range, the server restarts before any flush: the replay must
    leave the range trimmed (zeros), not write the older write again."""
    from .test_faults import Restartable, _direct_buffer

    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "disk").write_bytes(os.urandom(4 * MiB))
    srv = Restartable("--filter=cache", "file", f"dir={exports}", "cache=writeback")
    try:
        with mounted(srv.server.address, tmp_path / "mnt", "--timeout", "30") as mnt:
            fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
            try:
                assert os.pwrite(fd, _direct_buffer(b"W"), MiB) == MiB
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, MiB, MiB)
                srv.kill()
                srv.start()
                buf = _direct_buffer(b"\0")
                assert os.preadv(fd, [buf], 0) == MiB  # reconnects, replays
                os.fsync(fd)
                assert os.preadv(fd, [buf], MiB) == MiB and buf[:] == bytes(MiB)
            finally:
                os.close(fd)
        assert (exports / "disk").read_bytes()[MiB : 2 * MiB] == bytes(MiB)
    finally:
        srv.close()


def test_holes_are_asked_once_and_kept_true_by_writes(tmp_path: Path) -> None:
    with logged_memory(tmp_path, "64M") as (mnt, log):
        path = mnt / "%default%"
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)
            buf.write(b"d" * MiB)
            os.pwrite(fd, buf, 8 * MiB)
            assert os.lseek(fd, 0, os.SEEK_DATA) == 8 * MiB
            asked = len(events(log, "Extents"))
            assert asked >= 1
            for _ in range(20):  # answered from what block status said
                assert os.lseek(fd, 0, os.SEEK_DATA) == 8 * MiB
                assert os.lseek(fd, 8 * MiB, os.SEEK_HOLE) == 9 * MiB
            assert len(events(log, "Extents")) == asked
            os.pwrite(fd, buf, 2 * MiB)  # data where there was a hole
            assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * MiB, MiB)  # and a hole again
            assert os.lseek(fd, 0, os.SEEK_DATA) == 8 * MiB
        finally:
            os.close(fd)
