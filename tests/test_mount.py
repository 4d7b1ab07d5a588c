"""Real mounts through /dev/fuse against real servers: bytes in, the same bytes out."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import NBDFS, run_nbdfs
from .mounts import fs_mounted, loop_device, mounted
from .servers import free_port, nbd_server, nbdkit, require_tool

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_each_export_is_a_file_of_its_size_with_names_escaped(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    sizes = {"disk one": 3 * MiB, "b": 4096, "100%": 512, ".hidden": 1024}
    for name, size in sizes.items():
        (exports / name).write_bytes(os.urandom(size))
    with (
        nbdkit("file", f"dir={exports}") as srv,
        mounted(srv.address, tmp / "mnt", "--xattr") as mnt,
    ):
        assert sorted(os.listdir(mnt)) == sorted(["disk one", "b", "100%25", ".hidden"])
        for name, size in sizes.items():
            path = mnt / name.replace("%", "%25")
            st = path.stat()
            assert (st.st_size, oct(st.st_mode & 0o777), st.st_uid) == (size, "0o644", os.getuid())
            assert path.read_bytes() == (exports / name).read_bytes()
        assert os.getxattr(mnt / "disk one", "user.nbd.export") == b"disk one"
        assert os.getxattr(mnt / "b", "user.nbd.size") == b"4096"
        for name in ("user.nbd.nonesuch", "security.capability"):
            with pytest.raises(OSError) as err:
                os.getxattr(mnt / "b", name)
            assert err.value.errno == errno.ENODATA
        vfs = os.statvfs(mnt)
        assert vfs.f_blocks * vfs.f_frsize >= sum(sizes.values())


def test_without_xattr_the_kernel_is_told_once_and_status_is_a_hidden_file(tmp: Path) -> None:
    """By default extended attributes are answered ENOSYS, which the kernel remembers: a
    buffered write then costs no security.capability request (with --xattr, strace shows
    one per write(2)). The status is the file .nbdfs-status, found by name, never listed."""
    data = os.urandom(64 * 1024)
    with nbdkit("memory", "1M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        disk = mnt / "%default%"
        with open(disk, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        assert disk.read_bytes()[: len(data)] == data
        for call in (lambda: os.getxattr(disk, "user.nbd.size"), lambda: os.listxattr(disk)):
            with pytest.raises(OSError) as err:
                call()
            assert err.value.errno == errno.EOPNOTSUPP
        assert os.listdir(mnt) == ["%default%"]
        status = json.loads((mnt / ".nbdfs-status").read_bytes())
        (export,) = status["exports"]
        assert (export["name"], export["path"], export["bytes_written"]) == (
            "",
            "%default%",
            len(data),
        )
        with pytest.raises(PermissionError):
            open(mnt / ".nbdfs-status", "wb")


def test_default_export_and_nested_names_on_nbd_server(tmp: Path) -> None:
    (tmp / "a").write_bytes(b"A" * 8192)
    (tmp / "b").write_bytes(b"B" * 4096)
    exports = {
        "vm/disk 1": {"exportname": str(tmp / "a")},
        "ro": {"exportname": str(tmp / "b"), "readonly": "true"},
    }
    with nbd_server(tmp, exports) as srv, mounted(srv.address, tmp / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == ["ro", "vm"]
        assert os.listdir(mnt / "vm") == ["disk 1"]
        assert (mnt / "vm" / "disk 1").read_bytes() == b"A" * 8192
        ro = mnt / "ro"
        assert oct(ro.stat().st_mode & 0o777) == "0o444"
        with pytest.raises(OSError) as info:
            os.open(ro, os.O_WRONLY)
        assert info.value.errno == errno.EROFS


def test_written_and_fsynced_bytes_reach_the_backing_file(tmp: Path) -> None:
    backing = tmp / "exports" / "disk"
    backing.parent.mkdir()
    backing.write_bytes(bytes(16 * MiB))
    data = os.urandom(5 * MiB + 123)
    with nbdkit("file", f"dir={backing.parent}") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, 777) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Read back through the mount (cache) and straight from the server's file.
        with open(mnt / "disk", "rb") as f:
            f.seek(777)
            assert f.read(len(data)) == data
        on_disk = backing.read_bytes()
        assert on_disk[777 : 777 + len(data)] == data
        assert on_disk[:777] == bytes(777) and on_disk[777 + len(data) :] == bytes(
            16 * MiB - 777 - len(data)
        )


def test_a_unix_socket_server_reads_back_what_was_written(tmp: Path) -> None:
    """nbd+unix:// goes through the same raw-syscall socket path as TCP."""
    sock = tmp / "nbd.sock"
    data = os.urandom(3 * MiB + 1000)
    with (
        nbdkit("memory", "8M", unix=sock),
        mounted(f"nbd+unix:///?socket={sock}", tmp / "mnt") as mnt,
    ):
        path = mnt / "%default%"
        with open(path, "r+b") as f:
            f.seek(12345)
            f.write(data)
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # from the daemon, not the page cache
        try:
            import mmap

            buf = mmap.mmap(-1, 4 * MiB)
            assert os.preadv(fd, [buf], 0) == 4 * MiB
            assert buf[12345 : 12345 + len(data)] == data and buf[:12345] == bytes(12345)
        finally:
            os.close(fd)


