"""The forward agent (issue 10): `python relay_lite.py forward` brings webhooks to an app behind
NAT. Run as a user runs it, a process, against a relay (in this process, or a process too) and a
local app that records every request as it arrived."""

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given, settings, strategies as st

import relay_lite

from app_server import Answer, running_app
from conftest import FAILED, SENT, GITHUB_INPUT, KEY, SECRET, eventually, log_of, post, relay_config
from helpers import SCRIPT, start, stop


# ---------------------------------------------------------------------------- the agent, as a process


class Agent:
    """`relay_lite.py forward` in a process; what it prints goes to files the test reads."""

    def __init__(self, tmp_path: Path, relay_url: str, *args: str, key: str = KEY, secret: str = SECRET,
                 state: Path | None = None) -> None:
        self.args = ["--relay", relay_url, "--state", str(state or tmp_path / "agent-state.json"), *args]
        self.env = {**os.environ, "RELAY_KEY": key, "RELAY_SECRET": secret}
        self.out_path, self.err_path = tmp_path / "agent.out", tmp_path / "agent.err"
        self.process: trio.Process | None = None

    async def start(self) -> "Agent":
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-u", SCRIPT, "forward", *self.args], stdout=out, stderr=err, env=self.env)
        return self

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    @property
    def lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    @property
    def outcomes(self) -> list[str]:
        """The lines that give a webhook's outcome: not an attempt tried again, nor a resend hint."""
        return [line for line in self.lines if not line.startswith(" ") and ", again in " not in line]

    async def said(self, text: str, times: int = 1, timeout: float = 20) -> None:
        await eventually(lambda: self.err.count(text) >= times, timeout)

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            return await self.process.wait()

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()


@asynccontextmanager
async def running_agent(tmp_path, relay_url, *args, **options):
    agent = await Agent(tmp_path, relay_url, *args, **options).start()
    try:
        await agent.said("subscribed to buckets")
        yield agent
    finally:
        if agent.process.returncode is None:
            await agent.kill()
        print(f"agent's log:\n{agent.err}")  # shown if the test fails
        assert "Traceback" not in agent.err, agent.err


def state_of(agent: Agent) -> dict:
    return json.loads(Path(agent.args[3]).read_text())


def first_seen(received) -> list[bytes]:
    return list(dict.fromkeys(request.body for request in received))


async def newest_log_id(url, bucket):
    async with httpx.AsyncClient(base_url=url, auth=(KEY, SECRET)) as http:
        return (await http.get("/v1/logs", params={"bucket": bucket, "limit": 1})).json()["data"][0]["id"]


# ---------------------------------------------------------------------------- end to end, every process real


def relay_toml(app_url: str, storage: Path | None = None) -> str:
    """A relay with a bucket for the agent (no outputs) and one the relay delivers itself."""
    return f"""
[server]
port = 0
[[tokens]]
key = "{KEY}"
secret = "{SECRET}"
[[buckets]]
name = "agent"
[[buckets.inputs]]
id = "in-agent"
[[buckets]]
name = "public"
[[buckets.inputs]]
id = "in-public"
[[buckets.outputs]]
name = "app"
destination = "{app_url}/public"
internal = false
""" + (f'[storage]\npath = "{storage}"\n' if storage else "")


SIGNING_SECRET = b"github-webhook-secret"
BODIES = [  # (method, content type, body)
    ("POST", "application/json", b'{"action" :  "opened",\n\t"n":[ 1 ,2 ],"e":"\\u00e9\xc3\xa9"}  \r\n'),
    ("PUT", "application/octet-stream", bytes(range(256)) * 64),  # binary: base64 in the frame
    ("PATCH", "application/x-www-form-urlencoded", b"payload=%7B%22a%22%3A1%7D&x=%20y+z"),
    ("POST", "application/octet-stream", os.urandom(5 * 2**20)),  # 5 MiB
]


async def send_signed(http, input_url, method, content_type, body):
    """A GitHub-style webhook: signed, multi-valued headers; the headers as the app should get
    them: each name's values in order, names in the order they first came (a frame maps names to
    lists of values, as the hosted service's does)."""
    signature = "sha256=" + hmac.new(SIGNING_SECRET, body, hashlib.sha256).hexdigest()
    request = http.build_request(method, input_url + "/gh/event?x=1&y=%2F&y=2", content=body, headers=[
        ("X-Hub-Signature-256", signature), ("X-Multi", "first"), ("Content-Type", content_type),
        ("X-Multi", "second"), ("X-GitHub-Event", "push")])
    assert (await http.send(request)).status_code == 200
    grouped = {}
    for name, value in request.headers.raw:
        if name.lower() not in (b"host", b"content-length", b"connection"):
            grouped.setdefault(relay_lite._canonical_header(name.decode()), []).append(value.decode())
    return [(name, value) for name, values in grouped.items() for value in values]


def assert_delivered_as_sent(request, method, body, headers, path, app):
    assert (request.method, request.target, request.body) == (method, path + "/gh/event?x=1&y=%2F&y=2", body)
    assert request.header("Host") == [app.url.removeprefix("http://")]  # the app's own
    assert request.header("Content-Length") == [str(len(body))]
    expected = "sha256=" + hmac.new(SIGNING_SECRET, request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.header("X-Hub-Signature-256")[0], expected)  # the signature verifies
    assert [(name, value) for name, value in request.headers  # every header value, in order, and no others
            if name.lower() not in ("host", "content-length", "x-forwarded-for")] == headers


@pytest.mark.timeout(120)
async def test_a_webhook_reaches_the_app_unchanged_through_the_agent_and_through_a_public_output(tmp_path):
    async with running_app() as app:
        config = tmp_path / "relay.toml"
        config.write_text(relay_toml(app.url))
        relay, banner = await start("--config", str(config))
        try:
            url = banner.split("listening on ")[1].split()[0]
            async with running_agent(tmp_path, url, "--bucket", "agent", "--to", app.url + "/agent"):
                sent = []
                async with httpx.AsyncClient(timeout=30) as http:
                    for method, content_type, body in BODIES:
                        for input_id in ("in-agent", "in-public"):
                            headers = await send_signed(http, f"{url}/v1/webhooks/{input_id}", method, content_type,
                                                        body)
                            sent.append((input_id, method, body, headers))
                received = await app.wait_for(len(sent), timeout=60)
            assert await stop(relay) == 0
        finally:
            if relay.returncode is None:
                relay.kill()
    by_path = {"in-agent": [r for r in received if r.target.startswith("/agent/")],
               "in-public": [r for r in received if r.target.startswith("/public/")]}
    assert [len(requests) for requests in by_path.values()] == [len(BODIES), len(BODIES)]
    for input_id, method, body, headers in sent:
        request = by_path[input_id].pop(0)
        assert_delivered_as_sent(request, method, body, headers, "/agent" if input_id == "in-agent" else "/public",
                                 app)
        if input_id == "in-public":
            assert request.header("X-Forwarded-For") == ["127.0.0.1"]  # the relay adds the sender's address
        else:
            assert request.header("X-Forwarded-For") == []  # the agent knows none


