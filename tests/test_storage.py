"""Durable storage: with [storage], what was accepted survives a restart, and a kill -9."""

import re
import sqlite3
import time
from types import SimpleNamespace

import httpx
import pytest
import trio

import relay_lite

from conftest import FAILED, GITHUB_ID, GITHUB_INPUT, RECEIVED, KEY, SECRET, connect, post, relay_config, subscriber
from helpers import run, start, stop, post_many, last_seen, resume, receive_until_resumed, assert_in_id_order


@pytest.fixture
def config(tmp_path):
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    return config


async def test_a_restart_loses_nothing_and_a_client_resumes_across_it(config):
    async with relay_lite.open_relay(config) as relay:
        since = await last_seen(relay)
        await post_many(relay, [f"missed {n}" for n in range(999)])  # with the one below: the 1,000 kept
    async with relay_lite.open_relay(config) as relay:
        await post(relay, content="after the restart")
        async with connect(relay) as client:
            await resume(client, since)
            frames = await receive_until_resumed(client)  # no history_gap notice: nothing was lost
            await post(relay, content="live")
            assert (await client.webhook())["body"] == "live"
    assert [frame["body"] for frame in frames] == [f"missed {n}" for n in range(999)] + ["after the restart"]
    assert_in_id_order(frames)


async def test_statuses_and_answers_survive_a_restart(config):
    async with relay_lite.open_relay(config) as relay:
        async with subscriber(relay, ["github"]) as client:
            await post(relay, content="answered")
            answered = (await client.webhook())["meta"]["id"]
        await post(relay, content="never delivered")
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            answer = {"status_code": 204, "response_headers": {"X-A": "b"}, "status": "failed"}
            assert (await http.put(f"/v1/logs/{answered}", json=answer)).status_code == 200
    async with relay_lite.open_relay(config) as relay:
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
    assert [(log["body"], log["status"], log["status_code"]) for log in logs] == [
        ("never delivered", RECEIVED, 0), ("answered", FAILED, 204)]
    assert logs[1]["response_headers"] == {"X-A": ["b"]}


async def test_retention_bounds_the_file_too(config):
    config["buckets"][0]["history_size"] = 5
    async with relay_lite.open_relay(config) as relay:
        await post_many(relay, [str(n) for n in range(12)])
    with sqlite3.connect(config["storage"]["path"]) as db:
        assert [body for (body,) in db.execute("SELECT body FROM logs ORDER BY id")] == [str(n) for n in range(7, 12)]


async def test_a_failed_write_answers_503_and_delivers_nothing(config):
    async with relay_lite.open_relay(config) as relay, subscriber(relay, ["github"]) as client:
        def failing_commit():
            raise sqlite3.OperationalError("disk I/O error")

        await relay.services.core.backend.committed()  # what it wrote before is written: the fault is the next write's
        relay.services.core.backend.fault = failing_commit
        response = await post(relay, content="lost?")
        assert response.status_code == 503
        assert response.text == "the webhook log could not be written: disk I/O error; try again\n"
        relay.services.core.backend.fault = None
        assert (await post(relay, content="stored")).status_code == 200
        assert (await client.webhook())["body"] == "stored"  # never the one that was refused


async def test_a_change_that_failed_to_be_written_goes_with_the_next_write(config):
    async with relay_lite.open_relay(config) as relay, subscriber(relay, ["github"]) as client:
        await post(relay, content="answered")
        answered = (await client.webhook())["meta"]["id"]
        def failing_commit():
            raise sqlite3.OperationalError("database or disk is full")

        await relay.services.core.backend.committed()  # what it wrote before is written: the fault is the next write's
        relay.services.core.backend.fault = failing_commit
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            response = await http.put(f"/v1/logs/{answered}", json={"status_code": 201, "status": "failed"})
        assert response.status_code == 503 and "recorded in memory only" in response.text
        relay.services.core.backend.fault = None
        assert (await post(relay, content="next")).status_code == 200
    with sqlite3.connect(config["storage"]["path"]) as db:
        assert db.execute("SELECT status, status_code FROM logs WHERE id = ?", (answered,)).fetchone() == ("failed", 201)


