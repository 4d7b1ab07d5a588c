"""Command-line entry points: ``nbdfs list``, ``nbdfs mount`` and friends.

Every user or server mistake ends as one line on stderr and a non-zero exit status; a
traceback means a bug in nbdfs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .connection import list_exports
from .errors import NbdError, TargetError
from .handshake import Export, TlsMode
from .target import Target, parse_target
from .tls import TlsConfig

EXIT_OK = 0
EXIT_ERROR = 1  # the server, the network or the system said no
EXIT_USAGE = 2  # the command line is wrong

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
    _add_tls_options(p_list)
    _add_common(p_list)
    p_list.set_defaults(func=cmd_list)
    return parser


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
    return TlsConfig(
        mode=mode,
        certificates=args.tls_certificates or target.tls_certificates,
        verify_peer=verify,
        hostname=target.tls_hostname,
    )


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


async def _list(target: Target, tls: TlsConfig) -> list[Export]:
    listing = await list_exports(target, tls, target.export)
    return listing.exports


def cmd_list(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    exports = trio.run(_list, target, tls_config(args, target))
    if args.json:
        print(json.dumps([export_json(e) for e in exports], indent=2, ensure_ascii=False))
    else:
        print(format_listing(exports))
    return EXIT_OK


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="nbdfs: %(message)s"
        if verbose < 2
        else "%(asctime)s %(name)s %(levelname)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except NbdError as exc:
        print(f"nbdfs: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, TargetError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
