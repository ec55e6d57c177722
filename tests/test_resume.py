"""Resume: a client that subscribes with "since" gets every later webhook, in order, then live ones."""

import pytest
import trio

import relay_lite

from conftest import GITHUB_INPUT, KEY, SECRET, connect, eventually, post, relay_config, subscriber
from helpers import post_many, last_seen, resume, receive_until_resumed, assert_in_id_order


async def test_a_client_that_missed_1000_webhooks_gets_them_all_in_order_then_live(relay):
    since = await last_seen(relay)
    missed = [f"missed {n}" for n in range(1000)]
    await post_many(relay, missed)
    async with connect(relay) as client:
        await resume(client, since)
        frames = await receive_until_resumed(client)
        assert [frame["body"] for frame in frames] == missed
        assert_in_id_order(frames)
        await post(relay, content="live")
        live = await client.webhook()
        assert live["body"] == "live" and live["meta"]["id"] > frames[-1]["meta"]["id"]


async def test_webhooks_arriving_during_a_resume_come_once_and_in_order(relay):
    """The resume and live delivery meet without a gap or a duplicate."""
    since = await last_seen(relay)
    await post_many(relay, [f"old {n}" for n in range(300)])
    during = [f"during {n}" for n in range(200)]
    async with connect(relay) as client, trio.open_nursery() as nursery:
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")
        nursery.start_soon(post_many, relay, during)
        await client.send(action="subscribe", buckets=["github"], since=since)
        await client.expect("subscribed")
        frames = []
        with trio.fail_after(20):
            while len(frames) < 500:
                frame = await client.receive()
                if frame["type"] == "webhook":
                    frames.append(frame)
                else:
                    assert frame["status"] == "resumed"
    assert [frame["body"] for frame in frames] == [f"old {n}" for n in range(300)] + during
    assert_in_id_order(frames)


async def test_resuming_several_buckets_merges_them_in_arrival_order(relay):
    since = await last_seen(relay)
    expected = []
    for n in range(20):
        input_id, body = (GITHUB_INPUT, f"github {n}") if n % 3 else ("in-stripe", f"stripe {n}")
        await post_many(relay, [body], input_id)
        expected.append(body)
    async with connect(relay) as client:
        await resume(client, since, ["github", "stripe"])
        frames = await receive_until_resumed(client)
    assert [frame["body"] for frame in frames] == expected
    assert_in_id_order(frames)


async def test_a_resume_from_the_newest_webhook_sends_nothing_then_live(relay):
    since = await last_seen(relay)
    async with connect(relay) as client:
        await resume(client, since)
        assert await receive_until_resumed(client) == []
        await post(relay, content="live")
        assert (await client.webhook())["body"] == "live"


@pytest.fixture
def short_history_config():
    config = relay_config()
    config["buckets"][0]["history_size"] = 5
    return config


async def test_a_resume_point_older_than_the_history_is_told_so_before_what_is_left(short_history_config):
    async with relay_lite.open_relay(short_history_config) as relay:
        since = await last_seen(relay)
        await post_many(relay, [str(n) for n in range(10)])
        async with connect(relay) as client:
            await resume(client, since)
            notice = await client.expect("history_gap")
            assert "bucket github no longer holds every webhook after " + since in notice["message"]
            assert "it keeps 5 webhooks" in notice["message"]
            frames = await receive_until_resumed(client)
        assert [frame["body"] for frame in frames] == ["5", "6", "7", "8", "9"]


async def test_a_resume_point_from_before_a_restart_without_storage_is_told_so(config):
    async with relay_lite.open_relay(config) as relay:
        since = await last_seen(relay)
    async with relay_lite.open_relay(config) as relay:
        await post(relay, content="after the restart")
        async with connect(relay) as client:
            await resume(client, since)
            notice = await client.expect("history_gap")
            frames = await receive_until_resumed(client)
    assert [frame["body"] for frame in frames] == ["after the restart"]
    # its cause, not history_size (issue 21, finding 3)
    assert "the relay started then (without [storage], what it held before is gone)" in notice["message"]
    assert "it keeps" not in notice["message"]


async def test_a_client_that_has_seen_nothing_is_told_of_no_gap_where_nothing_was_lost(config):
    """A fresh agent of a fresh demo resumes from before every webhook (NIL_LOG_ID), and was told
    "bucket demo no longer holds every webhook ...: those up to ... are gone": nothing was
    (issue 21, finding 3). It is told only of webhooks the relay dropped."""
    config["buckets"][0]["history_size"] = 2
    async with relay_lite.open_relay(config) as relay:
        async with connect(relay) as client:
            await resume(client, relay_lite.NIL_LOG_ID)
            assert await receive_until_resumed(client) == []
        await post_many(relay, ["a", "b"])
        async with connect(relay) as client:
            await resume(client, relay_lite.NIL_LOG_ID)
            assert [frame["body"] for frame in await receive_until_resumed(client)] == ["a", "b"]
        await post(relay, content="c")  # "a" leaves the history: now one was dropped
        async with connect(relay) as client:
            await resume(client, relay_lite.NIL_LOG_ID)
            notice = await client.expect("history_gap")
            assert "it keeps 2 webhooks" in notice["message"]
            assert [frame["body"] for frame in await receive_until_resumed(client)] == ["b", "c"]


