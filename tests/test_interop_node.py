"""Interop: the seed document's JavaScript client, on Node's `ws`, against the real relay.

`ws` is installed with npm into .cache/node/ (git-ignored) on first use. ws@7 is what the seed was
written for: it hands text frames over as strings, so the client prints each frame as JSON. ws@8,
what `npm i ws` installs today, hands them over as Buffers, which the seed prints as bytes.
"""

import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

import relay_lite
from conftest import KEY, SECRET, eventually, post, relay_config

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "node" / "client.js"

if shutil.which("node") is None or shutil.which("npm") is None:  # they failed with FileNotFoundError (issue 21, 16)
    pytest.skip("Node.js and npm are not installed (.ci/run installs Debian's nodejs and npm)",
                allow_module_level=True)


def install_ws(major: int) -> Path:
    """The node_modules folder holding ws@<major>, installed once per checkout."""
    prefix = ROOT / ".cache" / "node" / f"ws{major}"
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:  # one install at a time: tests run in parallel (pytest-xdist)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prefix / "node_modules" / "ws" / "package.json").exists():
            subprocess.run([shutil.which("npm"), "install", "--no-audit", "--no-fund", "--silent", "--prefix",
                            str(prefix), f"ws@{major}"], check=True, timeout=300)
    return prefix / "node_modules"


class NodeClient:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    async def wait_for(self, predicate, timeout: float = 15) -> str:
        """Read stdout until a line satisfies `predicate`; return that line."""
        with trio.fail_after(timeout):
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    self.lines.append(line.decode())
                    if predicate(self.lines[-1]):
                        return self.lines[-1]
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"client exited: {self.lines}"
                self._buffer += chunk


async def start_client(relay, node_modules: Path, bucket: str) -> NodeClient:
    env = dict(os.environ, NODE_PATH=str(node_modules), RELAY_SOCKET_URL=relay.socket_url,
               RELAY_KEY=KEY, RELAY_SECRET=SECRET, RELAY_BUCKET=bucket)
    process = await trio.lowlevel.open_process(["node", str(CLIENT)], env=env, stdout=subprocess.PIPE)
    return NodeClient(process)


def with_every_extension(tmp_path):
    """The log on disk, and the github input holding senders for an answer the seed never gives."""
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    config["buckets"][0]["inputs"][0].update(response_from_output="anyOutput", response_timeout=0.5)
    return config


@pytest.fixture(params=["plain", "every extension"])
async def relay(request, tmp_path):
    """Unmodified clients work the same whether or not the relay's extensions are in use."""
    config = relay_config() if request.param == "plain" else with_every_extension(tmp_path)
    async with relay_lite.open_relay(config) as relay:
        yield relay