def shape(lines: str) -> str:
    """Lines with each number as N, a time zone's offset as +N:N."""
    return re.sub(r"[+-]N:N\b", "+N:N", re.sub(r"\d+", "N", lines))


async def test_the_demos_printed_forward_command_works_as_printed(tmp_path):
    async with running_app() as app:
        relay, banner = await start("--port", "0")
        try:
            command = next(line.strip() for line in banner.splitlines() if line.strip().startswith("RELAY_KEY="))
            assert " relay_lite.py forward " in command and command.endswith(" --to http://localhost:3000")
            words = shlex.split(command.replace("http://localhost:3000", app.url))  # the test's app, not 3000
            env = dict(word.split("=", 1) for word in words[:2])
            assert list(env) == ["RELAY_KEY", "RELAY_SECRET"] and words[3].endswith("relay_lite.py")
            assert words[4] == "forward"  # the Python and the file that ran the relay, as printed: run as they are
            with open(tmp_path / "agent.err", "wb") as err, open(tmp_path / "agent.out", "wb") as out:
                agent = await trio.lowlevel.open_process(
                    words[2:], stdout=out, stderr=err,
                    env={**os.environ, **env, "XDG_STATE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"})
            try:
                await eventually(lambda: "subscribed to buckets: demo" in (tmp_path / "agent.err").read_text(), 20)
                curl = re.search(r"curl .*", banner).group(0)
                async with httpx.AsyncClient() as http:  # what the printed curl command sends
                    response = await http.post(curl.split()[-1], content=b'{"hello": "relay"}',
                                               headers={"Content-Type": "application/json"})
                assert response.status_code == 200
                [request] = await app.wait_for(1)
                assert (request.method, request.target, request.body) == ("POST", "/", b'{"hello": "relay"}')
                agent.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    assert await agent.wait() == 0
            finally:
                if agent.returncode is None:
                    agent.kill()
            assert [path.name for path in (tmp_path / "relay_lite").iterdir()][0].startswith("forward-")
            said = (tmp_path / "agent.err").read_text()
            assert "WARNING" not in said, said  # "no longer holds every webhook ... gone" was (issue 21, finding 3)
            # what the README shows it prints, it prints (issue 21, finding 18)
            readme = (Path(SCRIPT).parent / "README.md").read_text()
            shown_err = readme.partition("It says on stderr what it is doing:\n\n```\n")[2].partition("```")[0]
            shown_out = readme.partition("one line per webhook on stdout:\n\n```\n")[2].partition("```")[0]
            host = curl.split()[-1].split("/")[2]
            printed = [line.partition(" INFO ")[2].replace(host, "127.0.0.1:8080") for line in said.splitlines()]
            assert [line.partition(" INFO ")[2] for line in shown_err.splitlines()] == printed[:3], said
            assert shape(shown_out) == shape((tmp_path / "agent.out").read_text())
            assert await stop(relay) == 0
        finally:
            if relay.returncode is None:
                relay.kill()


# ---------------------------------------------------------------------------- answers, retries, the log


def routes_config(app_url):
    config = relay_config()
    config["buckets"].append({"name": "routes", "inputs": [{"id": "in-routes"}], "outputs": [
        {"name": "app", "destination": app_url + "/via-output", "internal": True},
        {"name": "dead", "destination": "http://127.0.0.1:9/dead", "internal": True}]})
    return config


async def test_without_to_each_webhook_goes_to_its_output_with_retries_and_the_outcome_in_the_log(tmp_path):
    """503 with Retry-After: 1 is tried again after about a second; 400 is not tried again; an
    unreachable output is tried again, then shown failed in the log, with its retries."""
    answers = iter([Answer(503, [("Retry-After", "1")], b"busy"), Answer(201, [("X-App", "yes")], b"made"),
                    Answer(400, [], b"bad")])
    async with running_app() as app, relay_lite.open_relay(routes_config(app.url)) as relay:
        app.answer = lambda request: next(answers)
        async with running_agent(tmp_path, relay.url, "--bucket", "routes", "--retries", "1") as agent:
            await post(relay, input_id="in-routes", path="/first", content="one")
            await post(relay, input_id="in-routes", content="two")
            received = await app.wait_for(3, timeout=20)
            await eventually(lambda: len(agent.outcomes) == 4, timeout=20)
            async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                logs = (await http.get("/v1/logs", params={"bucket": "routes"})).json()["data"]
            outcomes = {(log["body"], log["output_name"]): await log_of(relay.url, log["id"]) for log in logs}
    assert [(request.target, request.body) for request in received] == [
        ("/via-output/first", b"one"), ("/via-output/first", b"one"), ("/via-output", b"two")]
    assert 0.9 <= received[1].at - received[0].at <= 5  # Retry-After: 1
    made, dead = outcomes["one", "app"], outcomes["one", "dead"]
    assert (made["status"], made["status_code"], made["retries"]) == (SENT, 201, 1)
    assert bytes(made["response_body"]) == b"made" and made["response_headers"]["X-App"] == ["yes"]
    assert (dead["status"], dead["status_code"], dead["retries"]) == (FAILED, 0, 1)
    assert b"Connect" in bytes(dead["response_body"])  # why, in the log
    refused = outcomes["two", "app"]
    assert (refused["status"], refused["status_code"], refused["retries"]) == (FAILED, 400, 0)
    lines = " | ".join(agent.lines)
    assert "POST /via-output/first 201" in lines and "(2 attempts)" in lines and "POST /via-output 400" in lines
    assert "POST /dead failed: ConnectError" in lines


async def test_a_sender_held_for_the_agents_output_gets_the_apps_answer(tmp_path):
    config = routes_config("http://unused.invalid")
    config["buckets"][-1]["inputs"][0].update(response_from_output="app", status_code=202, body="fallback")
    async with running_app() as app, relay_lite.open_relay(config) as relay:
        app.answer = lambda request: Answer(201, [("Content-Type", "application/json"), ("X-App", "agent")],
                                            b'{"deployed": true}')
        async with running_agent(tmp_path, relay.url, "--bucket", "routes", "--to", app.url, "--retries", "0"):
            response = await post(relay, input_id="in-routes", content="/deploy")
    assert (response.status_code, response.content) == (201, b'{"deployed": true}')
    assert response.headers["X-App"] == "agent" and response.headers["Content-Type"] == "application/json"


