"""Partition tables (MBR with extended/logical partitions, GPT), sans-IO.

:func:`read_table` is a generator that yields :class:`Read` requests for the bytes it needs
and returns the partitions, numbered as Linux numbers them: MBR primary slots 1-4 (an
empty slot keeps its number), logical partitions from 5 in chain order, GPT entries by
their index + 1. The extended partition itself (a container) gets its number but no file.
It trusts nothing: every table is bounded (at most :data:`MAX_PARTITIONS`, an extended
chain visited once per EBR, a GPT entry array of at most 1 MiB), every partition must lie
inside the disk, have a size and not overlap another, and GPT headers and entry arrays
must match their CRC-32. Anything else raises :class:`PartitionError` with one line that
says what is wrong; the caller logs it and shows no partitions.

Sectors are 512 bytes (what disk images and qemu-nbd exports use); a GPT written with 4 KiB
sectors is looked for at 4096 when none is found at 512.
"""

from __future__ import annotations

import itertools
import struct
import uuid
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass

from .errors import NbdError

MAX_PARTITIONS = 256  # Linux's limit per disk (DISK_MAX_PARTS)
MAX_GPT_ENTRIES_BYTES = 1 << 20
EXTENDED = {0x05, 0x0F, 0x85}
GPT_PROTECTIVE = 0xEE


class PartitionError(NbdError):
    """A partition table that is broken or hostile."""


@dataclass(frozen=True, slots=True)
class Read:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # MBR: "0x83"; GPT: the type GUID
    name: str = ""  # GPT only
    uuid: str = ""  # GPT only
    scheme: str = "mbr"

    @property
    def end(self) -> int:
        return self.start + self.size

    def facts(self) -> dict[str, int | str]:
        """What it is, as ``nbdfs status`` and the ``user.nbd.partition.*`` xattrs tell it."""
        out: dict[str, int | str] = {
            "number": self.number,
            "scheme": self.scheme,
            "start": self.start,
            "size": self.size,
            "type": self.type,
        }
        if self.scheme == "gpt":
            out |= {"name": self.name, "uuid": self.uuid}
        return out


Steps = Generator[Read, bytes, list[Partition]]


def read_table(disk_size: int) -> Steps:
    """The partitions of a disk of ``disk_size`` bytes ([] when it has no table)."""
    if disk_size < 1024:
        return []
    mbr = yield Read(0, 512)
    if len(mbr) != 512 or mbr[510:512] != b"\x55\xaa":
        return []
    if any(mbr[446 + 16 * i] not in (0x00, 0x80) for i in range(4)):
        return []  # boot flags other than 0 and 0x80: a boot sector, not a table (as Linux)
    entries = [_mbr_entry(mbr, i) for i in range(4)]
    if any(kind == GPT_PROTECTIVE for kind, _, _ in entries):
        for sector in (512, 4096):
            parts = yield from _gpt(disk_size, sector)
            if parts is not None:
                return parts
        raise PartitionError("a protective MBR but no valid GPT header at LBA 1")
    return (yield from _mbr(disk_size, entries))


def _mbr_entry(sector: bytes, i: int) -> tuple[int, int, int]:
    """(type, first sector, sectors) of entry ``i`` of an MBR or EBR."""
    raw = sector[446 + 16 * i : 462 + 16 * i]
    kind = raw[4]
    start, count = struct.unpack_from("<II", raw, 8)
    return kind, start, count


def _mbr(disk_size: int, entries: list[tuple[int, int, int]]) -> Steps:
    parts: list[Partition] = []
    extended: tuple[int, int] | None = None  # (first sector, sectors)
    spans: list[tuple[int, int]] = []
    for i, (kind, start, count) in enumerate(entries):
        if kind == 0 or count == 0:
            continue
        _check_inside(disk_size, start * 512, count * 512, f"partition {i + 1}")
        spans.append((start * 512, count * 512))
        if kind in EXTENDED:
            if extended is not None:
                raise PartitionError("two extended partitions in the MBR")
            extended = (start, count)
            continue
        parts.append(Partition(i + 1, start * 512, count * 512, f"0x{kind:02x}"))
    _check_disjoint(spans)
    if extended is not None:
        parts += yield from _logical(disk_size, *extended)
    _check_disjoint([(p.start, p.size) for p in parts])
    return parts


