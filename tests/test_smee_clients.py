"""Interop: the real smee clients against a bucket's smee channel (issue 23).

smee-client (npm, major 5: its CLI, on undici's fetch and the eventsource package) is installed
into .cache/node/smee-client5 (git-ignored) on first use. gosmee's client is a Go program that no
registry here serves: the gosmee tests run only where a `gosmee` is on PATH (built by hand), and
are skipped, saying so, elsewhere. Both forward to tests/app_server.py's app, which records each
request as it arrived. Webhooks are sent with h11 over a raw connection, so the headers the
sender sent are exactly the ones the test names.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h11
import httpx
import pytest
import trio

import relay_lite
from app_server import running_app
from conftest import GITHUB_ID, KEY, SECRET, eventually, relay_config

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "test-channel-0123456789abcdef"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
FORM_TYPE = "application/x-www-form-urlencoded"
STARTED = 30  # seconds a client may take to start and connect: Node starts slowly on a busy 2-core box
ARRIVED = 20  # seconds for a webhook to go relay -> client -> app

# What smee-client's request to the app has beside the headers the sender sent: host,
# content-length and content-type are smee-client's own (it drops the event's host and sets
# content-type: application/json); timestamp is the event's field of that name, which it makes a
# header as it does every field but body and query; the rest are undici fetch's defaults
# (connection: keep-alive, accept: */*, accept-language: *, sec-fetch-mode: cors,
# user-agent: undici, accept-encoding: gzip, deflate), each only where the sender sent none.
SMEE_CLIENT_ADDS = frozenset({"host", "content-length", "content-type", "timestamp", "connection", "accept",
                              "accept-language", "sec-fetch-mode", "user-agent", "accept-encoding"})


def smee_config(**server):
    config = relay_config(**server)
    config["buckets"][0]["smee_channel"] = CHANNEL  # the github bucket
    return config


@pytest.fixture
def config():
    return smee_config()


def client_env(**extra: str) -> dict[str, str]:
    """The environment without proxies: smee-client's undici (EnvHttpProxyAgent) would send even
    127.0.0.1's traffic to one."""
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    return {**env, "NO_PROXY": "*", "no_proxy": "*", **extra}


def install_smee_client() -> Path:
    """smee-client@5's CLI, installed once per checkout."""
    prefix = ROOT / ".cache" / "node" / "smee-client5"
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:  # one install at a time: tests run in parallel (pytest-xdist)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prefix / "node_modules" / "smee-client" / "package.json").exists():
            subprocess.run([shutil.which("npm"), "install", "--no-audit", "--no-fund", "--silent", "--prefix",
                            str(prefix), "smee-client@5"], check=True, timeout=300)
    return prefix / "node_modules" / ".bin" / "smee"


