"""Storage on a full disk (issue 9, finding 14): the 503 names the real error, and the relay
recovers once room is freed.

The disk is made full for real: a 6 MiB tmpfs is mounted (needs root, or CAP_SYS_ADMIN; the test
skips when mounting is refused), a 1 MiB filler file is written to it, and webhooks with 20 KB
bodies are posted until the relay answers 503. Deleting the filler then frees the room.

6 MiB is chosen so that, with SQLite's defaults, the write-ahead log reaches its 1,000-page
(4 MiB) autocheckpoint before the disk fills: the checkpoint then needs more room in relay.db
than the disk has, the WAL never shrinks, and a freed MiB is used up by the next commit and the
next failing checkpoint.
"""

import os
import sqlite3
import subprocess
import uuid

import httpx
import pytest

import relay_lite

from conftest import relay_config

BODY = "x" * 20_000
INPUT = "in-disk-full"


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs at tmp_path/mnt, unmounted afterwards; skip when it cannot be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


@pytest.fixture
def config(small_disk):
    config = relay_config()
    config["tokens"] = [{"key": "disk-key", "secret": "a-secret-long-enough-" + uuid.uuid4().hex}]
    # two socket outputs: each webhook is two rows, written in one transaction
    config["buckets"] = [{"name": "disk", "inputs": [{"id": INPUT}], "outputs": [
        {"name": "a", "destination": "http://localhost:8080", "internal": True},
        {"name": "b", "destination": "http://localhost:9090", "internal": True}]}]
    config["storage"] = {"path": str(small_disk / "relay.db")}
    return config


async def fill_free_and_post(config, small_disk):
    """Fill the disk, free the filler, post again; return what the relay answered, and the bodies stored."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 2**20)
    answers = {"full": [], "freed": [], "ready": []}
    async with relay_lite.open_relay(config) as relay:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as http:
            for n in range(2000):
                response = await http.post(f"/v1/webhooks/{INPUT}", content=f"before {n} {BODY}")
                if response.status_code != 200:
                    answers["full"].append((f"before {n}", response.status_code, response.text))
                    break
            else:
                pytest.fail("the disk never filled up")
            response = await http.post(f"/v1/webhooks/{INPUT}", content=f"still full {BODY}")
            answers["full"].append(("still full", response.status_code, response.text))
            answers["ready"].append((await http.get("/readyz")).status_code)
            os.unlink(filler)  # 1 MiB free again; the ten posts below need 200 KB of it
            for n in range(10):
                response = await http.post(f"/v1/webhooks/{INPUT}", content=f"after {n} {BODY}")
                answers["freed"].append((f"after {n}", response.status_code, response.text))
            answers["ready"].append((await http.get("/readyz")).status_code)
        wal = os.path.getsize(config["storage"]["path"] + "-wal")
    with sqlite3.connect(config["storage"]["path"]) as db:
        stored = [body.split(" x")[0] for (body,) in db.execute("SELECT body FROM logs")]
    return answers, stored, wal


async def test_a_full_disk_answers_503_with_the_real_error_and_writes_nothing_of_a_refused_webhook(
        config, small_disk):
    answers, stored, _ = await fill_free_and_post(config, small_disk)
    full_message = "the webhook log could not be written: database or disk is full; try again\n"
    assert [(status, text) for _, status, text in answers["full"]] == [(503, full_message)] * 2
    # a refused webhook left no row (not one of its two); an accepted one left both
    counts = {name: stored.count(name) for name in set(stored)}
    assert all(count == 2 for count in counts.values()), counts
    assert {name for name, _, _ in answers["full"]}.isdisjoint(counts)


async def test_the_relay_recovers_once_room_is_freed_and_the_wal_stays_small(config, small_disk):
    answers, stored, wal = await fill_free_and_post(config, small_disk)
    assert [status for _, status, _ in answers["freed"]] == [200] * 10, answers["freed"]
    assert answers["ready"] == [503, 200]  # /readyz said so while the disk was full
    assert {f"after {n}" for n in range(10)} <= set(stored)
    assert wal <= 2 * 2**20  # the WAL, while the relay still ran, was cut back to its bound
