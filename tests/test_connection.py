"""The trio shell on in-memory streams: many requests in flight, hostile bytes, cancellation."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdfs import wire
from nbdfs.connection import Connection, drive
from nbdfs.errors import ConnectionLost, NbdError, ProtocolError
from nbdfs.handshake import Handshake
from nbdfs.session import Export, Session
from nbdfs.target import Target
from nbdfs.tls import TlsConfig
from nbdfs.wire import Cmd, ReplyType, TransmissionFlag

from . import wirebuild as wb

FLAGS = TransmissionFlag(0x0FFD)
SESSION = Session(Export("d", 1 << 20, FLAGS), True, {"base:allocation": 1})
TARGET = Target(host="test")


async def read_request(server: trio.abc.Stream) -> tuple[int, int, int, int]:
    head = b""
    while len(head) < wire.REQUEST.size:
        head += await server.receive_some(wire.REQUEST.size - len(head))
    _, _, cmd, cookie, offset, length = wire.REQUEST.unpack(head)
    if cmd == Cmd.WRITE:
        got = 0
        while got < length:
            got += len(await server.receive_some(length - got))
    return cmd, cookie, offset, length


def test_concurrent_requests_are_matched_by_cookie() -> None:
    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(client, SESSION, TARGET)
        results: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_reader)

            async def reader(i: int) -> None:
                results[i] = bytes(await conn.read(i * 512, 512))

            for i in range(5):
                nursery.start_soon(reader, i)
            requests = [await read_request(server) for _ in range(5)]
            for _cmd, cookie, offset, length in reversed(requests):  # answer in reverse order
                payload = wire.U64.pack(offset) + bytes([offset // 512]) * length
                await server.send_all(wb.chunk(cookie, ReplyType.OFFSET_DATA, payload, done=True))
            while len(results) < 5:
                await trio.sleep(0.01)
            assert results == {i: bytes([i]) * 512 for i in range(5)}
            assert conn.in_flight == 0 and conn.usable
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_requests_queued_while_one_is_sending_leave_together() -> None:
    """The first request sends at once; the ones started meanwhile go out in one send (one
    TLS record, one writev) by the task already sending, not one send each."""

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        sends: list[int] = []

        async def counted() -> None:  # (memory_stream_pair's pump, counting each send)
            data = client.send_stream.get_data_nowait()
            sends.append(len(data))
            server.receive_stream.put_data(data)

        client.send_stream.send_all_hook = counted
        conn = Connection(client, SESSION, TARGET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_reader)
            for i in range(8):
                nursery.start_soon(conn.read, i * 512, 512)
            requests = [await read_request(server) for _ in range(8)]
            assert sorted(offset for _, _, offset, _ in requests) == [i * 512 for i in range(8)]
            assert sends == [wire.REQUEST.size, 7 * wire.REQUEST.size]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_garbage_breaks_the_connection_and_fails_every_waiter() -> None:
    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(client, SESSION, TARGET)
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_reader)

            async def flush() -> None:
                try:
                    await conn.flush()
                except NbdError as exc:
                    errors.append(exc)

            for _ in range(3):
                nursery.start_soon(flush)
            for _ in range(3):
                await read_request(server)
            await server.send_all(b"\xde\xad\xbe\xef" * 8)
        assert len(errors) == 3 and all(isinstance(e, ProtocolError) for e in errors)
        assert not conn.usable
        try:
            await conn.flush()
        except ProtocolError:
            pass
        else:
            raise AssertionError("a broken connection must not be reused")

    trio.run(main)


def test_end_of_stream_with_requests_in_flight_is_connection_lost() -> None:
    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(client, SESSION, TARGET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_reader)
            outcome: list[BaseException] = []

            async def flush() -> None:
                try:
                    await conn.flush()
                except NbdError as exc:
                    outcome.append(exc)

            nursery.start_soon(flush)
            await read_request(server)
            await server.aclose()
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)

    trio.run(main)


def test_a_cancelled_waiter_does_not_break_the_connection() -> None:
    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(client, SESSION, TARGET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_reader)
            with trio.move_on_after(0.1):
                await conn.flush()  # no reply yet: cancelled while waiting
            _, cookie, _, _ = await read_request(server)
            await server.send_all(wb.simple(cookie))  # the late reply is consumed and dropped
            nursery.start_soon(conn.flush)
            _, cookie2, _, _ = await read_request(server)
            await server.send_all(wb.simple(cookie2))
            await trio.sleep(0.05)
            assert conn.usable and conn.in_flight == 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_handshake_driver_with_bytes_one_at_a_time() -> None:
    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        script = wb.greeting() + wb.go_ok(4096)

        async def serve() -> None:
            for b in script:
                await server.send_all(bytes([b]))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            _, session = await drive(client, Handshake().go("x"), TlsConfig(), TARGET)
        assert session.export.size == 4096

    trio.run(main)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=12), st.booleans())
def test_arbitrary_server_bytes_through_the_shell(chunks: list[bytes], valid_first: bool) -> None:
    """Requests end in a reply or in nbdfs's own error; the reader always ends cleanly."""

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(client, SESSION, TARGET)
        outcomes: list[object] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run_reader)

                async def one(cmd: Cmd) -> None:
                    try:
                        outcomes.append(await conn.request(cmd, 0, 4096 if cmd == Cmd.READ else 0))
                    except NbdError as exc:
                        outcomes.append(exc)

                nursery.start_soon(one, Cmd.READ)
                nursery.start_soon(one, Cmd.FLUSH)
                cookies = [(await read_request(server))[1] for _ in range(2)]
                if valid_first:
                    await server.send_all(wb.simple(cookies[1]))
                for c in chunks:
                    await server.send_all(c)
                await server.aclose()
        assert len(outcomes) == 2

    trio.run(main)
