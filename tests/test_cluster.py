"""Several relays sharing one Redis ([cluster]): one log, whichever relay a webhook, a client or
an answer comes to. Needs redis-server (.ci/run installs Debian's package) and relay-lite[redis]."""

import base64
import functools
import shutil
import signal
import subprocess
import threading
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import trio

import relay_lite

from app_server import running_app
from conftest import KEY, SECRET, connect, post, relay_config, subscriber
from helpers import (BODY, CHANNEL, EventStream, RedisServer, free_port, logged, signed_stripe_headers, stripe_config,
                     to_channel)

pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (.ci/run installs Debian's package)", allow_module_level=True)


@asynccontextmanager
async def tail_held(relay):
    """Within the block, `relay`'s tail reads nothing: its next XREAD waits for the block's end."""
    reader = relay.services.core.backend._reader
    xread, held, released = reader.xread, threading.Event(), threading.Event()

    def held_xread(*args, **kwargs):
        held.set()
        released.wait()
        return xread(*args, **kwargs)
    reader.xread = held_xread
    try:
        await trio.to_thread.run_sync(held.wait)
        yield
    finally:
        released.set()
        reader.xread = xread


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def cluster_config(redis_server, **server):
    config = relay_config(**server)
    config["cluster"] = {"redis_url": redis_server.url}
    return config


@asynccontextmanager
async def relays(config, n):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(relay_lite.open_relay(config)) for _ in range(n)]


async def test_a_webhook_into_one_relay_reaches_clients_on_the_others_once_each_in_order(redis_server):
    async with relays(cluster_config(redis_server), 3) as (a, b, c):
        async with subscriber(b, ["github"]) as on_b, subscriber(c, ["github"]) as on_c:
            for n in range(20):
                assert (await post(a, content=f"w{n}")).status_code == 200
            got_b = [await on_b.webhook() for _ in range(20)]
            got_c = [await on_c.webhook() for _ in range(20)]
    assert [frame["body"] for frame in got_b] == [f"w{n}" for n in range(20)]
    assert [frame["meta"]["id"] for frame in got_b] == [frame["meta"]["id"] for frame in got_c]  # one id space
    assert [frame["meta"]["id"] for frame in got_b] == sorted(frame["meta"]["id"] for frame in got_b)


async def test_a_client_moves_from_one_relay_to_another_with_since_and_loses_nothing(redis_server):
    async with relays(cluster_config(redis_server), 3) as (a, b, c):
        async with subscriber(b, ["github"]) as on_b:
            await post(a, content="seen on b")
            last = (await on_b.webhook())["meta"]["id"]
        for n in range(5):
            await post(a, content=f"missed {n}")
        with trio.fail_after(10):  # c learns of them from the journal a moment after a's senders get 2xx
            while await logged(c, "github") < 6:
                await trio.sleep(0.01)
        async with connect(c) as on_c:
            await on_c.send(action="auth", key=KEY, secret=SECRET)
            await on_c.expect("authenticated")
            await on_c.send(action="subscribe", buckets=["github"], since=last)
            await on_c.expect("subscribed")
            frames = []
            while (frame := await on_c.receive())["type"] == "webhook":
                frames.append(frame["body"])
            assert frame["status"] == "resumed"
    assert frames == [f"missed {n}" for n in range(5)]


async def test_a_sender_held_on_one_relay_is_answered_by_a_client_on_another(redis_server):
    config = cluster_config(redis_server)
    config["buckets"][0]["inputs"][0].update(response_from_output="anyOutput", response_timeout=10)
    async with relays(config, 3) as (a, _, c):
        async with subscriber(c, ["github"]) as on_c, trio.open_nursery() as nursery:
            answers = []

            async def send():
                answers.append(await post(a, content="what is the answer?"))
            nursery.start_soon(send)
            frame = await on_c.webhook()
            async with httpx.AsyncClient(base_url=c.url, auth=(KEY, SECRET)) as http:
                put = await http.put(f"/v1/logs/{frame['meta']['id']}",
                                     json={"status_code": 201, "response_body": "NDI=", "status": "sent"})
            assert put.status_code == 200
    assert (answers[0].status_code, answers[0].content) == (201, b"42")


