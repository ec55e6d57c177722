"""The logs API (GET and PUT /v1/logs) and answers to a webhook's sender, against the real server."""

import base64

import httpx
import pytest
import trio

import relay_lite

from conftest import (FAILED, RECEIVED, SENT, STALLED, GITHUB_ID, KEY, SCOPED_KEY, SCOPED_SECRET, SECRET, post, relay_config, subscriber)

BASIC = (KEY, SECRET)
ANSWER = {"status_code": 201, "response_body": base64.b64encode(b"hello back").decode(),
          "response_headers": {"X-Reply": ["yes", "twice"], "Content-Type": "text/plain"}, "status": "sent"}


@pytest.fixture
def config():
    config = relay_config()
    github, stripe, two = config["buckets"][:3]
    github["inputs"].append({"id": "in-slack", "name": "slack", "response_from_output": "anyOutput",
                             "status_code": 202, "body": "fallback", "headers": {"X-Fallback": "1"}})
    github["inputs"].append({"id": "in-quick", "name": "quick", "response_from_output": "anyOutput",
                             "response_timeout": 0.3, "status_code": 504, "body": "nobody answered"})
    stripe["inputs"][0].update(status_code=201, body="thanks", headers={"X-Static": "yes"})
    two["inputs"].append({"id": "in-two-b", "name": "answered by b", "response_from_output": "b"})
    return config


async def api(relay, method, path, auth=BASIC, **kwargs):
    headers = kwargs.pop("headers", {})
    if isinstance(auth, str):
        headers["Authorization"] = f"Bearer {auth}"
        auth = None
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        return await http.request(method, path, auth=auth, headers=headers, **kwargs)


async def test_the_logs_api_needs_a_token(relay):
    for auth in (None, (KEY, "wrong"), "wrong", ("nobody", SECRET)):
        response = await api(relay, "GET", "/v1/logs", auth=auth)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="relay_lite"'
        assert "Basic key:secret" in response.json()["error"]


async def test_list_newest_first_with_filters_and_pages(relay):
    async with subscriber(relay, ["github"]) as client:
        for n in range(5):
            await post(relay, content=f"github {n}")
            await client.webhook()
    await post(relay, content="not delivered")  # nobody subscribed: received, not sent
    await post(relay, input_id="in-stripe", content="stripe")

    logs = (await api(relay, "GET", "/v1/logs", params={"bucket": "github"})).json()
    assert [log["body"] for log in logs["data"]] == ["not delivered"] + [f"github {n}" for n in range(4, -1, -1)]
    assert (logs["total"], logs["limit"], logs["offset"]) == (6, 100, 0)
    assert [log["status"] for log in logs["data"]] == [RECEIVED] + [SENT] * 5
    assert {log["bucket_id"] for log in logs["data"]} == {GITHUB_ID}

    page = (await api(relay, "GET", "/v1/logs", params={"bucket": GITHUB_ID, "limit": 2, "offset": 1})).json()
    assert [log["body"] for log in page["data"]] == ["github 4", "github 3"]
    received = (await api(relay, "GET", "/v1/logs", params={"bucket": "github", "status": "received"})).json()
    assert [log["body"] for log in received["data"]] == ["not delivered"]
    everything = (await api(relay, "GET", "/v1/logs")).json()
    assert [log["body"] for log in everything["data"][:2]] == ["stripe", "not delivered"]


