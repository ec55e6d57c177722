"""Webhook ingress over real HTTP: methods, status codes, body limits, headers, routing."""

import base64

import httpx
import pytest
import trio

import relay_lite
from conftest import GITHUB_INPUT, KEY, SECRET, post, relay_config, subscriber


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_is_relayed(relay, http, method):
    async with subscriber(relay, ["github"]) as client:
        response = await http.request(method, f"/v1/webhooks/{GITHUB_INPUT}")
        assert response.status_code == 200
        assert (await client.webhook())["method"] == method


async def test_unknown_input_is_404(relay, http):
    async with subscriber(relay) as client:
        response = await http.post("/v1/webhooks/no-such-input", content="x")
        assert response.status_code == 404
        assert "no input with id 'no-such-input'" in response.text
        await post(relay, content="next")
        assert (await client.webhook())["body"] == "next"  # nothing was relayed for the 404


async def test_other_paths_are_404_and_plain_get_of_the_socket_is_426(http):
    assert (await http.get("/")).status_code == 200  # the web inspector (tests/test_inspector.py)
    assert (await http.get("/index.html")).status_code == 404
    assert (await http.get("/v1/webhooks/")).status_code == 404
    response = await http.get("/v1/socket")
    assert response.status_code == 426
    assert "WebSocket endpoint" in response.text


@pytest.fixture
def config():
    return relay_config(max_body_size=1000)


async def test_body_at_the_limit_is_accepted(relay):
    async with subscriber(relay, ["github"]) as client:
        assert (await post(relay, content=b"x" * 1000)).status_code == 200
        assert len((await client.webhook())["body"]) == 1000


async def test_body_over_the_limit_is_413(relay):
    async with subscriber(relay, ["github"]) as client:
        response = await post(relay, content=b"x" * 1001)
        assert response.status_code == 413
        assert "limited to 1000 bytes" in response.text
        await post(relay, content="small")
        assert (await client.webhook())["body"] == "small"


async def test_huge_body_is_refused_without_reading_it(relay):
    """A declared 1 GiB body is answered with 413 after a few KiB have been sent."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    await stream.send_all(f"POST /v1/webhooks/{GITHUB_INPUT} HTTP/1.1\r\nHost: x\r\n"
                          f"Content-Length: {2**30}\r\n\r\n".encode() + b"x" * 4096)
    with trio.fail_after(5):
        answer = await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    await stream.aclose()


async def test_chunked_body_over_the_limit_is_413(relay):
    async def chunks():
        for _ in range(100):
            yield b"y" * 100

    async with httpx.AsyncClient() as http:
        response = await http.post(relay.input_url(GITHUB_INPUT), content=chunks())
    assert response.status_code == 413


async def test_headers_are_canonical_lists_without_host(relay):
    async with subscriber(relay, ["github"]) as client:
        await post(relay, headers=[("x-hub-signature-256", "sha256=1"), ("X-Multi", "a"), ("x-multi", "b"),
                                   ("content-type", "application/json")], content="{}")
        headers = (await client.webhook())["headers"]
    assert headers["X-Hub-Signature-256"] == ["sha256=1"]
    assert headers["X-Multi"] == ["a", "b"]
    assert headers["Content-Type"] == ["application/json"]
    assert "Host" not in headers and "host" not in headers
    assert all(isinstance(values, list) and all(isinstance(v, str) for v in values) for values in headers.values())


async def test_body_is_byte_exact_and_query_raw(relay):
    body = '{"b": 1,   "a": "caf\u00e9 \\u00e9",\n"z": [ ]}'
    async with subscriber(relay, ["github"]) as client:
        await post(relay, path="?a=1&b=%20x&a=2", content=body.encode())
        frame = await client.webhook()
        assert (frame["body"], frame["query"]) == (body, "a=1&b=%20x&a=2")
        assert "body_encoding" not in frame
        await post(relay, content="")
        assert ((await client.webhook())["query"]) == ""


async def test_body_that_is_not_utf8_arrives_base64(relay):
    raw = bytes(range(256))
    async with subscriber(relay, ["github"]) as client:
        await post(relay, content=raw)
        frame = await client.webhook()
    assert frame["body_encoding"] == "base64"
    assert base64.b64decode(frame["body"]) == raw


async def test_routing_to_outputs_with_the_extra_path(relay):
    async with subscriber(relay) as client:
        await post(relay, input_id="in-two", path="/directory/foo")
        frames = [await client.webhook() for _ in range(3)]
        assert [(f["meta"]["output_name"], f["meta"]["output_destination"]) for f in frames] == [
            ("a", "http://localhost:8080/directory/foo"),
            ("b", "http://localhost:9090/base/directory/foo"),
            ("locked", "http://localhost:7070/fixed"),
        ]
        # a log entry per output, as the hosted service logs each output's delivery: a client's
        # answer (PUT /v1/logs/<id>) then says which output answered
        ids = [f["meta"]["id"] for f in frames]
        assert ids == sorted(set(ids))

        await post(relay, input_id="in-public", content="public only")  # never reaches sockets
        await post(relay, content="no outputs")
        frame = await client.webhook()
        assert (frame["body"], frame["meta"]["output_name"], frame["meta"]["output_destination"]) == (
            "no outputs", "", "/")
        await post(relay, path="/a/b%20c")
        assert (await client.webhook())["meta"]["output_destination"] == "/a/b%20c"


@pytest.mark.parametrize("path", ["/a/../admin", "/..", "/./x", "/a/%2e%2E/b", "/a/%2E"])
async def test_a_path_with_dot_segments_is_refused(relay, path):
    """A client that joins the path to its destination (httpx, the Go agent) would climb out of it."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)  # httpx would remove the dots before sending
    await stream.send_all(f"POST /v1/webhooks/{GITHUB_INPUT}{path} HTTP/1.1\r\nHost: relay\r\n"
                          "Content-Length: 2\r\n\r\n{}".encode())
    answer = b""
    with trio.fail_after(5):
        while not answer.endswith(b"segments\n") and (chunk := await stream.receive_some(4096)):
            answer += chunk
    await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400") and answer.endswith(b"must not have . or .. segments\n")
    async with subscriber(relay, ["github"]) as client:  # and nothing was relayed
        assert (await post(relay, path="/a/..b/.c./...", content="dots inside names are fine")).status_code == 200
        frame = await client.webhook()
    assert frame["body"] == "dots inside names are fine"