def _logical(disk_size: int, ext_start: int, ext_count: int) -> Steps:
    """The logical partitions in the chain of EBRs inside the extended partition."""
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_start
    number = 5
    while True:
        if ebr in seen:
            raise PartitionError("a loop in the chain of extended boot records")
        if len(parts) >= MAX_PARTITIONS:
            raise PartitionError(f"more than {MAX_PARTITIONS} logical partitions")
        seen.add(ebr)
        if not ext_start <= ebr < ext_start + ext_count:
            raise PartitionError(f"an extended boot record at sector {ebr}, outside its partition")
        sector = yield Read(ebr * 512, 512)
        if len(sector) != 512 or sector[510:512] != b"\x55\xaa":
            raise PartitionError(f"no extended boot record signature at sector {ebr}")
        kind, start, count = _mbr_entry(sector, 0)
        if kind and count:
            first = ebr + start
            if first < ext_start or first + count > ext_start + ext_count:
                raise PartitionError(f"logical partition {number} lies outside the extended one")
            _check_inside(disk_size, first * 512, count * 512, f"partition {number}")
            parts.append(Partition(number, first * 512, count * 512, f"0x{kind:02x}"))
            number += 1
        next_kind, next_start, _ = _mbr_entry(sector, 1)
        if next_kind not in EXTENDED or next_start == 0:
            return parts
        ebr = ext_start + next_start


def _gpt(disk_size: int, sector: int) -> Generator[Read, bytes, list[Partition] | None]:
    """The GPT's partitions, None if there is no GPT header with these sectors."""
    header = yield Read(sector, sector)
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    (size,) = struct.unpack_from("<I", header, 12)
    if not 92 <= size <= sector:
        raise PartitionError(f"GPT header size {size} is not from 92 to {sector}")
    (crc,) = struct.unpack_from("<I", header, 16)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        raise PartitionError("the GPT header's CRC-32 does not match (a damaged table)")
    first_usable, last_usable = struct.unpack_from("<QQ", header, 40)
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or entry_size & (entry_size - 1):
        raise PartitionError(f"GPT entry size {entry_size} is not a power of two from 128")
    if count * entry_size > MAX_GPT_ENTRIES_BYTES:
        raise PartitionError(f"a GPT of {count} entries of {entry_size} bytes is too large")
    length = count * entry_size
    _check_inside(disk_size, entries_lba * sector, length, "the GPT entry array")
    array = yield Read(entries_lba * sector, length)
    if len(array) != length or zlib.crc32(array) != entries_crc:
        raise PartitionError("the GPT entry array's CRC-32 does not match (a damaged table)")
    parts: list[Partition] = []
    for i in range(count):
        raw = array[i * entry_size : i * entry_size + 128]
        if raw[:16] == bytes(16):
            continue  # an unused entry
        if len(parts) >= MAX_PARTITIONS:
            raise PartitionError(f"more than {MAX_PARTITIONS} GPT partitions")
        first, last = struct.unpack_from("<QQ", raw, 32)
        if not first_usable <= first <= last <= last_usable:
            raise PartitionError(f"GPT partition {i + 1} lies outside the usable sectors")
        start, size = first * sector, (last - first + 1) * sector
        _check_inside(disk_size, start, size, f"partition {i + 1}")
        name = raw[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(
            Partition(
                i + 1,
                start,
                size,
                str(uuid.UUID(bytes_le=raw[:16])),
                name,
                str(uuid.UUID(bytes_le=raw[16:32])),
                "gpt",
            )
        )
    _check_disjoint([(p.start, p.size) for p in parts])
    return parts


def _check_inside(disk_size: int, start: int, size: int, what: str) -> None:
    if size <= 0 or start <= 0 or start + size > disk_size:
        raise PartitionError(
            f"{what} ({start}+{size} bytes) does not lie inside the disk of {disk_size} bytes"
        )


def _check_disjoint(spans: list[tuple[int, int]]) -> None:
    ordered = sorted(spans)
    for (a, n), (b, _) in itertools.pairwise(ordered):
        if a + n > b:
            raise PartitionError(f"partitions at bytes {a} and {b} overlap")


def parse_with(read: Callable[[int, int], bytes], disk_size: int) -> list[Partition]:
    """:func:`read_table` driven by ``read(offset, length)``, a synchronous reader."""
    steps = read_table(disk_size)
    try:
        request = next(steps)
        while True:
            request = steps.send(read(request.offset, request.length))
    except StopIteration as stop:
        result: list[Partition] = stop.value
        return result


def parse(image: bytes) -> list[Partition]:
    """The partitions of an image held in memory (for tests and tools)."""
    return parse_with(lambda offset, length: image[offset : offset + length], len(image))