async def test_a_wrong_secret_exits_3_within_seconds_with_the_reason_in_one_line(tmp_path):
    async with relay_lite.open_relay(relay_config()) as relay:
        agent = await Agent(tmp_path, relay.url, "--bucket", "github", "--to", "http://127.0.0.1:9",
                            secret="not-the-secret-0123").start()
        started = time.monotonic()
        with trio.fail_after(15):
            assert await agent.process.wait() == relay_lite._REFUSED
    assert time.monotonic() - started < 10
    errors = [line for line in agent.err.splitlines() if "error" in line]
    assert errors == ["relay_lite: error: the relay refused the key key-1: invalid key or secret"]
    assert "Traceback" not in agent.err
    assert not (tmp_path / "agent-state.json").exists()  # no checkpoint from a refusal (issue 21, finding 2)


async def test_an_unknown_bucket_exits_3_and_a_bad_argument_exits_2(tmp_path):
    async with relay_lite.open_relay(relay_config()) as relay:
        agent = await Agent(tmp_path, relay.url, "--bucket", "nope", "--to", "http://127.0.0.1:9").start()
        with trio.fail_after(15):
            assert await agent.process.wait() == relay_lite._REFUSED
    assert agent.err.splitlines()[-1] == "relay_lite: error: the relay refused the subscription: no such bucket " \
                                         "for this token: nope"
    bad = await Agent(tmp_path, "ftp://relay", "--to", "http://127.0.0.1:9").start()
    with trio.fail_after(15):
        assert await bad.process.wait() == 2
    assert bad.err.splitlines()[-1] == "relay_lite: error: --relay ftp://relay: give the relay's URL, http(s)://host:port"


async def test_sigterm_lets_the_delivery_in_flight_finish_and_saves_the_checkpoint(tmp_path):
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        app.answer = lambda request: Answer(200, [], b"", delay=1.5 if request.body == b"slow" else 0)
        async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url) as agent:
            await post(relay, content="slow")
            await app.wait_for(1)
            assert await agent.stop() == 0  # once the app answered
            assert len(agent.lines) == 1 and " 200 " in agent.lines[0]
            assert state_of(agent)["last"] == await newest_log_id(relay.url, "github")
        await post(relay, content="after")
        async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url):
            await app.wait_for(2)
            await post(relay, content="live")
            received = await app.wait_for(3)
    assert [request.body for request in received] == [b"slow", b"after", b"live"]  # none twice


async def test_a_fresh_agent_loses_nothing_sent_while_it_first_reconnects(tmp_path):
    """With no checkpoint yet, the agent begins after the newest webhook the relay holds: a
    webhook sent while its first connection is down still comes after the reconnect."""
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay, TcpProxy(relay.port) as proxy:
        await post(relay, content="before the agent")
        async with running_agent(tmp_path, proxy.url, "--bucket", "github", "--to", app.url) as agent:
            proxy.cut()
            await post(relay, content="while cut")
            await agent.said("subscribed to buckets", times=2)
            received = await app.wait_for(1)
    assert [request.body for request in received] == [b"while cut"]


# ---------------------------------------------------------------------------- faults, 500 webhooks each