async def test_a_token_sees_only_the_logs_of_its_buckets(relay):
    await post(relay, input_id="in-stripe", content="stripe")
    await post(relay, content="github")
    scoped = (SCOPED_KEY, SCOPED_SECRET)
    logs = (await api(relay, "GET", "/v1/logs", auth=scoped)).json()
    assert [log["body"] for log in logs["data"]] == ["github"]
    response = await api(relay, "GET", "/v1/logs", auth=scoped, params={"bucket": "stripe"})
    assert response.status_code == 404 and response.json()["error"] == "no such bucket for this token: stripe"
    stripe_log = (await api(relay, "GET", "/v1/logs", params={"bucket": "stripe"})).json()["data"][0]
    response = await api(relay, "GET", f"/v1/logs/{stripe_log['id']}", auth=scoped)
    assert response.status_code == 403
    assert response.json()["error"] == f"log {stripe_log['id']} belongs to a bucket this token may not see"
    response = await api(relay, "PUT", f"/v1/logs/{stripe_log['id']}", auth=scoped, json=ANSWER)
    assert response.status_code == 403


@pytest.mark.parametrize("params, error", [
    ({"status": "lost"}, "status must be one of preparing, sent, failed, stalled, received, rejected (or 0 to 5)"),
    ({"from": "yesterday"}, "from must be a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-28T09:30:00Z), "
                            "not 'yesterday'"),
    ({"to": "2026-11-28T09:30:00"}, "to must be a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-28T09:30:00Z), "
                                    "not '2026-11-28T09:30:00'"),  # no time zone: which 09:30?
    ({"from": "2026-02-30"}, "from must be a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-28T09:30:00Z), "
                             "not '2026-02-30'"),
    ({"to": "2026-11-28", "from": "2026-11-29T00:00:00Z"}, "from must come before to"),  # to: the end of the 28th
    ({"from": "2026-11-28", "to": "2026-11-27"}, "from must come before to"),
    ({"output": "x"}, "unknown parameter 'output': this endpoint takes bucket, cursor, from, limit, offset, "
                      "status, to"),
    ([("bucket", "github"), ("bucket", "stripe")], "parameter 'bucket' given twice"),
    ({"limit": "0"}, "limit must be a whole number from 1 to 1000"),
    ({"limit": "many"}, "limit must be a whole number from 1 to 1000"),
    ({"limit": "²"}, "limit must be a whole number from 1 to 1000"),  # a digit to str.isdigit, not to int()
    ({"offset": "9" * 5000}, "offset must be a whole number from 0 to 2147483648"),
    ({"offset": "-1"}, "offset must be a whole number from 0 to 2147483648"),
])
async def test_bad_list_parameters_are_400_with_a_reason(relay, params, error):
    response = await api(relay, "GET", "/v1/logs", params=params)
    assert response.status_code == 400 and response.json()["error"] == error


async def test_one_log_has_the_request(relay):
    async with subscriber(relay, ["github"]) as client:
        await post(relay, path="/deep/path?x=1", content="hi", headers={"X-Custom": "v"})
        log_id = (await client.webhook())["meta"]["id"]
    log = (await api(relay, "GET", f"/v1/logs/{log_id}")).json()
    assert (log["id"], log["method"], log["extra_path"], log["raw_query"], log["body"]) == (
        log_id, "POST", "/deep/path", "x=1", "hi")
    assert log["headers"]["X-Custom"] == ["v"]
    assert (log["status"], log["status_code"], log["response_body"]) == (SENT, 0, [])
    assert isinstance(log["created_at"], int)
    for unknown in ("0190a000-0000-7000-8000-000000000000", "not-a-log-id"):
        response = await api(relay, "GET", f"/v1/logs/{unknown}")
        assert response.status_code == 404 and "no webhook log" in response.json()["error"]


async def answer_round(relay, client, nursery, input_id, frames=1):
    """Post to an input that answers from an output, in `nursery`; return the list its response
    will be appended to, and the frames the client received."""
    responses: list[httpx.Response] = []

    async def send():
        responses.append(await post(relay, input_id=input_id, content="/deploy now"))

    nursery.start_soon(send)
    received = [await client.webhook() for _ in range(frames)]
    return responses, received


