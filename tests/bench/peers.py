"""The processes a benchmark runs beside the server under test, one role each:

    python -m tests.bench.peers subscribers HOST PORT --clients N [--ceiling]
    python -m tests.bench.peers load HOST PORT PATH (--duration S --connections C [--first N] | --rate R --count N)
    python -m tests.bench.peers stream-reader HOST PORT PATH [--first N]
    python -m tests.bench.peers http-ceiling
    python -m tests.bench.peers socket-ceiling
    python -m tests.bench.peers app

Each prints JSON lines on stdout: {"event": "ready", ...} once it is set up, then, after a line
"stop" on stdin (subscribers, stream reader, ceilings, app) or when its load is done, {"event":
"result", ...}. Subscribers, the stream reader and the app also answer a line "count" with
{"event": "count", ...}.
Times are time.monotonic(), one clock for every process on the machine.
"""

import argparse
import json
import re
import socket
import statistics
import sys
import time

import trio

BUCKET, KEY, SECRET = "bench", "bench-key", "bench-secret-0123456789"
INPUT_ID = "bench-input"
BODY_SIZE = 1024


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def wait_for_stop() -> None:
    await trio.to_thread.run_sync(sys.stdin.readline)


def webhook_body(n: int, sent: float) -> bytes:
    """A 1 KiB JSON body that carries its sequence number and send time."""
    head = f'{{"n": {n}, "t": {sent:.6f}, "pad": "'
    return (head + "x" * (BODY_SIZE - len(head) - 2) + '"}').encode()