def test_writes_past_the_end_fail_with_enospc_and_truncate_is_refused(tmp: Path) -> None:
    with nbdkit("memory", "1M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        path = mnt / "%default%"
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 10, MiB - 4) == 4  # cut short at the end, like a disk
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", MiB)
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as info:
                os.ftruncate(fd, 10)
            assert info.value.errno == errno.EINVAL
        finally:
            os.close(fd)
        with pytest.raises(OSError) as info:
            (mnt / "new").write_bytes(b"x")
        assert info.value.errno == errno.EPERM
        # O_TRUNC is ignored as on a block device: the size and the rest of the data stay.
        (mnt / "%default%").write_bytes(b"new")
        assert path.stat().st_size == MiB
        with open(path, "rb") as f:
            f.seek(MiB - 4)
            assert f.read() == b"xxxx"


def test_readonly_mount_refuses_writes(tmp: Path) -> None:
    with nbdkit("memory", "1M") as srv, mounted(srv.address, tmp / "mnt", "-r") as mnt:
        path = mnt / "%default%"
        assert oct(path.stat().st_mode & 0o777) == "0o444"
        with pytest.raises(OSError) as info:
            os.open(path, os.O_RDWR)
        assert info.value.errno == errno.EROFS


def test_unaligned_io_against_a_4k_minimum_block(tmp: Path) -> None:
    """Read-modify-write keeps every request aligned to blocksize-minimum=4096."""
    with (
        nbdkit(
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ) as srv,
        mounted(srv.address, tmp / "mnt", "--cache-size=0") as mnt,
    ):
        path = mnt / "%default%"
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"hello", 4093)
            os.pwrite(fd, b"Z", 0)
            os.fsync(fd)
            assert os.pread(fd, 9, 4091) == b"\0\0hello\0\0"
            assert os.pread(fd, 2, 0) == b"Z\0"
        finally:
            os.close(fd)


