"""Issue 9's attack, all at once, against the command-line relay at a lowered open-file limit.

Strangers on other addresses (127.0.0.2 and up stand in for other hosts) throw wedged
connections, dripped bodies, idle connections, header floods and control-character bodies at
it, more connections than it has file descriptors for, while a good sender and a good
subscriber on 127.0.0.1 do their work. Every webhook the sender got a 2xx for must reach the
subscriber, in order; the relay's memory stays under RSS_BOUND; and it logs no ERROR.
"""

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

from test_cli import start

ATTACKERS = str(Path(__file__).with_name("attackers.py"))

FILES = 256  # the relay's open-file limit: max_connections 192, max_pending_per_ip 24
RSS_BOUND = 200 * 2**20  # history_bytes is 16 MiB a bucket; the rest is the relay itself and its buffers
GOOD_WEBHOOKS = 300
SECRET = "attack-test-secret-0123456789"

CONFIG = f"""
[server]
port = 0
request_timeout = 3
idle_timeout = 1
history_bytes = {16 * 2**20}
max_body_size = {2 * 2**20}

[[tokens]]
key = "good"
secret = "{SECRET}"

[[buckets]]
name = "hooks"
  [[buckets.inputs]]
  id = "in-hooks"
"""


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
    accepted, received, peak = [], [], [0]
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
                await trio.sleep(3)  # the attack in full swing
                async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                    for n in range(GOOD_WEBHOOKS):
                        try:
                            response = await http.post("/v1/webhooks/in-hooks", content=f"good {n}")
                        except httpx.HTTPError:
                            continue
                        if 200 <= response.status_code < 300:
                            accepted.append(f"good {n}")
                        await trio.sleep(0.02)
                with trio.fail_after(30):
                    while len(received) < len(accepted):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        print(f"good webhooks accepted {len(accepted)} of {GOOD_WEBHOOKS}, received {len(received)}; "
              f"relay peak RSS {peak[0] / 2**20:.0f} MB")
        assert received == accepted  # every 2xx reached the subscriber, in order, once
        assert len(accepted) >= 0.95 * GOOD_WEBHOOKS, len(accepted)
        assert peak[0] < RSS_BOUND, f"peak RSS {peak[0] / 2**20:.0f} MB"
    finally:
        attackers.kill()
        process.terminate()
        with trio.fail_after(20):
            await attackers.wait()
            await process.wait()
    log = (tmp_path / "relay.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("\n") < 2000  # warnings rate-limited: the good webhooks' INFO lines and a few more
