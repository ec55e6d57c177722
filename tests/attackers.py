"""The strangers of tests/test_attack.py, in a process of their own (other hosts, in effect):
`python tests/attackers.py PORT`. They attack until killed.

Each attack runs from eight addresses, 127.0.0.2 to 127.0.0.9, many copies at once.
"""

import sys

import httpx
import trio

sys.path.insert(0, __file__.rpartition("/")[0])
from helpers import closed_by_relay, tcp_from  # noqa: E402

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]


class Relay:
    """What the helpers of tests/helpers.py need of a relay: where it listens."""

    def __init__(self, port):
        self.host, self.port = "127.0.0.1", port
        self.url = f"http://127.0.0.1:{port}"


async def attack_forever(attack, relay, source):
    """Run `attack` from `source` again and again; what the relay does to it is its business."""
    while True:
        try:
            await attack(relay, source)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, httpx.HTTPError):
            await trio.sleep(0.05)  # refused or cut: try again


async def wedged(relay, source):
    """An answer before the body is read, the body later, then a second request (finding 1)."""
    stream = await tcp_from(relay, source)
    try:
        await stream.send_all(b"POST /v1/webhooks/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        await trio.sleep(0.02)
        await stream.send_all(b"{}")
        with trio.fail_after(5):
            await stream.receive_some(4096)
        await stream.send_all(b"GET /v1/logs HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        await stream.aclose()


async def dripped(relay, source):
    """A body a byte at a time, never finished in time (finding 3)."""
    stream = await tcp_from(relay, source)
    try:
        await stream.send_all(b"POST /v1/webhooks/in-hooks HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        with trio.fail_after(10):
            for _ in range(1000):
                await stream.send_all(b"x")
                with trio.move_on_after(0.5):
                    if not await stream.receive_some(4096):
                        return
    finally:
        await stream.aclose()


async def idle(relay, source):
    """A connection that says nothing until the relay closes it (finding 3)."""
    stream = await tcp_from(relay, source)
    try:
        await closed_by_relay(stream, timeout=10)
    finally:
        await stream.aclose()


async def header_flood(relay, source):
    """6,000 tiny headers (431), and webhooks at the header bounds, which are logged (finding 2)."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=relay.url, transport=transport, timeout=10) as http:
        await http.post("/v1/webhooks/in-hooks", headers={f"X-{n}": "v" for n in range(6000)}, content=b"x")
        await http.post("/v1/webhooks/in-hooks", headers={f"X-Flood-{n}": "v" * 150 for n in range(90)},
                        content=b"flood")


async def control_characters(relay, source):
    """A 1 MiB body of control characters: six times its size as JSON text (finding 4)."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=relay.url, transport=transport, timeout=10) as http:
        await http.post("/v1/webhooks/in-hooks", content=b"\x01" * 2**20)
    await trio.sleep(2)  # 4 MB/s of frames from eight addresses: what the subscriber must take, too


async def partial_body(relay, source):
    """A body that declares 2 MiB and sends all but its last byte, then waits (issue 20, 2)."""
    stream = await tcp_from(relay, source)
    try:
        await stream.send_all(b"POST /v1/webhooks/in-hooks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**21)
        await stream.send_all(b"p" * (2**21 - 1))
        await closed_by_relay(stream, timeout=10)
    finally:
        await stream.aclose()


async def bad_upgrade(relay, source):
    """A WebSocket upgrade of another path than /v1/socket: it answered 500 with 9 KB of
    traceback in the log (issue 20, 4)."""
    stream = await tcp_from(relay, source)
    try:
        await stream.send_all(b"GET /v1/logs HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await closed_by_relay(stream, timeout=10)
    finally:
        await stream.aclose()
    await trio.sleep(0.05)


async def main(port: int) -> None:
    relay = Relay(port)
    async with trio.open_nursery() as nursery:
        for source in ATTACKERS:
            for attack, copies in ((wedged, 40), (dripped, 30), (idle, 30), (header_flood, 2),
                                   (control_characters, 1), (partial_body, 10), (bad_upgrade, 2)):
                for _ in range(copies):
                    nursery.start_soon(attack_forever, attack, relay, source)
        print("attacking", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
