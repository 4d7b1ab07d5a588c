"""The FUSE file system: a directory of exports, each a regular file of the export's size.

Every handler answers ``getattr``, ``lookup``, ``readdir`` and ``statfs`` from the daemon's
state (never from the network), so ``ls`` works while a server is slow or gone. Backend
failures become an errno in one place (:func:`_errno_for`); only ``FUSEError`` leaves a
handler, since pyfuse3 ends the whole file system on any other exception.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from .blockio import ExportIO
from .cache import BlockStore
from .connection import DEFAULT_TIMEOUT
from .errors import CommandError, NbdError
from .names import STATUS_FILE, export_paths
from .partitions import Partition, Read, read_table
from .poll import MAX_BUDGET, AdaptivePoll
from .pool import ExportPool
from .session import Export
from .target import Target
from .tls import TlsConfig

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

ATTR_TIMEOUT = 60.0  # the tree changes only on refresh, which invalidates what it changes
XATTR_PREFIX = b"user.nbd."
# The status file (names.STATUS_FILE): a lookup finds it, a listing never shows it.
STATUS_INODE = (1 << 63) - 1  # (never one of the tree's, which count up from the root's)


# Every default, declared once (the command line's help is formatted from these).
DEFAULT_CONNECTIONS = 4
DEFAULT_CACHE_SIZE = 256 << 20
DEFAULT_REFRESH = 60.0


@dataclass(frozen=True, slots=True)
class MountConfig:
    target: Target
    tls: TlsConfig
    readonly: bool = False
    kernel_cache: bool = False  # keep the page cache across opens (nbdfs the only writer)
    writeback_cache: bool = False  # the kernel caches buffered writes, sends them later
    connections: int = DEFAULT_CONNECTIONS
    cache_size: int = DEFAULT_CACHE_SIZE
    timeout: float = DEFAULT_TIMEOUT
    poll: float = MAX_BUDGET  # longest adaptive poll before the event loop sleeps; 0: never
    refresh: float = DEFAULT_REFRESH  # seconds between re-reads of the export list; 0: never
    partitions: bool = False  # also a file per partition of each export (NAME.p1, ...)
    # Answer extended attributes (each file's user.nbd.* metadata). Off, they are answered
    # ENOSYS, which the kernel remembers: it then stops asking for security.capability
    # before every write(2), a FUSE round trip each (docs/architecture.md, writes).
    xattr: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


@dataclass(eq=False, slots=True)
class Node:
    inode: int
    name: bytes
    parent: int
    export: Export | None = None  # None: a directory
    children: dict[bytes, Node] = field(default_factory=dict)
    io: ExportIO | None = None  # once the export was first used and connected
    opening: trio.Lock = field(default_factory=trio.Lock)
    window: Partition | None = None  # a partition file: this part of ``disk``'s export
    disk: Node | None = None
    partitions: list[Node] = field(default_factory=list)  # of an export, with --partitions
    allocated: int | None = None  # bytes holding data, as block status said (st_blocks)

    @property
    def size(self) -> int:
        if self.window is not None:
            return self.window.size
        return self.export.size or 0 if self.export is not None else 0

    def on_disk(self, offset: int) -> tuple[Node, int]:
        """The export's node and the offset in it: a partition file is a window on its
        disk, any other file is itself."""
        if self.window is None:
            return self, offset
        assert self.disk is not None
        return self.disk, self.window.start + offset


@dataclass(slots=True)
class Handle:
    node: Node
    sync: bool  # O_SYNC / O_DSYNC: writes use FUA (or a flush)
    writable: bool


async def read_partitions(io: ExportIO, size: int) -> list[Partition]:
    """Run the partition table parser against the export."""
    steps = read_table(size)
    try:
        request: Read = next(steps)
        while True:
            end = min(request.offset + request.length, size)
            data = bytes(await io.read(request.offset, end - request.offset))
            request = steps.send(data)
    except StopIteration as stop:
        parts: list[Partition] = stop.value
        return parts


def _errno_for(exc: BaseException) -> int:
    """The errno a backend failure becomes. One place, so every handler agrees."""
    # (NBD_ESHUTDOWN never gets here: the connection turns it into a retry.)
    return exc.errno if isinstance(exc, CommandError) else errno.EIO


def _handler(
    fn: Callable[Concatenate[NbdFs, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[NbdFs, P], Coroutine[Any, Any, R]]:
    """A FUSE request that may go to the server: the poller is told when it begins and
    ends, and every failure becomes FUSEError (pyfuse3 would end the mount on anything
    else). (One wrapper, not two: it is a coroutine frame that every request of these
    handlers passes through, at every wake-up.)"""

    @functools.wraps(fn)
    async def wrapper(self: NbdFs, /, *args: P.args, **kwargs: P.kwargs) -> R:
        poller = self.poller
        if poller is not None:
            poller.enter()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NbdError as exc:
            code = _errno_for(exc)
            log.warning(
                "%s failed: %s (returning %s)", fn.__name__, exc, errno.errorcode.get(code, code)
            )
            raise pyfuse3.FUSEError(code) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("%s failed unexpectedly (a bug in nbdfs)", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if poller is not None:
                poller.leave()

    return wrapper


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_NO_HIDE_STALE = 0x01, 0x02, 0x04
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE


def missing_fuse_features() -> list[str]:
    """What this pyfuse3 cannot do that nbdfs's patched build can (contrib/pyfuse3)."""
    wanted = {
        "fallocate": "fallocate (discard and zeroing: fstrim, fallocate -p/-z)",
        "lseek": "lseek SEEK_DATA/SEEK_HOLE (holes for cp --sparse, qemu-img)",
        "max_background": "max_background (more than 12 requests in flight)",
    }
    return [text for name, text in wanted.items() if not hasattr(pyfuse3.Operations, name)]