def test_fio_write_and_verify(tmp: Path) -> None:
    fio = require_tool("fio")
    with nbdkit("memory", "64M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        result = subprocess.run(
            [
                fio,
                "--name=verify",
                f"--filename={mnt / '%default%'}",
                "--rw=randwrite",
                "--bs=4k,64k",
                "--size=32M",
                "--iodepth=8",
                "--ioengine=libaio",
                "--direct=1",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--do_verify=1",
                "--numjobs=1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verify:" not in result.stderr


def test_loop_device_ext4_copy_and_fsck(tmp: Path) -> None:
    require_tool("mkfs.ext4")
    source = Path(__file__).parent.parent / "nbdfs"
    with nbdkit("memory", "128M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        with loop_device(mnt / "%default%", "--direct-io=on") as dev:
            subprocess.run(["mkfs.ext4", "-q", dev], check=True)
            with fs_mounted(dev, tmp / "ext4") as fsdir:
                subprocess.run(["cp", "-r", str(source), str(fsdir / "copy")], check=True)
                subprocess.run(["sync"], check=True)
            fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            with fs_mounted(dev, tmp / "ext4", "-o", "ro") as fsdir:
                for f in source.glob("*.py"):
                    assert (fsdir / "copy" / f.name).read_bytes() == f.read_bytes()


def test_qemu_img_info_on_a_qcow2_served_raw(tmp: Path) -> None:
    qemu_img = require_tool("qemu-img")
    exports = tmp / "exports"
    exports.mkdir()
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", str(exports / "vm.qcow2"), "1G"], check=True
    )
    with nbdkit("file", f"dir={exports}") as srv, mounted(srv.address, tmp / "mnt", "-r") as mnt:
        info = subprocess.run(
            [qemu_img, "info", str(mnt / "vm.qcow2")], capture_output=True, text=True, check=True
        )
        assert "file format: qcow2" in info.stdout and "virtual size: 1 GiB" in info.stdout


def test_concurrent_readers_and_writers_on_several_exports(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    for i in range(4):
        (exports / f"d{i}").write_bytes(bytes(8 * MiB))
    with (
        nbdkit("file", f"dir={exports}") as srv,
        mounted(srv.address, tmp / "mnt", "-C", "3") as mnt,
    ):
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                rnd = hashlib.sha256(str(i).encode()).digest() * (MiB // 32)
                fd = os.open(mnt / f"d{i % 4}", os.O_RDWR)
                try:
                    region = (i // 4) * 4 * MiB
                    for j in range(4):
                        os.pwrite(fd, rnd, region + j * MiB)
                    os.fsync(fd)
                    for j in range(4):
                        assert os.pread(fd, MiB, region + j * MiB) == rnd
                finally:
                    os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(8):
            rnd = hashlib.sha256(str(i).encode()).digest() * (MiB // 32)
            region = (i // 4) * 4 * MiB
            assert (exports / f"d{i % 4}").read_bytes()[region : region + 4 * MiB] == rnd * 4


def test_mount_errors_are_one_line(tmp: Path) -> None:
    proc = run_nbdfs("mount", f"127.0.0.1:{free_port()}", str(tmp), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("nbdfs: connection refused")
    assert proc.stderr.count("\n") == 1
    proc = run_nbdfs("mount", "localhost", str(tmp / "missing"), check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    with nbdkit("memory", "1M") as srv:
        proc = run_nbdfs("mount", srv.address, str(tmp), "-C", "0", check=False)
        assert proc.returncode == 2 and "--connections" in proc.stderr
        proc = run_nbdfs("mount", srv.address, str(tmp), "-o", "connections=many", check=False)
        assert (
            proc.returncode == 2
            and proc.stderr
            == "nbdfs: --connections takes a whole number from 1 to 64, not 'many'\n"
        )


def test_sigterm_flushes_unmounts_and_exits_zero(tmp: Path) -> None:
    backing = tmp / "exports" / "disk"
    backing.parent.mkdir()
    backing.write_bytes(bytes(MiB))
    mnt = tmp / "mnt"
    mnt.mkdir()
    with nbdkit("file", f"dir={backing.parent}") as srv:
        with subprocess.Popen(
            [*NBDFS, "mount", "-f", srv.address, str(mnt)], stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                for _ in range(200):
                    if os.path.exists(mnt / "disk"):
                        break
                    time.sleep(0.05)
                (mnt / "disk").write_bytes(b"x" * 4096)
                proc.terminate()
                _, err = proc.communicate(timeout=20)
                assert proc.returncode == 0, err
                assert err == ""
                assert not os.path.exists(mnt / "disk")
                assert backing.read_bytes()[:4097] == b"x" * 4096 + b"\0"
            finally:
                if proc.poll() is None:
                    proc.kill()
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_a_uri_naming_one_export_mounts_just_that_one(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    for name in ("a", "b c"):
        (exports / name).write_bytes(name.encode() * 512)
    with nbdkit("file", f"dir={exports}") as srv, mounted(srv.uri("b c"), tmp / "mnt") as mnt:
        assert os.listdir(mnt) == ["b c"]
        assert (mnt / "b c").read_bytes() == b"b c" * 512
    with open("/proc/self/mounts") as f:
        assert str(tmp / "mnt") not in f.read()


def test_a_killed_daemon_leaves_no_dead_mountpoint(tmp: Path) -> None:
    """auto_unmount: SIGKILL the daemon and the kernel mount goes away with it."""
    with nbdkit("memory", "1M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        pids = subprocess.run(
            ["pgrep", "-f", f"nbdfs mount .* {mnt}$"], capture_output=True, text=True
        ).stdout.split()
        assert len(pids) == 1
        os.kill(int(pids[0]), 9)
        for _ in range(100):
            with open("/proc/self/mounts") as f:
                if str(mnt) not in f.read():
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the mountpoint outlived its daemon")
        assert os.listdir(mnt) == []


def test_export_list_refreshes_without_remounting(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    (exports / "old").write_bytes(b"o" * 4096)
    (exports / "stays").write_bytes(b"s" * 4096)
    with (
        nbdkit("file", f"dir={exports}") as srv,
        mounted(srv.address, tmp / "mnt", "--refresh", "0.5") as mnt,
    ):
        assert sorted(os.listdir(mnt)) == ["old", "stays"]
        fd = os.open(mnt / "stays", os.O_RDONLY)
        try:
            (exports / "new").write_bytes(b"n" * 8192)
            (exports / "old").unlink()
            deadline = time.monotonic() + 15
            while sorted(os.listdir(mnt)) != ["new", "stays"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sorted(os.listdir(mnt)) == ["new", "stays"]
            assert (mnt / "new").read_bytes() == b"n" * 8192
            assert not (mnt / "old").exists()
            assert os.pread(fd, 4, 0) == b"ssss"  # an open file of a kept export goes on
        finally:
            os.close(fd)