async def test_with_redis_down_senders_get_503s_and_it_recovers_by_itself(redis_server):
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(b, ["github"]) as on_b:
            redis_server.stop()
            down = await post(a, content="lost?")
            assert down.status_code == 503
            redis_server.start()
            with trio.fail_after(20):
                while (await post(a, content="after")).status_code != 200:
                    await trio.sleep(0.1)
            assert (await on_b.webhook(timeout=20))["body"] == "after"


async def test_the_first_answer_counts_whichever_relay_takes_it(redis_server):
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(a, ["github"]) as on_a:
            await post(a, content="x")
            log_id = (await on_a.webhook())["meta"]["id"]
        answers = []
        for relay in (a, b, a):
            async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
                answers.append((await http.put(f"/v1/logs/{log_id}", json={"status_code": 200})).status_code)
    assert sorted(answers) == [200, 409, 409]


async def test_a_pull_queue_hands_each_webhook_out_once_across_relays(redis_server):
    async with relays(cluster_config(redis_server), 3) as cluster:
        got: list[str] = []
        async with trio.open_nursery() as nursery:
            async def poll_on(relay):
                async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET), timeout=20) as http:
                    while len(got) < 60:
                        page = (await http.get("/v1/events", params={"bucket": "github", "limit": 7})).json()
                        got.extend(log["body"] for log in page["logs"])
                        await trio.sleep(0.01)  # a poller's pause between calls
            for relay in cluster:
                nursery.start_soon(poll_on, relay)
            for n in range(60):
                await post(cluster[n % 3], content=str(n))
    assert sorted(got, key=int) == [str(n) for n in range(60)]


async def test_a_public_output_is_delivered_once_not_once_per_relay(redis_server):
    async with running_app() as app:
        config = cluster_config(redis_server)
        config["buckets"].append({"name": "deliver", "inputs": [{"id": "in-deliver"}], "outputs": [
            {"name": "app", "destination": app.url, "internal": False}]})
        async with relays(config, 3) as cluster:
            for n in range(30):
                assert (await post(cluster[n % 3], "in-deliver", content=str(n))).status_code == 200
            await app.wait_for(30, timeout=30)
            with trio.move_on_after(1):  # any duplicate would come now
                await app.wait_for(31)
    assert sorted(int(request.body) for request in app.received) == list(range(30))


async def test_redis_restarted_mid_stream_loses_nothing_that_got_a_2xx(redis_server):
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(b, ["github"]) as on_b:
            accepted = []
            for n in range(40):
                if n == 20:
                    redis_server.stop()
                    redis_server.start()  # persistence on: appendfsync always
                answer = await post(a, content=str(n))
                if answer.status_code == 200:
                    accepted.append(str(n))
            got = [(await on_b.webhook(timeout=20))["body"] for _ in accepted]
    assert got == accepted and len(accepted) >= 30
    async with relays(cluster_config(redis_server), 1) as (c,):  # a relay started now loads them all
        async with httpx.AsyncClient(base_url=c.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "github", "limit": 1000})).json()["data"]
    assert [log["body"] for log in reversed(logs)] == accepted


async def test_workers_share_the_port_and_the_log_and_one_that_dies_is_started_again(redis_server, tmp_path):
    import contextlib
    import os
    import re
    import sys
    from pathlib import Path

    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
