"""The socket endpoint against the real server on port 0, with trio-websocket clients."""

import socket

import pytest
import trio

import relay_lite

from conftest import (GITHUB_ID, GITHUB_INPUT, KEY, SCOPED_KEY, SCOPED_SECRET, SECRET, connect, eventually,
                      fail_auth, never_reading_client, post, relay_config, subscriber)


async def test_auth_and_subscribe_answer_with_the_hosted_strings(relay):
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret=SECRET)
        assert await client.ws.get_message() == (
            '{"type":"status","status":"authenticated","message":"connected successfully, subscribe to buckets"}'
        )
        await client.send(action="subscribe", buckets=["github", "stripe-id"])
        assert await client.ws.get_message() == (
            '{"type":"status","status":"subscribed","message":"subscribed to buckets: github, stripe-id"}'
        )


async def test_webhook_reaches_subscriber_with_the_seed_schema(relay):
    async with subscriber(relay, ["github"]) as client:
        response = await post(relay, path="?foo=bar", content=b'{"hi": "there"}',
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        frame = await client.webhook()
    assert frame["body"] == '{"hi": "there"}'
    assert frame["query"] == "foo=bar"
    assert frame["method"] == "POST"
    assert frame["headers"]["Content-Type"] == ["application/json"]
    assert "Host" not in frame["headers"]
    meta = frame["meta"]
    assert meta["bucked_id"] == meta["bucket_id"] == GITHUB_ID
    assert (meta["bucket_name"], meta["input_id"], meta["input_name"]) == (
        "github", GITHUB_INPUT, "Default public endpoint")
    assert all(isinstance(value, str) for value in meta.values())
    assert set(meta) == {"id", "bucked_id", "bucket_id", "bucket_name", "input_id", "input_name",
                         "output_name", "output_destination"}


async def test_every_subscriber_on_one_key_gets_every_webhook_in_order(relay):
    async with subscriber(relay, ["github"]) as first, subscriber(relay, [GITHUB_ID]) as second:
        for n in range(20):
            assert (await post(relay, content=str(n))).status_code == 200
        for client in (first, second):
            frames = [await client.webhook() for _ in range(20)]
            assert [frame["body"] for frame in frames] == [str(n) for n in range(20)]
            assert len({frame["meta"]["id"] for frame in frames}) == 20  # meta.id unique per webhook


@pytest.mark.parametrize("subscribe", [
    {"action": "subscribe"},
    {"action": "subscribe", "buckets": None},
    {"action": "subscribe", "buckets": []},
    {"action": "subscribe", "key": "", "secret": "", "buckets": [""]},  # the Go agent, no bucket set
])
async def test_subscribe_all(relay, subscribe):
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret=SECRET, buckets=None)  # Go agent's auth frame
        await client.expect("authenticated")
        await client.send(**subscribe)
        status = await client.expect("subscribed")
        assert status["message"] == "subscribed to buckets: github, stripe, two-outputs, public-only"
        await post(relay, input_id="in-stripe", content="to stripe")
        await post(relay, content="to github")
        assert (await client.webhook())["meta"]["bucket_name"] == "stripe"
        assert (await client.webhook())["meta"]["bucket_name"] == "github"


async def test_a_second_subscribe_adds_buckets(relay):
    async with subscriber(relay, ["stripe"]) as client:
        await client.send(action="subscribe", buckets=["github"])
        assert (await client.expect("subscribed"))["message"] == "subscribed to buckets: github"
        await post(relay, content="g")
        await post(relay, input_id="in-stripe", content="s")
        assert [(await client.webhook())["body"] for _ in range(2)] == ["g", "s"]


async def test_scoped_token_sees_only_its_buckets(relay):
    async with subscriber(relay, None, SCOPED_KEY, SCOPED_SECRET) as client:
        await client.send(action="subscribe", buckets=["stripe"])
        error = await client.expect("error")
        assert error["message"] == "no such bucket for this token: stripe"
        await post(relay, input_id="in-stripe", content="not for you")
        await post(relay, content="for you")
        frame = await client.webhook()
        assert (frame["meta"]["bucket_name"], frame["body"]) == ("github", "for you")


async def test_unknown_bucket_is_an_error_and_the_socket_stays_usable(relay):
    async with subscriber(relay, ["github"]) as client:
        await client.send(action="subscribe", buckets=["github", "nope"])
        assert (await client.expect("error"))["message"] == "no such bucket for this token: nope"
        await post(relay, content="still here")
        assert (await client.webhook())["body"] == "still here"


async def test_api_key_auth_of_the_new_sdk(relay):
    async with connect(relay) as client:
        await client.send(action="auth", key="whr", secret=SECRET)
        await client.expect("authenticated")


async def test_bad_secret_is_unauthorized_then_a_good_one_works(relay):
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret="wrong")
        await client.expect("unauthorized")
        await client.send(action="auth", key="unknown", secret=SECRET)
        await client.expect("unauthorized")
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")