class TcpProxy:
    """A TCP proxy between the agent and the relay that the test can cut, or freeze."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.url = ""
        self._connections: set[trio.CancelScope] = set()
        self.frozen: set[trio.CancelScope] = set()

    async def __aenter__(self) -> "TcpProxy":
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        listeners = await self._nursery.start(trio.serve_tcp, self._serve, 0)
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info):
        self._nursery.cancel_scope.cancel()
        return await self._nursery_manager.__aexit__(*exc_info)

    def cut(self) -> int:
        """Drop every connection now (the agent sees them reset); return how many there were."""
        connections = list(self._connections)
        for scope in connections:
            scope.cancel()
        return len(connections)

    def freeze(self) -> None:
        """Let nothing more through the connections there are now, and keep them open."""
        self.frozen.update(self._connections)

    async def _serve(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await downstream.aclose()
            return
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, downstream, upstream, scope)
                    nursery.start_soon(self._pump, upstream, downstream, scope)
            finally:
                self._connections.discard(scope)
        for stream in (downstream, upstream):  # a reset, as a NAT box or a dead link gives
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            await trio.aclose_forcefully(stream)

    async def _pump(self, source, target, scope) -> None:
        try:
            while data := await source.receive_some(2**16):
                if scope in self.frozen:
                    await trio.sleep_forever()
                await target.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def send_numbered(url, input_id, count, between=None):
    """Post `count` webhooks, bodies 0, 1, ..., one after another; `between(n)` runs after the
    nth is accepted (a 2xx)."""
    async with httpx.AsyncClient(timeout=30) as http:
        for n in range(count):
            response = await http.post(f"{url}/v1/webhooks/{input_id}", content=str(n).encode())
            assert response.status_code == 200, response.text
            if between is not None:
                await between(n)


def report(capsys, fault, received, count):
    duplicates = len(received) - len({request.body for request in received})
    with capsys.disabled():
        print(f"\n  {fault}: {count} webhooks, {len(received)} deliveries, {duplicates} duplicate(s)")
    return duplicates


@pytest.mark.timeout(120)
async def test_the_agents_connection_cut_mid_stream_loses_nothing(tmp_path, capsys):
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay, TcpProxy(relay.port) as proxy:
        async with running_agent(tmp_path, proxy.url, "--bucket", "github", "--to", app.url) as agent:
            cuts = 0

            async def cut_sometimes(n):
                nonlocal cuts
                if n % 100 == 50:
                    await app.wait_for(n - 10)  # frames on their way, some in the proxy
                    cuts += proxy.cut()

            await send_numbered(relay.url, GITHUB_INPUT, 500, cut_sometimes)
            received = list(await app.wait_for(500, timeout=60))
            await trio.sleep(0.5)  # the moment a duplicate would come
            received = list(app.received)
            await agent.said("resumed", times=1)
    assert cuts >= 5 and agent.err.count("disconnected") >= 5
    assert first_seen(received) == [str(n).encode() for n in range(500)]  # every one, in order
    assert report(capsys, "connection cut 5 times", received, 500) == 0


@pytest.mark.timeout(150)
async def test_the_relay_killed_and_restarted_loses_nothing(tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "relay.toml"
    async with running_app() as app:
        app.answer = lambda request: Answer(delay=0.002)  # the agent falls behind the senders
        config.write_text(relay_toml(app.url, storage=tmp_path / "relay.db").replace("port = 0", f"port = {port}"))
        relay, _ = await start("--config", str(config))
        url = f"http://127.0.0.1:{port}"
        try:
            async with running_agent(tmp_path, url, "--bucket", "agent", "--to", app.url) as agent:

                async def kill_and_restart(n):
                    nonlocal relay
                    if n == 249:
                        relay.kill()  # SIGKILL, deliveries and reports in flight
                        await relay.wait()
                        relay, _ = await start("--config", str(config))

                await send_numbered(url, "in-agent", 500, kill_and_restart)
                received = list(await app.wait_for(500, timeout=90))
                await trio.sleep(0.5)  # the moment a duplicate would come
                received = list(app.received)
                assert agent.err.count("subscribed to buckets") >= 2
            assert await stop(relay) == 0
        finally:
            if relay.returncode is None:
                relay.kill()
    assert first_seen(received) == [str(n).encode() for n in range(500)]
    assert report(capsys, "relay kill -9", received, 500) == 0


@pytest.mark.timeout(120)
async def test_the_agent_killed_and_restarted_loses_nothing(tmp_path, capsys):
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        app.answer = lambda request: Answer(delay=0.002)
        agent = await Agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url).start()
        try:
            await agent.said("subscribed to buckets")

            async def kill_and_restart(n):
                if n == 249:
                    await agent.kill()  # SIGKILL, a delivery in flight
                elif n == 299:
                    await agent.start()

            await send_numbered(relay.url, GITHUB_INPUT, 500, kill_and_restart)
            received = list(await app.wait_for(500, timeout=60))
            await trio.sleep(0.5)
            received = list(app.received)
        finally:
            await agent.kill()
    assert first_seen(received) == [str(n).encode() for n in range(500)]
    duplicates = report(capsys, "agent kill -9", received, 500)
    assert duplicates <= 1  # at least once: the one delivered, and not yet checkpointed, when killed
    assert "Traceback" not in agent.err


async def test_a_silent_dead_connection_is_noticed_and_replaced(tmp_path):
    """A connection that stops carrying anything (a NAT box forgot it) is given up after
    --ping-timeout without a frame, and what was sent meanwhile comes on the next."""
    async with running_app() as app, relay_lite.open_relay(relay_config(ping_interval=0.2)) as relay, \
            TcpProxy(relay.port) as proxy:
        async with running_agent(tmp_path, proxy.url, "--bucket", "github", "--to", app.url,
                                 "--ping-timeout", "1") as agent:
            await post(relay, content="first")
            await app.wait_for(1)
            proxy.freeze()
            await post(relay, content="while frozen")
            await agent.said("disconnected: no frame for 1 s", timeout=10)
            received = await app.wait_for(2)
    assert [request.body for request in received] == [b"first", b"while frozen"]


# ---------------------------------------------------------------------------- the agent in this process


@asynccontextmanager
async def agent_here(relay, to, state, buckets=("github",), **options):
    config = relay_lite.AgentConfig(relay=relay.url, key=KEY, secret=SECRET, buckets=buckets, to=to,
                                    state=state, lines="quiet", **options)
    async with trio.open_nursery() as nursery:
        agent = await nursery.start(relay_lite.forward, config)
        try:
            yield agent
        finally:
            agent.stop()


async def test_an_app_slower_than_the_senders_pauses_the_socket_and_loses_nothing(tmp_path, monkeypatch, caplog):
    """The agent holds a bounded amount for the app: past it, it closes the socket and resumes
    from the relay's log once the app has caught up."""
    monkeypatch.setattr(relay_lite, "_AGENT_QUEUE_BYTES", 5_000)  # about five webhooks
    caplog.set_level(logging.INFO, logger="relay_lite")
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        app.answer = lambda request: Answer(delay=0.02)
        await post(relay, content="seen before")
        state = tmp_path / "state.json"
        state.write_text(json.dumps({"relay": relay.url, "buckets": ["github"], "last": await newest_log_id(relay.url, "github")}))
        async with agent_here(relay, app.url, state):
            await send_numbered(relay.url, GITHUB_INPUT, 300)
            received = await app.wait_for(300, timeout=60)
    assert [request.body for request in received] == [str(n).encode() for n in range(300)]
    assert any("behind; the relay keeps the rest" in record.message for record in caplog.records)


async def test_with_concurrency_deliveries_overlap_and_the_checkpoint_is_the_oldest_unfinished(tmp_path):
    state = tmp_path / "state.json"
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        app.answer = lambda request: Answer(delay=3 if request.body == b"0" else 0)
        await post(relay, content="seen before")
        before = await newest_log_id(relay.url, "github")
        async with agent_here(relay, app.url, state, concurrency=4):
            await eventually(lambda: state.exists() and json.loads(state.read_text())["last"] == before)
            await send_numbered(relay.url, GITHUB_INPUT, 4)
            newest = await newest_log_id(relay.url, "github")
            async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                async def reported():
                    logs = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
                    return {log["body"] for log in logs if log["status_code"] == 200}
                with trio.fail_after(10):
                    while await reported() != {"1", "2", "3"}:  # all three answered while 0 is in flight
                        await trio.sleep(0.05)
            assert json.loads(state.read_text())["last"] == before  # 0, the oldest, is not done
            await eventually(lambda: json.loads(state.read_text())["last"] == newest, timeout=10)
        received = app.received
    assert sorted(request.body for request in received) == [b"0", b"1", b"2", b"3"]


async def test_an_agent_begun_on_an_empty_bucket_loses_nothing_sent_while_it_was_away(tmp_path, caplog):
    """Its start point is "before every webhook", saved before it subscribes."""
    caplog.set_level(logging.INFO, logger="relay_lite")
    state = tmp_path / "state.json"
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        async with agent_here(relay, app.url, state, buckets=("stripe",)) as agent:
            await eventually(lambda: agent._subscribed)
        assert any("the relay holds none of these buckets yet" in record.message for record in caplog.records)
        for n in range(3):
            assert (await post(relay, input_id="in-stripe", content=f"away {n}")).status_code == 200
        async with agent_here(relay, app.url, state, buckets=("stripe",)):
            received = await app.wait_for(3)
    assert [request.body for request in received] == [b"away 0", b"away 1", b"away 2"]


class FakeRelay:
    """A relay that follows a script, one per connection: `scripts` are async functions given the
    WebSocket once the agent has sent its auth frame (the frames it sends are in `received`)."""

    def __init__(self, *scripts) -> None:
        self.scripts = list(scripts)
        self.received: list[dict] = []
        self.url = ""

    async def handler(self, request) -> None:
        ws = await request.accept()
        try:
            self.received.append(json.loads(await ws.get_message()))
            await self.scripts.pop(0)(self, ws)
            await ws.aclose()
        except trio_websocket.ConnectionClosed:
            pass

    async def next_frame(self, ws) -> dict:
        while True:
            frame = json.loads(await ws.get_message())
            self.received.append(frame)
            if frame.get("action") != "pong":
                return frame

    async def serve(self, nursery) -> "FakeRelay":
        server = await nursery.start(trio_websocket.serve_websocket, self.handler, "127.0.0.1", 0, None)
        self.url = f"http://127.0.0.1:{server.port}"
        return self


