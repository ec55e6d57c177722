"""Issue 9's attack, and issue 20's, all at once, against the command-line relay at a lowered
open-file limit.

Strangers on other addresses (127.0.0.2 and up stand in for other hosts) throw wedged
connections, dripped bodies, idle connections, header floods, control-character bodies, bodies
that stop a byte short of what they declare, and WebSocket upgrades of other paths at it, more
connections than it has file descriptors for; a token's holder answers a held input's webhooks
with pages of script. Meanwhile a good sender and a good subscriber on 127.0.0.1 do their work.
Every webhook the sender got a 2xx for must reach the subscriber, in order; every answer is
sandboxed; the relay's memory stays under RSS_BOUND; and it logs no ERROR.
"""

import base64
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from helpers import start


ATTACKERS = str(Path(__file__).with_name("attackers.py"))

FILES = 256  # the relay's open-file limit: max_connections 192, max_pending_per_ip 24
RSS_BOUND = 200 * 2**20  # history_bytes 16 MiB a bucket, bodies in flight 16 MiB; the rest the relay itself
GOOD_WEBHOOKS = 300
SECRET = "attack-test-secret-0123456789"
HOLDER_SECRET = "holder-secret-0123456789"

CONFIG = f"""
[server]
port = 0
request_timeout = 3
idle_timeout = 1
history_bytes = {16 * 2**20}
max_body_size = {2 * 2**20}
max_body_bytes_in_flight = {16 * 2**20}

[[tokens]]
key = "good"
secret = "{SECRET}"

[[tokens]]
key = "holder"
secret = "{HOLDER_SECRET}"
buckets = ["held"]

[[buckets]]
name = "hooks"
  [[buckets.inputs]]
  id = "in-hooks"

[[buckets]]
name = "held"
  [[buckets.inputs]]
  id = "in-held"
  response_from_output = "anyOutput"
  response_timeout = 1
"""


SCRIPT_PAGE = base64.b64encode(b"<script>fetch('/v1/logs', {headers: {Authorization: 'Basic ' + "
                               b"btoa(JSON.stringify(sessionStorage))}})</script>").decode()


async def script_answers(url: str, socket_url: str) -> None:
    """The holder of a token scoped to the bucket "held" answers its webhooks with a page of
    script, which the relay serves to their senders on its own origin, the inspector's (issue
    20, finding 1). An attacker, but one with a token: it runs here, where it is not starved of
    CPU by the strangers' thousand tasks."""
    while True:
        try:
            async with trio_websocket.open_websocket_url(socket_url) as ws, \
                    httpx.AsyncClient(base_url=url, auth=("holder", HOLDER_SECRET), timeout=10) as http:
                await ws.send_message(json.dumps({"action": "auth", "key": "holder", "secret": HOLDER_SECRET}))
                await ws.send_message(json.dumps({"action": "subscribe", "buckets": ["held"]}))
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "webhook":
                        await http.put(f"/v1/logs/{frame['meta']['id']}", json={
                            "status_code": 200, "response_body": SCRIPT_PAGE,
                            "response_headers": {"Content-Type": ["text/html"]}})
        except (OSError, trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, httpx.HTTPError):
            await trio.sleep(0.1)  # refused or cut under the attack: again


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) * 1024


def lower_file_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


async def start_relay(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    with (tmp_path / "relay.log").open("wb") as log:
        process, banner = await start("--config", str(config), stderr=log, preexec_fn=lower_file_limit)
    return process, int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", banner).group(1))


@pytest.mark.timeout(180)
async def test_the_attack_costs_a_good_client_nothing(tmp_path):
    process, port = await start_relay(tmp_path)
    url, socket_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/socket"
    attackers = await trio.lowlevel.open_process([sys.executable, ATTACKERS, str(port)], stdout=subprocess.PIPE)
    accepted, received, peak, answers = [], [], [0], []
    try:
        with trio.fail_after(20):
            assert b"attacking" in await attackers.stdout.receive_some()
        async with trio_websocket.open_websocket_url(socket_url, max_message_size=16 * 2**20,
                                                     receive_buffer_size=2**16) as ws:
            await ws.send_message(json.dumps({"action": "auth", "key": "good", "secret": SECRET}))
            await ws.send_message(json.dumps({"action": "subscribe", "buckets": ["hooks"]}))
            assert json.loads(await ws.get_message())["status"] == "authenticated"
            assert json.loads(await ws.get_message())["status"] == "subscribed"

            async def subscribe():
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "webhook" and frame["body"].startswith("good "):
                        received.append(frame["body"])

            async def watch_memory():
                while True:
                    peak[0] = max(peak[0], rss(process.pid))
                    await trio.sleep(0.1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscribe)
                nursery.start_soon(watch_memory)
                nursery.start_soon(script_answers, url, socket_url)
                await trio.sleep(3)  # the attack in full swing
                async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                    for n in range(GOOD_WEBHOOKS):
                        try:
                            response = await http.post("/v1/webhooks/in-hooks", content=f"good {n}")
                            if n % 30 == 0:  # a sender of the held input, answered by the script page's holder
                                answers.append(await http.post("/v1/webhooks/in-held", content=f"held {n}"))
                        except httpx.HTTPError:
                            continue
                        if 200 <= response.status_code < 300:
                            accepted.append(f"good {n}")
                        answers.append(response)
                        await trio.sleep(0.02)
                with trio.fail_after(30):
                    while len(received) < len(accepted):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        scripts = [answer for answer in answers if answer.text.startswith("<script>")]
        sandboxed = [answer for answer in answers
                     if "sandbox; default-src 'none'" in answer.headers.get_list("content-security-policy")
                     and answer.headers.get("x-content-type-options") == "nosniff"]
        print(f"good webhooks accepted {len(accepted)} of {GOOD_WEBHOOKS}, received {len(received)}; "
              f"relay peak RSS {peak[0] / 2**20:.0f} MB; answers sandboxed {len(sandboxed)} of {len(answers)}, "
              f"{len(scripts)} of them pages of script")
        assert received == accepted  # every 2xx reached the subscriber, in order, once
        assert len(accepted) >= 0.95 * GOOD_WEBHOOKS, len(accepted)
        assert peak[0] < RSS_BOUND, f"peak RSS {peak[0] / 2**20:.0f} MB"
        assert scripts and len(sandboxed) == len(answers)  # the holder's pages reached senders, inert
    finally:
        attackers.kill()
        process.terminate()
        with trio.fail_after(20):
            await attackers.wait()
            await process.wait()
    log = (tmp_path / "relay.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("\n") < 2000  # warnings rate-limited: the good webhooks' INFO lines and a few more