class NbdFs(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # (contrib/pyfuse3's INIT settings; stock pyfuse3 ignores them.) The kernel's default
    # of 12 background requests capped queue depth 16 at 12; 64 is pyfuse3's task limit.
    max_background = 64
    congestion_threshold = 48

    def __init__(
        self, config: MountConfig, exports: Sequence[Export], nursery: trio.Nursery
    ) -> None:
        super().__init__()
        self.config = config
        # (read by pyfuse3 at FUSE INIT: the kernel then owns buffered writes until writeback)
        self.enable_writeback_cache = config.writeback_cache
        self._nursery = nursery
        self._nodes: dict[int, Node] = {}
        self._handles: dict[int, Handle] = {}
        self._snapshots: dict[int, bytes] = {}  # open status files: what each one reads
        self._next_fh = 1
        self._mtime_ns = time.time_ns()
        self.after_init: Callable[[], None] | None = None
        self.poller: AdaptivePoll | None = None  # set by the mount when polling is on
        self._store = BlockStore(config.cache_size)  # every export's cached blocks
        self._root = self._add(b"", pyfuse3.ROOT_INODE)
        self._paths: dict[str, tuple[str, ...]] = {}
        self.sync(exports)

    def sync(self, exports: Sequence[Export]) -> list[tuple[int, bytes, int]]:
        """Make the tree show exactly ``exports``; return the entries that went away.

        An export whose path and metadata did not change keeps its node (and its open
        files and connections). A new, vanished or changed one is added or removed; each
        removed ``(parent inode, name, inode)`` is returned so the kernel's cached entry can
        be invalidated. Removed nodes stay known by inode, so files still open on them keep
        working (or fail cleanly) until closed.
        """
        paths = export_paths(e.name for e in exports)
        wanted = {e.name: e for e in exports}
        gone: list[tuple[int, bytes, int]] = []
        for name, path in list(self._paths.items()):
            node = self._lookup_path(path)
            same = node is not None and node.export == wanted.get(name) and paths.get(name) == path
            if not same:
                gone += self._detach(path)
                del self._paths[name]
        for export in exports:
            if export.name in self._paths:
                continue
            parent = self._root
            *dirs, leaf = paths[export.name]
            for d in dirs:
                key = os.fsencode(d)
                child = parent.children.get(key)
                if child is None:
                    child = self._add(key, parent.inode)
                    parent.children[key] = child
                parent = child
            key = os.fsencode(leaf)
            parent.children[key] = self._add(key, parent.inode, export)
            self._paths[export.name] = paths[export.name]
        return gone

    def _lookup_path(self, path: tuple[str, ...]) -> Node | None:
        node: Node | None = self._root
        for part in path:
            node = node.children.get(os.fsencode(part)) if node is not None else None
        return node

    def _detach(self, path: tuple[str, ...]) -> list[tuple[int, bytes, int]]:
        """Unlink the file at ``path`` and any directories left empty above it."""
        chain = [self._root]
        for part in path:
            child = chain[-1].children.get(os.fsencode(part))
            if child is None:
                return []
            chain.append(child)
        gone = self._set_partitions(chain[-2], chain[-1], [])
        for parent, node in reversed(list(itertools.pairwise(chain))):
            if node.children:  # a directory still holding other exports stays
                break
            del parent.children[node.name]
            gone.append((parent.inode, node.name, node.inode))
        return gone

    def init(self) -> None:
        """FUSE INIT is being answered; run ``after_init`` once the kernel has the reply."""
        if self.after_init is not None:
            hook = self.after_init

            async def later() -> None:
                await trio.sleep(0)
                hook()

            self._nursery.start_soon(later)

    def _add(self, name: bytes, parent: int, export: Export | None = None) -> Node:
        inode = pyfuse3.ROOT_INODE if not self._nodes else max(self._nodes) + 1  # never reused
        node = Node(inode, name, parent, export)
        self._nodes[inode] = node
        return node

    @property
    def exports(self) -> list[Node]:
        """Every export node, including ones removed by a refresh but still known (not the
        partition files)."""
        return [n for n in self._nodes.values() if n.export is not None and n.window is None]

    async def load_partitions(self) -> list[tuple[int, bytes, int]]:
        """Read each export's partition table and show a file per partition next to it
        (``NAME.p1``, ...); return the entries that went away. A table that cannot be read
        or trusted gives one log line and no partition files for that export."""
        gone: list[tuple[int, bytes, int]] = []
        for node in self.exports:
            parent = self._nodes[node.parent]
            shown = parent.children.get(node.name) is node
            if node.export is None or not node.export.size or not shown:
                continue
            parts: list[Partition] = []
            try:
                io = await self._io(node)
                with trio.fail_after(self.config.timeout):
                    parts = await read_partitions(io, node.export.size)
            except (NbdError, trio.TooSlowError) as exc:
                log.warning("export %r: no partition files: %s", node.export.name, exc)
            gone += self._set_partitions(parent, node, parts)
        return gone

    def _set_partitions(
        self, parent: Node, node: Node, parts: list[Partition]
    ) -> list[tuple[int, bytes, int]]:
        """Show ``parts`` as files next to ``node`` in ``parent``; return what went away."""
        gone = []
        kept = []
        for old in node.partitions:
            if old.window in parts:  # unchanged: the same file (open ones keep working)
                kept.append(old)
            elif parent.children.get(old.name) is old:
                del parent.children[old.name]
                gone.append((parent.inode, old.name, old.inode))
        node.partitions = kept
        for part in parts:
            name = node.name + f".p{part.number}".encode()
            if any(k.window == part for k in kept):
                continue
            if name in parent.children:
                log.warning("partition file %r not shown: the name is taken", name)
                continue
            child = self._add(name, parent.inode, node.export)
            child.window, child.disk = part, node
            parent.children[name] = child
            node.partitions.append(child)
        return gone

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _read_only(self, node: Node) -> bool:
        return self.config.readonly or (node.export is not None and node.export.read_only)

    def _base_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        """What every file's attributes share: owner, times, how long the kernel keeps them."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_uid = self.config.uid
        attr.st_gid = self.config.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        return attr

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = self._base_attr(node.inode)
        if node.export is None:
            attr.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            attr.st_nlink = 2 + sum(1 for c in node.children.values() if c.export is None)
            attr.st_size = 0
        else:
            mode = 0o444 if self._read_only(node) else 0o644
            attr.st_mode = pyfuse3.ModeT(stat.S_IFREG | mode)
            attr.st_nlink = 1
            attr.st_size = node.size
            block = node.export.block_size
            attr.st_blksize = max(block.preferred if block else 4096, 4096)
            # What the server has allocated, once known (so cp --sparse and tar -S look for
            # holes, and du tells a thin export's use); otherwise all of it.
            used = attr.st_size if node.allocated is None else node.allocated
            attr.st_blocks = (used + 511) // 512
        return attr

    async def _count_allocation(self, node: Node) -> bool:
        """Ask (through the extents map) how much of a connected export file holds data;
        whether the figure changed. Never connects: a stat of an unused file stays free."""
        disk, start = node.on_disk(0)
        if disk.io is None:
            return False
        try:
            allocated = await disk.io.allocated(start, start + node.size)
        except NbdError as exc:  # (st_blocks is an estimate: the full size will do)
            log.info("%r: cannot count its allocation: %s", node.name, exc)
            allocated = None
        changed = allocated != node.allocated
        node.allocated = allocated
        return changed

    async def _io(self, node: Node) -> ExportIO:
        """The export's I/O object, built (and connected) on the export's first use."""
        io = node.io
        if io is not None:
            return io
        async with node.opening:
            if node.io is None:
                assert node.export is not None
                cfg = self.config
                pool = ExportPool(
                    cfg.target,
                    node.export.name,
                    cfg.tls,
                    self._nursery,
                    limit=cfg.connections,
                    timeout=cfg.timeout,
                    poller=self.poller,
                )
                try:
                    node.io = await ExportIO.open(pool, self._store)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await pool.aclose()
                    raise
            return node.io

    # -- the tree --------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        child = parent.children.get(bytes(name))
        if child is None:
            if parent_inode == pyfuse3.ROOT_INODE and name == STATUS_FILE.encode():
                return self._status_attr()
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode == STATUS_INODE:
            return self._status_attr()
        node = self._node(inode)
        if node.export is not None:
            await self._count_allocation(node)
        return self._attr(node)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size and (node.export is None or attr.st_size != node.size):
            log.info("refusing to resize %r: an export's size is set by the server", node.name)
            raise pyfuse3.FUSEError(errno.EINVAL if node.export is not None else errno.EISDIR)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(node)  # time updates are accepted and not kept

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self._node(inode)
        if node.export is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        node = self._node(fh)
        children = sorted(node.children.values(), key=lambda c: c.name)
        for i in range(start_id, len(children)):
            child = children[i]
            if not pyfuse3.readdir_reply(
                token, pyfuse3.FileNameT(child.name), self._attr(child), i + 1
            ):
                break

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        total = sum(n.export.size or 0 for n in self.exports if n.export is not None)
        st.f_blocks = (total + 4095) // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self._nodes)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- files -----------------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if inode == STATUS_INODE:
            return self._open_status(writable)
        node = self._node(inode)
        if node.export is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writable and self._read_only(node):
            raise pyfuse3.FUSEError(errno.EROFS)
        # O_TRUNC is ignored, as a block device ignores it: `cp img FILE` or `dd of=FILE`
        # overwrite the start of the export and leave the rest. An explicit truncate to
        # another size is refused in setattr.
        # Connect now (the first read would), and count the allocation: the kernel answers
        # the fstat that follows (cp, tar) from attributes cached at lookup, so they are
        # invalidated if st_blocks is not what it was told.
        # (Open itself never fails for it: an unreachable server is the first read's error.)
        disk, _ = node.on_disk(0)
        try:
            await self._io(disk)
        except NbdError as exc:
            log.info("%r: not connected at open: %s", node.name, exc)
        if await self._count_allocation(node):
            pyfuse3.invalidate_inode(pyfuse3.InodeT(inode), attr_only=True)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, bool(flags & (os.O_SYNC | os.O_DSYNC)), writable)
        # O_DIRECT (e.g. losetup --direct-io=on) bypasses the kernel's page cache, as asked.
        # Otherwise the kernel drops a file's cached pages at each open, unless told to keep
        # them (--kernel-cache): right only while all writes come through this mount.
        direct = bool(flags & os.O_DIRECT)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fh),
            direct_io=direct,
            keep_cache=self.config.kernel_cache and not direct,
        )

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @_handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:  # the status file (or a handle that is not open: EBADF)
            return self._read_status(fh, off, size)
        node = handle.node
        if node.window is not None:  # a partition file: clipped to it
            if off >= node.window.size:
                return b""
            size = min(size, node.window.size - off)
            node, off = node.on_disk(off)
        # pyfuse3 replies from any buffer (PyObject_GetBuffer); a memoryview saves a copy.
        io = node.io or await self._io(node)
        return await io.read(off, size)  # type: ignore[return-value]

    @_handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        size = node.size
        if off >= size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = memoryview(buf)[: size - off]  # a write across the end is cut short, like a disk
        node, off = node.on_disk(off)
        io = node.io or await self._io(node)
        return await io.write(off, data, fua=handle.sync)

    @_handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        node, _ = self._handle(fh).node.on_disk(0)
        io = node.io
        if io is not None:  # (nothing was written through an export not opened)
            await io.flush()

    @_handler
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2), as a disk answers it (contrib/pyfuse3 patch 1): punch a hole →
        NBD_CMD_TRIM, zero a range → NBD_CMD_WRITE_ZEROES (or zeros written), allocate →
        nothing to do (the server allocates); past the end → EINVAL, as a block device."""
        handle = self._handle(fh)
        node = handle.node
        known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_NO_HIDE_STALE
        if mode & ~(known | FALLOC_FL_ZERO_RANGE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # collapse, insert, unshare
        if offset < 0 or length <= 0 or offset + length > node.size:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return  # allocation inside a disk of fixed size: there already
        node, offset = node.on_disk(offset)
        io = node.io or await self._io(node)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not io.can_trim:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # as a disk without discard
            await io.trim(offset, length, fua=handle.sync)
        else:
            await io.zero(offset, length, fua=handle.sync)

    @_handler
    async def lseek(self, fh: pyfuse3.FileHandleT, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the export's block status (contrib/pyfuse3 patch 2)."""
        node = self._handle(fh).node
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)  # (the kernel answers the others itself)
        size = node.size
        if offset < 0 or offset >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        node, base = node.on_disk(0)
        io = node.io or await self._io(node)
        found = await io.next_extent(base + offset, whence == SEEK_DATA)
        if found is None or found - base >= size:
            if whence == SEEK_DATA:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return size  # the end of a partition file is a hole, as any file's end
        return found - base

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None  # close() is not fsync(), as on any disk; the kernel calls fsync for that

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._handles.pop(fh, None)
        self._snapshots.pop(fh, None)

    # -- the status file -----------------------------------------------------------------

    def _status_attr(self) -> pyfuse3.EntryAttributes:
        attr = self._base_attr(STATUS_INODE)
        attr.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
        attr.st_nlink = 1
        attr.st_size = 0  # (its length is known only when read; opened for direct I/O)
        return attr

    def _open_status(self, writable: bool) -> pyfuse3.FileInfo:
        """A handle on the status as it is now (each open reads a snapshot of its own)."""
        if writable:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        self._snapshots[fh] = json.dumps(self.status()).encode()
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True)

    def _read_status(self, fh: int, off: int, size: int) -> bytes:
        snapshot = self._snapshots.get(fh)
        if snapshot is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return snapshot[off : off + size]

    # -- metadata as extended attributes ------------------------------------------------

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        export = node.export
        if export is None:
            return {}
        out = {
            b"export": export.name.encode(),
            b"size": str(export.size).encode(),
            b"read_only": b"1" if export.read_only else b"0",
            b"flags": " ".join(
                f.name or "" for f in type(export.flags) if f in export.flags
            ).encode(),
            b"server": self.config.target.describe().encode(),
        }
        if export.description:
            out[b"description"] = export.description.encode()
        if export.block_size:
            b = export.block_size
            out[b"block_size"] = f"{b.minimum} {b.preferred} {b.maximum}".encode()
        if node.window is not None:  # partition (its number), partition.start, ...
            out |= {
                b"partition" + (b"" if k == "number" else b"." + k.encode()): str(v).encode()
                for k, v in node.window.facts().items()
            }
        return {XATTR_PREFIX + k: v for k, v in out.items()}

    def export_status(self, node: Node, path: tuple[str, ...]) -> dict[str, object]:
        """One export's part of ``nbdfs status`` (its file at ``path``): from memory."""
        assert node.export is not None
        entry: dict[str, object] = {
            "name": node.export.name,
            "path": "/".join(path),
            "active": node.io is not None,
        }
        if node.io is not None:
            entry |= node.io.stats()
        parts = []
        for p in node.partitions:  # (files next to the export's)
            assert p.window is not None
            where = "/".join((*path[:-1], p.name.decode(errors="surrogateescape")))
            parts.append({"path": where, **p.window.facts()})
        if parts:
            entry["partitions"] = parts
        return entry

    def status(self) -> dict[str, object]:
        """What the status file holds, from memory: the mount's part, and each export's in
        the tree in path order."""
        in_tree = [(path, self._lookup_path(path)) for path in sorted(self._paths.values())]
        out: dict[str, object] = {
            "server": self.config.target.describe(),
            "exports": [self.export_status(n, path) for path, n in in_tree if n is not None],
            "active": sum(1 for n in self.exports if n.io is not None),
            "cache": {
                "used": self._store.currsize,
                "capacity": self._store.capacity,
                "read_ahead": self._store.read_ahead.used,  # (outside the cache: runs)
            },
        }
        if self.poller is not None:
            out["poll"] = {
                "max_us": round(self.poller.max_budget * 1e6),
                "budget_us": round(self.poller.budget * 1e6),
                "caught": self.poller.caught,
                "slept": self.poller.slept,
            }
        return out

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if not self.config.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # (the kernel stops asking: see MountConfig)
        key = bytes(name)
        # (The kernel asks for security.capability before every write: a name that is not
        # ours is answered without building the export's attributes.)
        value = self._xattrs(self._node(inode)).get(key) if key.startswith(XATTR_PREFIX) else None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        if not self.config.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return [pyfuse3.XAttrNameT(k) for k in self._xattrs(self._node(inode))]

    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM if self.config.xattr else errno.ENOSYS)

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.EPERM if self.config.xattr else errno.ENOSYS)

    # -- the export list is the server's: no creating, removing or renaming ---------------

    async def create(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def close_all(self) -> dict[str, int]:
        """Flush and disconnect every export's connections (on unmount); return the exports
        whose final flush failed, with the bytes that may be lost."""
        lost: dict[str, int] = {}

        async def close(node: Node) -> None:
            assert node.io is not None and node.export is not None
            n = await node.io.aclose()
            if n:
                lost[node.export.name] = n

        async with trio.open_nursery() as nursery:
            for node in self.exports:
                if node.io is not None:
                    nursery.start_soon(close, node)
        return lost