def status(name, message=""):
    return json.dumps({"type": "status", "status": name, "message": message})


def webhook_frame(log_id, body, **meta):
    return json.dumps({"type": "webhook", "meta": {"id": log_id, "bucket_name": "github", "output_destination": "/",
                                                   **meta}, "headers": {}, "query": "", "body": body,
                       "method": "POST"})


async def subscribed(relay, ws):
    await ws.send_message(status("authenticated"))
    await relay.next_frame(ws)
    await ws.send_message(status("subscribed", "subscribed to buckets: github"))


def fake_agent_config(relay, app, tmp_path, **options):
    """The agent's config for a FakeRelay, with a checkpoint from before every webhook: a fake
    relay serves no logs API, where an agent without one asks where to begin (and stops, if it
    gets no answer a relay would give)."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"relay": relay.url, "buckets": ["github"], "last": relay_lite.NIL_LOG_ID}))
    return relay_lite.AgentConfig(relay=relay.url, key=KEY, secret=SECRET, buckets=("github",), to=app.url,
                                  state=state, lines="quiet", **options)


async def test_a_refusal_for_now_is_waited_out_not_final(tmp_path, monkeypatch):
    """A relay refuses every client of an address for a while after many failed authentications
    there (a shared NAT, a proxy): the agent tries again later instead of giving up."""
    monkeypatch.setattr(relay_lite, "_RECONNECT_FIRST", 0.05)

    async def locked_out(relay, ws):
        await ws.send_message(status("unauthorized", "too many failed authentications from 127.0.0.1: try again "
                                                     "in 1 s"))

    async def welcome(relay, ws):
        await subscribed(relay, ws)
        await ws.send_message(webhook_frame("id-1", "after the lockout"))
        await trio.sleep_forever()

    async with running_app() as app, trio.open_nursery() as nursery:
        relay = await FakeRelay(locked_out, welcome).serve(nursery)
        agent = await nursery.start(relay_lite.forward, fake_agent_config(relay, app, tmp_path))
        [request] = await app.wait_for(1)
        agent.stop()
        nursery.cancel_scope.cancel()
    assert request.body == b"after the lockout"


async def test_a_final_refusal_ends_the_agent_in_seconds_even_with_a_delivery_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_lite, "_RECONNECT_FIRST", 0.05)
    monkeypatch.setattr(relay_lite, "_AGENT_STOP_GRACE", 0.5)

    async def one_webhook_then_gone(relay, ws):
        await subscribed(relay, ws)
        await ws.send_message(webhook_frame("id-1", "slow to deliver"))

    async def refused(relay, ws):
        await ws.send_message(status("unauthorized", "invalid key or secret"))

    async with running_app() as app:
        app.answer = lambda request: Answer(delay=60)
        with pytest.raises(relay_lite.AgentError, match="invalid key or secret"), trio.fail_after(10):
            try:
                async with trio.open_nursery() as nursery:
                    relay = await FakeRelay(one_webhook_then_gone, refused).serve(nursery)
                    await nursery.start(relay_lite.forward, fake_agent_config(relay, app, tmp_path))
            except* relay_lite.AgentError as group:
                raise relay_lite._innermost(group) from None


async def test_a_relay_that_cannot_pause_is_read_no_faster_than_the_app_takes_webhooks(tmp_path, monkeypatch):
    """Without a resume (the hosted service has none, and a replay has not yet said "resumed"),
    the agent stops reading the socket while it holds its bound: its memory stays bounded."""
    monkeypatch.setattr(relay_lite, "_AGENT_QUEUE_BYTES", 5_000)
    most = 0
    take = relay_lite._Agent._take

    def measured_take(agent, frame):
        nonlocal most
        paused = take(agent, frame)
        most = max(most, agent._queued_bytes)
        return paused

    monkeypatch.setattr(relay_lite._Agent, "_take", measured_take)

    async def flood(relay, ws):
        await subscribed(relay, ws)
        for n in range(200):
            await ws.send_message(webhook_frame(f"id-{n:03}", str(n) + " " * 1000))
        await trio.sleep_forever()

    async with running_app() as app, trio.open_nursery() as nursery:
        app.answer = lambda request: Answer(delay=0.005)
        relay = await FakeRelay(flood).serve(nursery)
        agent = await nursery.start(relay_lite.forward, fake_agent_config(relay, app, tmp_path))
        received = await app.wait_for(200, timeout=60)
        agent.stop()
        nursery.cancel_scope.cancel()
    assert [request.body.strip() for request in received] == [str(n).encode() for n in range(200)]
    assert most <= 5_000 + 1_100  # the bound, and the frame that reached it


async def test_a_relay_that_does_not_speak_websocket_is_a_connection_error_not_a_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(relay_lite, "_RECONNECT_FIRST", 0.05)
    caplog.set_level(logging.INFO, logger="relay_lite")

    async def garbage(stream):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some()
            await stream.send_all(b"garbage\r\n\r\n")
        await stream.aclose()

    async with running_app() as app, trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
        relay = FakeRelay()
        relay.url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        agent = await nursery.start(relay_lite.forward, fake_agent_config(relay, app, tmp_path))
        await eventually(lambda: sum("cannot connect" in record.message for record in caplog.records) >= 3)
        agent.stop()
        nursery.cancel_scope.cancel()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]


# ---------------------------------------------------------------------------- pieces, sans I/O


@pytest.mark.parametrize("output_destination, to, url", [
    ("/", "http://app:3000/hooks", "http://app:3000/hooks"),  # a bucket without outputs
    ("/github/push", "http://app:3000/hooks/", "http://app:3000/hooks/github/push"),
    ("http://localhost:8080/base/gh?k=1", "http://app:3000", "http://app:3000/base/gh?k=1"),
    ("http://localhost:8080/base/gh", "", "http://localhost:8080/base/gh"),  # each to its own output
    ("/github", "", None),  # nowhere: no outputs, and no --to
    ("ftp://x/y", "", None),
    ("/a/../admin", "http://app:3000/hooks", None),  # it would climb out of --to (the hosted relay may send it)
    ("http://localhost:8080/hooks/%2E%2E/admin", "http://app:3000", None),
])
def test_where_the_agent_delivers(output_destination, to, url):
    assert relay_lite._agent_destination(output_destination, to) == url


@pytest.mark.parametrize("given_url, base, socket_url", [
    ("http://relay:8080", "http://relay:8080", "ws://relay:8080/v1/socket"),
    ("https://relay.example.com/", "https://relay.example.com", "wss://relay.example.com/v1/socket"),
    ("wss://relay.example.com/v1/socket", "https://relay.example.com", "wss://relay.example.com/v1/socket"),
    ("http://host/prefix", "http://host/prefix", "ws://host/prefix/v1/socket"),
])
def test_the_relays_urls(given_url, base, socket_url):
    assert relay_lite._relay_urls(given_url) == (base, socket_url)


def test_the_checkpoint_is_a_low_water_mark_saved_whole(tmp_path):
    path = tmp_path / "deep" / "state.json"
    checkpoint = relay_lite._Checkpoint(path, "http://relay", ("github",))
    for log_id in "abcd":
        checkpoint.took(log_id)
    checkpoint.done("b")
    assert checkpoint.last == ""  # a is not done
    checkpoint.done("a")
    assert checkpoint.last == "b"
    checkpoint.done("d")
    checkpoint.save()
    assert json.loads(path.read_text())["last"] == "b" and list(path.parent.iterdir()) == [path]  # no temporary left
    assert relay_lite._Checkpoint.load(path, "http://relay", ("github",)).last == "b"
    with pytest.raises(relay_lite.AgentError, match="belongs to the relay http://relay"):
        relay_lite._Checkpoint.load(path, "http://other", ("github",))
    with pytest.raises(relay_lite.AgentError, match=r"belongs to the buckets \['github'\]"):
        relay_lite._Checkpoint.load(path, "http://relay", ("github", "stripe"))
    path.write_text("{half")
    with pytest.raises(relay_lite.AgentError, match="is not one relay_lite forward wrote"):
        relay_lite._Checkpoint.load(path, "http://relay", ("github",))


async def test_a_checkpoint_that_cannot_be_saved_is_warned_of_and_saving_goes_on(tmp_path, caplog):
    """The save runs in a worker thread, and its warning asked the event loop's clock there: a
    RuntimeError ended the agent where it should warn and go on delivering (issue 22's review)."""
    (tmp_path / "file").write_text("")  # a file where the state's folder should be
    checkpoint = relay_lite._Checkpoint(tmp_path / "file" / "state.json", "http://relay", ("github",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(checkpoint.keep_saved)
        for log_id in "ab":
            checkpoint.took(log_id)
            with trio.fail_after(10):
                await checkpoint.saved(checkpoint.done(log_id))  # tried, and failed: not waited for again
        nursery.cancel_scope.cancel()
    assert [record.getMessage().partition(":")[0] for record in caplog.records] == [
        f"cannot save the checkpoint in {tmp_path / 'file' / 'state.json'}"]  # once: the throttle holds the next


async def test_a_worker_waits_for_the_save_that_holds_its_webhook(tmp_path):
    """So that a crash repeats at most the webhook each worker had delivered."""
    path = tmp_path / "state.json"
    checkpoint = relay_lite._Checkpoint(path, "http://relay", ("github",))
    for log_id in "abc":
        checkpoint.took(log_id)
    assert checkpoint.done("b") == 0  # a is not done: no save will hold b before a
    waited = []

    async def worker(version):
        await checkpoint.saved(version)
        waited.append(json.loads(path.read_text())["last"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, checkpoint.done("a"))
        await trio.testing.wait_all_tasks_blocked()
        assert waited == [] and not path.exists()  # nothing has saved it yet
        nursery.start_soon(checkpoint.keep_saved)
        await eventually(lambda: waited, 10)
        assert waited == ["b"]
        nursery.cancel_scope.cancel()


async def test_a_worker_waiting_for_a_save_that_will_never_come_waits_no_more(tmp_path):
    """A worker finishing a delivery waits, shielded for its stop grace, for the save that
    holds it. Stopped at once (a second SIGTERM), the saver was cancelled, and the worker
    waited out the whole 10 s grace for a save nobody would make; the agent saves as it ends."""
    checkpoint = relay_lite._Checkpoint(tmp_path / "state.json", "http://relay", ("github",))
    checkpoint.took("a")
    ended = trio.Event()

    async def worker(version):
        with trio.CancelScope(shield=True) as grace:  # as _work's delivery scope is, with its grace
            grace.deadline = trio.current_time() + 3
            await checkpoint.saved(version)
        assert not grace.cancelled_caught, "waited out its grace for a save nobody would make"
        ended.set()

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as saver:
            saver.start_soon(checkpoint.keep_saved)
            await trio.testing.wait_all_tasks_blocked()
            saver.cancel_scope.cancel()  # the agent stopped at once: nothing saves any more
        outer.start_soon(worker, checkpoint.done("a"))
        await ended.wait()
    checkpoint.save()
    assert json.loads((tmp_path / "state.json").read_text())["last"] == "a"  # saved as the agent ends


def test_a_frame_the_relay_sends_is_read_back_as_the_webhook_it_carries():
    bucket = relay_lite.BucketConfig(name="github", id="b-id")
    sent = relay_lite.Webhook.from_request("PUT", "/x", b"a=1", [(b"X-Multi", b"1"), (b"X-Multi", b"2")],
                                           bytes(range(256)))
    entry = relay_lite._Entry("log-1", bucket, "in", "input", "out", "http://app/x", sent, 0.0)
    frame = relay_lite.parse_server_frame(entry.frame())
    assert (frame.id, frame.bucket, frame.output_destination) == ("log-1", "github", "http://app/x")
    assert frame.webhook.body_bytes == bytes(range(256)) and frame.webhook.headers == {"X-Multi": ["1", "2"]}
    assert (frame.webhook.method, frame.webhook.query) == ("PUT", "a=1")


@pytest.mark.parametrize("frame, error", [
    ('{"type":"webhook","meta":{}}', 'needs "meta" with an "id"'),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET /"}', "must be an HTTP method"),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","headers":{"X":["a\\r\\nY: b"]}}', "is not one HTTP"),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","headers":{"X Y":"a"}}', "is not one HTTP"),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","body":"%%","body_encoding":"base64"}', "not base64"),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","body":1}', '"body" must be Unicode strings'),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","body":"\\ud800"}', '"body" must be Unicode strings'),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","query":"\\udcff"}', '"body" must be Unicode strings'),
    ('{"type":"webhook","meta":{"id":"1"},"method":"GET","headers":{"X":"\\udcff"}}', "is not one HTTP"),
    ('{"type":"webhook","meta":{"id":"../admin"},"method":"GET"}', 'needs "meta" with an "id"'),
    ('{"type":"webhook","meta":{"id":"\\ud800"},"method":"GET"}', 'needs "meta" with an "id"'),
    ('[1]', "must be a JSON object"),
    ('{"type":"other"}', "unknown frame type"),
])
def test_a_frame_no_request_could_carry_is_refused(frame, error):
    with pytest.raises(relay_lite.ProtocolError, match=error):
        relay_lite.parse_server_frame(frame)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"type": st.sampled_from(["webhook", "status", "x"])}, optional={
    "meta": st.fixed_dictionaries({}, optional={"id": json_values, "bucket_name": json_values,
                                                "output_destination": json_values}),
    "method": json_values, "headers": json_values, "query": json_values, "body": json_values,
    "body_encoding": json_values, "status": json_values, "message": json_values}))