async def test_three_failed_auths_close_the_socket(relay):
    reason = await fail_auth(relay)
    assert (reason.code, reason.reason) == (1008, "3 failed authentication attempts")


@pytest.fixture
def quick_config():
    return relay_config(auth_timeout=0.3, ping_interval=0.1)


async def test_unauthenticated_socket_is_closed_after_auth_timeout(quick_config):
    async with relay_lite.open_relay(quick_config) as relay, connect(relay) as client:
        reason = await client.closed()
        assert (reason.code, reason.reason) == (1008, "not authenticated within 0.3 s")


async def test_status_pings_after_auth_and_pong_is_accepted(quick_config):
    async with relay_lite.open_relay(quick_config) as relay, subscriber(relay, ["github"]) as client:
        ping = await client.expect("ping")
        assert isinstance(ping["message"], str) and ping["message"]
        await client.send(action="pong")
        await client.send(action="pong", key="", secret="", buckets=None)
        await client.expect("ping")  # still authenticated and alive, well past auth_timeout
        await post(relay, content="after pings")
        while (frame := await client.receive())["type"] != "webhook":
            assert frame["status"] == "ping"
        assert frame["body"] == "after pings"


async def test_websocket_ping_frames_are_answered(relay):
    async with subscriber(relay) as client:
        with trio.fail_after(5):
            await client.ws.ping(b"jenkins")


BAD_FRAMES = [
    ("not json at all", "frame is not valid JSON"),
    ("[1,2,3]", "frame must be a JSON object, got an array"),
    ('{"action":"dance"}', "unknown action 'dance': expected \"auth\", \"subscribe\" or \"pong\""),
    ('{"nothing":"here"}', 'frame needs an "action": "auth", "subscribe" or "pong"'),
    ('{"action":"subscribe","buckets":"github"}', 'subscribe "buckets" must be an array of bucket names or ids'),
    ('{"action":"subscribe","buckets":["nope"]}', "no such bucket for this token: nope"),
    ('{"action":"auth","key":["k"],"secret":"s"}', 'auth needs "key" and "secret" strings'),
    ('{"action":"auth","key":"other","secret":"s"}', "already authenticated with another key"),
    (b"\x00\x01binary", "binary frames are not accepted: send JSON in a text frame"),
]


async def test_bad_frames_get_clear_errors_while_a_good_client_loses_nothing(relay):
    async with subscriber(relay, ["github"]) as good, subscriber(relay, ["github"]) as bad:
        for n, (message, complaint) in enumerate(BAD_FRAMES):
            await bad.ws.send_message(message)
            assert (await bad.expect("error"))["message"] == complaint
            await post(relay, content=f"webhook {n}")
            assert (await bad.webhook())["body"] == f"webhook {n}"  # the bad client's socket still works
        assert [(await good.webhook())["body"] for _ in BAD_FRAMES] == [f"webhook {n}" for n in range(len(BAD_FRAMES))]


async def test_frames_before_auth_get_errors_and_auth_still_works(relay):
    async with connect(relay) as client:
        await client.send(action="subscribe", buckets=["github"])
        assert "not authenticated" in (await client.expect("error"))["message"]
        await client.ws.send_message("garbage")
        await client.expect("error")
        await client.send(action="pong")  # harmless before auth: no answer
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")


async def test_oversized_client_frame_closes_with_1009_others_unaffected(relay):
    async with subscriber(relay, ["github"]) as good, connect(relay) as client:
        await client.send(action="auth", key=KEY, secret="x" * (2**20 + 1))
        reason = await client.closed()
        assert reason.code == 1009
        await post(relay, content="fine")
        assert (await good.webhook())["body"] == "fine"


async def test_many_connections_per_key(relay):
    async with trio.open_nursery() as nursery:
        bodies = {}

        async def listen(n):
            async with subscriber(relay, ["github"]) as client:
                ready.append(n)
                if len(ready) == 10:
                    all_ready.set()
                bodies[n] = (await client.webhook())["body"]

        ready, all_ready = [], trio.Event()
        for n in range(10):
            nursery.start_soon(listen, n)
        with trio.fail_after(5):
            await all_ready.wait()
        await post(relay, content="to all ten")
    assert bodies == {n: "to all ten" for n in range(10)}


async def test_client_disconnect_unsubscribes(relay):
    async with subscriber(relay, ["github"]):
        pass
    async with subscriber(relay, ["github"]) as client:
        await post(relay, content="x")
        assert (await client.webhook())["body"] == "x"
    bucket = relay.services.core.bucket_by_id(relay.services.core.find_bucket("github").id)
    await eventually(lambda: not bucket.subscribers)
    assert not relay.sockets.open


# ---------------------------------------------------------------------------- slow clients


