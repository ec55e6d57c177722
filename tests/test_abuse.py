"""Every bad input at once, while a well-behaved client receives every webhook, in order."""

import logging

import httpx
import pytest
import trio
import trio_websocket

from conftest import KEY, SECRET, connect, eventually, fail_auth, never_reading_client, post, relay_config, subscriber

WEBHOOKS = 200


@pytest.fixture
def config():
    return relay_config(max_body_size=64 * 1024, auth_timeout=0.5, send_queue_size=16)


async def bad_frames(relay):
    async with subscriber(relay, ["stripe"]) as client:
        for message in ["nope", "[]", '{"action":7}', '{"action":"subscribe","buckets":[1]}',
                        '{"action":"subscribe","buckets":["missing"]}', b"\x00binary"]:
            await client.ws.send_message(message)
            await client.expect("error")


async def bad_secrets(relay):
    assert (await fail_auth(relay)).code == 1008


async def silent_socket(relay):
    async with connect(relay) as client:
        assert (await client.closed()).code == 1008  # auth_timeout


async def huge_frame(relay):
    async with subscriber(relay, ["stripe"]) as client:
        await client.ws.send_message("x" * (2**20 + 10))
        assert (await client.closed()).code == 1009


async def huge_frame_racing_the_auth_timeout(relay):
    """Under load this frame often lands after the relay has begun closing for auth_timeout;
    trio-websocket's reader then raised LocalProtocolError, logged as a failed connection."""
    async with connect(relay) as client:
        await trio.sleep(0.45)  # auth_timeout is 0.5 s
        try:
            await client.ws.send_message("x" * (2**20 + 10))
        except trio_websocket.ConnectionClosed:
            pass
        assert (await client.closed()).code in (1008, 1009)


async def garbage_bytes(relay):
    for garbage in (b"\x16\x03\x01" + bytes(300), b"\r\n" * 10000, b"GET /v1/socket HTTP/1.1\r\n" + b"A" * 20000):
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        try:
            await stream.send_all(garbage)
            await stream.receive_some(1024)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


async def bad_http(relay):
    for _ in range(20):
        assert (await post(relay, content=b"x" * (64 * 1024 + 1))).status_code == 413
        assert (await post(relay, input_id="nope", content=b"x")).status_code == 404


async def bad_resumes_and_logs_api_calls(relay):
    async with subscriber(relay, ["stripe"]) as client:
        for since in ("garbage", 7, "ffffffff-ffff-7fff-bfff-ffffffffffff"):
            await client.send(action="subscribe", buckets=["stripe"], since=since)
            await client.expect("error")
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        for _ in range(5):
            assert (await http.get("/v1/logs")).status_code == 401
            assert (await http.get("/v1/logs", headers={"Authorization": "Basic !!!"})).status_code == 401
            assert (await http.get("/v1/logs", auth=(KEY, SECRET), params={"limit": "x"})).status_code == 400
            log_path = "/v1/logs/0190a000-0000-7000-8000-000000000000"
            assert (await http.put(log_path, auth=(KEY, SECRET), content=b"\xff")).status_code == 404
            assert (await http.put(log_path, auth=(KEY, SECRET), content=b"x" * (64 * 1024 + 1))).status_code in (404, 413)


async def test_bad_inputs_cost_a_good_client_nothing(relay, caplog):
    stuck = await never_reading_client(relay, ["github"])
    async with subscriber(relay, ["github"]) as good:
        received = []

        async def read_all():
            for _ in range(WEBHOOKS):
                received.append((await good.webhook(timeout=30))["body"])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                for attack in (bad_frames, bad_secrets, silent_socket, huge_frame, huge_frame_racing_the_auth_timeout,
                               garbage_bytes, bad_http, bad_resumes_and_logs_api_calls):
                    nursery.start_soon(attack, relay)
                for n in range(WEBHOOKS):
                    body = f"{n:04}" + "." * 4096  # 4 KiB each: the stuck client's buffers fill
                    assert (await post(relay, content=body)).status_code == 200
                    await trio.sleep(0)
        assert [body[:4] for body in received] == [f"{n:04}" for n in range(WEBHOOKS)]

        # the stuck client was cut off; only the good one is left
        await eventually(lambda: len(relay.sockets.open) == 1, timeout=10)
    stuck.close()
    async with subscriber(relay, ["github"]) as late:
        await post(relay, content="server still fine")
        assert (await late.webhook())["body"] == "server still fine"
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