def test_any_frame_is_parsed_or_refused_with_a_reason(frame):
    try:
        parsed = relay_lite.parse_server_frame(json.dumps(frame))
    except relay_lite.ProtocolError:
        return
    if isinstance(parsed, relay_lite._WebhookFrame):  # then it is a request HTTP can carry
        request = relay_lite._outbound(parsed.webhook, "http://app/")
        httpx.Request(request.method, request.url, headers=request.raw_headers, content=request.body)
        h11.Connection(h11.CLIENT).send(h11.Request(method=request.method, target="/",
                                                    headers=[("Host", "app"), *request.raw_headers]))


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1:3000/hooks", True), ("http://127.0.0.1:3000/hooks/", True),
    ("http://127.0.0.1:3000/hooks/push?x=1", True), ("HTTP://127.0.0.1:3000/hooks", True),
    ("http://127.0.0.1:3000/hooksx", False), ("http://127.0.0.1:3000/", False), ("http://127.0.0.1:30001/hooks", False),
    ("http://127.0.0.2:3000/hooks", False), ("https://127.0.0.1:3000/hooks", False),
    ("http://user:pw@127.0.0.1:3000/hooks", False), ("http://127.0.0.1:3000@evil.example/hooks", False),
    ("http://127.0.0.1:99999/hooks", False), ("http://app.local/x", True), ("http://app.local:80/y/z", True),
    ("http://127.0.0.1:3000/hooks/../admin", False), ("http://127.0.0.1:3000/hooks/%2e%2E/admin", False),
    ("http://127.0.0.1:3000/hooks/..%5cadmin", False), ("http://127.0.0.1:3000/hooks/..x", True),
    ("http://127.0.0.1:3000/hooks/.\\..\\admin", False),
])
def test_allow_takes_a_url_at_or_below_a_prefix_and_nothing_beside_it(url, allowed):
    assert relay_lite._allowed(url, ["http://127.0.0.1:3000/hooks", "http://app.local/"]) is allowed