# In a relay frame the body is a JSON string inside JSON: {\"n\": 5, \"t\": 12.5, ...
_STAMP = re.compile(rb'\\"n\\": (\d+), \\"t\\": ([0-9.]+)')


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)
    return {"p50": ordered[len(ordered) // 2], "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1], "count": len(ordered), "mean": statistics.fmean(ordered)}


# ---------------------------------------------------------------------------- a raw WebSocket client
# Cheap enough that 10,000 fit in one process; it parses frame boundaries and nothing else.

_HANDSHAKE = ("GET /v1/socket HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def client_frame(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    size = len(payload)
    if size < 126:
        header = bytes([0x81, 0x80 | size])
    elif size < 65536:
        header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload  # a zero masking key leaves the payload as it is


class FrameReader:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 2:
            opcode, size, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if size == 126:
                if len(self.buffer) < 4:
                    break
                size, start = int.from_bytes(self.buffer[2:4], "big"), 4
            elif size == 127:
                if len(self.buffer) < 10:
                    break
                size, start = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < start + size:
                break
            frames.append((opcode, bytes(self.buffer[start:start + size])))
            del self.buffer[:start + size]
        return frames


class Subscribers:
    """N socket clients subscribed to the bench bucket, recording when each webhook arrives."""

    def __init__(self, clients: int, stuck: bool = False, since: str | None = None) -> None:
        self.clients = clients
        self.stuck = stuck  # subscribe, then never read
        self.since = since  # resume from this log id
        self.subscribed = self.resumed = 0.0  # when the last client was subscribed, and was resumed
        self.stopping = trio.Event()
        self.frames = 0
        self.latencies: list[float] = []  # receive time - send time, every frame
        self.arrivals: dict[int, list] = {}  # n -> [count, send time, last receive time]
        self.closed: list[str] = []

    def on_frame(self, payload: bytes, received: float) -> None:
        start = payload.find(b'"body":"')
        stamp = _STAMP.search(payload, start, start + 64)
        if stamp is None:
            return
        self.frames += 1
        n, sent = int(stamp.group(1)), float(stamp.group(2))
        self.latencies.append(received - sent)
        arrival = self.arrivals.setdefault(n, [0, sent, received])
        arrival[0] += 1
        arrival[2] = max(arrival[2], received)

    async def client(self, host: str, port: int, ceiling: bool, ready: trio.CapacityLimiter, done) -> None:
        async with ready:
            sock = trio.socket.socket()
            if self.stuck:  # a tiny receive buffer, so the server's side fills up soon
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            await stream.send_all(_HANDSHAKE.format(host=host).encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 101"), head[:100]
            reader = FrameReader()
            reader.feed(head.split(b"\r\n\r\n", 1)[1])
            subscribe = {"action": "subscribe", "buckets": [BUCKET], **({"since": self.since} if self.since else {})}
            await stream.send_all(client_frame({"action": "auth", "key": KEY, "secret": SECRET})
                                  + client_frame(subscribe))
            pending = []
            if not ceiling:  # the relay answers authenticated, then subscribed
                statuses = 0
                while statuses < 2:
                    pending = reader.feed(await stream.receive_some(65536))
                    while pending and statuses < 2:
                        opcode, payload = pending.pop(0)
                        assert b'"status":"error"' not in payload and b"unauthorized" not in payload, payload
                        statuses += 1
                self.subscribed = time.monotonic()
        done()
        if self.stuck:  # read nothing until told to stop, then see how the server left it
            await self.stopping.wait()
            with trio.move_on_after(10):
                while data := await stream.receive_some(65536):
                    for opcode, payload in reader.feed(data):
                        if opcode == 8:
                            self.closed.append(payload[2:].decode(errors="replace") or "close frame")
                            return
                self.closed.append("disconnected")
            return
        while True:
            now = time.monotonic()
            for opcode, payload in pending:
                if opcode == 1:
                    self.on_frame(payload, now)
                    if payload.startswith(b'{"type":"status","status":"resumed"'):
                        self.resumed = now
                elif opcode == 8:
                    self.closed.append(payload[2:].decode(errors="replace"))
                    return
            data = await stream.receive_some(65536)
            if not data:
                self.closed.append("eof")
                return
            pending = reader.feed(data)

    async def run(self, host: str, port: int, ceiling: bool) -> None:
        connecting = trio.CapacityLimiter(200)
        ready = [0]
        all_ready = trio.Event()

        def done() -> None:
            ready[0] += 1
            if ready[0] == self.clients:
                all_ready.set()

        async with trio.open_nursery() as nursery:
            for _ in range(self.clients):
                nursery.start_soon(self.client, host, port, ceiling, connecting, done)
            await all_ready.wait()
            emit(event="ready", clients=self.clients)
            while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "count":
                emit(event="count", frames=self.frames)
            self.stopping.set()
            if not self.stuck:
                nursery.cancel_scope.cancel()
        complete = [arrival[2] - arrival[1] for arrival in self.arrivals.values() if arrival[0] >= self.clients]
        emit(event="result", frames=self.frames, webhooks=len(self.arrivals), closed=len(self.closed),
             close_reasons=sorted(set(self.closed))[:5], latency=percentiles(self.latencies),
             fanout=percentiles(complete), incomplete=len(self.arrivals) - len(complete),
             resumed_after=self.resumed - self.subscribed if self.resumed else None)


# ---------------------------------------------------------------------------- an HTTP load generator


class HTTPMessages:
    """HTTP/1.1 messages (requests or responses) read off a stream: a head, then a
    Content-Length body. Enough for this benchmark's own peers, nothing more."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> tuple[bytes, bytes] | None:
        """The next message's head and body, or None when the peer closed between messages."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(length.group(1)) if length else 0
        while len(self.buffer) < length:
            self.buffer += await self.stream.receive_some(65536)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head, body


class HTTPConnection:
    def __init__(self, stream: trio.SocketStream, host: str, path: str) -> None:
        self.stream = stream
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: {size}\r\n\r\n")
        self.responses = HTTPMessages(stream)

    async def post(self, body: bytes) -> int:
        await self.stream.send_all(self.head.format(size=len(body)).encode() + body)
        response = await self.responses.next()
        if response is None:
            raise ConnectionError("server closed the connection")
        return int(response[0][9:12])


async def closed_loop(host: str, port: int, path: str, connections: int, duration: float, first: int = 0) -> None:
    """As many webhooks as `connections` keep-alive connections can send in `duration` seconds,
    numbered from `first`. Every webhook numbered is answered before the load ends (a closed
    loop), so those answered 200 are the numbers from `first` to `first + sent` but `failed`."""
    statuses: dict[int, int] = {}
    failed: list[int] = []
    deadline = time.monotonic() + duration
    counter = iter(range(first, 10**12))

    async def worker() -> None:
        http = HTTPConnection(await trio.open_tcp_stream(host, port), host, path)
        while time.monotonic() < deadline:
            n = next(counter)
            status = await http.post(webhook_body(n, time.monotonic()))
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                failed.append(n)
        await http.stream.aclose()

    started, cpu = time.monotonic(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    emit(event="result", ok=ok, errors=sum(statuses.values()) - ok, seconds=elapsed, rate=ok / elapsed,
         started=started, first=first, sent=next(counter) - first, failed=failed,
         cpu_seconds=time.process_time() - cpu)


async def open_loop(host: str, port: int, path: str, connections: int, rate: float, count: int,
                    first: int = 0) -> None:
    """`count` webhooks at `rate` per second, numbered from `first`, each stamped with its
    scheduled time, so a stall shows as latency instead of as a slower rate."""
    channels = [trio.open_memory_channel(count) for _ in range(connections)]
    statuses: dict[int, int] = {}
    failed: list[int] = []
    late = []
    offset = time.monotonic() - trio.current_time()  # trio's clock is time.monotonic() shifted
    cpu = time.process_time()

    async def worker(receive) -> None:
        http = HTTPConnection(await trio.open_tcp_stream(host, port), host, path)
        async for n, when in receive:
            await trio.sleep_until(when)
            late.append(trio.current_time() - when)
            status = await http.post(webhook_body(n, when + offset))
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                failed.append(n)
        await http.stream.aclose()

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(worker, receive)
        await trio.sleep(0.2)  # let the connections open
        start = trio.current_time()
        for n in range(count):
            channels[n % connections][0].send_nowait((first + n, start + n / rate))
        for send, _ in channels:
            send.close()
    ok = statuses.get(200, 0)
    emit(event="result", ok=ok, errors=sum(statuses.values()) - ok, send_lag=percentiles(late), first=first,
         sent=count, failed=failed, cpu_seconds=time.process_time() - cpu)


# ---------------------------------------------------------------------------- a smee channel's stream reader
# One client of a text/event-stream as smee-client reads it (GET, Accept: text/event-stream):
# it counts message events and times each webhook from the send time its body carries.

# The body in a message event's data, as JSON: relay_lite passes the text on ({"n": 5, "t": ...),
# smee.io re-encodes it ({"n":5,"t":...).
_EVENT_STAMP = re.compile(rb'"body": ?\{"n": ?(\d+), ?"t": ?([0-9.e+-]+)')


class Dechunker:
    """An HTTP/1.1 chunked body, decoded as it comes."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.left = 0  # data bytes left in the current chunk
        self.skip = 0  # bytes of the CRLF after a chunk's data left to drop
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = bytearray()
        while not self.ended:
            if self.left:
                take = min(self.left, len(self.buffer))
                out += self.buffer[:take]
                del self.buffer[:take]
                self.left -= take
                if self.left:
                    break
                self.skip = 2
            if self.skip:
                take = min(self.skip, len(self.buffer))
                del self.buffer[:take]
                self.skip -= take
                if self.skip:
                    break
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
            del self.buffer[:end + 2]
            if size == 0:
                self.ended = True
            self.left = size
        return bytes(out)


SEGMENT = 10**9  # a load's webhooks are numbered from a multiple of it, a segment each


class StreamReader:
    """One subscriber of a smee channel's stream. Webhooks numbered from `first` on are the
    measured ones (those before warm the server up): for each, when it was sent and first
    received, and how often it came; its result has their figures by segment (n // SEGMENT),
    one for each load that numbered its webhooks from another multiple of SEGMENT."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.messages = 0  # message events (webhooks), measured or not
        self.named: dict[str, int] = {}  # other events (ready, ping, ...) by name
        self.arrivals: dict[int, list] = {}  # n -> [send time, first receive time, times received]
        self.ended = ""  # why the stream ended, if it did
        self.ended_at = None

    def on_event(self, event: bytes, received: float) -> None:
        name = re.search(rb"^event: ?(.*)$", event, re.MULTILINE)
        if name is not None and name.group(1).strip() not in (b"", b"message"):
            key = name.group(1).strip().decode(errors="replace")
            self.named[key] = self.named.get(key, 0) + 1
            return
        if b"data:" not in event:
            return  # a comment
        self.messages += 1
        stamp = _EVENT_STAMP.search(event)
        if stamp is None:
            self.named["unreadable message"] = self.named.get("unreadable message", 0) + 1
            return
        n = int(stamp.group(1))
        if n < self.first:
            return
        arrival = self.arrivals.setdefault(n, [float(stamp.group(2)), received, 0])
        arrival[2] += 1

    async def read(self, host: str, port: int, path: str, ready: trio.Event) -> None:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                              "Cache-Control: no-cache\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError(f"the server closed the stream before answering: {head[:200]!r}")
            head += data
        head, rest = head.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"not a stream: {head[:300]!r}")
        dechunker = Dechunker() if re.search(rb"(?im)^transfer-encoding: *chunked", head) else None
        buffer = b""
        data = rest
        while True:
            received = time.monotonic()
            buffer += dechunker.feed(data) if dechunker else data
            *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                self.on_event(event, received)
            if not ready.is_set() and self.named.get("ready"):
                ready.set()
            if dechunker is not None and dechunker.ended:
                self.ended = "the server ended the answer (last chunk)"
                break
            data = await stream.receive_some(262144)
            if not data:
                self.ended = "the server closed the connection"
                break
        self.ended_at = time.monotonic()
        ready.set()
        await stream.aclose()

    async def run(self, host: str, port: int, path: str) -> None:
        ready = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.read, host, port, path, ready)
            await ready.wait()  # the server's "ready" event: subscribed
            emit(event="ready", ended=self.ended)
            while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "count":
                emit(event="count", messages=self.messages, measured=len(self.arrivals))
            nursery.cancel_scope.cancel()
        emit(event="result", **self.result())

    def result(self) -> dict:
        segments: dict[int, dict[int, list]] = {}
        for n, arrival in self.arrivals.items():
            segments.setdefault(n // SEGMENT, {})[n] = arrival
        return {"messages": self.messages, "named": self.named, "ended": self.ended, "ended_at": self.ended_at,
                "cpu_seconds": time.process_time(),
                "segments": {str(segment): self._figures(arrivals) for segment, arrivals in segments.items()}}

    @staticmethod
    def _figures(arrivals: dict[int, list]) -> dict:
        ranges: list[list[int]] = []  # the numbers received, as [from, to] runs
        for n in sorted(arrivals):
            if ranges and ranges[-1][1] == n - 1:
                ranges[-1][1] = n
            else:
                ranges.append([n, n])
        return {"webhooks": len(arrivals), "duplicates": sum(arrival[2] - 1 for arrival in arrivals.values()),
                "latency": percentiles([arrival[1] - arrival[0] for arrival in arrivals.values()]),
                "first_sent": min(arrival[0] for arrival in arrivals.values()),
                "last_received": max(arrival[1] for arrival in arrivals.values()), "received": ranges[:10000]}


# ---------------------------------------------------------------------------- the ceilings


async def bare_asgi(scope, receive, send) -> None:
    """The HTTP ceiling: read the body, answer 200."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def http_ceiling() -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.loglevel = "WARNING"
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(bare_asgi, config, task_status=task_status))
        emit(event="ready", port=int(binds[0].rsplit(":", 1)[1]))
        await wait_for_stop()
        nursery.cancel_scope.cancel()
    emit(event="result")


async def socket_ceiling() -> None:
    """The socket ceiling: a bare trio-websocket server; each webhook POSTed to its HTTP port is
    encoded once, as the relay would frame it, and sent to every client."""
    import trio_websocket
    clients: set = set()

    async def handler(request) -> None:
        ws = await request.accept()
        clients.add(ws)
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            clients.discard(ws)

    async def trigger(stream) -> None:  # a minimal HTTP/1.1 server: each POST is one webhook
        requests = HTTPMessages(stream)
        while request := await requests.next():
            _, body = request
            frame = json.dumps({"type": "webhook", "meta": {"id": "x" * 36, "bucked_id": "b" * 36,
                                "bucket_id": "b" * 36, "bucket_name": BUCKET, "input_id": INPUT_ID,
                                "input_name": "Default public endpoint", "output_name": "",
                                "output_destination": "/"},
                                "headers": {"Content-Type": ["application/json"]}, "query": "",
                                "body": body.decode(), "method": "POST"}, separators=(",", ":"))
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            for ws in list(clients):
                try:
                    await ws.send_message(frame)
                except trio_websocket.ConnectionClosed:
                    clients.discard(ws)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        listeners = await nursery.start(trio.serve_tcp, trigger, 0)
        emit(event="ready", port=server.port, trigger_port=listeners[0].socket.getsockname()[1])
        await wait_for_stop()
        nursery.cancel_scope.cancel()
    emit(event="result")


# ---------------------------------------------------------------------------- an app behind the relay


async def app() -> None:
    """The app webhooks are forwarded to: answers each request 200 at once, and counts them."""
    requests, last = 0, None

    async def serve(stream) -> None:
        nonlocal requests, last
        messages = HTTPMessages(stream)
        while await messages.next():
            requests, last = requests + 1, time.monotonic()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        emit(event="ready", port=listeners[0].socket.getsockname()[1])
        while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "count":
            emit(event="count", requests=requests, last=last)
        nursery.cancel_scope.cancel()
    emit(event="result", requests=requests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["subscribers", "load", "stream-reader", "http-ceiling", "socket-ceiling",
                                         "app"])
    parser.add_argument("host", nargs="?")
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("path", nargs="?", default=f"/v1/webhooks/{INPUT_ID}")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--stuck", action="store_true", help="subscribe, then never read")
    parser.add_argument("--since", help="subscribe with this resume point")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--count", type=int)
    parser.add_argument("--first", type=int, default=0,
                        help="load: number webhooks from this; stream-reader: measure those numbered from it")
    args = parser.parse_args()
    if args.role == "subscribers":
        trio.run(Subscribers(args.clients, args.stuck, args.since).run, args.host, args.port, args.ceiling)
    elif args.role == "load" and args.rate:
        trio.run(open_loop, args.host, args.port, args.path, args.connections, args.rate, args.count, args.first)
    elif args.role == "load":
        trio.run(closed_loop, args.host, args.port, args.path, args.connections, args.duration, args.first)
    elif args.role == "stream-reader":
        trio.run(StreamReader(args.first).run, args.host, args.port, args.path)
    elif args.role == "http-ceiling":
        trio.run(http_ceiling)
    elif args.role == "app":
        trio.run(app)
    else:
        trio.run(socket_ceiling)


if __name__ == "__main__":
    main()
