"""Command-line entry points: ``nbdfs list``, ``nbdfs mount`` and friends.

Every user or server mistake ends as one line on stderr and a non-zero exit status; a
traceback means a bug in nbdfs.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import math
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .connection import DEFAULT_TIMEOUT, list_exports
from .errors import MountError, NbdError, TargetError, UsageError
from .fs import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_CONNECTIONS,
    DEFAULT_REFRESH,
    MountConfig,
)
from .mount import (
    fuse_options,
    mount_problem,
    raise_open_files_limit,
    run_mount,
    set_io_flusher,
    tune_malloc,
)
from .names import STATUS_FILE
from .poll import MAX_BUDGET
from .session import Export, TlsMode
from .target import Target, parse_target
from .tls import TlsConfig

EXIT_OK = 0
EXIT_ERROR = 1  # the server, the network or the system said no

TARGET_HELP = """\
TARGET is one of:
  HOST                       port 10809
  HOST:PORT                  e.g. localhost:10809
  [IPV6]:PORT                e.g. [::1]:10809
  nbd://HOST[:PORT]/EXPORT   an NBD URI (the export name is percent-decoded)
  nbds://HOST[:PORT]/EXPORT  the same, TLS required
  nbd+unix:///EXPORT?socket=PATH, nbds+unix:///EXPORT?socket=PATH
