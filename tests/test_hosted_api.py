"""The hosted REST API's calls, made as the official JavaScript SDK makes them (its requests are in
../shared/PROTOCOL.md, "The hosted REST API"), over real HTTP: list, iterate, time windows, the
pull queue, update, resend, and the buckets."""

import base64
import datetime
import fractions
import math
import sqlite3
import threading

import httpx
import pytest
import trio
from hypothesis import given, strategies as st

import relay_lite

from conftest import (GITHUB_ID, GITHUB_INPUT, SCOPED_KEY, SCOPED_SECRET, SECRET, SENT, eventually, post,
                      relay_config, subscriber)


class Sdk:
    """What @webhookrelay/sdk sends, call by call: an API key as a Bearer token, the query's
    parameters only when given, and an error for any answer that is not 2xx."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def call(self, method: str, path: str, **kwargs) -> object:
        answer = await self.http.request(method, path, **kwargs)
        assert answer.is_success, (answer.status_code, answer.text)
        return answer.json()

    async def list(self, **params) -> dict:  # webhooks.list
        return await self.call("GET", "/v1/logs", params={name: value for name, value in params.items()
                                                          if value is not None})

    async def iterate(self, between_pages=None, **params):  # webhooks.iterate
        cursor = None
        while True:
            page = await self.list(**params, cursor=cursor)
            for log in page["data"]:
                yield log
            cursor = page.get("next_cursor")
            if not cursor:
                return
            if between_pages is not None:
                await between_pages()

    async def update(self, log_id: str, **fields) -> dict:  # webhooks.update
        return await self.call("PUT", f"/v1/logs/{log_id}", json=fields)

    async def poll(self, bucket: str, take, output: str | None = None, **params) -> None:  # webhooks.poll
        """The SDK's poller: asks again at once while has_more, else after a pause; `take` gets
        each log and returns False to stop the poller (after the page it is in, as the SDK's
        stop() does)."""
        while True:
            page = await self.call("GET", "/v1/events", params={"bucket": bucket, **params,
                                                                 **({"output": output} if output else {})})
            going = [take(log) for log in page["logs"] or []]
            if not all(going):
                return
            if not page["has_more"]:
                await trio.sleep(0.02)  # the SDK waits about a second

    async def resend(self, log_id: str, **fields) -> dict:
        return await self.call("POST", f"/v1/logs/{log_id}/action", json={"action": "resend", **fields})


def sdk_for(relay, secret: str = SECRET) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10)


@pytest.fixture
async def sdk(relay):
    async with sdk_for(relay) as http:
        yield Sdk(http)


async def posted(relay, *bodies: str, input_id: str = GITHUB_INPUT) -> None:
    for body in bodies:
        assert (await post(relay, input_id, content=body)).status_code == 200


def rfc3339(at: float) -> str:
    """A Unix time as RFC 3339, to the microsecond below it (fromtimestamp would round, and so
    would at * 1e6: up past the next microsecond, one time in eight)."""
    seconds, micros = divmod(math.floor(fractions.Fraction(at) * 1_000_000), 1_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


async def test_webhooks_list_gives_numbers_as_the_sdk_reads_them(relay, sdk):
    async with subscriber(relay, ["github"]) as client:
        await posted(relay, '{"n": 1}')
        frame = await client.webhook()
    await posted(relay, '{"n": 2}', input_id="in-stripe")  # nobody subscribed: received
    page = await sdk.list()
    stripe, github = page["data"]
    assert (github["status"], stripe["status"]) == (SENT, relay_lite.LOG_STATUSES.index("received"))
    assert github["id"] == frame["meta"]["id"] and github["bucket_id"] == GITHUB_ID
    assert github["input_id"] == GITHUB_INPUT and github["output_id"] == ""
    assert all(isinstance(github[field], int) for field in ("created_at", "updated_at", "duration_ms", "retries"))
    assert (github["response_body"], github["body"], github["method"]) == ([], '{"n": 1}', "POST")
    assert page["total"] == 2 and page["next_cursor"] == ""  # the last page
    assert [log["id"] for log in (await sdk.list(status="sent"))["data"]] == [github["id"]]


async def test_webhooks_iterate_goes_through_three_pages_while_webhooks_arrive(relay, sdk):
    await posted(relay, *(f"old {n}" for n in range(25)))
    arriving = iter(range(100))

    async def more_arrive():
        await posted(relay, *(f"new {next(arriving)}" for _ in range(5)))

    seen = [log["body"] async for log in sdk.iterate(bucket="github", limit=10, between_pages=more_arrive)]
    assert seen == [f"old {n}" for n in reversed(range(25))]  # none skipped, none twice, newest first
    assert next(arriving) == 10  # two pages' worth of webhooks came in between the three pages


async def test_webhooks_list_from_to(relay, sdk):
    await posted(relay, "a", "b", "c")
    c, b, a = (await sdk.list(bucket="github"))["data"]
    window = await sdk.list(bucket="github", **{"from": rfc3339(b["received_at"]), "to": rfc3339(b["received_at"])})
    assert [log["body"] for log in window["data"]] == ["b"] and window["total"] == 1
    since_b = await sdk.list(bucket="github", **{"from": rfc3339(b["received_at"])})
    assert [log["body"] for log in since_b["data"]] == ["c", "b"]
    today = datetime.datetime.fromtimestamp(a["received_at"], datetime.timezone.utc).date()
    assert (await sdk.list(**{"from": str(today), "to": str(today)}))["total"] == 3  # to takes in the whole day
    assert (await sdk.list(to=str(today - datetime.timedelta(days=1))))["total"] == 0
    assert (await sdk.list(**{"from": str(today + datetime.timedelta(days=1))}))["total"] == 0
    offset = datetime.datetime.fromtimestamp(b["received_at"], datetime.timezone(datetime.timedelta(hours=-5)))
    assert [log["body"] for log in (await sdk.list(to=offset.isoformat()))["data"]] == ["b", "a"]  # any zone


async def test_a_poller_gets_250_webhooks_exactly_once_across_restarts_of_it_and_the_relay(tmp_path):
    config = relay_config(request_timeout=30)
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    got: list[str] = []

    def taker(stop_at):
        def take(log):
            got.append(log["body"])
            return len(got) < stop_at
        return take

    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        sdk = Sdk(http)
        await posted(relay, *(str(n) for n in range(60)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(posted, relay, *(str(n) for n in range(60, 120)))  # while it polls
            await sdk.poll("github", taker(50), limit=7)  # stops mid-way: the poller restarts
            await sdk.poll("github", taker(100), limit=7)
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:  # the relay restarts
        sdk = Sdk(http)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(posted, relay, *(str(n) for n in range(120, 250)))
            await sdk.poll("github", taker(250))
        assert (await sdk.call("GET", "/v1/events", params={"bucket": "github"}))["logs"] == []
    assert got == [str(n) for n in range(250)]  # each once, in order


async def test_webhooks_update_as_the_sdk_sends_it(relay, sdk):
    async with subscriber(relay, ["github"]) as client:
        await posted(relay, "hello")
        log_id = (await client.webhook())["meta"]["id"]
    updated = await sdk.update(log_id, status_code=202, response_body=list(b"taken"),
                               response_headers={"X-App": ["1"]}, status=SENT)
    assert (updated["status"], updated["status_code"], bytes(updated["response_body"])) == (SENT, 202, b"taken")
    assert (await sdk.call("GET", f"/v1/logs/{log_id}"))["response_headers"] == {"X-App": ["1"]}


async def test_buckets_find_by_name_as_the_sdk_does(sdk):
    buckets = await sdk.call("GET", "/v1/buckets")
    [found] = [bucket for bucket in buckets if bucket["name"] == "stripe"]  # buckets.findByName
    assert (found["id"], [input_["id"] for input_ in found["inputs"]]) == ("stripe-id", ["in-stripe"])
    assert await sdk.call("GET", "/v1/buckets/stripe-id") == found


# ---------------------------------------------------------------------------- the pull queue


async def events(http: httpx.AsyncClient, **params) -> httpx.Response:
    return await http.get("/v1/events", params=params)


async def test_two_pollers_on_one_bucket_share_its_queue(relay, sdk):
    await posted(relay, *(str(n) for n in range(40)))
    got: dict[str, list[str]] = {"first": [], "second": []}

    async def poller(name):
        while page := (await sdk.call("GET", "/v1/events", params={"bucket": "github", "limit": 3}))["logs"]:
            got[name] += [log["body"] for log in page]
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller, "first")
        nursery.start_soon(poller, "second")
    assert sorted(got["first"] + got["second"], key=int) == [str(n) for n in range(40)]
    assert got["first"] and got["second"] and not set(got["first"]) & set(got["second"])


async def test_each_output_has_its_own_queue(relay, sdk):
    await posted(relay, "x", input_id="in-two")
    by_name = await sdk.call("GET", "/v1/events", params={"bucket": "two-outputs", "output": "a"})
    [bucket] = [bucket for bucket in await sdk.call("GET", "/v1/buckets") if bucket["name"] == "two-outputs"]
    b_id = next(output["id"] for output in bucket["outputs"] if output["name"] == "b")
    by_id = await sdk.call("GET", "/v1/events", params={"bucket": "two-outputs", "output": b_id})
    internal = await sdk.call("GET", "/v1/events", params={"bucket": "two-outputs"})  # what sockets get
    assert [log["output_name"] for log in by_name["logs"] + by_id["logs"]] == ["a", "b"]
    assert [log["output_name"] for log in internal["logs"]] == ["a", "b", "locked"]
    assert (await sdk.call("GET", "/v1/events", params={"bucket": "two-outputs", "output": "a"}))["logs"] == []


async def test_max_age_bounds_only_the_first_call(relay, sdk):
    await posted(relay, "too old")
    first = await sdk.call("GET", "/v1/events", params={"bucket": "github", "max_age": "1ns"})
    await posted(relay, "new")
    later = await sdk.call("GET", "/v1/events", params={"bucket": "github", "max_age": "1ns"})
    assert (first["logs"], [log["body"] for log in later["logs"]]) == ([], ["new"])
    everything = await sdk.call("GET", "/v1/events", params={"bucket": "stripe"})  # 24h by default
    assert everything == {"logs": [], "has_more": False, "next_cursor": everything["next_cursor"]}
    await posted(relay, "s", input_id="in-stripe")
    assert [log["body"] for log in (await sdk.call("GET", "/v1/events", params={
        "bucket": "stripe", "max_age": "0"}))["logs"]] == ["s"]  # a queue, once started, ignores max_age


async def test_has_more_and_next_cursor(relay, sdk):
    await posted(relay, *(str(n) for n in range(5)))
    first = await sdk.call("GET", "/v1/events", params={"bucket": "github", "limit": 3})
    second = await sdk.call("GET", "/v1/events", params={"bucket": "github", "limit": 3})
    assert ([log["body"] for log in first["logs"]], first["has_more"]) == (["0", "1", "2"], True)
    assert ([log["body"] for log in second["logs"]], second["has_more"]) == (["3", "4"], False)
    # a client that lost an answer reads it again with the cursor of the one before; the queue stays put
    again = await sdk.call("GET", "/v1/events", params={"bucket": "github", "cursor": first["next_cursor"]})
    assert [log["body"] for log in again["logs"]] == ["3", "4"]
    await posted(relay, "5")
    assert [log["body"] for log in (await sdk.call("GET", "/v1/events", params={"bucket": "github"}))["logs"]] == ["5"]


@pytest.mark.parametrize("params, status, error", [
    ({}, 400, "bucket is required: a pull queue is a bucket's (or one of its outputs')"),
    ({"bucket": "github", "max_age": "1d"}, 400, "max_age must be a duration such as 24h, 90m or 30s, not '1d'"),
    ({"bucket": "github", "max_age": "-1h"}, 400, "max_age must be a duration such as 24h, 90m or 30s, not '-1h'"),
    ({"bucket": "github", "limit": "101"}, 400, "limit must be a whole number from 1 to 100"),
    ({"bucket": "github", "status": "sent"}, 400, "unknown parameter 'status': this endpoint takes bucket, cursor, "
                                                  "limit, max_age, output"),
    ({"bucket": "github", "cursor": "bm90IGEgY3Vyc29y"}, 400, "cursor is not one this relay gave: pass next_cursor "
                                                               "as it came"),
    ({"bucket": "nope"}, 404, "no such bucket for this token: nope"),
    ({"bucket": "github", "output": "nope"}, 404, "bucket 'github' has no output 'nope'"),
])
async def test_bad_events_calls(relay, sdk, params, status, error):
    answer = await events(sdk.http, **params)
    assert (answer.status_code, answer.json()) == (status, {"error": error})


async def test_a_cursor_from_another_bucket_or_token_is_refused(relay, sdk):
    await posted(relay, "1", "2")
    await posted(relay, "3", input_id="in-stripe")
    github = await sdk.list(bucket="github", limit=1)
    other_bucket = await sdk.http.get("/v1/logs", params={"bucket": "stripe", "cursor": github["next_cursor"]})
    assert (other_bucket.status_code, other_bucket.json()["error"]) == (
        400, "cursor belongs to another query: its bucket is 'github'")
    async with httpx.AsyncClient(base_url=relay.url, auth=(SCOPED_KEY, SCOPED_SECRET)) as scoped:
        other_token = await scoped.get("/v1/logs", params={"bucket": "github", "cursor": github["next_cursor"]})
    assert (other_token.status_code, other_token.json()["error"]) == (400, "cursor belongs to another token")
    only_cursor = await sdk.list(cursor=github["next_cursor"], limit=5)  # the cursor carries the query
    assert [log["body"] for log in only_cursor["data"]] == ["1"]
    queue = await sdk.call("GET", "/v1/events", params={"bucket": "github", "limit": 1})
    crossed = await events(sdk.http, bucket="stripe", cursor=queue["next_cursor"])
    assert (crossed.status_code, crossed.json()["error"]) == (400, "cursor belongs to another query: another "
                                                                   "bucket or output")
    with_offset = await sdk.http.get("/v1/logs", params={"cursor": github["next_cursor"], "offset": 1})
    assert with_offset.status_code == 400 and "offset and cursor" in with_offset.json()["error"]


# ---------------------------------------------------------------------------- resend


async def test_resend_delivers_again_as_a_new_entry_naming_the_first(relay, sdk):
    async with subscriber(relay, ["github"]) as client:
        await posted(relay, "again, please")
        first = await client.webhook()
        resent = await sdk.resend(first["meta"]["id"])
        again = await client.webhook()
    assert (again["meta"]["id"], again["body"]) == (resent["id"], "again, please")
    assert resent["resent_from"] == first["meta"]["id"] and resent["id"] > first["meta"]["id"]
    assert [log["id"] for log in (await sdk.list(bucket="github"))["data"]] == [resent["id"], first["meta"]["id"]]


async def test_resend_along_another_output(relay, sdk):
    async with subscriber(relay, ["two-outputs"]) as client:
        await posted(relay, "x", input_id="in-two")
        frames = [await client.webhook() for _ in range(3)]
        resent = await sdk.resend(frames[0]["meta"]["id"], output="b")
        again = await client.webhook()
    assert (again["meta"]["output_name"], resent["output_name"]) == ("b", "b")
    assert again["meta"]["output_destination"] == "http://localhost:9090/base/"


@pytest.mark.parametrize("body, status, error", [
    ({"action": "delete"}, 400, 'the body must be {"action": "resend"}, with "output" (an id or name) to send it '
                                "along another output"),
    ({"action": "resend", "output": 5}, 400, 'the body must be {"action": "resend"}, with "output" (an id or name) '
                                             "to send it along another output"),
    ({"action": "resend", "output": "nope"}, 404, "bucket 'github' has no output 'nope'"),
])
async def test_bad_resends(relay, sdk, body, status, error):
    await posted(relay, "x")
    [log] = (await sdk.list(bucket="github"))["data"]
    answer = await sdk.http.post(f"/v1/logs/{log['id']}/action", json=body)
    assert (answer.status_code, answer.json()) == (status, {"error": error})


async def test_resend_of_a_webhook_the_token_may_not_see_is_403(relay, sdk):
    await posted(relay, "secret stuff", input_id="in-stripe")
    [log] = (await sdk.list(bucket="stripe"))["data"]
    async with httpx.AsyncClient(base_url=relay.url, auth=(SCOPED_KEY, SCOPED_SECRET)) as scoped:
        answer = await scoped.post(f"/v1/logs/{log['id']}/action", json={"action": "resend"})
    assert (answer.status_code, answer.json()) == (403, {"error": f"log {log['id']} belongs to a bucket this "
                                                                  "token may not see"})
    assert (await sdk.list(bucket="stripe"))["total"] == 1  # nothing resent


async def test_resend_with_storage_across_a_restart(tmp_path):
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with relay_lite.open_relay(config) as relay:
        await posted(relay, "kept")
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        [first] = (await Sdk(http).list(bucket="github"))["data"]
        async with subscriber(relay, ["github"]) as client:
            resent = await Sdk(http).resend(first["id"])
            assert (await client.webhook())["meta"]["id"] == resent["id"]
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        logs = (await Sdk(http).list(bucket="github"))["data"]
    assert [(log["id"], log["resent_from"], log["body"]) for log in logs] == [
        (resent["id"], first["id"], "kept"), (first["id"], "", "kept")]


# ---------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("text, seconds", [("24h", 86400), ("90m", 5400), ("30s", 30), ("1h30m", 5400),
                                           ("1.5h", 5400), ("300ms", 0.3), ("0", 0), (".5s", 0.5),
                                           ("2us", 2e-6), ("2\u00b5s", 2e-6), ("7ns", 7e-9)])
def test_max_age_takes_go_durations(text, seconds):
    assert relay_lite.parse_go_duration(text, "max_age") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "-1h", "+1h", "1d", "1 h", "1hh", "1H", "1e3s", "9" * 70 + "s"])
def test_max_age_refuses_what_go_would(text):
    with pytest.raises(relay_lite.ProtocolError, match="max_age must be a duration"):
        relay_lite.parse_go_duration(text, "max_age")


@given(st.text(max_size=80))
def test_parameters_from_outside_fail_only_with_a_reason(text):
    for parse in (lambda: relay_lite.parse_go_duration(text, "max_age"), lambda: relay_lite.parse_time(text, "to"),
                  lambda: relay_lite.decode_cursor(text, "logs", 5)):
        try:
            parse()
        except relay_lite.ProtocolError:
            pass


@given(st.from_regex(r"\A\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2}))?\Z"))
def test_times_that_look_right_parse_or_fail_with_a_reason(text):
    try:
        assert relay_lite.parse_time(text, "from") < relay_lite.parse_time(text, "to", end=True)
    except relay_lite.ProtocolError:
        pass


def test_a_cursor_round_trips():
    cursor = relay_lite.encode_cursor("events", ["bucket", "out"], relay_lite.NIL_LOG_ID)
    assert relay_lite.decode_cursor(cursor, "events", 2) == (["bucket", "out"], relay_lite.NIL_LOG_ID)
    with pytest.raises(relay_lite.ProtocolError):
        relay_lite.decode_cursor(cursor, "logs", 2)  # a cursor of another listing


# ---------------------------------------------------------------------------- found by a review


async def test_a_cursor_nested_deep_is_a_400_not_a_500(relay, sdk):
    nested = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    for answer in (await sdk.http.get("/v1/logs", params={"cursor": nested}),
                   await events(sdk.http, bucket="github", cursor=nested)):
        assert (answer.status_code, answer.json()) == (400, {
            "error": "cursor is not one this relay gave: pass next_cursor as it came"})


@pytest.mark.parametrize("query", ["bucket=&bucket=github", "limit=5&limit=", "from=&from="])
async def test_a_parameter_given_twice_is_refused_even_empty(relay, sdk, query):
    answer = await sdk.http.get("/v1/logs?" + query)
    assert answer.status_code == 400 and "given twice" in answer.json()["error"]


async def test_a_made_up_cursor_cannot_move_a_queue_past_webhooks_to_come(relay, sdk):
    await posted(relay, "before")
    future = relay_lite.encode_cursor("events", [GITHUB_ID, ""], "ffffffff-ffff-7fff-bfff-ffffffffffff")
    async with httpx.AsyncClient(base_url=relay.url, auth=(SCOPED_KEY, SCOPED_SECRET)) as scoped:
        assert (await events(scoped, cursor=future)).json()["logs"] == []
    await posted(relay, "after")
    queue = await sdk.call("GET", "/v1/events", params={"bucket": "github"})
    assert [log["body"] for log in queue["logs"]] == ["before", "after"]


async def test_a_failed_commit_hands_its_page_out_again_while_another_poll_waits(tmp_path):
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        sdk = Sdk(http)
        await posted(relay, *(f"e{n}" for n in range(6)))
        assert [log["body"] for log in (await events(http, bucket="github", limit=2)).json()["logs"]] == ["e0", "e1"]
        calls, release = [], threading.Event()

        def failing_once():
            calls.append(None)
            if len(calls) == 1:
                release.wait(10)
                raise sqlite3.OperationalError("disk I/O error (made by the test)")

        await relay.services.core.backend.committed()  # what it wrote before is written: the fault is the next write's
        relay.services.core.backend.fault = failing_once
        answers = {}

        async def poll(name):
            answers[name] = await events(http, bucket="github", limit=2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, "first")
            await eventually(lambda: calls)  # its commit is under way
            nursery.start_soon(poll, "second")
            [bucket] = relay.services.core.resolve(relay.config.tokens[0], ("github",))
            await eventually(lambda: bucket.queue_lock("").statistics().tasks_waiting == 1)
            release.set()
        assert answers["first"].status_code == 503
        assert [log["body"] for log in answers["second"].json()["logs"]] == ["e2", "e3"]  # none skipped
        rest = await sdk.call("GET", "/v1/events", params={"bucket": "github"})
    assert [log["body"] for log in rest["logs"]] == ["e4", "e5"]


async def test_a_resend_along_another_output_carries_the_senders_headers_not_the_first_outputs():
    config = relay_config()
    config["buckets"].append({"name": "two-vendors", "inputs": [{"id": "in-vendors"}], "outputs": [
        {"name": "vendor-a", "destination": "http://127.0.0.1:9/a",
         "headers": {"Authorization": "Bearer for-a-only", "X-Replaced": "by a"}},
        {"name": "vendor-b", "destination": "http://127.0.0.1:9/b", "headers": {"X-B": "b"}}]})
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        sdk = Sdk(http)
        assert (await post(relay, "in-vendors", content="x", headers={"X-Replaced": "the sender's"})).status_code == 200
        [from_a] = [log for log in (await sdk.list(bucket="two-vendors"))["data"] if log["output_name"] == "vendor-a"]
        to_b = await sdk.resend(from_a["id"], output="vendor-b")
        again_a = await sdk.resend(from_a["id"])
    assert from_a["headers"]["Authorization"] == ["Bearer for-a-only"]
    assert "Authorization" not in to_b["headers"] and to_b["headers"]["X-B"] == ["b"]
    assert to_b["headers"]["X-Replaced"] == ["the sender's"]
    assert (again_a["headers"]["Authorization"], again_a["headers"]["X-Replaced"]) == (["Bearer for-a-only"], ["by a"])


async def test_a_resend_and_a_poll_the_log_cannot_keep_are_503s_saying_try_again(tmp_path):
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with relay_lite.open_relay(config) as relay, sdk_for(relay) as http:
        await posted(relay, "one")
        [log] = (await Sdk(http).list(bucket="github"))["data"]

        def failing():
            raise sqlite3.OperationalError("disk I/O error (made by the test)")

        await relay.services.core.backend.committed()  # what it wrote before is written: the fault is the next write's
        relay.services.core.backend.fault = failing
        resend = await http.post(f"/v1/logs/{log['id']}/action", json={"action": "resend"})
        poll = await events(http, bucket="github")
    for answer in (resend, poll):
        assert answer.status_code == 503 and answer.json()["error"].endswith("disk I/O error (made by the test); "
                                                                             "try again")


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # to 2100
def test_from_and_to_of_a_logged_time_to_its_microsecond_take_that_time_in(at):
    """to=<a webhook's time, to the microsecond below it> left the webhook out one time in
    eight: the nearest float to the end of that microsecond fell on or below the logged time."""
    shown = rfc3339(at)
    assert relay_lite.parse_time(shown, "from") <= at < relay_lite.parse_time(shown, "to", end=True)