def node_missing() -> str:
    """Why smee-client cannot run here; "" if it can."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "Node.js and npm are not installed (.ci/run installs Debian's nodejs and npm)"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if tuple(map(int, re.findall(r"[0-9]+", version)[:2])) < (20, 18):  # its engines: ^20.18 || >= 22 (undici 7)
        return f"smee-client 5 needs Node.js 20.18 or later; this is {version}"
    return ""


NODE_MISSING = node_missing()
needs_node = pytest.mark.skipif(bool(NODE_MISSING), reason=NODE_MISSING)
GOSMEE = shutil.which("gosmee")
needs_gosmee = pytest.mark.skipif(GOSMEE is None, reason=(
    "gosmee is not on PATH: a Go program that no registry here serves; build it by hand "
    "(github.com/chmouel/gosmee) and put it on PATH to run these tests"))


class Client:
    """A client's process, its stdout and stderr read as lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    @classmethod
    async def start(cls, command: list[str], **env: str) -> "Client":
        process = await trio.lowlevel.open_process(command, env=client_env(**env), stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return cls(process)

    async def wait_for(self, predicate, timeout: float = STARTED) -> str:
        """Read until a line satisfies `predicate`; return that line."""
        with trio.fail_after(timeout):
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    self.lines.append(line.decode(errors="replace"))
                    if predicate(self.lines[-1]):
                        return self.lines[-1]
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"the client exited ({await self.process.wait()}): {self.lines}"
                self._buffer += chunk

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not ended 10 s later."""
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        await self.process.wait()


async def start_gosmee(relay, app, *options: str) -> Client:
    return await Client.start([GOSMEE, "client", "--nocolor", *options, f"{relay.url}/smee/{CHANNEL}",
                               f"{app.url}/hook"], NO_COLOR="1")


def forwarding(line: str) -> bool:
    """gosmee's line once its stream is open: it logs it at the stream's "ready" event."""
    return " Forwarding http" in line


async def send(relay, target: str, body: bytes, headers: list[tuple[str, str]]) -> set[str]:
    """POST `body` to the relay with exactly Host, `headers` and Content-Length; the names of the
    headers sent, lower-cased. The relay must answer 200."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    connection = h11.Connection(h11.CLIENT)
    sent = [("Host", f"{relay.host}:{relay.port}"), *headers, ("Content-Length", str(len(body)))]
    try:
        await stream.send_all(connection.send(h11.Request(method="POST", target=target, headers=sent))
                              + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
        with trio.fail_after(10):
            while not isinstance(event := connection.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200, event
    finally:
        await stream.aclose()
    return {name.lower() for name, _ in sent}


def names(request) -> list[str]:
    return [name.lower() for name, _ in request.headers]


async def smee_id_of_newest(relay) -> str:
    """The event id the relay gave the github bucket's newest webhook (its log entry's place)."""
    async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
        logs = (await http.get("/v1/logs", params={"bucket": GITHUB_ID})).json()["data"]
    newest = max(logs, key=lambda log: log["id"])
    return relay_lite._smee_id(newest["id"], False)


def checkpoint(state: Path) -> str:
    """What gosmee's --resume-state-file holds ("" before it writes one)."""
    try:
        return state.read_text().strip()
    except FileNotFoundError:
        return ""


@needs_node
async def test_smee_client_forwards_the_json_the_query_and_the_senders_headers_plus_only_its_own(relay):
    smee = await trio.to_thread.run_sync(install_smee_client)
    async with running_app() as app:
        client = await Client.start([str(smee), "-u", f"{relay.url}/smee/{CHANNEL}", "-t", f"{app.url}/hook"])
        try:
            await client.wait_for(lambda line: line.startswith(f"Connected to {relay.url}/smee/{CHANNEL}"))
            push = b'{"ref": "refs/heads/main", "commits": [{"id": "abc", "message": "caf\\u00e9"}], "size": 1.5}'
            sent = await send(relay, f"/smee/{CHANNEL}", push, [
                ("Content-Type", "application/json"), ("X-GitHub-Event", "push"), ("X-GitHub-Delivery", DELIVERY)])
            [first] = await app.wait_for(1, timeout=ARRIVED)
            assert (first.method, first.target) == ("POST", "/hook")
            assert json.loads(first.body) == json.loads(push)  # re-encoded by smee-client: equal as JSON
            assert first.header("X-GitHub-Event") == ["push"] and first.header("X-GitHub-Delivery") == [DELIVERY]
            assert first.header("Content-Type") == ["application/json"]
            assert re.fullmatch(r"[0-9]{13}", first.header("timestamp")[0])  # the event's, in ms
            assert len(names(first)) == len(set(names(first))), first.headers  # each header once
            assert set(names(first)) == sent | SMEE_CLIENT_ADDS, first.headers
            assert not {"body", "bodyb", "query"} & set(names(first))

            # a query string is forwarded (smee-client's default); a sender's User-Agent kept
            ping = b'{"zen": "Keep it logically awesome.", "hook_id": 1}'
            sent = await send(relay, f"/smee/{CHANNEL}?a=1", ping, [
                ("Content-Type", "application/json"), ("X-GitHub-Event", "ping"),
                ("User-Agent", "GitHub-Hookshot/044aadd")])
            second = (await app.wait_for(2, timeout=ARRIVED))[1]
            assert (second.method, second.target) == ("POST", "/hook?a=1")
            assert json.loads(second.body) == json.loads(ping)
            assert second.header("X-GitHub-Event") == ["ping"]
            assert second.header("User-Agent") == ["GitHub-Hookshot/044aadd"]
            assert len(names(second)) == len(set(names(second))), second.headers
            assert set(names(second)) == sent | SMEE_CLIENT_ADDS, second.headers
        finally:
            client.process.kill()
            await client.process.wait()


@needs_gosmee
async def test_gosmee_forwards_a_form_body_that_is_not_utf8_byte_for_byte(relay, tmp_path):
    form = b"payload=\xff\xfe%20x&n=1"
    async with running_app() as app:
        gosmee = await start_gosmee(relay, app, "--resume-state-file", str(tmp_path / "state"))
        try:
            await gosmee.wait_for(forwarding)
            await send(relay, f"/smee/{CHANNEL}", form, [("Content-Type", FORM_TYPE), ("X-GitHub-Delivery", DELIVERY)])
            [request] = await app.wait_for(1, timeout=ARRIVED)
            assert (request.method, request.target) == ("POST", "/hook")
            assert request.body == form
            assert request.header("Content-Type") == [FORM_TYPE]
            assert request.header("X-GitHub-Delivery") == [DELIVERY]
        finally:
            await gosmee.stop()


@needs_gosmee
async def test_gosmee_resumes_after_its_own_restart_with_what_it_missed_once_each_in_order(relay, tmp_path):
    state = tmp_path / "state"
    first, missed, live = b"n=0", [b"n=1&missed=\xff", b"n=2&missed=yes", b"n=3&missed=%20"], b"n=4&live=1"
    headers = [("Content-Type", FORM_TYPE), ("X-GitHub-Event", "push")]
    async with running_app() as app:
        gosmee = await start_gosmee(relay, app, "--resume-state-file", str(state))
        try:
            await gosmee.wait_for(forwarding)
            await send(relay, f"/smee/{CHANNEL}", first, headers)
            await app.wait_for(1, timeout=ARRIVED)
            # gosmee writes its checkpoint once the app has answered
            await eventually(lambda: checkpoint(state) != "", timeout=ARRIVED)
            resume_from = checkpoint(state)
            assert re.fullmatch(r"[0-9]+-[0-9]+", resume_from)
            assert resume_from == await smee_id_of_newest(relay)  # the first webhook's event id
        finally:
            await gosmee.stop()

        for body in missed:  # while gosmee is down
            await send(relay, f"/smee/{CHANNEL}", body, headers)
        gosmee = await start_gosmee(relay, app, "--resume-state-file", str(state))
        try:
            await gosmee.wait_for(lambda line: "Loaded resume checkpoint " + resume_from in line)
            await app.wait_for(4, timeout=ARRIVED)
            # then one sent live: once it is in, the stream (in order) has brought all it had before it
            await send(relay, f"/smee/{CHANNEL}", live, headers)
            received = await app.wait_for(5, timeout=ARRIVED)
            assert [request.body for request in received] == [first, *missed, live]
            assert all(request.header("Content-Type") == [FORM_TYPE] for request in received)
            live_id = await smee_id_of_newest(relay)
            await eventually(lambda: checkpoint(state) == live_id, timeout=ARRIVED)  # its checkpoint moved on
        finally:
            await gosmee.stop()
        assert len(app.received) == 5


@needs_gosmee
async def test_gosmee_connects_on_its_first_stream_request(relay):
    """Its stream request goes on the kept-alive connection of its GET /version: Hypercorn's
    second request, served as a stream all the same (it was a 404, a failed guess, and gosmee
    connected after ~15 s)."""
    async with running_app() as app:
        gosmee = await start_gosmee(relay, app)
        try:
            line = await gosmee.wait_for(lambda line: forwarding(line) or "SSE connection ended" in line)
            assert forwarding(line), gosmee.lines
            assert relay.metrics.auth_failures["smee"] == 0
        finally:
            await gosmee.stop()