[cluster]
redis_url = "{redis_server.url}"
[[tokens]]
key = "{KEY}"
secret = "{SECRET}"
[[buckets]]
name = "github"
[[buckets.inputs]]
id = "in-workers"
""")
    url = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        parent = await trio.lowlevel.open_process(
            [sys.executable, "relay_lite.py", "--config", str(config), "--workers", "2"],
            cwd=Path(__file__).parents[1], stderr=err)
    try:
        async def all_posted(bodies):
            async with httpx.AsyncClient(timeout=5) as http:
                for body in bodies:
                    with trio.fail_after(20):
                        while True:  # a new connection each: the kernel spreads them over the workers
                            try:
                                answer = await http.post(f"{url}/v1/webhooks/in-workers", content=body,
                                                         headers={"Connection": "close"})
                                if answer.status_code == 200:
                                    break
                            except httpx.TransportError:
                                pass  # a worker dying, or not listening yet
                            await trio.sleep(0.05)

        await all_posted([f"first {n}" for n in range(10)])
        pids = [int(pid) for pid in re.search(r"2 workers started \(pids (\d+), (\d+)\)",
                                             stderr.read_text()).groups()]
        os.kill(pids[0], signal.SIGKILL)
        await all_posted([f"then {n}" for n in range(10)])
        with trio.fail_after(20):
            while "starting it again" not in stderr.read_text():
                await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"limit": 100})).json()["data"]
        assert sorted(log["body"] for log in logs) == sorted([f"first {n}" for n in range(10)]
                                                             + [f"then {n}" for n in range(10)])
    finally:
        parent.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await parent.wait()
        if parent.returncode is None:  # a failure: leave no worker behind
            for pid in re.findall(r"pids? (\d+)", stderr.read_text()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            parent.kill()
    assert parent.returncode == 0, stderr.read_text()[-3000:]
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in pids[1:])


def test_an_abbreviated_workers_flag_is_refused_not_a_fork_bomb(tmp_path, capsys):
    config = tmp_path / "relay.toml"
    config.write_text('[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n[server]\nport = 18999\n')
    with pytest.raises(SystemExit) as exited:
        relay_lite.main(["--config", str(config), "--worker", "2"])
    assert exited.value.code == 2 and "error:" in capsys.readouterr().err  # not taken for --workers


async def test_a_relay_started_while_redis_is_down_waits_for_it(redis_server):
    redis_server.stop()
    async with trio.open_nursery() as nursery:
        async def start_redis_soon():
            await trio.sleep(1)  # the relay is trying meanwhile
            redis_server.start()
        nursery.start_soon(start_redis_soon)
        with trio.fail_after(30):
            async with relay_lite.open_relay(cluster_config(redis_server)) as relay:
                assert (await post(relay, content="after all")).status_code == 200


async def test_an_answer_is_claimed_and_journaled_in_one_step(redis_server):
    """A claim whose journal write failed would leave the answer on one relay, refused (409)
    everywhere else: they go to Redis together, and the other relays see it."""
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(a, ["github"]) as on_a:
            await post(a, content="x")
            log_id = (await on_a.webhook())["meta"]["id"]
        async with httpx.AsyncClient(base_url=a.url, auth=(KEY, SECRET)) as http:
            assert (await http.put(f"/v1/logs/{log_id}", json={"status_code": 202, "status": "sent"})).status_code == 200
        async with httpx.AsyncClient(base_url=b.url, auth=(KEY, SECRET)) as http:
            with trio.fail_after(10):
                while (await http.get(f"/v1/logs/{log_id}")).json()["status_code"] != 202:
                    await trio.sleep(0.02)
    import redis
    events = redis.Redis(port=redis_server.port).xrange("relay_lite:journal")
    assert [fields[b"kind"] for _, fields in events] == [b"entry", b"update"]  # the answer journaled once


async def test_a_relay_that_cannot_renew_its_lead_stops_leading_before_the_lease_could_pass_on(redis_server):
    async with relays(cluster_config(redis_server), 1) as (a,):
        backend = a.services.core.backend
        began = trio.current_time()
        async with backend.leading("test-output") as lead:
            redis_server.process.send_signal(signal.SIGSTOP)  # Redis hangs: no answer, no error
            try:
                stopped_at = None
                with trio.fail_after(relay_lite._LEASE_SECONDS + 5):
                    while not lead.cancel_called:
                        await trio.sleep(0.05)
                    stopped_at = trio.current_time()
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
    assert stopped_at is not None and stopped_at - began < relay_lite._LEASE_SECONDS  # before it could pass on


async def test_an_append_whose_answer_was_lost_is_asked_again_and_made_once(redis_server):
    """Redis hangs past the client's timeout with the webhook's append in hand, then goes on: the
    relay asks again, learns that the append was made, and the sender gets its 2xx; the webhook
    is in the log once."""

    import redis

    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(b, ["github"]) as on_b, trio.open_nursery() as nursery:
            nursery.start_soon(redis_server.hang, 3)  # past the 2 s timeout of the relay's writes, within its 3 tries
            await trio.sleep(0.1)
            async with httpx.AsyncClient(timeout=60) as http:
                answer = await http.post(a.input_url("github"), content="once")
            frame = await on_b.webhook(timeout=20)
            assert (answer.status_code, frame["body"]) == (200, "once")
            with trio.move_on_after(1):
                assert (await on_b.receive_or_close())["type"] != "webhook"  # no second copy
    events = redis.Redis(port=redis_server.port).xrange("relay_lite:journal")
    assert [fields[b"kind"] for _, fields in events] == [b"entry"]


async def test_a_bucket_a_reload_adds_brings_its_history_from_the_cluster_and_its_news(redis_server):
    """Relay B has bucket "late"; A gets it by a reload, as in a rolling config change: A then
    holds what B logged before (as history, not frames) and gives its sockets what comes after.
    Removed and added again, it holds each webhook once."""
    without = cluster_config(redis_server)
    late = {"name": "late", "inputs": [{"id": "in-late"}]}
    with_late = cluster_config(redis_server)
    with_late["buckets"].append(late)

    async def bodies(relay):
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "late"})).json()
        return [log["body"] for log in reversed(logs["data"])] if "data" in logs else None

    async def eventually_bodies(relay, expected):
        with trio.fail_after(10):
            while (found := await bodies(relay)) != expected:
                await trio.sleep(0.05)
        return found

    async with relay_lite.open_relay(without) as a, relay_lite.open_relay(with_late) as b:
        for n in range(3):
            assert (await post(b, "in-late", content=f"before {n}")).status_code == 200
        a.reload(with_late)
        await eventually_bodies(a, [f"before {n}" for n in range(3)])
        async with subscriber(a, ["late"]) as on_a:
            assert (await post(b, "in-late", content="news")).status_code == 200
            assert (await on_a.webhook())["body"] == "news"  # news, and not the history before it
        a.reload(without)
        assert (await post(b, "in-late", content="while gone")).status_code == 200
        a.reload(with_late)
        await eventually_bodies(a, [*(f"before {n}" for n in range(3)), "news", "while gone"])


async def test_a_stream_trimmed_at_its_start_tells_a_resume_from_before_it_of_the_gap(redis_server):
    import redis

    async with relays(cluster_config(redis_server), 1) as (a,):
        async with subscriber(a, ["github"]) as on_a:
            for n in range(5):
                await post(a, content=str(n))
            ids = [(await on_a.webhook())["meta"]["id"] for _ in range(5)]
    redis.Redis(port=redis_server.port).xtrim("relay_lite:journal", maxlen=3, approximate=False)
    async with relays(cluster_config(redis_server), 1) as (b,):
        async with connect(b) as on_b:
            await on_b.send(action="auth", key=KEY, secret=SECRET)
            await on_b.expect("authenticated")
            await on_b.send(action="subscribe", buckets=["github"], since=ids[0])
            await on_b.expect("subscribed")
            frames = []
            while (frame := await on_b.receive())["type"] == "webhook" or frame["status"] != "resumed":
                frames.append(frame.get("status") or frame["body"])
    assert frames == ["history_gap", "2", "3", "4"]


async def test_a_pull_queue_call_that_lost_its_lock_moves_nothing(redis_server):
    """A call that outlived its lock (Redis slow past _QUEUE_LOCK_SECONDS) while another call
    took the queue must not write its older position over the other's."""
    import redis

    client = redis.Redis(port=redis_server.port)
    async with relays(cluster_config(redis_server), 1) as (a,):
        bucket = a.services.core.buckets[0]
        backend = a.services.core.backend
        positions = f"relay_lite:positions:{bucket.config.id}"
        async with backend.queue(bucket, ""):
            bucket.positions[""] = "mine"
            await backend.move(bucket, "")
        assert client.hget(positions, "") == b"mine"
        async with backend.queue(bucket, ""):
            client.set(f"relay_lite:queue:{bucket.config.id}:", "another call's")  # expired, and taken
            bucket.positions[""] = "outlived"
            with pytest.raises(relay_lite.StorageError, match="lost its lock"):
                await backend.move(bucket, "")
    assert client.hget(positions, "") == b"mine"