@pytest.mark.parametrize("auth", [BASIC, SECRET], ids=["basic", "bearer"])
async def test_a_socket_client_answers_the_sender(relay, auth):
    async with subscriber(relay, ["github"]) as client, trio.open_nursery() as nursery:
        responses, (frame,) = await answer_round(relay, client, nursery, "in-slack")
        assert not responses  # the sender waits for the answer
        response = await api(relay, "PUT", f"/v1/logs/{frame['meta']['id']}", auth=auth, json=ANSWER)
        assert response.status_code == 200
        assert (response.json()["status"], response.json()["status_code"]) == (SENT, 201)
    (sender,) = responses
    assert (sender.status_code, sender.content) == (201, b"hello back")
    assert sender.headers.get_list("X-Reply") == ["yes", "twice"]
    assert sender.headers["Content-Type"] == "text/plain"
    log = (await api(relay, "GET", f"/v1/logs/{frame['meta']['id']}")).json()
    assert (log["status_code"], bytes(log["response_body"])) == (201, b"hello back")
    assert log["response_headers"] == {"X-Reply": ["yes", "twice"], "Content-Type": ["text/plain"]}


async def test_an_answers_connection_headers_are_not_passed_on(relay):
    """They describe the client's own connection; Hypercorn frames the sender's response itself."""
    async with subscriber(relay, ["github"]) as client, trio.open_nursery() as nursery:
        responses, (frame,) = await answer_round(relay, client, nursery, "in-slack")
        hop_by_hop = {"Content-Length": "999", "Transfer-Encoding": "chunked", "Connection": "close"}
        answer = {**ANSWER, "response_headers": {**ANSWER["response_headers"], **hop_by_hop}}
        assert (await api(relay, "PUT", f"/v1/logs/{frame['meta']['id']}", json=answer)).status_code == 200
    (sender,) = responses
    assert (sender.status_code, sender.content, sender.headers["Content-Length"]) == (201, b"hello back", "10")
    assert "Transfer-Encoding" not in sender.headers and sender.headers.get("Connection") != "close"


async def test_answers_in_the_other_clients_shapes(relay):
    """The JS SDK's byte array and numbered status; the Go agent's nulls and extra fields."""
    async with subscriber(relay, ["github"]) as client, trio.open_nursery() as nursery:
        responses, (frame,) = await answer_round(relay, client, nursery, "in-slack")
        js = {"status_code": 200, "response_body": list(b"ok"), "response_headers": None, "status": 1}
        assert (await api(relay, "PUT", f"/v1/logs/{frame['meta']['id']}", json=js)).status_code == 200
    assert (responses[0].status_code, responses[0].content) == (200, b"ok")
    async with subscriber(relay, ["github"]) as client:
        await post(relay, content="plain")
        frame = await client.webhook()
    go = {"id": frame["meta"]["id"], "status_code": 0, "response_body": None, "response_headers": None,
          "status": "failed", "retries": 0, "duration_ms": 12}
    response = await api(relay, "PUT", f"/v1/logs/{frame['meta']['id']}", json=go)
    assert response.status_code == 200 and response.json()["status"] == FAILED


async def test_without_an_answer_in_time_the_sender_gets_the_fallback_and_a_late_answer_is_still_logged(relay):
    """A late answer was refused 409, and an agent's outcome after its retries (a failure) never
    reached the log (issue 21, finding 1): the sender's time decides only what the sender gets."""
    async with subscriber(relay, ["github"]) as client, trio.open_nursery() as nursery:
        responses, (frame,) = await answer_round(relay, client, nursery, "in-quick")
    (sender,) = responses  # the nursery waited for it: 0.3 s
    assert (sender.status_code, sender.text) == (504, "nobody answered")
    log_path = f"/v1/logs/{frame['meta']['id']}"
    assert (await api(relay, "GET", log_path)).json()["status"] == STALLED
    response = await api(relay, "PUT", log_path, json={**ANSWER, "status": "failed"})
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["status_code"]) == (FAILED, ANSWER["status_code"])