async def test_allow_keeps_a_relay_from_sending_the_agent_anywhere_else(tmp_path):
    """Without --to, an agent delivered to whatever its relay named: a relay taken over reached
    other ports and addresses of the agent's network, and its user and password became Basic
    auth (issue 20, finding 8)."""
    async with running_app() as app, running_app() as other:
        config = relay_config()
        config["buckets"].append({"name": "routes", "inputs": [{"id": "in-routes"}], "outputs": [
            {"name": "app", "destination": app.url + "/hooks"},
            {"name": "beside", "destination": app.url + "/hooksx"},
            {"name": "other", "destination": other.url + "/hooks"},
            {"name": "userinfo", "destination": app.url.replace("//", "//admin:pw@") + "/hooks"}]})
        async with relay_lite.open_relay(config) as relay:
            async with running_agent(tmp_path, relay.url, "--bucket", "routes", "--retries", "0",
                                     "--allow", app.url + "/hooks") as agent:
                await post(relay, input_id="in-routes", path="/push", content="one")
                await eventually(lambda: len(agent.outcomes) == 4, timeout=20)
                async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                    logs = (await http.get("/v1/logs", params={"bucket": "routes"})).json()["data"]
                outcomes = {log["output_name"]: await log_of(relay.url, log["id"]) for log in logs}
        assert [request.target for request in app.received] == ["/hooks/push"] and other.received == []
        assert outcomes["app"]["status"] == SENT
        for refused in ("beside", "other", "userinfo"):
            assert outcomes[refused]["status"] == FAILED, refused
            assert b"is not under any --allow" in bytes(outcomes[refused]["response_body"])
        assert "which no --allow takes" in agent.err


@pytest.mark.parametrize("args, complaint", [
    (["--allow", "ftp://x/"], "--allow ftp://x/: give the app's URL"),
    (["--allow", "http://x/?q=1"], "give the app's URL"),
    (["--to", "http://a:3000", "--allow", "http://b:3000"], "--to http://a:3000 is not under any --allow"),
])
def test_allow_and_to_are_checked_at_start(args, complaint, capsys):
    assert relay_lite.main(["forward", "--relay", "http://127.0.0.1:9", "--key", "k", "--secret", "s", *args]) == 2
    assert complaint in capsys.readouterr().err


def test_the_agents_own_1009_is_not_blamed_on_the_relay():
    """A frame over the agent's limit closed its socket with 1009, logged as "closed by the
    relay" (issue 20, 11)."""
    closed = trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1009, "Exceeded maximum message size"))
    said = relay_lite._connection_error(closed)
    assert "over the 128 MiB the agent takes" in said and "closed by the relay" not in said


async def test_a_wrong_secret_at_first_never_makes_the_right_one_replay_the_history(tmp_path):
    """A refused logs API was read as "the relay holds none of these buckets": the zero
    checkpoint was saved, and the next run, with the right secret, delivered every webhook the
    relay held again (issue 21, finding 2)."""
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        for n in range(3):
            await post(relay, content=f"old {n}")
        wrong = await Agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url,
                            secret="not-the-secret-0123").start()
        with trio.fail_after(15):
            assert await wrong.process.wait() == relay_lite._REFUSED
        assert "forwarding every webhook from now on" not in wrong.err
        async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url):
            await post(relay, content="new")
            await app.wait_for(1)
            await trio.sleep(0.3)  # time for a replay of the old ones to show, had it begun
    assert [request.body for request in app.received] == [b"new"]


async def test_a_logs_api_refusing_for_now_is_waited_out_and_nothing_is_saved_meanwhile(tmp_path):
    """429 (a lockout) and 503 were read as an empty relay, and saved (issue 21, finding 2)."""
    config = relay_config(auth_failures_per_minute=20)  # lockouts of 3 s
    refused = "refused for now: too many failed authentications"
    err = tmp_path / "agent.err"

    async def lock_out(http: httpx.AsyncClient) -> None:
        """Keep this address locked out until the agent has met the lockout, however long it
        takes to start: each lockout's end is taken by a wrong secret within a round trip."""
        while not (err.exists() and refused in err.read_text()):
            await http.get("/v1/logs", auth=(KEY, "wrong"))

    async with running_app() as app, relay_lite.open_relay(config) as relay:
        await post(relay, content="old")
        async with httpx.AsyncClient(base_url=relay.url) as http:
            while (await http.get("/v1/logs", auth=(KEY, "wrong"))).status_code != 429:
                pass  # this address is locked out: the agent's first call gets 429
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lock_out, http)
                async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url) as agent:
                    assert refused in agent.err
                    await post(relay, content="new")
                    await app.wait_for(1)
    assert [request.body for request in app.received] == [b"new"]