async def test_ids_are_unique_and_in_arrival_order_across_buckets(redis_server):
    """Review finding 1: ids made from per-bucket streams clashed across buckets in the same
    millisecond. One journal: one id space, in one order on every relay."""
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(b, ["github", "stripe"]) as on_b:
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(functools.partial(post, a, content=f"g{n}"))
                    nursery.start_soon(functools.partial(post, a, "in-stripe", content=f"s{n}"))
            frames = [await on_b.webhook() for _ in range(80)]
        ids = [frame["meta"]["id"] for frame in frames]
        assert len(set(ids)) == 80 and ids == sorted(ids)  # a resume from any of them misses nothing
        async with httpx.AsyncClient(base_url=a.url, auth=(KEY, SECRET)) as http:
            for frame in frames[:10]:
                log = (await http.get(f"/v1/logs/{frame['meta']['id']}")).json()
                assert (log["body"], log["bucket_name"]) == (frame["body"], frame["meta"]["bucket_name"])


async def test_a_relay_that_fell_behind_the_journal_says_so(redis_server):
    """Review finding 2: a relay whose tail lagged past the journal's MAXLEN skipped webhooks
    silently. Its sockets now get a history_gap, and a resume from before it is told too."""
    config = cluster_config(redis_server, history_size=2)
    async with relays(config, 2) as (a, b):
        async with subscriber(b, ["github"]) as on_b:
            async with tail_held(b):
                for n in range(400):  # far past 4 x the buckets' history_size, however MAXLEN ~ rounds
                    assert (await post(a, content=str(n))).status_code == 200
            with trio.fail_after(20):
                while (frame := await on_b.receive())["type"] == "webhook":
                    pass
            assert frame["status"] == "history_gap" and "fell behind the cluster" in frame["message"]