@pytest.fixture
def slow_config():
    return relay_config(send_queue_size=4)


async def test_a_client_cut_off_as_too_slow_resumes_and_loses_nothing(slow_config):
    big = "x" * 256 * 1024  # a few dozen fill any socket buffer
    bodies = [big + f"{n:04}" for n in range(60)]
    async with relay_lite.open_relay(slow_config) as relay:
        async with subscriber(relay, ["github"]) as slow:
            await post_many(relay, bodies)  # it reads nothing meanwhile, and is cut off
            received = []
            with trio.fail_after(10):
                while (frame := await slow.receive_or_close()) is not None:
                    if frame["type"] == "webhook":
                        received.append(frame)
            assert slow.ws.closed.code in (1008, 1006)  # 1006: the frame on the wire was cut in two
        assert 0 < len(received) < len(bodies)
        async with connect(relay) as client:
            await resume(client, received[-1]["meta"]["id"])
            received += await receive_until_resumed(client)
    assert [frame["body"][-4:] for frame in received] == [f"{n:04}" for n in range(60)]
    assert_in_id_order(received)


@pytest.mark.parametrize("since, error", [
    ("not-an-id", '"since" must be the meta.id of the last webhook you processed'),
    (42, '"since" must be the meta.id of the last webhook you processed'),
    ("ffffffff-ffff-7fff-bfff-ffffffffffff", "unknown resume point ffffffff-ffff-7fff-bfff-ffffffffffff: "
                                             "newer than any webhook of these buckets"),
])
async def test_a_bad_resume_point_is_an_error_and_subscribes_nothing(relay, since, error):
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")
        await client.send(action="subscribe", buckets=["github"], since=since)
        assert (await client.expect("error"))["message"] == error
        await client.send(action="subscribe", buckets=["github"])  # the socket stays usable
        await client.expect("subscribed")
        await post(relay, content="live")
        assert (await client.webhook())["body"] == "live"


async def test_a_second_resume_while_one_runs_is_refused(relay):
    since = await last_seen(relay)
    await post_many(relay, [str(n) for n in range(900)])  # more than one refill of the outbox (500)
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")
        await client.send(action="subscribe", buckets=["github"], since=since)
        await client.send(action="subscribe", buckets=["stripe"], since=since)
        await client.expect("subscribed")
        frames, errors = [], []
        with trio.fail_after(20):
            while (frame := await client.receive())["type"] != "status" or frame["status"] != "resumed":
                (frames if frame["type"] == "webhook" else errors).append(frame)
    assert [frame["body"] for frame in frames] == [str(n) for n in range(900)]
    assert [frame["message"] for frame in errors] == [
        'a resume is already running: subscribe with "since" again once the "resumed" status has arrived']


async def test_resumed_webhooks_are_logged_as_sent(relay):
    since = await last_seen(relay)
    await post(relay, content="missed")
    (entry,) = relay.services.core.after(relay.services.core.buckets[:1], since, 10)
    assert entry.status == "received"
    async with connect(relay) as client:
        await resume(client, since)
        await receive_until_resumed(client)
    await eventually(lambda: entry.status == "sent")


async def test_a_resume_of_buckets_already_live_changes_nothing(relay):
    """The bucket is served live already: no history is sent again, and nothing comes twice."""
    since = await last_seen(relay)
    async with subscriber(relay, ["github"]) as client:
        await client.send(action="subscribe", buckets=["github"], since=since)
        await client.expect("subscribed")
        assert await receive_until_resumed(client) == []
        await post(relay, content="live")
        assert (await client.webhook())["body"] == "live"  # once: it was live all along
        await post(relay, content="next")
        assert (await client.webhook())["body"] == "next"


async def test_a_resume_of_large_webhooks_queues_about_one_write_at_a_time(relay):
    """History frames are built for one session alone: a resume queues about 1 MiB of them at a
    time, not half the outbox (500 frames of up to max_body_size)."""
    since = await last_seen(relay)
    big = "x" * 256 * 1024
    await post_many(relay, [big + f"{n:02}" for n in range(20)])
    async with connect(relay) as client:
        await client.send(action="auth", key=KEY, secret=SECRET)
        await client.expect("authenticated")
        (session,) = relay.sockets.open
        queued, deliver = [], session.deliver

        def counting_deliver(frame):
            deliver(frame)
            queued.append(len(session._outbox))

        session.deliver = counting_deliver
        await client.send(action="subscribe", buckets=["github"], since=since)
        await client.expect("subscribed")
        frames = await receive_until_resumed(client)
    assert [frame["body"][-2:] for frame in frames] == [f"{n:02}" for n in range(20)]
    assert max(queued) <= 1 + 4  # "subscribed", and 4 frames of 256 KiB


async def test_a_resume_stays_within_a_small_send_queue_bytes():
    """Regression: a refill queued up to 1 MiB of history whatever send_queue_bytes was, so with
    512 KiB the resuming client cut itself off as too slow."""
    async with relay_lite.open_relay(relay_config(send_queue_bytes=512 * 1024)) as relay:
        since = await last_seen(relay)
        await post_many(relay, ["x" * 200 * 1024 + f"{n:02}" for n in range(10)])
        async with connect(relay) as client:
            await resume(client, since)
            frames = await receive_until_resumed(client)
    assert [frame["body"][-2:] for frame in frames] == [f"{n:02}" for n in range(10)]
