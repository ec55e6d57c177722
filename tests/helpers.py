"""What the tests share: the server as a process, raw connections, resumes, signed webhooks, smee
channels' streams, a Redis of their own. (conftest.py holds the fixtures and the config every test starts from.)"""

import contextlib
import hashlib
import hmac
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

import relay_lite

from conftest import GITHUB_INPUT, KEY, SECRET, TRUSTED_CAS, post, relay_config, subscriber


SCRIPT = str(Path(relay_lite.__file__))


def run(*args, timeout=20):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


async def start(*args, **options):
    """Start the server; return the process and its banner, which ends with "Ctrl-C to stop".

    Its log goes to this process's stderr, which pytest captures (a pipe nobody read would fill
    up, 64 KiB, a few hundred webhooks' INFO lines, and stall the server), unless `options`
    (for subprocess.Popen) say otherwise.
    """
    process = await trio.lowlevel.open_process([sys.executable, "-u", SCRIPT, *args], stdout=subprocess.PIPE,
                                               **options)
    banner = b""
    with trio.fail_after(20):
        while b"Ctrl-C to stop" not in banner:
            chunk = await process.stdout.receive_some()
            assert chunk, f"server exited: {banner!r}"
            banner += chunk
    return process, banner.decode()


async def stop(process):
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        return await process.wait()