URI query parameters: tls-certificates=DIR, tls-verify-peer=0|1, tls-hostname=NAME.
An nbd:// URI without a path names the whole server; with a path, one export
("nbd://host/" is the default export, whose name is empty).
"""


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        help="disable: never; allow: use TLS if the server offers it (open to downgrade);"
        " require: TLS or nothing. Default: require for nbds://, else disable.",
    )
    group.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="directory with ca-cert.pem (and client-cert.pem, client-key.pem);"
        " default: the system trust store",
    )
    group.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="use a pre-shared key from FILE (username:hexkey lines, as nbdkit and qemu use)",
    )
    group.add_argument(
        "--tls-username", metavar="NAME", help="which PSK user (default: your user name)"
    )
    group.add_argument(
        "--no-tls-verify-peer",
        action="store_true",
        help="do not check the server's certificate (for tests only: allows impersonation)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: protocol traces)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdfs",
        description="Use the exports of an NBD (Network Block Device) server as regular files,"
        " through FUSE, without the kernel nbd module.",
        epilog="Run 'nbdfs COMMAND --help' for the options of each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbdfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_list = sub.add_parser(
        "list",
        help="show the exports a server offers",
        description="Show every export of an NBD server: name, size, read-only or writable, and"
        " description. Names are shell-quoted (the default export is '').",
        epilog=TARGET_HELP
        + "\nExamples:\n  nbdfs list localhost\n  nbdfs list --json nbds://nas.example/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_list.add_argument("target", metavar="TARGET")
    p_list.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p_list.add_argument(
        "--timeout",
        default=None,
        metavar="SECONDS",
        help="how long connecting and each handshake may take before giving up"
        f" (default {DEFAULT_TIMEOUT:g})",
    )
    _add_tls_options(p_list)
    _add_common(p_list)
    p_list.set_defaults(func=cmd_list)

    p_mount = sub.add_parser(
        "mount",
        help="mount a server's exports as files",
        description="Mount the exports of an NBD server on MOUNTPOINT: each export is a regular"
        " file of the export's size, which losetup, qemu-img, fdisk, dd or any program can use."
        " nbdfs goes to the background once the mount is ready (like sshfs); unmount with"
        " 'fusermount3 -u MOUNTPOINT'.",
        epilog=TARGET_HELP + MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_mount.add_argument("target", metavar="TARGET")
    p_mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_mount.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground, log to stderr (or --log-file)",
    )
    p_mount.add_argument(
        "-r", "--readonly", action="store_true", help="mount read-only (files are 0444)"
    )
    p_mount.add_argument(
        "--kernel-cache",
        action="store_true",
        help="keep the kernel's page cache of a file when it is opened again (fast re-reads);"
        " safe only while nothing else writes to the exports (see nbdfs(1))",
    )
    p_mount.add_argument(
        "--writeback-cache",
        action="store_true",
        help="let the kernel cache buffered writes and send them in the background, many at"
        " once (faster over a link); a write then returns before the server has it, and its"
        " errors (ENOSPC past the end) come at fsync or close (see nbdfs(1))",
    )
    p_mount.add_argument(
        "--xattr",
        action="store_true",
        help="answer extended attributes: each file's export metadata as user.nbd.*"
        " (getfattr -d FILE); the kernel then asks the daemon for security.capability"
        " before every write, one round trip more each (see nbdfs(1))",
    )
    p_mount.add_argument(
        "--partitions",
        action="store_true",
        help="also show each partition of an export (MBR, logical, GPT) as a file NAME.p1,"
        " NAME.p2, ... (numbered as Linux numbers them), a window on the export; the tables"
        " are read at mount and on refresh",
    )
    p_mount.add_argument(
        "-C",
        "--connections",
        default=None,
        metavar="N",
        help="connections per export, used only if the server allows multi-conn"
        f" (default {DEFAULT_CONNECTIONS})",
    )
    p_mount.add_argument(
        "--cache-size",
        default=None,
        metavar="SIZE",
        help="block cache of the whole mount, shared by its exports, bytes or with K/M/G"
        f" (default {DEFAULT_CACHE_SIZE >> 20}M; 0 disables it)",
    )
    p_mount.add_argument(
        "--timeout",
        default=None,
        metavar="SECONDS",
        help="how long one request may wait before it fails with EIO, and connecting and"
        f" each handshake before giving up (default {DEFAULT_TIMEOUT:g})",
    )
    p_mount.add_argument(
        "--poll-max",
        default=None,
        metavar="MICROSECONDS",
        help="poll for I/O up to this long before the daemon sleeps, adapting to how soon"
        " replies and requests come (faster small I/O against a fast server, for CPU time;"
        f" default {MAX_BUDGET * 1e6:.0f}; 0: never poll)",
    )
    p_mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: the ones above as name=value (ro, kernel_cache, writeback_cache, partitions, xattr, connections=N,"
        " cache_size=SIZE, timeout=S, poll_max=US, tls=MODE, tls_certificates=DIR), or FUSE"
        " options such as allow_other",
    )
    p_mount.add_argument(
        "--refresh",
        default=None,
        metavar="SECONDS",
        help="re-read the export list this often: new exports appear, vanished ones go"
        f" (default {DEFAULT_REFRESH:g}; 0: never)",
    )
    p_mount.add_argument("--uid", metavar="N", help="owner of the files (default: you)")
    p_mount.add_argument("--gid", metavar="N", help="group of the files (default: yours)")
    p_mount.add_argument(
        "--log-file",
        metavar="FILE",
        help="where the daemon logs (default: syslog; with -f, stderr)",
    )
    _add_tls_options(p_mount)
    _add_common(p_mount)
    p_mount.set_defaults(func=cmd_mount)

    p_umount = sub.add_parser(
        "umount",
        help="unmount (flushing every export first)",
        description="Unmount an nbdfs mount: the daemon flushes what was written, disconnects"
        " politely and exits. Same as 'fusermount3 -u MOUNTPOINT'.",
    )
    p_umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_common(p_umount)
    p_umount.set_defaults(func=cmd_umount)

    p_status = sub.add_parser(
        "status",
        help="show what a running mount is doing",
        description="Per export: connections, requests and bytes read and written, cache use and"
        " hit rate, reconnects, retries, timeouts and errors, unflushed bytes; from the"
        " running daemon (it answers from memory, also while a server is away).",
    )
    p_status.add_argument("mountpoint", metavar="MOUNTPOINT")
    p_status.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p_status)
    p_status.set_defaults(func=cmd_status)

    p_tls = sub.add_parser(
        "tls-init",
        help="create a CA, a server and a client certificate for NBD over TLS",
        description="Create, in DIR, a private CA with a server certificate for the given host"
        " names or addresses and a client certificate, in the layout nbdkit, qemu-nbd, libnbd"
        " and nbdfs use (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,"
        " client-key.pem; keys are mode 0600). Prints how to start each server with them.",
        epilog="Example:\n  nbdfs tls-init ~/nbd-pki --host nas.example --host 192.0.2.7\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_tls.add_argument("directory", metavar="DIR")
    p_tls.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a host name or IP address clients use for the server (repeat for more)",
    )
    p_tls.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p_tls.add_argument(
        "--client-name", default="nbdfs-client", help="the client certificate's common name"
    )
    _add_common(p_tls)
    p_tls.set_defaults(func=cmd_tls_init)
    return parser


def _nbdfs_mount(path: str) -> str:
    mountpoint = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == mountpoint and fields[2] == "fuse.nbdfs":
                return mountpoint
    raise MountError(f"{path} is not an nbdfs mount (see 'findmnt -t fuse.nbdfs')")


def mount_status(mountpoint: str) -> dict[str, Any]:
    """The whole status, the mount's own part and each export's: the daemon's status file
    (MOUNTPOINT/.nbdfs-status, found by name, never listed), read in one go."""
    try:
        with open(os.path.join(mountpoint, STATUS_FILE), "rb") as f:
            status = json.loads(f.read())
    except OSError as exc:
        raise MountError(f"the daemon of {mountpoint} does not answer: {exc.strerror}") from None
    except ValueError as exc:
        raise MountError(f"the daemon of {mountpoint} sent an unreadable status: {exc}") from None
    assert isinstance(status, dict)
    return status


def _flush_before_unmount(mountpoint: str) -> None:
    """fsync every export holding unflushed bytes, so a failure is the user's to decide on
    while the mount is still there (an unmount cannot give them back)."""
    try:
        status = mount_status(mountpoint)
    except MountError:
        return  # the daemon does not answer: unmounting is all there is left to do
    for e in status["exports"]:
        if not e.get("unflushed") or not e.get("path"):
            continue
        try:
            fd = os.open(os.path.join(mountpoint, e["path"]), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise MountError(
                f"not unmounting {mountpoint}: export {e['name']!r} holds"
                f" {human_size(e['unflushed'])} the server has not made durable, and flushing"
                f" failed ({exc.strerror}); bring the server back and retry, or unmount anyway"
                f" with 'fusermount3 -u {mountpoint}' and lose them"
            ) from None


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = _nbdfs_mount(args.mountpoint)
    _flush_before_unmount(mountpoint)
    proc = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().rpartition(": ")[2] or "fusermount3 failed"
        hint = ""
        if "busy" in reason.lower():
            hint = "; something still uses it (a loop device? see 'losetup -a' and 'fuser -m')"
        raise MountError(f"cannot unmount {mountpoint}: {reason}{hint}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    mountpoint = _nbdfs_mount(args.mountpoint)
    status = mount_status(mountpoint)
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    cache = status["cache"]
    ahead = cache.get("read_ahead")  # (a daemon started before nbdfs was upgraded: none)
    print(
        f"{mountpoint}: {status['server']}, {len(status['exports'])} export(s),"
        f" {status['active']} opened; cache {human_size(cache['used'])}"
        f"/{human_size(cache['capacity'])}"
        + (f", read-ahead {human_size(ahead)}" if ahead is not None else "")
    )
    for e in status["exports"]:
        line = f"  {shlex.quote(e['name'])}: "
        parts = [
            f"    {p['path']}: {p['scheme']} partition {p['number']}, start {p['start']}, size"
            f" {human_size(p['size'])}, type {p['type']}"
            + (f", name {shlex.quote(p['name'])}" if p.get("name") else "")
            for p in e.get("partitions", ())
        ]
        if not e["active"]:
            print(line + "not opened yet", *parts, sep="\n")
            continue
        if e.get("failed"):
            line += "FAILED (it changed on the server while disconnected: remount); "
        c = e["cache"]
        hits = c["hits"] + c["misses"]
        rate = f"{c['hits'] / hits:.0%}" if hits else "-"
        print(
            line + f"{e['connections']} conn, read {human_size(e['bytes_read'])}, written"
            f" {human_size(e['bytes_written'])}, {e['requests']} requests; cached"
            f" {human_size(c['used'])}, hit {rate}; reconnects"
            f" {e['reconnects']}, retries {e['retries']}, timeouts {e['timeouts']}, errors"
            f" {e['errors']}, unflushed {human_size(e['unflushed'])}"
        )
        for part in parts:
            print(part)
    if "poll" in status:
        p = status["poll"]
        print(
            f"  polling: up to {p['max_us']} us (now {p['budget_us']} us); waits caught"
            f" {p['caught']}, slept {p['slept']}"
        )
    return EXIT_OK


def cmd_tls_init(args: argparse.Namespace) -> int:
    from . import pki

    created = pki.create(Path(args.directory).expanduser(), args.host, args.days, args.client_name)
    print(pki.server_commands(created), end="")
    return EXIT_OK


def tls_config(args: argparse.Namespace, target: Target) -> TlsConfig:
    """Combine the TARGET's TLS parameters with the command line's; the stricter wins."""
    mode = target.tls or TlsMode.DISABLE
    if args.tls is not None:
        wanted = TlsMode(args.tls)
        if target.tls is TlsMode.REQUIRE and wanted is not TlsMode.REQUIRE:
            raise TargetError(
                f"--tls={wanted.value} contradicts the nbds:// URI, which requires TLS"
            )
        mode = wanted
    verify = not args.no_tls_verify_peer
    if target.tls_verify_peer is not None:
        verify = verify and target.tls_verify_peer
    config = TlsConfig(
        mode=mode,
        certificates=args.tls_certificates or target.tls_certificates,
        verify_peer=verify,
        psk_file=args.tls_psk or target.tls_psk_file,
        username=args.tls_username or target.tls_username,
    )
    if mode is not TlsMode.DISABLE:
        config.context()  # a missing or unreadable file is reported before connecting
    return config


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def export_json(export: Export) -> dict[str, object]:
    out: dict[str, object] = {
        "name": export.name,
        "size": export.size,
        "read_only": export.read_only,
        "description": export.description,
        "flags": [f.name for f in type(export.flags) if f in export.flags and f.name],
    }
    if export.block_size is not None:
        b = export.block_size
        out["block_size"] = {"minimum": b.minimum, "preferred": b.preferred, "maximum": b.maximum}
    if export.tls_required:
        out["tls_required"] = True
    return out


def format_listing(exports: list[Export]) -> str:
    rows = []
    for e in exports:
        if e.size is None:
            size = "TLS required" if e.tls_required else "size unknown"
            nbytes = ""
        else:
            size, nbytes = human_size(e.size), f"{e.size} bytes"
        mode = "" if e.size is None else ("ro" if e.read_only else "rw")
        rows.append((shlex.quote(e.name), size, nbytes, mode, e.description or ""))
    if not rows:
        return "(the server offers no exports)"
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        cells = [
            r[0].ljust(widths[0]),
            r[1].rjust(widths[1]),
            r[2].rjust(widths[2]),
            r[3].ljust(widths[3]),
        ]
        lines.append("  ".join(cells + ([r[4]] if r[4] else [])).rstrip())
    return "\n".join(lines)


async def _list(target: Target, tls: TlsConfig, timeout: float) -> list[Export]:
    listing = await list_exports(target, tls, target.export, timeout)
    return listing.exports


def cmd_list(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    timeout = _number(
        args.timeout, "--timeout", float, DEFAULT_TIMEOUT, 1e-3, MAX_TIMEOUT, "seconds"
    )
    exports = trio.run(_list, target, tls_config(args, target), timeout)
    if args.json:
        print(json.dumps([export_json(e) for e in exports], indent=2, ensure_ascii=False))
    else:
        print(format_listing(exports))
    return EXIT_OK


MOUNT_EPILOG = """
Files: one per export, named as the export; a "/" in a name makes a subdirectory, the
default (empty-named) export is "%default%", and a "%" is written "%25" (see the man page).
nbdfs status MOUNTPOINT tells each file's export and counters; with --xattr each file also
carries its export's metadata as extended attributes: getfattr -d FILE.