async def test_health_and_readiness_answer_and_are_no_webhooks(relay, http):
    for path, text in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
        response = await http.get(relay.url + path)
        assert (response.status_code, response.text) == (200, text)
        assert (await http.head(relay.url + path)).status_code == 200
    async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as api:
        assert (await api.get("/v1/logs")).json()["total"] == 0


async def test_readiness_fails_while_the_webhook_log_cannot_be_written(tmp_path):
    config = relay_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with relay_lite.open_relay(config) as relay, httpx.AsyncClient(base_url=relay.url) as http:
        await relay.services.core.backend.committed()  # what it writes at start is written
        relay.services.core.backend.failing = "database or disk is full"  # what a failed transaction leaves; see test_disk_full
        response = await http.get("/readyz")
        assert (response.status_code, response.text) == (503, "the webhook log cannot be written\n")  # why: in the log
        assert (await post(relay, content="written")).status_code == 200  # a write that succeeds clears it
        assert (await http.get("/readyz")).status_code == 200


async def test_garbage_on_the_port_does_not_hurt(relay):
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
                    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n",
                    b"NOT HTTP AT ALL\r\n\r\n"):
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        await stream.send_all(garbage)
        with trio.fail_after(5):
            try:
                answer = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
        await stream.aclose()
    async with subscriber(relay, ["github"]) as client:
        await post(relay, content="alive")
        assert (await client.webhook())["body"] == "alive"


async def test_a_connection_that_sends_nothing_is_closed():
    async with relay_lite.open_relay(relay_config(idle_timeout=0.2)) as relay:
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        with trio.fail_after(5):
            assert await stream.receive_some(4096) == b""
        await stream.aclose()


async def test_a_senders_answer_has_no_content_type_unless_one_is_given(relay):
    """Quart's default, text/html, went out with an empty or a static answer."""
    config = relay_config()
    config["buckets"][0]["inputs"] += [
        {"id": "static", "name": "static", "body": "thanks", "status_code": 202},
        {"id": "typed", "name": "typed", "body": '{"ok":true}', "headers": {"Content-Type": "application/json"}},
        {"id": "held", "name": "held", "response_from_output": "anyOutput", "response_timeout": 10}]
    async with relay_lite.open_relay(config) as custom, httpx.AsyncClient() as http:
        empty = await http.post(custom.input_url(GITHUB_INPUT), content="x")
        static = await http.post(custom.input_url("static"), content="x")
        typed = await http.post(custom.input_url("typed"), content="x")
        async with subscriber(custom, ["github"]) as client, trio.open_nursery() as nursery:
            answers = []

            async def send():
                answers.append(await http.post(custom.input_url("held"), content="x"))
            nursery.start_soon(send)
            frame = await client.webhook()
            async with httpx.AsyncClient(base_url=custom.url, auth=(KEY, SECRET)) as api:
                await api.put(f"/v1/logs/{frame['meta']['id']}", json={"status_code": 200, "response_body": "NDI="})
    assert (empty.status_code, empty.content, "content-type" in empty.headers) == (200, b"", False)
    assert (static.status_code, static.content, "content-type" in static.headers) == (202, b"thanks", False)
    assert typed.headers["content-type"] == "application/json"
    assert (answers[0].content, "content-type" in answers[0].headers) == (b"42", False)


async def test_a_shared_port_passes_over_an_address_family_the_machine_lacks(monkeypatch):
    """[server] reuse_port (what --workers uses) on "localhost", which names IPv4 and IPv6, on a
    machine with IPv6 turned off: it listens on IPv4, as trio's own listeners do."""
    import errno
    import socket

    make = trio.socket.socket

    def without_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return make(family, *args, **kwargs)
    monkeypatch.setattr(trio.socket, "socket", without_ipv6)

    async def two_families(*args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
    monkeypatch.setattr(trio.socket, "getaddrinfo", two_families)
    listeners = await relay_lite._listen_shared("localhost", 0)
    try:
        assert [listener.socket.family for listener in listeners] == [socket.AF_INET]
    finally:
        for listener in listeners:
            listener.socket.close()
