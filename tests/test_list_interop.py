"""`nbdfs list` against nbdkit, qemu-nbd and the reference nbd-server: exact, as served."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import run_nbdfs
from .servers import nbd_server, nbdkit, qemu_nbd, require_tool

pytestmark = pytest.mark.interop


def listed(target: str, *extra: str) -> list[dict[str, object]]:
    result = json.loads(run_nbdfs("list", "--json", *extra, target).stdout)
    assert isinstance(result, list)
    return result


def test_nbdkit_memory_default_export() -> None:
    with nbdkit("memory", "size=64M") as srv:
        (export,) = listed(srv.address)
        assert export["name"] == "" and export["size"] == 64 << 20
        assert export["read_only"] is False and export["description"] is None
        assert "CAN_MULTI_CONN" in export["flags"]  # type: ignore[operator]
        text = run_nbdfs("list", srv.address).stdout
        assert text.split() == ["''", "64.0", "MiB", "67108864", "bytes", "rw"]


def test_nbdkit_file_dir_many_exports(tmp: Path) -> None:
    sizes = {"alpha": 4096, "with space": 1 << 20, "ünïcode": 512, "z": 0}
    for name, size in sizes.items():
        (tmp / name).write_bytes(b"\x01" * size)
    with nbdkit("file", f"dir={tmp}") as srv:
        got = {e["name"]: e["size"] for e in listed(srv.address)}
        assert got == sizes
        # A named export is described alone, by name, even with a space (percent-encoded).
        (one,) = listed(srv.uri("with space"))
        assert one["size"] == 1 << 20


def test_nbdkit_readonly_and_block_size() -> None:
    with nbdkit(
        "-r",
        "--filter=blocksize-policy",
        "memory",
        "1M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1048576",
    ) as srv:
        (export,) = listed(srv.address)
        assert export["read_only"] is True
        assert export["block_size"] == {"minimum": 4096, "preferred": 65536, "maximum": 1048576}
        assert run_nbdfs("list", srv.address).stdout.split()[-1] == "ro"


def test_nbdkit_unknown_export_is_one_line_error() -> None:
    with nbdkit(
        "--filter=exportname", "memory", "1M", "exportname-strict=true", "exportname=a"
    ) as srv:
        proc = run_nbdfs("list", srv.uri("nope"), check=False)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and "no export named 'nope'" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_qemu_nbd_named_qcow2_export(tmp: Path) -> None:
    require_tool("qemu-img")
    image = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "10M"], check=True)
    with qemu_nbd(image, "vm disk/1", "qcow2", "-D", "Test image") as srv:
        (export,) = listed(srv.address)
        assert export == export | {
            "name": "vm disk/1",
            "size": 10 << 20,
            "read_only": False,
            "description": "Test image",
        }
        assert export["block_size"] == {"minimum": 1, "preferred": 4096, "maximum": 33554432}
        (one,) = listed(srv.uri("vm disk/1"))
        assert one["name"] == "vm disk/1"


def test_nbd_server_several_exports_with_space_and_slash(tmp: Path) -> None:
    """nbd-server 3.24 says size 0 in NBD_OPT_INFO; nbdfs asks GO for the true size."""
    (tmp / "a").write_bytes(bytes(1 << 20))
    (tmp / "b").write_bytes(bytes(3 << 20))
    (tmp / "c").write_bytes(bytes(4096))
    exports = {
        "my disk": {"exportname": str(tmp / "a")},
        "dir/b": {"exportname": str(tmp / "b"), "readonly": "true"},
        "plain": {"exportname": str(tmp / "c")},
    }
    with nbd_server(tmp, exports) as srv:
        got = {e["name"]: (e["size"], e["read_only"]) for e in listed(srv.address)}
        assert got == {
            "my disk": (1 << 20, False),
            "dir/b": (3 << 20, True),
            "plain": (4096, False),
        }


def test_connection_refused_is_one_line() -> None:
    from .servers import free_port

    proc = run_nbdfs("list", f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr
        == f"nbdfs: connection refused by {proc.args[-1]}: is an NBD server listening there?\n"
    )


def test_not_an_nbd_server_is_one_line() -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(64))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    port = listener.getsockname()[1]
    proc = run_nbdfs("list", f"127.0.0.1:{port}", check=False)
    listener.close()
    assert proc.returncode == 1
    assert proc.stderr == "nbdfs: this is not an NBD server (its greeting lacks NBDMAGIC)\n"


def test_bad_target_is_usage_error() -> None:
    proc = run_nbdfs("list", "http://example.com/", check=False)
    assert proc.returncode == 2 and "unknown URI scheme 'http'" in proc.stderr


def test_oldstyle_server_supported_but_refused_when_tls_required() -> None:
    with nbdkit("--oldstyle", "memory", "1M") as srv:
        (export,) = listed(srv.address)
        assert export["size"] == 1 << 20
        proc = run_nbdfs("list", "--tls=require", srv.address, check=False)
        assert proc.returncode == 1 and "oldstyle" in proc.stderr and "downgrade" in proc.stderr
