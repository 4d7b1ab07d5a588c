"""nbdfs among the Linux tools: mount(8) and fstab, status, umount, the man page, --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import run_nbdfs
from .mounts import mounted, unmount
from .servers import nbdkit, require_tool

ROOT = Path(__file__).parent.parent
MiB = 1 << 20


def _mounts() -> str:
    with open("/proc/self/mounts") as f:
        return f.read()


@pytest.mark.fuse
def test_mount_helper_and_fstab_line(tmp: Path) -> None:
    require_tool("mount.fuse3")
    if shutil.which("nbdfs") is None:
        pytest.fail("nbdfs is not on PATH for mount(8): run scripts/install")
    mnt = tmp / "mnt"
    mnt.mkdir()
    with nbdkit("memory", "4M") as srv:
        try:
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "fuse.nbdfs",
                    srv.uri(""),
                    str(mnt),
                    "-o",
                    "ro,connections=2,timeout=5",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            line = next(ln for ln in _mounts().splitlines() if f" {mnt} " in ln)
            assert line.split()[2] == "fuse.nbdfs" and " ro," in line
            assert oct((mnt / "%default%").stat().st_mode & 0o777) == "0o444"
        finally:
            unmount(mnt)
        fstab = tmp / "fstab"
        fstab.write_text(
            f"{srv.uri('')} {mnt} fuse.nbdfs rw,cache_size=8M,_netdev,nofail,x-systemd.automount 0 0\n"
        )
        try:
            subprocess.run(
                ["mount", "-T", str(fstab), str(mnt)], check=True, capture_output=True, timeout=60
            )
            (mnt / "%default%").write_bytes(b"via fstab")
            assert (mnt / "%default%").read_bytes()[:9] == b"via fstab"
        finally:
            unmount(mnt)
    assert f" {mnt} " not in _mounts()


@pytest.mark.fuse
def test_status_reports_the_io_done(tmp: Path) -> None:
    with (
        nbdkit("memory", "16M") as srv,
        mounted(srv.address, tmp / "mnt", "--cache-size=4M") as mnt,
    ):
        path = mnt / "%default%"
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, MiB)
            buf.write(b"z" * MiB)
            os.pwritev(fd, [buf], 0)
            os.pwritev(fd, [buf], MiB)
            os.preadv(fd, [buf], 4 * MiB)
            os.preadv(fd, [buf], 4 * MiB)  # the second time from the cache
        finally:
            os.close(fd)
        status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
        (export,) = status["exports"]
        assert export["active"] and export["bytes_written"] == 2 * MiB
        assert export["bytes_read"] >= MiB
        assert export["cache"]["hits"] >= 1 and export["cache"]["capacity"] == 4 * MiB
        assert export["unflushed"] == 2 * MiB and export["errors"] == 0
        text = run_nbdfs("status", str(mnt)).stdout
        assert "written 2.0 MiB" in text and "unflushed 2.0 MiB" in text


@pytest.mark.fuse
def test_umount_command(tmp: Path) -> None:
    with nbdkit("memory", "1M") as srv:
        mnt = tmp / "mnt"
        with mounted(srv.address, mnt):
            run_nbdfs("umount", str(mnt))
            assert f" {mnt} " not in _mounts()
    proc = run_nbdfs("umount", str(tmp), check=False)
    assert proc.returncode == 1 and "is not an nbdfs mount" in proc.stderr


def test_man_page_renders_cleanly() -> None:
    require_tool("groff")
    page = ROOT / "docs" / "nbdfs.1"
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stderr == ""
    text = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        env=dict(os.environ, MANPAGER="cat", MANWIDTH="100"),
    ).stdout
    for word in (
        "nbdfs list",
        "nbdfs mount",
        "tls-init",
        "status",
        "EXIT STATUS",
        "%default%",
        "losetup",
    ):
        assert word in text, word


def test_help_teaches_every_command() -> None:
    top = run_nbdfs("--help").stdout
    for command in ("list", "mount", "umount", "status", "tls-init"):
        assert command in top
        assert "usage: nbdfs " + command in run_nbdfs(command, "--help").stdout
    assert "nbds://" in run_nbdfs("mount", "--help").stdout


def test_bash_completion_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "contrib" / "nbdfs.bash-completion")], check=True)
