"""The mount's lifecycle: list exports, mount, serve, and on every exit path unmount.

``run_mount`` is what the daemon runs inside ``trio.run``. It reports readiness (or the
one-line error that stopped it) through ``ready`` so that ``nbdfs mount`` can go to the
background only once the mount is really there, as sshfs does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import stat
from collections.abc import Callable

import pyfuse3
import trio

from . import poll
from .connection import list_exports, probe_export
from .errors import NbdError, TlsError
from .fs import MountConfig, NbdFs, missing_fuse_features
from .session import Export

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> None:
    """Keep large buffers (FUSE writes, NBD reads: up to 32 MiB) in the heap for reuse.

    By default glibc mmaps every allocation above 128 KiB and unmaps it on free, so each
    1 MiB request paid for fresh pages: page faults and zeroing, measured as a large share
    of the daemon's CPU time on the write path. Nor is the heap's free top given back
    (trimmed) after every burst: the write journal frees up to 64 MiB at each flush, and
    with glibc's 128 KiB trim threshold (32 MiB tried too) the next burst faulted it all in
    again; dd bs=1M + fsync went from ~430 to ~550 MB/s without trimming. The memory stays
    bounded by the peak (block cache + journal + requests in flight).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc
        pass


def raise_open_files_limit() -> None:
    """Let the daemon hold as many sockets as the hard limit allows: every export read keeps
    a connection until it has been idle a while, and the usual soft limit of 1024 would
    make the thousandth export fail with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.info("cannot raise the open files limit from %d: %s", soft, exc)


def set_io_flusher() -> None:
    """Mark the daemon as an I/O flusher (Linux 5.6+), as loop and nbd helpers should be.

    Memory reclaim may need to write pages of a loop device that sits on our mount; an I/O
    flusher gets PF_MEMALLOC_NOIO, so its own allocations never wait for that writeback,
    which is the deadlock libnbd warns nbdfuse users about.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.info(
            "PR_SET_IO_FLUSHER not available (%s); loop devices on this mount are"
            " safest with --direct-io=on",
            os.strerror(err),
        )


async def discover(config: MountConfig) -> list[Export]:
    """The exports to show: the one the TARGET names, or every export the server lists."""
    target, tls = config.target, config.tls
    listing = await list_exports(target, tls, target.export, config.timeout)
    exports = []
    for export in listing.exports:
        if export.tls_required:
            if target.export is not None:
                raise TlsError(
                    f"server requires TLS for export {export.name!r}; use --tls=require (or an"
                    " nbds:// URI) with --tls-certificates DIR"
                )
            log.warning("export %r requires TLS; not shown (mount with --tls=require)", export.name)
            continue
        if export.size is None:  # a server without NBD_OPT_INFO: ask GO
            export = (await probe_export(target, tls, export.name, config.timeout)).export
        exports.append(export)
    return exports


def fuse_options(config: MountConfig, extra: set[str], target_text: str) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add("fsname=" + target_text.replace("\\", "\\\\").replace(",", "\\,"))
    opts.add("subtype=nbdfs")
    if config.readonly:
        opts.add("ro")
    opts |= extra
    return opts


READ_AHEAD_KB = 1024  # FUSE requests go up to 1 MiB (256 pages); the kernel default is 128 KiB


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """Let the kernel read ahead (and so send FUSE reads of) up to ``kb`` KiB at a time.

    Fewer, larger requests: a sequential reader costs an eighth of the round trips. The
    device number comes from /proc/self/mountinfo: stat() on our own mountpoint from the
    thread that serves it would wait for ourselves.
    """
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [fields[2] for fields in map(str.split, f) if fields[4] == mountpoint]
        if not devs:
            log.info("cannot raise the kernel read-ahead of %s: not in mountinfo", mountpoint)
            return
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as ra:
            ra.write(f"{kb}\n")
        log.info("kernel read-ahead of %s (bdi %s) set to %d KiB", mountpoint, devs[-1], kb)
    except OSError as exc:
        log.info("cannot raise the kernel read-ahead of %s: %s", mountpoint, exc)