async def test_seed_client_prints_authenticated_subscribed_and_the_webhook_twice_on_one_key(relay):
    node_modules = await trio.to_thread.run_sync(install_ws, 7)
    clients = [await start_client(relay, node_modules, "github") for _ in range(2)]
    try:
        for client in clients:
            authenticated = await client.wait_for(lambda line: '"authenticated"' in line)
            assert authenticated == ('{"type":"status","status":"authenticated",'
                                     '"message":"connected successfully, subscribe to buckets"}')
            subscribed = await client.wait_for(lambda line: '"subscribed"' in line)
            assert subscribed == '{"type":"status","status":"subscribed","message":"subscribed to buckets: github"}'

        response = await post(relay, path="?foo=bar", content=b'{"hi": "there"}',
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        for client in clients:
            frame = json.loads(await client.wait_for(lambda line: line.startswith('{"type":"webhook"')))
            # the seed's schema
            assert set(frame) >= {"type", "meta", "headers", "query", "body", "method"}
            assert {"bucked_id", "bucket_name", "input_id", "input_name", "output_name",
                    "output_destination"} <= set(frame["meta"])
            assert frame["meta"]["bucket_name"] == "github"
            assert (frame["body"], frame["query"], frame["method"]) == ('{"hi": "there"}', "foo=bar", "POST")
            assert frame["headers"]["Content-Type"] == ["application/json"]
    finally:
        for client in clients:
            client.process.kill()
            await client.process.wait()


async def test_seed_client_on_todays_ws_receives_the_webhook(relay):
    node_modules = await trio.to_thread.run_sync(install_ws, 8)
    client = await start_client(relay, node_modules, "github")
    try:
        await client.wait_for(lambda line: line.startswith("connected"))
        # it prints Buffers; the relay's side shows it subscribed
        await eventually(lambda: any(session.buckets for session in relay.sockets.open), timeout=15)
        await post(relay, content="x" * 10)
        # ws@8 prints '<Buffer 7b 22 74 79 70 65 22 3a 22 77 65 62 68 6f 6f 6b ...': '{"type":"webhook'
        await client.wait_for(lambda line: line.startswith("<Buffer 7b 22 74 79 70 65 22 3a 22 77 65 62"))
    finally:
        client.process.kill()
        await client.process.wait()


async def test_seed_client_reconnects_after_a_restart():
    """The seed reconnects every 3 s; a relay restarted on the same port takes it back."""
    config = relay_config()
    async with relay_lite.open_relay(config) as relay:
        port = int(relay.url.rsplit(":", 1)[1])
        client = await start_client(relay, await trio.to_thread.run_sync(install_ws, 7), "github")
        await client.wait_for(lambda line: '"subscribed"' in line)
    try:
        await client.wait_for(lambda line: "socket closed, reconnecting" in line)
        async with relay_lite.open_relay(config, port=port) as relay:
            await client.wait_for(lambda line: '"subscribed"' in line)
            await post(relay, content="after restart")
            frame = json.loads(await client.wait_for(lambda line: line.startswith('{"type":"webhook"')))
            assert frame["body"] == "after restart"
    finally:
        client.process.kill()
        await client.process.wait()


async def test_the_readmes_first_webhook_walkthrough_prints_what_it_promises(tmp_path):
    """"A first webhook, end to end", followed as written: the server (on a free port), the npm
    line (its folder under tmp_path, not ~), the README's client.js, the line that runs it with
    what the server printed, and the server's curl command."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A first webhook, end to end"):readme.index("## Configuration")]
    npm_line = re.search(r"^\s*(mkdir ~/relay-client && .*)$", section, re.M).group(1)
    client_js = textwrap.dedent(re.search(r"```js\n(.*?)```", section, re.S).group(1))
    run_line = re.search(r"^\s*(RELAY_SOCKET_URL=<socket URL> .* node client\.js)$", section, re.M).group(1)
    promised = re.findall(r"`(\{\"type\":\"status\".*?\})`", section)
    webhook_shape = json.loads(re.search(r"```\n(\{\"type\":\"webhook\".*?)\n```", section, re.S).group(1)
                               .replace("\n", "").replace("\u2026", "x"))

    folder = tmp_path / "relay-client"
    await trio.to_thread.run_sync(functools.partial(
        subprocess.run, ["bash", "-c", npm_line.replace("~/", f"{tmp_path}/")], check=True, timeout=300,
        capture_output=True))
    (folder / "client.js").write_text(client_js)

    server = await trio.lowlevel.open_process([sys.executable, "-u", str(ROOT / "relay_lite.py"), "--port", "0"],
                                              stdout=subprocess.PIPE)
    client = None
    try:
        banner = b""
        with trio.fail_after(20):
            while b"Ctrl-C to stop" not in banner:
                banner += await server.stdout.receive_some()
        printed = banner.decode()
        filled = (run_line.replace("<socket URL>", re.search(r"socket URL: (\S+)", printed).group(1))
                  .replace("<key>", re.search(r"key:\s+(\S+)", printed).group(1))
                  .replace("<secret>", re.search(r"secret:\s+(\S+)", printed).group(1)))
        client = NodeClient(await trio.lowlevel.open_process(["bash", "-c", filled], cwd=folder,
                                                             stdout=subprocess.PIPE))
        await client.wait_for(lambda line: line == "connected, sending authentication request")
        for line in promised:
            await client.wait_for(lambda printed_line: printed_line == line)
        curl = re.search(r"^\s*(curl .*)$", printed, re.M).group(1)
        await trio.to_thread.run_sync(functools.partial(subprocess.run, shlex.split(curl), check=True, timeout=20,
                                                        capture_output=True))
        frame = json.loads(await client.wait_for(lambda line: line.startswith('{"type":"webhook"')))
    finally:
        for process in (client.process if client else None, server):
            if process is not None:
                process.kill()
                await process.wait()
    assert frame["body"] == '{"hello": "relay"}' and frame["method"] == "POST"
    assert frame.keys() == webhook_shape.keys() and frame["meta"].keys() == webhook_shape["meta"].keys()
    assert frame["meta"]["bucket_name"] == "demo"
    assert not (ROOT / "node_modules").exists() and not (ROOT / "package.json").exists()  # nothing in the checkout