Examples:
  nbdfs mount localhost /mnt/nbd
  losetup --direct-io=on -f --show /mnt/nbd/disk
  nbdfs mount -r nbds://nas.example/backup /mnt/backup --tls-certificates ~/pki
"""

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``SIZE`` as bytes, or with a K/M/G/T suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * _SUFFIXES[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"bad size {text!r}: give bytes or a number with K, M or G")
    if value < 0:
        raise UsageError(f"bad size {text!r}: must not be negative")
    return int(value)


_OPTION_KEYS = {
    "ro": "readonly",
    "readonly": "readonly",
    "kernel_cache": "kernel_cache",
    "kernel-cache": "kernel_cache",
    "writeback_cache": "writeback_cache",
    "writeback-cache": "writeback_cache",
    "partitions": "partitions",
    "xattr": "xattr",
    "connections": "connections",
    "cache_size": "cache_size",
    "cache-size": "cache_size",
    "timeout": "timeout",
    "poll_max": "poll_max",
    "poll-max": "poll_max",
    "tls": "tls",
    "tls_certificates": "tls_certificates",
    "tls-certificates": "tls_certificates",
    "uid": "uid",
    "gid": "gid",
    "refresh": "refresh",
}
# Generic mount(8) options that make no sense to FUSE and are dropped silently.
_IGNORED = {
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "dev",
    "suid",
    "exec",
}


def split_mount_options(args: argparse.Namespace) -> set[str]:
    """Apply nbdfs's own -o options to ``args``; return the rest, for FUSE."""
    fuse: set[str] = set()
    for group in args.options:
        for opt in filter(None, group.split(",")):
            key, _, value = opt.partition("=")
            attr = _OPTION_KEYS.get(key)
            if attr is None:
                if key not in _IGNORED and not key.startswith("x-"):
                    fuse.add(opt)
                continue
            if attr in ("readonly", "kernel_cache", "writeback_cache", "partitions", "xattr"):
                setattr(args, attr, True)
            elif getattr(args, attr) is None:
                if not value:
                    raise UsageError(f"-o {key} needs a value: -o {key}=VALUE")
                setattr(args, attr, value)
    return fuse