@pytest.fixture
def slow_config():
    return relay_config(send_queue_size=4)


BIG = "x" * 256 * 1024  # 256 KiB per webhook: a few dozen fill any socket buffer


async def _post_in_step_with(relay, good, count=60, until=lambda: False):
    """Post big webhooks, each after `good` has read the one before, so it never falls behind."""
    for n in range(count):
        assert (await post(relay, content=BIG + f"{n:04}")).status_code == 200
        assert (await good.webhook())["body"][-4:] == f"{n:04}"
        if until():
            return n + 1
    return count


async def test_a_client_that_reads_too_slowly_is_cut_off_with_a_reason(slow_config):
    """The late reader still sees why: close code 1008 with a "too slow" reason."""
    async with relay_lite.open_relay(slow_config) as relay:
        async with subscriber(relay, ["github"]) as good, subscriber(relay, ["github"]) as slow:
            # `slow` reads nothing meanwhile; it is cut off as soon as its queue overflows
            cut = lambda: any(session.close_reason for session in relay.sockets.open)
            assert await _post_in_step_with(relay, good, until=cut) < 60
            reason = await slow.closed(timeout=10)
            assert reason.code == 1008
            assert reason.reason.startswith("too slow: 4 frames waiting unread")


async def test_a_client_that_leaves_too_many_bytes_unread_is_cut_off_before_its_frame_count_is_reached():
    """Frames are shared, but a stuck client holds on to them: 1,000 frames of large webhooks
    would be gigabytes, so send_queue_bytes bounds the outbox too."""
    async with relay_lite.open_relay(relay_config(send_queue_bytes=2**20)) as relay:
        async with subscriber(relay, ["github"]) as good, subscriber(relay, ["github"]) as slow:
            cut = lambda: any(session.close_reason for session in relay.sockets.open)
            assert await _post_in_step_with(relay, good, until=cut) < 60  # far from 1,000 frames
            (session,) = [session for session in relay.sockets.open if session.close_reason]
            assert session._outbox.bytes <= 2**20
            reason = await slow.closed(timeout=10)
            assert reason.code == 1008
            assert reason.reason == "too slow: over 1048576 bytes waiting unread; reconnect and read faster"


async def test_a_client_that_never_reads_costs_others_nothing(slow_config):
    """A raw TCP client with a tiny receive buffer that never reads: it is cut off and disconnected."""
    async with relay_lite.open_relay(slow_config) as relay:
        stuck = await never_reading_client(relay, ["github"])
        await eventually(lambda: any(session.buckets for session in relay.sockets.open))
        (session,) = relay.sockets.open  # its kernel send buffer is capped (Linux reports it doubled)
        assert session._ws._stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * 256 * 1024

        async with subscriber(relay, ["github"]) as good:
            await _post_in_step_with(relay, good)
            await eventually(lambda: len(relay.sockets.open) == 1, timeout=10)  # the stuck one is gone
        stuck.close()


@pytest.fixture
def small_queue_config():
    return relay_config(send_queue_size=8)


async def test_a_client_that_reads_everything_keeps_up_with_a_burst(small_queue_config):
    """Regression: the writer sent one frame per trio scheduling round while a busy relay
    accepts several webhooks per round, so a client reading everything was cut off as too slow."""
    import httpx

    async with relay_lite.open_relay(small_queue_config) as relay, subscriber(relay, ["github"]) as client:
        received = []

        async def read_all():
            while len(received) < 400:
                received.append((await client.webhook(timeout=20))["body"])

        async def send(sender: int, http: httpx.AsyncClient):
            for n in range(20):
                assert (await http.post(relay.input_url("github"), content=f"{sender}:{n}")).status_code == 200

        async with trio.open_nursery() as nursery, httpx.AsyncClient(
                limits=httpx.Limits(max_connections=20)) as http:
            nursery.start_soon(read_all)
            async with trio.open_nursery() as senders:
                for sender in range(20):
                    senders.start_soon(send, sender, http)
        assert sorted(received) == sorted(f"{s}:{n}" for s in range(20) for n in range(20))
        assert not any(session.close_reason for session in relay.sockets.open)


async def test_a_webhook_to_more_internal_outputs_than_send_queue_size_reaches_an_idle_client():
    """The frame a waiting writer takes at once is not one waiting unread: a send_queue_size of
    2 takes a webhook's 3 frames in one go, as it always did."""
    async with relay_lite.open_relay(relay_config(send_queue_size=2)) as relay:
        async with subscriber(relay, ["two-outputs"]) as client:
            [session] = relay.sockets.open
            await eventually(lambda: session._outbox.writer_waiting)
            assert (await post(relay, input_id="in-two", content="x")).status_code == 200
            frames = [await client.webhook() for _ in range(3)]
    assert [frame["meta"]["output_name"] for frame in frames] == ["a", "b", "locked"]