async def test_a_change_that_failed_to_be_journaled_is_journaled_once_redis_is_back(redis_server):
    """Review finding 3: a change (a delivery's outcome, a stall) whose append failed was lost,
    so other relays delivered the webhook again."""
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with subscriber(a, ["github"]) as on_a:
            await post(a, content="x")
            log_id = (await on_a.webhook())["meta"]["id"]
        entry = a.services.core.entry(a.config.tokens[0], log_id)
        redis_server.stop()
        entry.status = "stalled"
        a.services.core.backend.update(entry)
        with pytest.raises(relay_lite.StorageError):
            await a.services.core.backend.committed()
        redis_server.start()
        async with httpx.AsyncClient(base_url=b.url, auth=(KEY, SECRET)) as http:
            with trio.fail_after(20):
                while (await http.get(f"/v1/logs/{log_id}")).json()["status"] != relay_lite.LOG_STATUSES.index(
                        "stalled"):
                    await trio.sleep(0.05)


async def test_a_relay_started_without_buckets_takes_them_at_a_reload(redis_server):
    """Review finding 4: with no stream to read, the tail failed for good."""
    empty = cluster_config(redis_server)
    empty["buckets"], empty["tokens"] = [], empty["tokens"][:1]
    async with relays(empty, 1) as (a,), relays(cluster_config(redis_server), 1) as (b,):
        a.reload(cluster_config(redis_server))
        with trio.fail_after(10):
            while not a.services.core.buckets or a.services.core.buckets[0].config.id in a.services.core.backend._loading:
                await trio.sleep(0.02)
        async with subscriber(a, ["github"]) as on_a:
            assert (await post(b, content="to a")).status_code == 200
            assert (await on_a.webhook())["body"] == "to a"