MAX_TIMEOUT = 86400.0  # a day: beyond that a wait is a hang
MAX_ID = (1 << 32) - 2  # uid_t and gid_t; (uid_t)-1 means "no change" to the kernel


def _number(
    value: str | float | None,
    name: str,
    kind: type[int] | type[float],
    default: float,
    lo: float,
    hi: float,
    what: str = "",
) -> float:
    """An option's number (from the command line or -o, as text), checked to lie in
    ``[lo, hi]``, or a one-line error that says what it takes."""
    if value is None:
        return default
    what = what or ("a whole number" if kind is int else "a number")
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f"{name} takes {what} from {lo:g} to {hi:g}, not {value!r}") from None
    if not (math.isfinite(number) and lo <= number <= hi):
        raise UsageError(f"{name} takes {what} from {lo:g} to {hi:g}, not {value!r}")
    return number


def mount_config(args: argparse.Namespace, target: Target) -> MountConfig:
    connections = int(_number(args.connections, "--connections", int, DEFAULT_CONNECTIONS, 1, 64))
    timeout = _number(
        args.timeout, "--timeout", float, DEFAULT_TIMEOUT, 1e-3, MAX_TIMEOUT, "seconds"
    )
    cache = parse_size(args.cache_size) if args.cache_size is not None else DEFAULT_CACHE_SIZE
    poll_max = _number(
        args.poll_max, "--poll-max", float, MAX_BUDGET * 1e6, 0, 10_000, "microseconds"
    )
    refresh = _number(
        args.refresh, "--refresh", float, DEFAULT_REFRESH, 0, MAX_TIMEOUT, "seconds (0: never)"
    )
    ids: dict[str, int] = {}
    if args.uid is not None:
        ids["uid"] = int(_number(args.uid, "--uid", int, 0, 0, MAX_ID))
    if args.gid is not None:
        ids["gid"] = int(_number(args.gid, "--gid", int, 0, 0, MAX_ID))
    return MountConfig(
        **ids,
        target=target,
        tls=tls_config(args, target),
        readonly=args.readonly,
        kernel_cache=args.kernel_cache,
        writeback_cache=args.writeback_cache,
        partitions=args.partitions,
        xattr=args.xattr,
        connections=connections,
        cache_size=cache,
        refresh=refresh,
        timeout=timeout,
        poll=poll_max / 1e6,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    fuse_extra = split_mount_options(args)
    target = parse_target(args.target)
    config = mount_config(args, target)
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(args.mountpoint, mountpoint)
    if args.log_file:
        open_log_file(args.log_file).close()  # (a bad path is reported here, not in the daemon)
    options = fuse_options(config, fuse_extra, args.target)
    problem = mount_problem(mountpoint, options)
    if problem is not None:
        raise MountError(problem)
    if "auto_unmount" not in options and not args.foreground:
        options.add("auto_unmount")  # a killed daemon must not leave a dead mountpoint
    if args.foreground:
        if args.log_file:
            _daemon_logging(args)
        return _serve(config, mountpoint, options, None)
    return _daemonize(config, mountpoint, options, args)


def check_mountpoint(given: str, path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {given} does not exist: create it with mkdir") from None
    except PermissionError:
        raise MountError(
            f"cannot reach mountpoint {given}: permission denied on a directory on its path"
            " (mount somewhere you can enter)"
        ) from None
    except OSError as exc:
        raise MountError(f"cannot use mountpoint {given}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {given} is not a directory: mount on a directory")


def open_log_file(path: str) -> logging.FileHandler:
    try:
        return logging.FileHandler(path)
    except OSError as exc:
        raise MountError(
            f"cannot write the log file {path}: {exc.strerror} (give a path in a directory"
            " that exists and that you may write to)"
        ) from None


def _serve(
    config: MountConfig,
    mountpoint: str,
    options: set[str],
    notify: Callable[[str | None], None] | None,
) -> int:
    error: list[str] = []

    def ready(message: str | None) -> None:
        if message is not None:
            error.append(message)
        if notify is not None:
            notify(message)

    set_io_flusher()
    tune_malloc()
    raise_open_files_limit()
    failure = trio.run(run_mount, config, mountpoint, options, ready)
    if error:
        if notify is None:
            print(f"nbdfs: {error[0]}", file=sys.stderr)
        return EXIT_ERROR
    if failure is not None:
        logging.getLogger("nbdfs").error("%s", failure)
        if notify is None:
            print(f"nbdfs: {failure}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _daemonize(
    config: MountConfig, mountpoint: str, options: set[str], args: argparse.Namespace
) -> int:
    """Fork; the child mounts and says "ok" or why not; the parent exits only then."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        if message == "ok":
            return EXIT_OK
        if not message:
            _, status = os.waitpid(pid, 0)
            message = (
                f"the nbdfs daemon died during start-up (status {status}); run with -f to see why"
            )
        print(f"nbdfs: {message}", file=sys.stderr)
        return EXIT_ERROR
    # The child: a session of its own, no terminal, logs to syslog or --log-file.
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    _daemon_logging(args)

    def notify(message: str | None) -> None:
        nonlocal write_fd
        if write_fd < 0:
            return
        os.write(write_fd, b"ok" if message is None else message.encode())
        os.close(write_fd)
        write_fd = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    try:
        code = _serve(config, mountpoint, options, notify)
    except BaseException as exc:  # the parent must hear something, whatever happened
        notify(f"{exc}" if isinstance(exc, NbdError) else f"internal error: {exc!r}")
        logging.getLogger("nbdfs").exception("daemon failed")
        code = EXIT_ERROR
    os._exit(code)


def _daemon_logging(args: argparse.Namespace) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if args.log_file:
        handler = open_log_file(args.log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s nbdfs[%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("nbdfs[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if args.verbose >= 2 else logging.INFO)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="nbdfs: %(message)s"
        if verbose < 2
        else "%(asctime)s %(name)s %(levelname)s: %(message)s",
    )


COMMANDS = ("list", "mount", "umount", "status", "tls-init")


def helper_argv(argv: list[str]) -> list[str]:
    """mount(8) runs ``nbdfs SOURCE MOUNTPOINT -o OPTS`` (through mount.fuse3 for type
    fuse.nbdfs); that is ``nbdfs mount`` without the word."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(helper_argv(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except NbdError as exc:
        print(f"nbdfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
