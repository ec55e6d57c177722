"""Delivery to HTTP (issue 10): the engine that turns a logged webhook into a request and records
its outcome, and the relay delivering its public outputs with it, to a real local app."""

import functools
import hashlib
import hmac
import socket

import httpx
import pytest
import trio

import relay_lite
from relay_lite import Webhook

from app_server import Answer, running_app
from conftest import FAILED, SENT, KEY, SECRET, log_of, post, relay_config, subscriber


# ---------------------------------------------------------------------------- the request, sans I/O


def webhook(headers=(), body=b"{}", path="/extra", query=b"", sender="203.0.113.7"):
    return Webhook.from_request("POST", path, query, [(name.encode(), value.encode()) for name, value in headers],
                                body, sender)


def test_the_request_keeps_every_header_value_in_order_but_the_connections_own():
    request = relay_lite._outbound(webhook([
        ("X-Multi", "1"), ("Host", "relay.example.com"), ("Connection", "keep-alive, X-Hop"),
        ("Content-Length", "2"), ("Transfer-Encoding", "chunked"), ("X-Multi", "2"), ("Proxy-Authorization", "p"),
        ("X-Hop", "named by Connection"), ("Keep-Alive", "5"), ("Upgrade", "h2c"), ("TE", "trailers"),
        ("X-Hub-Signature-256", "sha256=abc")]), "http://app/hooks/extra")
    assert request.headers == [("X-Multi", "1"), ("X-Multi", "2"), ("X-Hub-Signature-256", "sha256=abc")]
    assert (request.method, request.url, request.body) == ("POST", "http://app/hooks/extra", b"{}")


@pytest.mark.parametrize("destination, query, url", [
    ("http://app/x", b"a=1&b=%20", "http://app/x?a=1&b=%20"),
    ("http://app/x?key=k", b"a=1", "http://app/x?key=k&a=1"),  # after the destination's own
    ("http://app/x", b"", "http://app/x"),
])
def test_the_raw_query_follows_the_destinations_own(destination, query, url):
    assert relay_lite._outbound(webhook(query=query), destination).url == url


def test_the_senders_address_is_added_to_x_forwarded_for():
    plain = relay_lite._outbound(webhook(), "http://app", forwarded_for="203.0.113.7")
    assert plain.headers == [("X-Forwarded-For", "203.0.113.7")]
    chained = relay_lite._outbound(webhook([("X-Forwarded-For", "198.51.100.1")]), "http://app", forwarded_for="2001:db8::1")
    assert chained.headers == [("X-Forwarded-For", "198.51.100.1, 2001:db8::1")]


def test_the_body_is_the_senders_bytes_even_when_the_frame_carried_base64():
    binary = bytes(range(256)) * 10
    assert relay_lite._outbound(webhook(body=binary), "http://app").body == binary


@pytest.mark.parametrize("status, retried", [(200, False), (301, False), (400, False), (404, False), (408, True),
                                             (425, True), (429, True), (500, True), (501, False), (503, True)])
def test_which_answers_are_worth_another_try(status, retried):
    assert relay_lite._worth_retrying(status) is retried


def test_retry_delays_honour_retry_after_else_back_off_with_jitter():
    assert relay_lite._retry_delay(1, "3", 0.5) == 3.0
    in_ten = __import__("email.utils").utils.formatdate(__import__("time").time() + 10, usegmt=True)
    assert 8 <= relay_lite._retry_delay(1, in_ten, 0.5) <= 10
    assert relay_lite._retry_delay(1, None, 1.0) == 1.0 and relay_lite._retry_delay(1, None, 0.0) == 0.5
    assert relay_lite._retry_delay(3, "soon", 1.0) == 4.0  # not a number or a date: backoff
    assert relay_lite._retry_delay(20, None, 1.0) == 60.0  # capped
    assert relay_lite._retry_delay(2, "120", 1.0) == 120.0  # honoured past the backoff's cap...
    assert relay_lite._retry_delay(2, "3600", 1.0) == 600.0  # ...up to ten minutes