async def test_an_answer_whose_reply_was_lost_is_claimed_once_and_known_everywhere(redis_server):
    """Review finding 6: a claim Redis made but whose reply was lost gave a 503, then 409s, and
    the relay that took it never applied it. Asked again with the same token, it is this
    claim's: 200, and the held sender gets the answer."""

    config = cluster_config(redis_server)
    config["buckets"][0]["inputs"][0].update(response_from_output="anyOutput", response_timeout=20)
    async with relays(config, 2) as (a, b):
        async with subscriber(a, ["github"]) as on_a, trio.open_nursery() as nursery:
            answers = []

            async def send():
                async with httpx.AsyncClient(timeout=30) as http:
                    answers.append(await http.post(a.input_url("github"), content="question"))
            nursery.start_soon(send)
            log_id = (await on_a.webhook())["meta"]["id"]

            nursery.start_soon(redis_server.hang, 3)  # past the 2 s timeout of the relay's writes, within its 3 tries
            await trio.sleep(0.1)
            async with httpx.AsyncClient(base_url=a.url, auth=(KEY, SECRET), timeout=30) as http:
                put = await http.put(f"/v1/logs/{log_id}", json={"status_code": 201, "response_body": "NDI="})
        assert put.status_code == 200, put.text
        assert (answers[0].status_code, answers[0].content) == (201, b"42")
        async with httpx.AsyncClient(base_url=b.url, auth=(KEY, SECRET)) as http:
            with trio.fail_after(10):
                while (await http.get(f"/v1/logs/{log_id}")).json()["status_code"] != 201:
                    await trio.sleep(0.05)
    import redis
    ttl = redis.Redis(port=redis_server.port).ttl(f"relay_lite:answered:{log_id}")
    # kept as long as answers are taken (review finding 11): while the entry is kept (issue 21: late outcomes count)
    assert 0 < ttl <= relay_lite.DEFAULT_HISTORY_TTL + relay_lite._ANSWER_KEPT_MORE


async def test_a_short_redis_restart_does_not_take_the_lead_away(redis_server):
    """Review finding 7: the first failed renewal gave the lead up, cancelling deliveries under
    way (and making them again), with most of the lease left."""
    async with relays(cluster_config(redis_server), 1) as (a,):
        async with a.services.core.backend.leading("test-output") as lead:
            redis_server.stop()
            await trio.sleep(3)
            redis_server.start()  # appendfsync always: the lease is still there
            await trio.sleep(relay_lite._LEASE_SECONDS / 3 + 2)  # a renewal after it
            assert not lead.cancel_called


async def test_a_lagging_relay_takes_a_resume_point_another_relay_gave(redis_server):
    """A client moving from A to B, which has not read A's newest webhook yet, is not refused."""
    async with relays(cluster_config(redis_server), 2) as (a, b), connect(b) as on_b:
        async with tail_held(b):
            async with subscriber(a, ["github"]) as on_a:
                await post(a, content="newest")
                since = (await on_a.webhook())["meta"]["id"]
            await on_b.send(action="auth", key=KEY, secret=SECRET)
            await on_b.expect("authenticated")
            await on_b.send(action="subscribe", buckets=["github"], since=since)
            await on_b.expect("subscribed")
        await post(a, content="after")
        while (frame := await on_b.receive())["type"] != "webhook" or frame["body"] == "newest":
            pass  # "newest" may come again: at least once
        assert frame["body"] == "after"


