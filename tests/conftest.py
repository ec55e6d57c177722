"""Shared fixtures: a relay on port 0 and small clients that talk to it over real sockets."""

import json
import socket
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio_websocket
import wsproto
from hypothesis import settings
from wsproto.events import AcceptConnection, Request, TextMessage

import relay_lite

# Property tests assert behaviour, not speed: no example may fail for taking long on a busy
# machine (the suite runs 4 processes on 2 cores), as one of 200 ms did.
settings.register_profile("relay_lite", deadline=None)
settings.load_profile("relay_lite")

GITHUB_ID = "1593fe5f-45f9-45cc-ba23-675fdc7c1638"
# a log's status, as the hosted API numbers them (relay_lite.LOG_STATUSES)
PREPARING, SENT, FAILED, STALLED, RECEIVED, REJECTED = range(6)
GITHUB_INPUT = "b90f2fe9-621d-4290-9e74-edd5b61325dd"
KEY, SECRET = "key-1", "secret-one-0123456789"
# httpx loads its CAs for each client it makes (36 ms here): the helpers that make one per call
# (post, log_of, hundreds of times a run) share the relay's, made once
TRUSTED_CAS = relay_lite._trusted_cas()
SCOPED_KEY, SCOPED_SECRET = "scoped", "scoped-secret-0123456789"


def relay_config(**server):
    """A config with buckets for every routing case; `server` keys override [server]."""
    return {
        "server": {"port": 0, **server},
        "tokens": [
            {"key": KEY, "secret": SECRET},
            {"key": SCOPED_KEY, "secret": SCOPED_SECRET, "buckets": ["github"]},
        ],
        "buckets": [
            {"id": GITHUB_ID, "name": "github",
             "inputs": [{"id": GITHUB_INPUT, "name": "Default public endpoint"}]},
            {"id": "stripe-id", "name": "stripe", "inputs": [{"id": "in-stripe", "name": "stripe in"}]},
            {"name": "two-outputs", "inputs": [{"id": "in-two"}], "outputs": [
                {"name": "a", "destination": "http://localhost:8080", "internal": True},
                {"name": "b", "destination": "http://localhost:9090/base/", "internal": True},
                {"name": "locked", "destination": "http://localhost:7070/fixed", "lock_path": True},
                {"name": "off", "destination": "http://localhost:6060", "disabled": True},
                {"name": "public", "destination": "http://127.0.0.1:9/hook", "internal": False, "retries": 0},
            ]},
            {"name": "public-only", "inputs": [{"id": "in-public"}], "outputs": [
                {"name": "p", "destination": "http://127.0.0.1:9/hook", "internal": False, "retries": 0},
            ]},
        ],
    }


@pytest.fixture
def config():
    """Override in a test module (or parametrize) to start the relay with other settings."""
    return relay_config()


@pytest.fixture
async def relay(config):
    """The suite's relay: a relay_lite.Relay serving `config` in the test's Trio loop. Not the
    plugin's `relay` (a RelayFixture): the plugin is off in this suite (pyproject's addopts), and
    tests/test_pytest_plugin.py tries it in projects of its own."""
    async with relay_lite.open_relay(config) as relay:
        yield relay


# the plugin's relay_factory (a relay in a thread of its own: the browser tests'), as a project's
# tests get it
relay_factory = relay_lite.pytest_plugin.relay_factory
_relay_lite_trio_factory = relay_lite.pytest_plugin._relay_lite_trio_factory


@pytest.fixture
async def http(relay):
    async with httpx.AsyncClient(base_url=relay.url, timeout=10, verify=TRUSTED_CAS) as client:
        yield client


class Client:
    """A socket client: JSON frames out, decoded frames in, each wait capped."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **frame) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def receive(self, timeout: float = 5) -> dict:
        with trio.fail_after(timeout):
            return json.loads(await self.ws.get_message())

    async def expect(self, status: str) -> dict:
        frame = await self.receive()
        assert frame["type"] == "status" and frame["status"] == status, frame
        assert isinstance(frame["message"], str)
        return frame

    async def webhook(self, timeout: float = 5) -> dict:
        frame = await self.receive(timeout)
        assert frame["type"] == "webhook", frame
        return frame

    async def receive_or_close(self) -> dict | None:
        """The next frame, or None once the socket has closed."""
        try:
            return json.loads(await self.ws.get_message())
        except trio_websocket.ConnectionClosed:
            return None

    async def closed(self, timeout: float = 5) -> trio_websocket.CloseReason:
        """Read until the server closes the socket; return its close reason."""
        with trio.fail_after(timeout):
            while True:
                try:
                    await self.ws.get_message()
                except trio_websocket.ConnectionClosed as closed:
                    return closed.reason


@asynccontextmanager
async def connect(relay, **options):
    async with trio_websocket.open_websocket_url(relay.socket_url, **options) as ws:
        yield Client(ws)


@asynccontextmanager
async def subscriber(relay, buckets=None, key=KEY, secret=SECRET, **subscribe):
    """A client that has authenticated and subscribed (to everything when `buckets` is None).

    `relay` is a Relay, or anything with its `socket_url`.
    """
    async with connect(relay) as client:
        await client.send(action="auth", key=key, secret=secret)
        await client.expect("authenticated")
        await client.send(action="subscribe", **({} if buckets is None else {"buckets": buckets}), **subscribe)
        await client.expect("subscribed")
        yield client


async def eventually(condition, timeout: float = 5) -> None:
    """Wait until `condition()` holds: the relay's side of something a real socket caused."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def fail_auth(relay, attempts: int = 3) -> trio_websocket.CloseReason:
    """Send wrong secrets, each answered "unauthorized"; return how the relay then closed."""
    async with connect(relay) as client:
        for _ in range(attempts):
            await client.send(action="auth", key=KEY, secret="wrong")
            await client.expect("unauthorized")
        return await client.closed()


async def log_of(url: str, log_id: str, *, settled: bool = True, timeout: float = 30) -> dict:
    """GET /v1/logs/<id> from the relay at `url`; with `settled`, once its status is no longer
    "received" (a delivery or an answer has ended)."""
    async with httpx.AsyncClient(base_url=url, auth=(KEY, SECRET), verify=TRUSTED_CAS) as http:
        with trio.fail_after(timeout):
            while True:
                log = (await http.get(f"/v1/logs/{log_id}")).json()
                if log["status"] != RECEIVED or not settled:
                    return log
                await trio.sleep(0.05)


async def post(relay, input_id=GITHUB_INPUT, path="", **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10, verify=TRUSTED_CAS) as http:
        return await http.post(f"{relay.url}/v1/webhooks/{input_id}{path}", **kwargs)


async def never_reading_client(relay, buckets, receive_buffer=4096, **subscribe):
    """A raw TCP client with a tiny receive buffer: it subscribes, then never reads again."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect((relay.host, relay.port))
    protocol = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await sock.send(protocol.send(Request(host=relay.host, target="/v1/socket")))
    with trio.fail_after(5):
        while not any(isinstance(event, AcceptConnection) for event in protocol.events()):
            protocol.receive_data(await sock.recv(4096))
    frames = [{"action": "auth", "key": KEY, "secret": SECRET}, {"action": "subscribe", "buckets": buckets, **subscribe}]
    await sock.send(b"".join(protocol.send(TextMessage(json.dumps(frame))) for frame in frames))
    return sock