@pytest.mark.parametrize("query, url", [
    (b'x="<>"&y=%41', "http://app/x?x=%22%3C%3E%22&y=%41"),  # what a URL cannot carry is encoded, escapes kept
    (b"a=1#not-a-fragment", "http://app/x?a=1%23not-a-fragment"),
    (b"q=\x01 a", "http://app/x?q=%01%20a"),
])
def test_a_query_no_url_could_carry_as_sent_goes_as_its_encoding(query, url):
    request = relay_lite._outbound(webhook(query=query), "http://app/x")
    assert request.url == url and str(httpx.URL(request.url)) == url  # httpx sends it as it is


async def test_an_answer_slow_to_end_is_the_outcome_not_a_reason_to_try_again():
    """Its status has come: trying again would deliver the webhook twice."""
    requests = []

    async def slow_body(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        requests.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await trio.sleep(5)  # the rest never comes in time

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, slow_body, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with relay_lite._http_client() as client:
            request = relay_lite._outbound(webhook(), f"http://127.0.0.1:{port}/")
            with trio.fail_after(10):
                answer = await relay_lite._deliver(client, request, relay_lite._Delivery(timeout=1, retries=2))
        nursery.cancel_scope.cancel()
    assert (answer.status_code, answer.body, answer.retries, len(requests)) == (200, b"hello", 0, 1)


async def test_connecting_has_its_own_timeout():
    """A destination that never accepts costs connect_timeout a try, not the whole timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        address = full.getsockname()
        fillers = []
        for _ in range(3):  # fill the accept queue, so that the next connection waits for good
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(address)
            except BlockingIOError:
                pass
            fillers.append(filler)
        try:
            async with relay_lite._http_client() as client:
                request = relay_lite._outbound(webhook(), f"http://127.0.0.1:{address[1]}/")
                with trio.fail_after(15):
                    answer = await relay_lite._deliver(
                        client, request, relay_lite._Delivery(timeout=60, connect_timeout=0.5, retries=0))
        finally:
            for filler in fillers:
                filler.close()
    assert answer.status_code == 0 and answer.body.startswith(b"ConnectTimeout")


# ---------------------------------------------------------------------------- public outputs, delivered by the relay


def delivering_config(destination, **output):
    config = relay_config()
    config["buckets"].append({"name": "deliver", "inputs": [{"id": "in-deliver"}], "outputs": [
        {"name": "app", "destination": destination, "internal": False, **output},
        {"name": "socket", "destination": "http://localhost:9/", "internal": True}]})
    return config


async def test_a_public_output_gets_the_senders_request_byte_exact():
    secret = b"github-webhook-secret"
    bodies = [b'{"a" :  1,\n\t"b":[ ]}  ', bytes(range(256)) * 20_480, b"name=x&v=%20y+z"]  # odd JSON, 5 MiB binary, form
    sent = []
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url + "/hooks")) as relay:
        async with httpx.AsyncClient(timeout=30) as http:
            for body in bodies:
                signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                request = http.build_request("POST", relay.input_url("deliver") + "/gh/event?x=1&y=%2F", content=body,
                                             headers=[("X-Hub-Signature-256", signature), ("X-Multi", "first"),
                                                      ("X-Multi", "second"), ("Content-Type", "application/json")])
                sent.append([(relay_lite._canonical_header(name.decode()), value.decode())
                             for name, value in request.headers.raw
                             if name.lower() not in (b"host", b"content-length", b"connection")])
                assert (await http.send(request)).status_code == 200
        received = await app.wait_for(len(bodies), timeout=30)
    for request, body, headers in zip(received, bodies, sent):
        assert (request.method, request.target, request.body) == ("POST", "/hooks/gh/event?x=1&y=%2F", body)
        assert request.header("X-Multi") == ["first", "second"]
        assert request.header("Host") == [app.url.removeprefix("http://")]  # the destination's own
        assert request.header("X-Forwarded-For") == ["127.0.0.1"]
        assert request.header("Content-Length") == [str(len(body))]
        expected = "sha256=" + hmac.new(secret, request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.header("X-Hub-Signature-256")[0], expected)  # it verifies
        # the sender's headers, every value in order, and nothing the relay's HTTP client would add
        assert [(name, value) for name, value in request.headers
                if name.lower() not in ("host", "content-length", "x-forwarded-for")] == headers


async def test_the_outcome_lands_in_the_log():
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url)) as relay:
        app.answer = lambda request: Answer(201, [("X-App", "yes")], b"created")
        async with subscriber(relay, ["deliver"]) as client:
            await post(relay, input_id="in-deliver", content="x")
            socket_frame = await client.webhook()  # the internal output's, as before
        assert socket_frame["meta"]["output_name"] == "socket"
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "deliver"})).json()["data"]
        delivered = await log_of(relay.url, next(log["id"] for log in logs if log["output_name"] == "app"), timeout=20)
    assert (delivered["status"], delivered["status_code"], delivered["internal"]) == (SENT, 201, False)
    assert bytes(delivered["response_body"]) == b"created"
    assert delivered["response_headers"]["X-App"] == ["yes"] and delivered["retries"] == 0
    assert delivered["ip_address"] == "127.0.0.1"


async def test_a_resend_delivers_to_the_app_again_once_it_is_fixed():
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url, retries=0)) as relay:
        app.answer = lambda request: Answer(500)  # the app is broken
        await post(relay, input_id="in-deliver", content="order 7")
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "deliver"})).json()["data"]
            failed = await log_of(relay.url, next(log["id"] for log in logs if log["output_name"] == "app"), timeout=20)
            app.answer = lambda request: Answer(200)  # fixed
            resent = (await http.post(f"/v1/logs/{failed['id']}/action", json={"action": "resend"})).json()
        [*_, again] = await app.wait_for(2, timeout=20)
        delivered = await log_of(relay.url, resent["id"], timeout=20)
    assert (failed["status"], delivered["status"], again.body) == (FAILED, SENT, b"order 7")
    assert (delivered["resent_from"], delivered["output_name"]) == (failed["id"], "app")


async def test_a_503_with_retry_after_is_tried_again_after_it_and_a_400_is_not():
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url, retries=3)) as relay:
        app.answer = lambda request: (Answer(503, [("Retry-After", "1")]) if len(app.received) == 1
                                      else Answer(200) if request.body == b"retry me" else Answer(400))
        await post(relay, input_id="in-deliver", content="retry me")
        first, second = await app.wait_for(2)
        assert 0.9 <= second.at - first.at < 3
        await post(relay, input_id="in-deliver", content="refuse me")
        await app.wait_for(3)
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "deliver"})).json()["data"]
        outcomes = {log["body"]: await log_of(relay.url, log["id"], timeout=20)
                    for log in logs if log["output_name"] == "app"}
    assert (outcomes["retry me"]["status"], outcomes["retry me"]["retries"]) == (SENT, 1)
    assert (outcomes["refuse me"]["status"], outcomes["refuse me"]["status_code"]) == (FAILED, 400)
    assert outcomes["refuse me"]["retries"] == 0 and len(app.received) == 3  # the 400: once


async def test_an_unreachable_destination_is_tried_again_then_shown_failed():
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there
    async with relay_lite.open_relay(delivering_config(f"http://127.0.0.1:{port}", retries=2)) as relay:
        await post(relay, input_id="in-deliver", content="nobody home")
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "deliver"})).json()["data"]
        started = trio.current_time()
        outcome = await log_of(relay.url, next(log["id"] for log in logs if log["output_name"] == "app"), timeout=20)
    assert (outcome["status"], outcome["status_code"], outcome["retries"]) == (FAILED, 0, 2)
    assert "ConnectError" in bytes(outcome["response_body"]).decode()
    assert trio.current_time() - started >= 1.4  # two backoffs: 0.5-1 s, then 1-2 s


async def test_a_sender_held_for_a_public_output_gets_the_apps_answer():
    async with running_app() as app:
        config = delivering_config(app.url)
        config["buckets"][-1]["inputs"][0].update(response_from_output="app", status_code=202, body="fallback")
        app.answer = lambda request: Answer(200, [("Content-Type", "application/json"), ("X-Slack", "1")],
                                            b'{"text": "deployed"}')
        async with relay_lite.open_relay(config) as relay:
            response = await post(relay, input_id="in-deliver", content="/deploy")
    assert (response.status_code, response.content) == (200, b'{"text": "deployed"}')
    assert response.headers["X-Slack"] == "1" and response.headers["Content-Type"] == "application/json"


async def test_deliveries_are_made_in_order_one_at_a_time():
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url)) as relay:
        app.answer = lambda request: Answer(200, delay=0.01)
        for n in range(30):
            assert (await post(relay, input_id="in-deliver", content=f"{n}")).status_code == 200
        received = await app.wait_for(30)
    assert [request.body for request in received] == [f"{n}".encode() for n in range(30)]


async def test_a_dead_destination_slows_neither_senders_nor_sockets():
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url, timeout=60)) as relay:
        app.answer = lambda request: Answer(200, delay=60)  # it never answers in time
        async with subscriber(relay, ["deliver"]) as client:
            started = trio.current_time()
            for n in range(50):
                assert (await post(relay, input_id="in-deliver", content=f"{n}")).status_code == 200
                assert (await client.webhook())["body"] == f"{n}"
            assert trio.current_time() - started < 10
        assert len(app.received) == 1  # one in flight, the rest wait in the log


async def test_deliveries_pending_at_a_restart_are_made_after_it(tmp_path):
    config = delivering_config("http://127.0.0.1:9/", retries=0)
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with running_app() as app:
        config["buckets"][-1]["outputs"][0]["destination"] = app.url
        app.answer = lambda request: Answer(200, delay=60)  # the first hangs: the rest stay pending
        async with relay_lite.open_relay(config) as relay:
            for n in range(5):
                assert (await post(relay, input_id="in-deliver", content=f"{n}")).status_code == 200
            await app.wait_for(1)
        app.answer = lambda request: Answer(200)
        async with relay_lite.open_relay(config) as relay:
            received = await app.wait_for(6)  # the one cut off by the shutdown, again, then the rest
    assert [request.body for request in received] == [b"0", b"0", b"1", b"2", b"3", b"4"]


async def test_header_values_that_are_not_ascii_are_delivered_and_the_relay_lives_on():
    """The fuzzer's find: a header byte 0xe9 made the HTTP client raise UnicodeEncodeError out
    of the relay's delivery task, and the relay stopped."""
    async with running_app() as app, relay_lite.open_relay(delivering_config(app.url)) as relay:
        for value in (b"caf\xc3\xa9", b"caf\xe9"):  # UTF-8, and Latin-1
            stream = await trio.open_tcp_stream(relay.host, relay.port)
            await stream.send_all(b"POST /v1/webhooks/in-deliver HTTP/1.1\r\nHost: x\r\nX-Name: " + value
                                  + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()
        received = await app.wait_for(2)
        assert (await post(relay, input_id="in-deliver", content="still alive")).status_code == 200
        await app.wait_for(3)
    assert received[0].header("X-Name") == ["caf\xc3\xa9"]  # the app's latin-1 view of the UTF-8 bytes: exact
    assert received[1].header("X-Name") == ["caf\xc3\xa9"]  # logged as Latin-1, sent as its UTF-8