async def tcp_from(relay, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the relay from `source`, another loopback address standing in for another host."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((relay.host, relay.port))
    return trio.SocketStream(sock)


async def closed_by_relay(stream: trio.abc.ReceiveStream, timeout: float | None = None) -> bytes:
    """Read until the relay closes the connection (within `timeout`, if given); what it sent before."""
    received = b""
    with trio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return received


def errors_logged(caplog) -> list[str]:
    """The ERROR lines (and worse) the relay logged."""
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def post_many(relay, bodies, input_id=GITHUB_INPUT):
    async with httpx.AsyncClient(timeout=10) as http:
        for body in bodies:
            response = await http.post(f"{relay.url}/v1/webhooks/{input_id}", content=body)
            assert response.status_code == 200


async def last_seen(relay, body="before"):
    """The meta.id of a webhook a client processed before it went away."""
    async with subscriber(relay, ["github"]) as client:
        await post(relay, content=body)
        return (await client.webhook())["meta"]["id"]


async def resume(client, since, buckets=("github",)):
    await client.send(action="auth", key=KEY, secret=SECRET)
    await client.expect("authenticated")
    await client.send(action="subscribe", buckets=list(buckets), since=since)
    await client.expect("subscribed")


async def receive_until_resumed(client, timeout=20):
    """The webhooks a resume sends, up to its "resumed" status."""
    frames = []
    with trio.fail_after(timeout):
        while (frame := await client.receive()).get("type") == "webhook":
            frames.append(frame)
    assert frame["status"] == "resumed", frame
    return frames


def assert_in_id_order(frames):
    ids = [frame["meta"]["id"] for frame in frames]
    assert ids == sorted(set(ids)), "ids out of order, or one twice"


BODY = b'{"id": "evt_1", "type": "charge.succeeded"}'

STRIPE_SECRET = "whsec_stripe_one"


def stripe_signature(body: bytes = BODY, at: float | None = None) -> tuple[str, str]:
    """Stripe's t= and v1= for `body`, signed as Stripe signs."""
    stamp = str(int(time.time() if at is None else at))
    return stamp, hmac.new(STRIPE_SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def stripe_config(**server):
    config = relay_config(**server)
    config["buckets"][1]["inputs"][0]["verify"] = {"scheme": "stripe", "secrets": [STRIPE_SECRET]}
    return config


def signed_stripe_headers(at: float | None = None) -> dict[str, str]:
    stamp, signature = stripe_signature(at=at)
    return {"Stripe-Signature": f"t={stamp},v1={signature}"}


async def logged(relay, bucket: str) -> int:
    async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
        return (await http.get("/v1/logs", params={"bucket": bucket})).json()["total"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server of the test's (or the bench's) own, on a free loopback port, persisting every
    write as a production one would (appendfsync always)."""

    def __init__(self, directory) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None
        self.started = False  # once: a restart keeps the port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers. At its first start, on another free port if another
        process took this one meanwhile (the suite runs in parallel); a restart keeps its port,
        which relays already hold, or fails."""
        import redis  # relay-lite[redis]

        for _ in range(1 if self.started else 3):
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(port=self.port)
            deadline = time.monotonic() + 10
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.info("server")["process_id"] == self.process.pid and client.ping():  # ours, not
                        self.started = True  # another's; and its data loaded (INFO answers while it loads)
                        return
                except redis.ConnectionError:  # and BusyLoadingError
                    pass
                time.sleep(0.025)
            self.stop()
            if not self.started:
                self.port = free_port()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(10)
            self.process = None

    async def hang(self, seconds: float) -> None:
        """Stop Redis (SIGSTOP) for `seconds`: requests in its hands get no answer, no error; then it goes on."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(seconds)
        finally:
            self.process.send_signal(signal.SIGCONT)


# ---- smee channels --------------------------------------------------------------------------

CHANNEL = "github-channel-0123456789abcdef"  # a smee channel's name, as strong as a secret


class EventStream:
    """A smee channel's stream over a raw connection: the answer's head, then its events, each
    a dict of its fields ("comment" for a comment line), as an EventSource would read them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.head = b""
        self._raw = b""  # chunked, as received
        self._text = ""  # de-chunked
        self.ended = False  # the last chunk came

    @classmethod
    async def open(cls, relay, name=CHANNEL, *, gosmee=False, last_event_id=None, host="127.0.0.1",
                   version="1.1") -> "EventStream":
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        lines = [f"GET /smee/{'events/' if gosmee else ''}{name} HTTP/{version}", f"Host: {host}"]
        lines += [] if gosmee else ["Accept: text/event-stream"]
        lines += [f"Last-Event-ID: {last_event_id}"] if last_event_id else []
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        self = cls(stream)
        self._chunked = version == "1.1"
        with trio.fail_after(5):
            while b"\r\n\r\n" not in self._raw:
                data = await stream.receive_some()
                assert data, self._raw
                self._raw += data
        self.head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        self._dechunk()
        return self

    @property
    def status(self) -> int:
        return int(self.head.split(b" ")[1])

    def _dechunk(self) -> None:
        if not self._chunked:
            self._text += self._raw.decode()
            self._raw = b""
            return
        while b"\r\n" in self._raw:
            size_line, _, rest = self._raw.partition(b"\r\n")
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            self._text += rest[:size].decode()
            self._raw = rest[size + 2:]
            if size == 0:
                self.ended = True
                return

    async def event(self, timeout: float = 5) -> dict:
        with trio.fail_after(timeout):
            while "\n\n" not in self._text:
                data = await self.stream.receive_some()
                assert data, f"the stream ended: {self._text!r}"
                self._raw += data
                self._dechunk()
        block, _, self._text = self._text.partition("\n\n")
        fields: dict = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name or "comment"] = value
        return fields

    async def message(self, timeout: float = 5) -> dict:
        """The next webhook's event, its data decoded: pings and comments skipped."""
        while True:
            event = await self.event(timeout)
            if "id" in event:
                return {"id": event["id"], **json.loads(event["data"])}
            assert event.get("event") in ("ping", None) or "comment" in event, event

    async def aclose(self) -> None:
        await self.stream.aclose()


async def to_channel(relay, body=b"{}", name=CHANNEL, path="", **kwargs) -> httpx.Response:
    """Send a webhook to the smee channel `name` of `relay`."""
    async with httpx.AsyncClient(timeout=10, verify=TRUSTED_CAS) as http:
        return await http.post(f"{relay.url}/smee/{name}{path}", content=body, **kwargs)


def place(event_id: str) -> tuple[int, int]:
    """A smee event id's place, in order."""
    return tuple(map(int, event_id.split("-")))