async def test_an_outcome_that_comes_after_response_timeout_is_logged(tmp_path):
    """A delivery that failed after the input's response_timeout was recorded as sent: the
    relay refused its outcome (409) and the agent dropped it at debug level (issue 21, 1)."""
    config = relay_config()
    config["buckets"][0]["inputs"][0]["response_timeout"] = 0.3
    async with relay_lite.open_relay(config) as relay:
        async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", "http://127.0.0.1:9",
                                 "--retries", "2") as agent:
            await post(relay, content="to an app that is down")
            await eventually(lambda: len(agent.lines) == 1, timeout=20)
            async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                (log,) = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
            log = await log_of(relay.url, log["id"])
            with trio.fail_after(10):
                while log["status"] != FAILED:
                    log = await log_of(relay.url, log["id"], settled=False)
                    await trio.sleep(0.05)
    assert (log["status_code"], log["retries"]) == (0, 2)
    assert log["updated_at"] - log["created_at"] >= 1  # its outcome came well past the 0.3 s
    assert "did not record" not in agent.err


async def test_without_to_a_bucket_whose_webhooks_name_no_url_is_refused_at_start(tmp_path):
    """The demo's bucket has no outputs: an agent without --to started, then failed every
    webhook ("no URL to deliver to") (issue 21, finding 4)."""
    async with relay_lite.open_relay(relay_config()) as relay:
        agent = await Agent(tmp_path, relay.url, "--bucket", "github").start()
        with trio.fail_after(15):
            assert await agent.process.wait() == relay_lite._REFUSED
    assert agent.err.splitlines()[-1] == ("relay_lite: error: bucket github names no URL to deliver its webhooks to "
                                          "(an output's destination): pass --to with your app's URL, e.g. --to "
                                          "http://localhost:3000")
    assert not (tmp_path / "agent-state.json").exists()


async def test_each_retry_is_a_line_and_a_final_failure_says_how_to_resend_as_a_command_that_works(tmp_path):
    """While it retried, the agent printed nothing for 24 s, and its final failure did not say
    how to resend the webhook (issue 21, finding 5)."""
    async with relay_lite.open_relay(relay_config()) as relay:
        async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", "http://127.0.0.1:9",
                                 "--retries", "1") as agent:
            await post(relay, content="to an app that is down")
            await eventually(lambda: len(agent.outcomes) == 1, timeout=20)
            retried, failed, hint = agent.lines  # the failure and its hint are written at once
            async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                (log,) = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
            assert re.fullmatch(r"\S+ POST / ConnectError: .*; attempt 1 of 2, again in \d s", retried), retried
            assert re.fullmatch(r"\S+ POST / failed: ConnectError: .* \d+ ms \(2 attempts\)", failed), failed
            assert hint.startswith(f"  resend {log['id']} once the cause is fixed: Resend in the relay's inspector, or ")
            readme = (Path(SCRIPT).parent / "README.md").read_text()
            shown = readme.partition("prints five lines of retries):\n\n```\n")[2].partition("```")[0]
            assert shape(shown.replace("8080", str(relay.port)).replace(shown.split()[-1].split("/")[-2], log["id"])) == \
                shape("\n".join(agent.lines) + "\n")  # as the README shows it
            command = hint.partition(", or ")[2]
            with trio.fail_after(30):
                done = await trio.run_process(command, shell=True, capture_stdout=True, check=False,
                                              env={**os.environ, "RELAY_SECRET": SECRET})
            assert done.returncode == 0 and json.loads(done.stdout)["resent_from"] == log["id"], done
            await eventually(lambda: len(agent.outcomes) == 2, timeout=20)  # the resend, delivered (and failed) too


@pytest.mark.parametrize("environ, coloured", [({}, True), ({"NO_COLOR": "1"}, False)])
def test_lines_are_coloured_on_a_terminal_unless_no_color_and_json_lines_say_each_retry(
        tmp_path, monkeypatch, environ, coloured):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    bucket = relay_lite.BucketConfig(name="github", id="b-id")
    sent = relay_lite.Webhook.from_request("POST", "/x", b"", [], b"{}")
    frame = relay_lite.parse_server_frame(relay_lite._Entry("log-1", bucket, "in", "input", "out", "", sent, 0.0).frame())
    config = relay_lite.AgentConfig(relay="http://relay:8080", key="k", secret="s", to="http://app")
    checkpoint = relay_lite._Checkpoint(tmp_path / "state.json", "http://relay:8080", ())
    for out, json_lines in [(Terminal(), False), (io.StringIO(), False), (Terminal(), True)]:
        agent = relay_lite._Agent(dataclasses.replace(config, lines="json" if json_lines else "text"), checkpoint, out)
        agent._print(frame, "http://app/x", relay_lite._Answer(503, {}, b"busy", 1.5), 2.0, started=1.0)
        agent._print(frame, "http://app/x", relay_lite._Answer(503, {}, b"busy", 5.0, 1), started=1.0)
        printed = out.getvalue()
        if json_lines:
            retried, failed = map(json.loads, printed.splitlines())
            assert (retried["status"], retried["attempts"], retried["retry_in_s"]) == ("retrying", 1, 2.0)
            assert (failed["status"], failed["attempts"]) == ("failed", 2) and "retry_in_s" not in failed
            assert failed["resend"] == "POST http://relay:8080/v1/logs/log-1/action"
        else:
            assert ("\033[" in printed) == (coloured and isinstance(out, Terminal)), printed
            assert "503" in printed and "attempt 1 of 6, again in 2 s" in printed and "(2 attempts)" in printed


async def test_a_stopped_agent_closes_its_socket_with_a_close_frame(tmp_path, caplog):
    """The agent dropped its socket without a close frame when stopped: the relay logged 1006,
    an abnormal closure (issue 21, finding 13)."""
    with caplog.at_level(logging.INFO, logger="relay_lite"):
        async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
            async with running_agent(tmp_path, relay.url, "--bucket", "github", "--to", app.url) as agent:
                assert await agent.stop() == 0
                await eventually(lambda: " closed (" in caplog.text)
    (closed,) = [record.getMessage() for record in caplog.records if " closed (" in record.getMessage()]
    assert "closed (1001, 'the agent is stopping')" in closed, closed