async def test_a_second_answer_is_refused(relay):
    async with subscriber(relay, ["github"]) as client, trio.open_nursery() as nursery:
        responses, (frame,) = await answer_round(relay, client, nursery, "in-slack")
        log_path = f"/v1/logs/{frame['meta']['id']}"
        assert (await api(relay, "PUT", log_path, json=ANSWER)).status_code == 200
        response = await api(relay, "PUT", log_path, json={**ANSWER, "status_code": 500})
        assert response.status_code == 409
        assert response.json()["error"] == f"log {frame['meta']['id']} was already answered; the first answer counts"
    assert responses[0].status_code == 201


async def test_an_input_answering_from_a_named_output_waits_for_that_output(relay):
    async with subscriber(relay, ["two-outputs"]) as client, trio.open_nursery() as nursery:
        responses, frames = await answer_round(relay, client, nursery, "in-two-b", frames=3)
        by_output = {frame["meta"]["output_name"]: frame["meta"]["id"] for frame in frames}
        a_answer = {**ANSWER, "response_body": base64.b64encode(b"from a").decode()}
        assert (await api(relay, "PUT", f"/v1/logs/{by_output['a']}", json=a_answer)).status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        assert not responses  # a's answer is logged, but the sender waits for b
        b_answer = {**ANSWER, "response_body": base64.b64encode(b"from b").decode()}
        assert (await api(relay, "PUT", f"/v1/logs/{by_output['b']}", json=b_answer)).status_code == 200
    assert responses[0].content == b"from b"


async def test_a_static_answer_and_late_answers_to_inputs_that_do_not_hold(relay):
    response = await post(relay, input_id="in-stripe", content="event")
    assert (response.status_code, response.text, response.headers["X-Static"]) == (201, "thanks", "yes")
    (log,) = (await api(relay, "GET", "/v1/logs", params={"bucket": "stripe"})).json()["data"]
    relay.services.core.entry(relay.config.tokens[0], log["id"]).received_at -= 60  # as if the answer came a minute after the webhook
    response = await api(relay, "PUT", f"/v1/logs/{log['id']}", json={"status_code": 0, "status": "failed"})
    assert response.status_code == 200 and response.json()["status"] == FAILED  # an agent's outcome: the truth


@pytest.mark.parametrize("body, error", [
    (b"not json", "the body must be JSON"),
    (b"[]", "the body must be a JSON object, got an array"),
    (b'{"status_code": 99}', '"status_code" must be an HTTP status, 200 to 599'),
    (b'{"status_code": 200, "response_body": "not base64!"}', '"response_body" must be base64'),
    (b'{"status_code": 200, "response_headers": {"X": 1}}', "response header 'X' must be a name with a string"),
    (b'{"status": "lost"}', '"status" must be one of preparing, sent, failed, stalled, received, rejected'),
    (b"{}", 'nothing to record: give a "status_code" or a "status"'),
])
async def test_bad_answers_are_400_with_a_reason_and_change_nothing(relay, body, error):
    await post(relay, content="event")
    (log,) = (await api(relay, "GET", "/v1/logs", params={"bucket": "github"})).json()["data"]
    response = await api(relay, "PUT", f"/v1/logs/{log['id']}", content=body)
    assert response.status_code == 400 and response.json()["error"].startswith(error)
    assert (await api(relay, "GET", f"/v1/logs/{log['id']}")).json()["status"] == RECEIVED


async def test_a_shutdown_answers_held_senders_with_the_fallback(config):
    responses = []
    async with relay_lite.open_relay(config) as relay:
        async with subscriber(relay, ["github"]) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: _collect(responses, post(relay, input_id="in-slack", content="x")))
                await client.webhook()
                relay.shutdown()
    assert (responses[0].status_code, responses[0].text, responses[0].headers["X-Fallback"]) == (202, "fallback", "1")


async def _collect(into, awaitable):
    into.append(await awaitable)
