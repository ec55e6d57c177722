"""The webhook log's bounds and reads, synchronously: no sockets, no clock but the one given."""

import time

import relay_lite
from relay_lite import Webhook


def log_and_buckets(**history):
    config = relay_lite.load_config({"buckets": [{"name": "a", "inputs": [{"id": "in-a"}], **history},
                                                 {"name": "b", "inputs": [{"id": "in-b"}]}]})
    store = relay_lite._Store(config)
    log = relay_lite._Log()
    trims = []
    log.on_trim = lambda bucket: trims.append((bucket.config.name, bucket.trimmed))
    return log, store.buckets, trims


def add(log, bucket, body="x", at=None):
    (entry,) = log.record(bucket, bucket.config.inputs[0], Webhook.from_request("POST", "", b"", [], body.encode()))
    if at is not None:
        entry.received_at = at
    log.add(bucket, [entry])
    return entry


def bodies(bucket):
    return [entry.webhook.body for entry in bucket.history]


def test_the_oldest_go_past_history_size_and_the_mark_moves_past_them():
    log, (a, _), trims = log_and_buckets(history_size=3)
    entries = [add(log, a, str(n)) for n in range(5)]
    assert bodies(a) == ["2", "3", "4"]
    assert a.trimmed == entries[1].id and trims[-1] == ("a", entries[1].id)
    assert log.get(entries[1].id) is None and log.get(entries[2].id) is entries[2]


def test_history_bytes_drops_the_oldest_but_never_the_newest():
    entry_size = add(log_and_buckets()[0], log_and_buckets()[1][0], "x" * 1000).size  # with its overheads
    assert 1600 < entry_size < 1800  # the body, its str's and the path's and query's, and the entry's own
    log, (a, _), _ = log_and_buckets(history_bytes=entry_size * 2 + 100)
    add(log, a, "x" * 1000)
    add(log, a, "y" * 1000)
    assert bodies(a) == ["x" * 1000, "y" * 1000]  # two fit
    add(log, a, "z" * 1000)
    assert bodies(a) == ["y" * 1000, "z" * 1000]
    big = add(log, a, "big" * 10_000)  # alone over the bound: kept, so the newest webhook can be resumed
    assert bodies(a) == ["big" * 10_000]
    assert a.history_bytes == big.size > 30_000 + relay_lite._ENTRY_OVERHEAD


def test_entries_past_history_ttl_expire():
    log, (a, b), trims = log_and_buckets(history_ttl=60)
    now = time.time()
    add(log, a, "old", at=now - 50)
    add(log, a, "new", at=now - 10)
    add(log, b, "other", at=now - 50)  # bucket b keeps the [server] default, a day
    assert trims == []
    log.expire([a, b], now=now + 20)
    assert bodies(a) == ["new"] and bodies(b) == ["other"]
    assert trims == [("a", a.trimmed)]


def test_after_merges_buckets_in_id_order_from_a_cursor():
    log, (a, b), _ = log_and_buckets()
    entries = [add(log, (a, b)[n % 2], str(n)) for n in range(6)]
    assert log.after([a, b], entries[1].id, 10) == entries[2:]
    assert log.after([a, b], entries[1].id, 2) == entries[2:4]
    assert log.after([b], "", 10) == entries[1::2]
    assert log.after([], "", 10) == []
    assert list(log.newest([a, b])) == entries[::-1]