def test_workers_end_when_their_supervisor_is_killed(redis_server, tmp_path):
    """Review finding 9: a supervisor killed with SIGKILL left its workers on the port."""
    import os
    import re
    import sys
    import time
    from pathlib import Path

    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'[cluster]\nredis_url = "{redis_server.url}"\n')
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        parent = subprocess.Popen([sys.executable, "relay_lite.py", "--config", str(config), "--workers", "2"],
                                  cwd=Path(__file__).parents[1], stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"2 workers started \(pids (\d+), (\d+)\)", stderr.read_text())):
            assert time.monotonic() < deadline and parent.poll() is None, stderr.read_text()
            time.sleep(0.05)
        pids = [int(pid) for pid in found.groups()]
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 30  # a graceful stop: sockets closed, requests answered
        while alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()
                        and "zombie" not in Path(f"/proc/{pid}/status").read_text()]:
            if time.monotonic() > deadline:
                for pid in alive:
                    os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"workers {alive} outlived their supervisor")
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_a_signed_webhook_replayed_to_another_relay_is_not_relayed_again(redis_server):
    """The replay memory was each relay's own (issue 20, finding 5): a replay into another
    relay of the cluster, or into a worker of --workers, was relayed once per relay."""
    config = stripe_config()
    config["cluster"] = {"redis_url": redis_server.url}
    headers = signed_stripe_headers()
    async with relays(config, 3) as (a, b, c):
        async with trio.open_nursery() as nursery:  # the same webhook into every relay at once
            for relay in (a, b, c, a, b, c):
                nursery.start_soon(functools.partial(post, relay, input_id="in-stripe", content=BODY, headers=headers))
        assert (await post(b, input_id="in-stripe", content=BODY, headers=headers)).status_code == 200
        for relay in (a, b, c):
            with trio.fail_after(5):
                while await logged(relay, "stripe") < 1:
                    await trio.sleep(0.02)
        assert [await logged(relay, "stripe") for relay in (a, b, c)] == [1, 1, 1]
        assert sum(relay.metrics.rejected["replay"] for relay in (a, b, c)) == 6


async def test_an_inspector_session_from_one_relay_is_taken_by_the_others(redis_server):
    """The inspector's session (issue 20, finding 1) is signed with one key for the cluster: a
    balancer may send its next request, or its socket, to another relay."""
    async with relays(cluster_config(redis_server), 2) as (a, b):
        async with httpx.AsyncClient() as http:
            session = (await http.post(a.url + "/inspector/session", auth=(KEY, SECRET))).json()["session"]
            assert (await http.get(b.url + "/v1/buckets", auth=(KEY, session))).status_code == 200
        async with subscriber(b, ["github"], secret=session) as watcher:
            await post(a, content="to the inspector on b")
            assert (await watcher.webhook())["body"] == "to the inspector on b"


async def test_a_redis_that_lost_its_data_is_said_so_not_a_negative_gap(redis_server, caplog):
    """When Redis came back empty a relay logged "fell -1990 events behind" (issue 20, 11)."""
    import redis
    async with relays(cluster_config(redis_server), 2) as (a, b), httpx.AsyncClient() as http:
        session = (await http.post(a.url + "/inspector/session", auth=(KEY, SECRET))).json()["session"]
        async with subscriber(b, ["github"]) as on_b:
            for n in range(5):
                await post(a, content=f"before {n}")
                await on_b.webhook()
            redis.Redis(port=redis_server.port).flushall()
            assert (await post(a, content="after")).status_code == 200
            assert (await on_b.webhook(timeout=10))["body"] == "after"
        with trio.fail_after(5):  # the inspectors' session key went with the data: kept there again, the same
            while redis.Redis(port=redis_server.port).get("relay_lite:session_key") != a.services.core.session_key:
                await trio.sleep(0.05)
        for relay in (a, b):
            assert (await http.get(relay.url + "/v1/buckets", auth=(KEY, session))).status_code == 200
    said = caplog.text
    assert "began again (event 1, after 5)" in said and "fell -" not in said


async def test_a_smee_stream_resumes_on_another_relay_by_its_last_event_id_in_order(redis_server):
    """Its event ids are the journal's own stream ids, the same on every relay (issue 23)."""
    config = cluster_config(redis_server)
    config["buckets"][0]["smee_channel"] = CHANNEL
    async with relays(config, 2) as (a, b):
        stream = await EventStream.open(a, gosmee=True)
        await stream.event()
        await to_channel(b, b"one")
        first = await stream.message()
        await stream.aclose()
        for n in range(3):
            assert (await to_channel(a, b"after %d" % n)).status_code == 200
        moved = await EventStream.open(b, gosmee=True, last_event_id=first["id"])
        await moved.event()
        got = [await moved.message() for _ in range(3)]
    assert [base64.b64decode(message["bodyB"]) for message in got] == [b"after 0", b"after 1", b"after 2"]
    assert [relay_lite._smee_id(relay_lite._stream_log_id(message["id"]), True) for message in got] == \
        [message["id"] for message in got]  # each is its journal entry's id