async def test_kill_9_after_acceptance_loses_nothing(tmp_path):
    """1,000 webhooks accepted (2xx) while no client listened are all there after a kill -9 the
    moment the last was accepted, and a restart."""
    path = tmp_path / "relay.toml"
    assert run("init", str(path)).returncode == 0
    text = path.read_text() + f'\n[storage]\npath = "{tmp_path / "relay.db"}"\n'
    path.write_text(text)
    key = re.search(r'key = "(\S+)"', text).group(1)
    secret = re.search(r'secret = "(\S+)"', text).group(1)

    async def serve():
        process, banner = await start("--config", str(path), "--port", "0")
        url = re.search(r"listening on (http://\S+)", banner).group(1)
        return process, url, re.search(r"input 'Default public endpoint': (\S+)", banner).group(1)

    process, url, input_url = await serve()
    try:
        async with subscriber(SimpleNamespace(socket_url=socket_url(url)), key=key, secret=secret) as client:
            async with httpx.AsyncClient() as http:
                assert (await http.post(input_url, content="seen")).status_code == 200
            since = (await client.webhook())["meta"]["id"]
        # Ten at a time, each holding a pooled connection: 1,000 requests queued on httpx's pool
        # of ten waited past its 5 s pool timeout on a busy machine (PoolTimeout, 3 runs of 3).
        senders = trio.CapacityLimiter(10)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=10), timeout=30) as http:
            async def send(n):
                async with senders:
                    assert (await http.post(input_url, content=f"accepted {n}")).status_code == 200
            async with trio.open_nursery() as nursery:
                for n in range(1000):
                    nursery.start_soon(send, n)
        process.kill()  # SIGKILL, the moment the last sender has its 200
        await process.wait()

        process, url, input_url = await serve()
        async with subscriber(SimpleNamespace(socket_url=socket_url(url)), key=key, secret=secret,
                              since=since) as client:
            frames = await receive_until_resumed(client)
        assert sorted(frame["body"] for frame in frames) == sorted(f"accepted {n}" for n in range(1000))
        assert_in_id_order(frames)
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def socket_url(url):
    return url.replace("http", "ws", 1) + "/v1/socket"


def test_a_database_that_cannot_be_opened_exits_2_with_a_message(tmp_path):
    path = tmp_path / "relay.toml"
    assert run("init", str(path)).returncode == 0
    path.write_text(path.read_text() + f'\n[storage]\npath = "{tmp_path / "missing" / "relay.db"}"\n')
    result = run("--config", str(path), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith(f"relay_lite: error: {path}: storage.path: cannot use")  # named as others are
    assert f"its folder '{tmp_path / 'missing'}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_file_of_the_first_schema_is_migrated(config):
    """A log written before schema versions existed (user_version 0) opens, keeps its rows, and
    takes what later versions added: resends and pull queues."""
    with sqlite3.connect(config["storage"]["path"]) as db:
        db.executescript(relay_lite._SCHEMA)
        db.execute("INSERT INTO logs VALUES ('01a2227f-4c1e-7000-8a3b-5f0c9d2e1b77', ?, ?, 'in', '', '/', ?, 'POST', "
                   "'/', '', '{}', 'from schema 0', '', 'received', NULL, NULL, NULL, NULL)",
                   (GITHUB_ID, GITHUB_INPUT, time.time()))
    async with relay_lite.open_relay(config) as relay:
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            [old] = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
            queue = (await http.get("/v1/events", params={"bucket": "github"})).json()["logs"]
            resent = (await http.post(f"/v1/logs/{old['id']}/action", json={"action": "resend"})).json()
    assert (old["body"], old["resent_from"], [log["id"] for log in queue]) == ("from schema 0", "", [old["id"]])
    with sqlite3.connect(config["storage"]["path"]) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(relay_lite._MIGRATIONS),)
        assert db.execute("SELECT resent_from FROM logs WHERE id = ?", (resent["id"],)).fetchone() == (old["id"],)
        assert db.execute("SELECT output, last FROM positions").fetchall() == [("", old["id"])]


def test_a_migration_that_failed_is_made_again_at_the_next_start(tmp_path):
    path = str(tmp_path / "relay.db")
    with sqlite3.connect(path) as db:
        db.executescript(relay_lite._SCHEMA)  # schema 0
        db.execute("CREATE TABLE positions (x)")  # makes migration 2 fail, as a full disk or a kill would
    with pytest.raises(relay_lite.StorageError, match="positions already exists"):
        relay_lite._Storage(path, print).open()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)  # 1 took, 2 did not
        db.execute("DROP TABLE positions")
    storage = relay_lite._Storage(path, print)
    storage.open()
    storage._db.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(relay_lite._MIGRATIONS),)  # 2, and the rest
        assert "request_headers" in [column[1] for column in db.execute("PRAGMA table_info(logs)")]
