"""nbdfs as an ordinary user, for real: a user of its own, a venv that user can read
(made from Debian's /usr/bin/python3, since the pyenv Python lives in root's home; it gets
stock pyfuse3 from PyPI, so this is also the path without the pyfuse3 patches), and
/dev/fuse 0666 as distributions ship it. Everything the user does runs as that user;
root only serves the exports and checks the bytes on the server's side."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .servers import nbdkit, require_tool
from .test_partitions import GPT, make_image

pytestmark = pytest.mark.fuse
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@dataclass
class User:
    name: str
    home: Path
    nbdfs: str  # the user's own nbdfs command
    work: Path  # a directory the user owns, outside its home

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["runuser", "-u", self.name, "--", "env", f"HOME={self.home}", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc


@contextlib.contextmanager
def _fuse_device_mode(mode: int) -> Iterator[None]:
    before = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", mode)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", before)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if os.geteuid() != 0:
        pytest.fail("the rootless tests create a user: run them as root (scripts/test does)")
    require_tool("runuser")
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.fail("no /usr/bin/python3 for a venv another user can read: run scripts/install")
    name = f"nbdfs-t{os.getpid() % 100000}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="nbdfs-rootless-", dir="/var/tmp"))
    try:
        venv = work / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [
                str(venv / "bin/python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                str(ROOT),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        entry = pwd.getpwnam(name)
        for path in (work, *work.rglob("*")):
            os.lchown(path, entry.pw_uid, entry.pw_gid)
        work.chmod(0o755)
        with _fuse_device_mode(0o666):
            yield User(name, Path(entry.pw_dir), str(venv / "bin/nbdfs"), work)
    finally:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith((f"/home/{name}/", str(work))):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        subprocess.run(["pkill", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_a_user_mounts_writes_fsyncs_reads_and_unmounts(user: User, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "disk").write_bytes(bytes(8 * MiB))
    data = user.work / "data"
    data.write_bytes(os.urandom(2 * MiB))
    data.chmod(0o644)
    mnt = user.home / "mnt"
    user.run("mkdir", "-p", str(mnt))
    with nbdkit("file", f"dir={exports}") as srv:
        log = user.work / "mount.log"
        user.run(user.nbdfs, "mount", "--log-file", str(log), srv.address, str(mnt))
        try:
            # The user's venv has stock pyfuse3 from PyPI (no contrib/pyfuse3 patches):
            # everything else works, and the daemon says once what is unavailable.
            assert log.read_text().count("unavailable: fallocate") == 1
            assert user.run("stat", "-c", "%U %s", str(mnt / "disk")).stdout.split() == [
                user.name,
                str(8 * MiB),
            ]
            user.run(
                "dd",
                f"if={data}",
                f"of={mnt / 'disk'}",
                "bs=1M",
                "conv=notrunc,fsync",
                "status=none",
            )
            # fsync reached the server: the backing file holds the bytes now
            assert (exports / "disk").read_bytes()[: 2 * MiB] == data.read_bytes()
            back = user.run("sh", "-c", f"head -c {2 * MiB} {mnt / 'disk'} | sha256sum").stdout
            assert back.split()[0] == hashlib.sha256(data.read_bytes()).hexdigest()
            status = json.loads(user.run(user.nbdfs, "status", "--json", str(mnt)).stdout)
            assert status["exports"][0]["bytes_written"] == 2 * MiB
            assert status["exports"][0]["unflushed"] == 0
        finally:
            umount = user.run(user.nbdfs, "umount", str(mnt), check=False)
        assert umount.returncode == 0, umount.stderr
    assert f" {mnt} " not in Path("/proc/self/mounts").read_text()


def test_what_a_user_can_get_wrong_is_one_line_that_says_what_to_do(user: User) -> None:
    mnt = user.home / "mnt2"
    user.run("mkdir", "-p", str(mnt))
    not_mine = user.work / "not-mine"
    not_mine.mkdir()
    os.chown(not_mine, 0, 0)
    fuse_conf = Path("/etc/fuse.conf")
    saved = fuse_conf.read_text() if fuse_conf.exists() else None
    with nbdkit("memory", "1M") as srv:
        with _fuse_device_mode(0o600):
            proc = user.run(user.nbdfs, "mount", srv.address, str(mnt), check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "/dev/fuse" in proc.stderr and "chmod 0666 /dev/fuse" in proc.stderr
        proc = user.run(user.nbdfs, "mount", srv.address, str(not_mine), check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "you may not write to it" in proc.stderr
        try:
            lines = (saved or "").splitlines()
            fuse_conf.write_text(
                "\n".join(x for x in lines if x.strip() != "user_allow_other") + "\n"
            )
            proc = user.run(
                user.nbdfs, "mount", "-o", "allow_other", srv.address, str(mnt), check=False
            )
        finally:
            if saved is None:
                fuse_conf.unlink()
            else:
                fuse_conf.write_text(saved)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "user_allow_other" in proc.stderr and "/etc/fuse.conf" in proc.stderr


def test_a_user_inspects_a_disk_image_with_partitions(user: User, tmp_path: Path) -> None:
    """The README's rootless path: --partitions, then fuse2fs on a partition file."""
    fuse2fs = require_tool("fuse2fs")
    exports = tmp_path / "exports"
    exports.mkdir()
    image = exports / "vm"
    table = make_image(image, GPT)
    first = table[0]
    files = tmp_path / "files"
    files.mkdir()
    (files / "etc-hostname").write_text("guest\n")
    start, size = int(first["start"]) * 512, int(first["size"]) * 512  # type: ignore[call-overload]
    subprocess.run(
        [
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            f"offset={start}",
            "-d",
            str(files),
            str(image),
            f"{size // 1024}k",
        ],
        check=True,
    )
    mnt, fs = user.home / "disks", user.home / "fs"
    user.run("mkdir", "-p", str(mnt), str(fs))
    with nbdkit("file", f"dir={exports}") as srv:
        user.run(user.nbdfs, "mount", "-r", "--partitions", srv.address, str(mnt))
        try:
            names = user.run("ls", str(mnt)).stdout.split()
            assert names == ["vm", "vm.p1", "vm.p2", "vm.p3"]
            user.run(fuse2fs, "-o", "ro,fakeroot", str(mnt / "vm.p1"), str(fs))
            try:
                assert user.run("cat", str(fs / "etc-hostname")).stdout == "guest\n"
            finally:
                user.run("fusermount3", "-u", str(fs), check=False)
            info = json.loads(user.run("qemu-img", "info", "--output=json", str(mnt / "vm")).stdout)
            assert info["virtual-size"] == 64 * MiB
        finally:
            user.run(user.nbdfs, "umount", str(mnt), check=False)
