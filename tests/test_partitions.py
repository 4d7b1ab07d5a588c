"""Partition tables: the parser against images sfdisk made (and what sfdisk says of them),
hostile tables from hypothesis, and partition files on a real mount."""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdfs.partitions import MAX_PARTITIONS, Partition, PartitionError, parse, parse_with

from .conftest import run_nbdfs
from .mounts import mounted
from .servers import nbdkit, require_tool

MiB = 1 << 20
SIZE = 64 * MiB

MBR_LOGICAL = """label: dos
start=2048, size=20480, type=83
start=22528, size=61440, type=5
start=24576, size=8192, type=83
start=34816, size=8192, type=82
start=45056, size=4096, type=7
"""
GPT = """label: gpt
size=16MiB, type=L, name=root
size=8MiB, type=S, name=swap
size=16MiB, type=L, name=data
"""


def make_image(path: Path, script: str) -> list[dict[str, object]]:
    """A 64 MiB image partitioned by sfdisk; its partitions as ``sfdisk --json`` lists them."""
    sfdisk = require_tool("sfdisk")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    subprocess.run([sfdisk, "-q", str(path)], input=script, text=True, check=True)
    out = subprocess.run([sfdisk, "--json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]["partitions"]  # type: ignore[no-any-return]


def expected(table: list[dict[str, object]], image: Path) -> list[tuple[int, int, int]]:
    """(number, start, size) in bytes, the extended container left out."""
    out = []
    for p in table:
        number = int(str(p["node"])[len(str(image)) :])
        if str(p.get("type")) in ("5", "f", "85"):
            continue
        out.append((number, int(p["start"]) * 512, int(p["size"]) * 512))  # type: ignore[call-overload]
    return out


@pytest.mark.parametrize("script", [MBR_LOGICAL, GPT], ids=["mbr-logical", "gpt"])
def test_the_parser_finds_what_sfdisk_wrote(tmp_path: Path, script: str) -> None:
    image = tmp_path / "disk.img"
    table = make_image(image, script)
    parts = parse(image.read_bytes())
    assert [(p.number, p.start, p.size) for p in parts] == expected(table, image)
    if script is GPT:
        assert [p.name for p in parts] == ["root", "swap", "data"]
        assert [p.uuid.upper() for p in parts] == [str(p["uuid"]) for p in table]
        assert [p.type.upper() for p in parts] == [str(p["type"]) for p in table]
    else:
        assert [p.type for p in parts] == ["0x83", "0x83", "0x82", "0x07"]


def test_no_table_and_a_bare_file_system_give_no_partitions() -> None:
    assert parse(bytes(SIZE // 16)) == []
    boot = bytearray(4 * MiB)  # a FAT-like boot sector: signature, but code where entries go
    boot[446:510] = bytes(range(64))
    boot[510:512] = b"\x55\xaa"
    assert parse(bytes(boot)) == []


def _mbr(entries: list[tuple[int, int, int]], size: int = 4 * MiB) -> bytearray:
    disk = bytearray(size)
    for i, (kind, start, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", disk, 446 + 16 * i, 0, kind, start, count)
    disk[510:512] = b"\x55\xaa"
    return disk


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([(0x83, 2048, 4096), (0x83, 4000, 1000)], "overlap"),
        ([(0x83, 2048, 1 << 20)], "inside the disk"),
        ([(0x05, 2048, 4096), (0x0F, 6144, 100)], "two extended"),
    ],
)
def test_broken_mbrs_are_refused(entries: list[tuple[int, int, int]], why: str) -> None:
    with pytest.raises(PartitionError, match=why):
        parse(bytes(_mbr(entries)))


def test_a_loop_in_the_extended_chain_is_refused() -> None:
    disk = _mbr([(0x05, 2048, 4096)])
    ebr = 2048 * 512  # the first EBR points to a second, which points to itself
    struct.pack_into("<B3xB3xII", disk, ebr + 446, 0, 0x83, 1, 10)
    disk[ebr + 510 : ebr + 512] = b"\x55\xaa"
    struct.pack_into("<B3xB3xII", disk, ebr + 462, 0, 0x05, 100, 4096)
    nxt = (2048 + 100) * 512
    struct.pack_into("<B3xB3xII", disk, nxt + 462, 0, 0x05, 100, 4096)  # -> itself again
    disk[nxt + 510 : nxt + 512] = b"\x55\xaa"
    with pytest.raises(PartitionError, match="loop"):
        parse(bytes(disk))


def _gpt(tmp_path: Path) -> bytearray:
    image = tmp_path / "gpt.img"
    make_image(image, GPT)
    return bytearray(image.read_bytes())


def test_a_gpt_with_a_bad_header_crc_is_refused(tmp_path: Path) -> None:
    disk = _gpt(tmp_path)
    disk[512 + 40] ^= 1  # first usable LBA, without fixing the CRC
    with pytest.raises(PartitionError, match="CRC"):
        parse(bytes(disk))


def test_a_gpt_of_thousands_of_partitions_is_refused(tmp_path: Path) -> None:
    disk = _gpt(tmp_path)
    count, entry = 4096, 128
    array = bytearray(count * entry)
    for i in range(MAX_PARTITIONS + 1):
        raw = array[i * entry : (i + 1) * entry]
        raw[:16] = b"\x01" * 16
        struct.pack_into("<QQ", raw, 32, 2048 + i, 2048 + i)
        array[i * entry : (i + 1) * entry] = raw
    disk[2 * 512 : 2 * 512 + len(array)] = array
    struct.pack_into("<QIII", disk, 512 + 72, 2, count, entry, zlib.crc32(array))
    struct.pack_into("<I", disk, 512 + 16, 0)
    struct.pack_into("<I", disk, 512 + 16, zlib.crc32(bytes(disk[512 : 512 + 92])))
    with pytest.raises(PartitionError, match=f"more than {MAX_PARTITIONS}"):
        parse(bytes(disk))


_BASES: dict[str, bytes] = {}


def _base(factory: pytest.TempPathFactory, kind: str) -> bytes:
    if kind not in _BASES:
        path = factory.mktemp("img") / "disk.img"
        make_image(path, MBR_LOGICAL if kind == "mbr" else GPT)
        _BASES[kind] = path.read_bytes()
    return _BASES[kind]


def _parse_changed(base: bytes, changes: dict[int, int]) -> list[Partition]:
    """:func:`parse` of ``base`` with some bytes changed, without copying the image."""

    def read(offset: int, length: int) -> bytes:
        data = bytearray(base[offset : offset + length])
        for at, value in changes.items():
            if offset <= at < offset + len(data):
                data[at - offset] = value
        return bytes(data)

    return parse_with(read, len(base))


# Where the tables live: the MBR and GPT header and entries, and the extended boot records.
HOT = [
    *range(0, 34 * 512),
    *range(22528 * 512 + 446, 22528 * 512 + 512),
    *range(32768 * 512 + 446, 32768 * 512 + 512),
    *range(43008 * 512 + 446, 43008 * 512 + 512),
]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["mbr", "gpt"]),
    changes=st.dictionaries(st.sampled_from(HOT), st.integers(0, 255), min_size=1, max_size=16),
    fix_crcs=st.booleans(),
)
def test_hostile_tables_never_crash_the_parser(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    changes: dict[int, int],
    fix_crcs: bool,
) -> None:
    """Valid tables with bytes changed anywhere in them (and, half the time, a GPT whose
    CRCs are made to match the change): partitions inside the disk and disjoint, or a
    PartitionError; nothing else, and never more than MAX_PARTITIONS."""
    base = _base(tmp_path_factory, kind)
    if fix_crcs and kind == "gpt":
        head = bytearray(base[: 34 * 512])
        for at, value in changes.items():
            if at < len(head):
                head[at] = value
        _fix_gpt_crcs(head)
        changes = {**changes, **{i: head[i] for i in range(512, 34 * 512) if head[i] != base[i]}}
    try:
        parts = _parse_changed(base, changes)
    except PartitionError:
        return
    assert len(parts) <= MAX_PARTITIONS
    spans = sorted((p.start, p.end) for p in parts)
    assert all(0 < s < e <= len(base) for s, e in spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def _fix_gpt_crcs(disk: bytearray) -> None:
    if disk[512:520] != b"EFI PART":
        return
    lba, count, size = struct.unpack_from("<QII", disk, 512 + 72)
    if count * size <= 1 << 20 and lba * 512 + count * size <= len(disk):
        array = disk[lba * 512 : lba * 512 + count * size]
        struct.pack_into("<I", disk, 512 + 88, zlib.crc32(array))
    (hsize,) = struct.unpack_from("<I", disk, 512 + 12)
    if 92 <= hsize <= 512:
        struct.pack_into("<I", disk, 512 + 16, 0)
        struct.pack_into("<I", disk, 512 + 16, zlib.crc32(bytes(disk[512 : 512 + hsize])))


@pytest.mark.fuse
@pytest.mark.parametrize("script", [MBR_LOGICAL, GPT], ids=["mbr-logical", "gpt"])
def test_partition_files_on_a_real_mount(tmp_path: Path, script: str) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    image = exports / "disk"
    table = make_image(image, script)
    want = expected(table, image)
    first = want[0]
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from a partition\n")
    subprocess.run(
        [
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            f"offset={first[1]}",
            "-d",
            str(files),
            str(image),
            f"{first[2] // 1024}k",
        ],
        check=True,
    )
    with (
        nbdkit("file", f"dir={exports}") as srv,
        mounted(srv.address, tmp_path / "mnt", "--partitions", "-o", "xattr") as mnt,
    ):
        shown = sorted(n for n in os.listdir(mnt) if n.startswith("disk.p"))
        assert shown == sorted(f"disk.p{n}" for n, _, _ in want)
        for number, start, size in want:
            path = mnt / f"disk.p{number}"
            assert path.stat().st_size == size
            assert os.getxattr(path, "user.nbd.partition.start") == str(start).encode()
        # nbdfs status tells the same, with or without --xattr.
        (export,) = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)["exports"]
        told = sorted((p["number"], p["start"], p["size"]) for p in export["partitions"])
        assert told == sorted(want)
        assert all(p["path"] == f"disk.p{p['number']}" for p in export["partitions"])
        assert f"    disk.p{first[0]}: " in run_nbdfs("status", str(mnt)).stdout
        # A write to the partition file lands at the partition's offset on the server.
        last = want[-1]
        fd = os.open(mnt / f"disk.p{last[0]}", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"E" * 4096, last[2] - 4096) == 4096
            os.fsync(fd)
            assert os.pread(fd, 10, last[2]) == b""  # its end is the end of the file
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", last[2])
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with open(image, "rb") as f:
            f.seek(last[1] + last[2] - 4096)
            assert f.read(4096) == b"E" * 4096
        # The file system inside the first partition, through Debian's fuse2fs.
        fuse2fs = require_tool("fuse2fs")
        fs = tmp_path / "fs"
        fs.mkdir()
        subprocess.run(
            [fuse2fs, "-o", "ro,fakeroot", str(mnt / f"disk.p{first[0]}"), str(fs)], check=True
        )
        try:
            assert (fs / "hello.txt").read_text() == "hello from a partition\n"
        finally:
            subprocess.run(["fusermount3", "-u", str(fs)], check=False)
        qemu_info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(mnt / "disk")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(qemu_info.stdout)["virtual-size"] == SIZE