def mount_problem(mountpoint: str, options: set[str]) -> str | None:
    """What will stop FUSE from mounting, checked before anything starts (fusermount3
    would say it on stderr in its own words, after the daemon was forked)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        return (
            f"you may not use /dev/fuse (mode {mode:04o}); distributions make it 0666: ask an"
            " administrator to run 'chmod 0666 /dev/fuse' (a udev rule keeps it so), or mount"
            " as root"
        )
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        return (
            f"cannot mount on {mountpoint}: you may not write to it (mount on a directory"
            " you own, e.g. mkdir ~/mnt)"
        )
    if "allow_other" in options and os.geteuid() != 0:
        try:
            with open("/etc/fuse.conf") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            return (
                "-o allow_other needs 'user_allow_other' in /etc/fuse.conf when not root;"
                " add it there (as root) or drop allow_other"
            )
    return None


def mount_failure(mountpoint: str, options: set[str], exc: Exception) -> str:
    """Why FUSE would not mount, as far as we can tell, and what to do about it."""
    problem = mount_problem(mountpoint, options)
    if problem is not None:
        return problem
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == mountpoint for line in f):
            return (
                f"{mountpoint} is already a mount point; unmount it first or pick another directory"
            )
    return f"cannot mount on {mountpoint}: {exc} (see the log for FUSE's reason)"


async def refresh_exports(fs: NbdFs, config: MountConfig) -> None:
    """Every ``config.refresh`` seconds, show the server's current export list."""
    while True:
        await trio.sleep(config.refresh)
        try:
            with trio.fail_after(config.timeout):
                exports = await discover(config)
        except (NbdError, trio.TooSlowError) as exc:
            log.info("export list not refreshed: %s", exc)
            continue
        before = {n.export.name for n in fs.exports if n.export is not None}
        gone = fs.sync(exports)
        if config.partitions:
            gone += await fs.load_partitions()
        added = {e.name for e in exports} - before
        for parent, name, inode in gone:
            # Queued to pyfuse3's notify thread: invalidating from this thread could wait
            # on a request that waits on us.
            pyfuse3.invalidate_entry_async(
                pyfuse3.InodeT(parent),
                pyfuse3.FileNameT(name),
                pyfuse3.InodeT(inode),
                ignore_enoent=True,
            )
        if gone or added:
            log.info("export list refreshed: %d removed, %d added", len(gone), len(added))


async def run_mount(
    config: MountConfig,
    mountpoint: str,
    options: set[str],
    ready: Callable[[str | None], None],
) -> str | None:
    """Discover, mount, report readiness, serve until unmounted or signalled, clean up.

    Returns:
        Why the mount ended badly after it was up (data the server may not have), or None.
    """
    try:
        exports = await discover(config)
    except NbdError as exc:
        ready(str(exc))
        return None
    if not exports:
        ready("the server offers no exports to mount")
        return None
    failure = None
    missing = missing_fuse_features()
    if missing:
        log.info(
            "pyfuse3 without nbdfs's patches (contrib/pyfuse3; scripts/install builds them):"
            " unavailable: %s",
            "; ".join(missing),
        )
    async with trio.open_nursery() as nursery:
        fs = NbdFs(config, exports, nursery)
        fs.poller = poll.install(config.poll)  # (before any pool exists: each is handed it)
        if config.partitions:
            await fs.load_partitions()
        fs.after_init = lambda: raise_read_ahead(mountpoint)
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as exc:
            ready(mount_failure(mountpoint, options, exc))
            nursery.cancel_scope.cancel()
            return None
        log.info(
            "mounted %d export(s) of %s on %s", len(exports), config.target.describe(), mountpoint
        )
        unmount = False
        try:
            ready(None)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

                async def on_signal() -> None:
                    nonlocal unmount
                    async for sig in signals:
                        log.info("signal %d: flushing and unmounting", sig)
                        unmount = True
                        pyfuse3.terminate()
                        return

                nursery.start_soon(on_signal)
                if config.refresh > 0:
                    nursery.start_soon(refresh_exports, fs, config)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            with trio.CancelScope(shield=True):
                lost = await fs.close_all()
            pyfuse3.close(unmount=unmount)
            nursery.cancel_scope.cancel()
            log.info("unmounted %s", mountpoint)
            if lost:
                failure = "final flush failed: " + ", ".join(
                    f"{n} bytes of export {name!r} may be lost" for name, n in sorted(lost.items())
                )
    return failure
