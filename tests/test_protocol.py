"""The sans-IO protocol core: client frames in, server frames out. No sockets."""

import base64
import json

import pytest

import relay_lite
from relay_lite import ProtocolError, Webhook, parse_client_frame


def test_auth_frame():
    frame = parse_client_frame('{"action":"auth","key":"K","secret":"S"}')
    assert (frame.key, frame.secret) == ("K", "S")


@pytest.mark.parametrize("message, buckets", [
    ('{"action":"subscribe","buckets":["a","b"]}', ("a", "b")),
    ('{"action":"subscribe"}', ()),
    ('{"action":"subscribe","buckets":null}', ()),
    ('{"action":"subscribe","buckets":[]}', ()),
    ('{"action":"subscribe","buckets":[""]}', ()),  # the Go agent with no bucket configured
    ('{"action":"subscribe","buckets":["a","","a"]}', ("a",)),
])
def test_subscribe_frame(message, buckets):
    assert parse_client_frame(message).buckets == buckets


@pytest.mark.parametrize("message", [
    # the Go agent serialises every field of one struct every time
    '{"action":"auth","key":"K","secret":"S","buckets":null}',
    '{"action":"subscribe","key":"","secret":"","buckets":["b"]}',
    '{"action":"pong","key":"","secret":"","buckets":null}',
])
def test_extra_fields_are_tolerated(message):
    parse_client_frame(message)


@pytest.mark.parametrize("message, complaint", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got an array"),
    ('"auth"', "must be a JSON object, got a string"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("{}", 'needs an "action"'),
    ('{"action": 5}', 'needs an "action"'),
    ('{"action":"dance"}', "unknown action 'dance'"),
    ('{"action":"auth","key":"K"}', '"key" and "secret" strings'),
    ('{"action":"auth","key":1,"secret":"S"}', '"key" and "secret" strings'),
    ('{"action":"subscribe","buckets":"github"}', "array of bucket names or ids"),
    ('{"action":"subscribe","buckets":[1]}', "array of bucket names or ids"),
    (b'{"action":"pong"}', "binary frames are not accepted"),
])
def test_bad_frames_say_what_is_wrong(message, complaint):
    with pytest.raises(ProtocolError, match=None) as caught:
        parse_client_frame(message)
    assert complaint in str(caught.value)


def test_status_frames_are_the_hosted_strings():
    assert relay_lite.status_frame("authenticated", relay_lite.AUTHENTICATED_MESSAGE) == (
        '{"type":"status","status":"authenticated","message":"connected successfully, subscribe to buckets"}'
    )
    assert relay_lite.status_frame("subscribed", "subscribed to buckets: my-1-bucket-name, my-2-bucket-id") == (
        '{"type":"status","status":"subscribed","message":"subscribed to buckets: my-1-bucket-name, my-2-bucket-id"}'
    )


@pytest.mark.parametrize("name, canonical", [
    ("content-type", "Content-Type"),
    ("x-hub-signature-256", "X-Hub-Signature-256"),
    ("X-GITHUB-EVENT", "X-Github-Event"),
    ("x-foo2bar", "X-Foo2bar"),
    ("etag", "Etag"),
])
def test_canonical_header(name, canonical):
    assert relay_lite._canonical_header(name) == canonical


def test_webhook_from_request_keeps_everything_but_host():
    webhook = Webhook.from_request(
        "put", "/a/b", b"foo=bar&x=%20",
        [(b"host", b"relay.example"), (b"content-type", b"application/json"),
         (b"x-multi", b"1"), (b"x-multi", b"2")],
        '{"hi":  "th\u00e9re"}'.encode(),
    )
    assert webhook.method == "PUT"
    assert webhook.path == "/a/b"
    assert webhook.query == "foo=bar&x=%20"
    assert webhook.headers == {"Content-Type": ["application/json"], "X-Multi": ["1", "2"]}
    assert webhook.body == '{"hi":  "th\u00e9re"}' and webhook.body_encoding == ""


def test_webhook_body_that_is_not_utf8_is_base64():
    raw = b"\xff\xfe\x00binary"
    webhook = Webhook.from_request("POST", "", b"", [], raw)
    assert webhook.path == "/"
    assert webhook.body_encoding == "base64"
    assert base64.b64decode(webhook.body) == raw


def _bucket(outputs=()):
    config = relay_lite.load_config({"buckets": [{"name": "b", "id": "bid", "inputs": [{"id": "iid"}],
                                                  "outputs": list(outputs)}]})
    return config.buckets[0]


def _frames(bucket, webhook):
    """The frames of `webhook`: one per route of `bucket`, ids log-1, log-2, ..."""
    routes = relay_lite._routes(bucket)
    ids = [f"log-{n}" for n in range(1, len(routes) + 1)]
    return [entry.frame() for entry in relay_lite._entries(ids, bucket, bucket.inputs[0].id, bucket.inputs[0].name, webhook, routes, 0.0)
            if entry.internal]  # what sockets get


def test_webhook_frame_schema():
    bucket = _bucket()
    webhook = Webhook.from_request("POST", "", b"q=1", [(b"content-type", b"text/plain")], b"hello")
    (frame,) = _frames(bucket, webhook)
    assert json.loads(frame) == {
        "type": "webhook",
        "meta": {"id": "log-1", "bucked_id": "bid", "bucket_id": "bid", "bucket_name": "b", "input_id": "iid",
                 "input_name": "Default public endpoint", "output_name": "", "output_destination": "/"},
        "headers": {"Content-Type": ["text/plain"]},
        "query": "q=1",
        "body": "hello",
        "method": "POST",
    }
    assert list(json.loads(frame)) == ["type", "meta", "headers", "query", "body", "method"]


def test_frames_per_output():
    bucket = _bucket([
        {"name": "a", "destination": "http://localhost:8080"},
        {"name": "b", "destination": "http://localhost:9090/base/", "internal": True},
        {"name": "locked", "destination": "http://x/fixed", "lock_path": True},
        {"name": "off", "destination": "http://y", "disabled": True},
        {"name": "public", "destination": "https://z", "internal": False},
    ])
    webhook = Webhook.from_request("GET", "/directory/foo", b"", [], b"")
    frames = [json.loads(f) for f in _frames(bucket, webhook)]
    assert [(f["meta"]["id"], f["meta"]["output_name"], f["meta"]["output_destination"]) for f in frames] == [
        ("log-1", "a", "http://localhost:8080/directory/foo"),
        ("log-2", "b", "http://localhost:9090/base/directory/foo"),
        ("log-3", "locked", "http://x/fixed"),
    ]


def test_only_public_outputs_reach_no_socket():
    bucket = _bucket([{"name": "p", "destination": "https://z", "internal": False}])
    webhook = Webhook.from_request("GET", "", b"", [], b"")
    assert _frames(bucket, webhook) == []
    (entry,) = relay_lite._entries(["log-1"], bucket, bucket.inputs[0].id, bucket.inputs[0].name, webhook, relay_lite._routes(bucket), 0.0)
    assert (entry.internal, entry.output_name, entry.destination) == (False, "p", "https://z")  # the relay's


def test_an_outputs_headers_replace_the_requests():
    bucket = _bucket([{"name": "a", "destination": "http://x", "headers": {"authorization": "Bearer app", "X-New": "1"}}])
    webhook = Webhook.from_request("POST", "", b"", [(b"authorization", b"Bearer sender"), (b"x-keep", b"k")], b"")
    (frame,) = _frames(bucket, webhook)
    assert json.loads(frame)["headers"] == {"X-Keep": ["k"], "Authorization": ["Bearer app"], "X-New": ["1"]}


@pytest.mark.parametrize("head, upgrade", [
    (b"GET /v1/socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", True),
    (b"GET /v1/socket?x=1 HTTP/1.1\r\nupgrade: WebSocket\r\n\r\n", True),
    (b"GET /v1/socket/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", True),
    (b"GET /v1/socket HTTP/1.1\r\nHost: x\r\n\r\n", False),
    (b"POST /v1/socket HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
    (b"GET /v1/webhooks/x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
    (b"\x16\x03\x01garbage", False),
    (b"", False),
])
def test_socket_upgrade_detection(head, upgrade):
    assert relay_lite._is_socket_upgrade(head) is upgrade


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_wire_frame_is_what_a_websocket_client_decodes(size):
    from wsproto.frame_protocol import FrameProtocol, Opcode

    text = ("\u00e9" * size)[: max(0, size - size // 3)] + "x" * (size // 3)  # some multi-byte UTF-8
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(relay_lite.wire_frame(text))
    (frame,) = list(client.received_frames())
    assert frame.opcode is Opcode.TEXT and frame.frame_finished and frame.message_finished
    assert frame.payload == text


# ---------------------------------------------------------------------------- log ids, resume, answers


def test_log_ids_are_uuid7_and_increase_within_a_millisecond_and_when_the_clock_steps_back(monkeypatch):
    import uuid

    now = [1_790_000_000_000 * 1_000_000]
    monkeypatch.setattr(relay_lite.time, "time_ns", lambda: now[0])
    ids = relay_lite._LogIds()
    made = [ids.next() for _ in range(5000)]  # more than the 4096 a millisecond's counter holds
    now[0] -= 60 * 10**9  # the clock steps back a minute
    made += [ids.next() for _ in range(3)]
    assert made == sorted(set(made))
    assert {uuid.UUID(log_id).version for log_id in made} == {7}
    assert ids.last == made[-1]
    assert relay_lite._LogIds(made[-1]).next() > made[-1]  # a log loaded from storage goes on after it


def test_subscribe_with_a_resume_point():
    frame = parse_client_frame('{"action":"subscribe","buckets":["b"],"since":"0190A000-0000-7000-8000-00000000000A"}')
    assert frame.since == "0190a000-0000-7000-8000-00000000000a"  # compared as log ids are written
    assert parse_client_frame('{"action":"subscribe","since":""}').since is None
    assert parse_client_frame('{"action":"subscribe"}').since is None
    for since in ('"x"', "1", "[]"):
        with pytest.raises(ProtocolError, match='"since" must be the meta.id'):
            parse_client_frame('{"action":"subscribe","since":%s}' % since)


def test_answers_in_every_client_shape():
    answer, status = relay_lite._parse_answer(
        {"status_code": 200, "response_body": "aGk=", "response_headers": {"A": ["1", "2"], "B": "3"}}, 5.0)
    assert (answer.status_code, answer.body, answer.headers, answer.at, status) == (
        200, b"hi", {"A": ["1", "2"], "B": ["3"]}, 5.0, "sent")
    answer, status = relay_lite._parse_answer({"response_body": [104, 105], "status": 2}, 0)
    assert (answer.status_code, answer.body, status) == (0, b"hi", "failed")
    for bad in ({"status_code": True}, {"status_code": 200, "response_body": [256]},
                {"status_code": 200, "response_headers": ["A"]}, {"status_code": 200, "response_headers": {"A": "x\ny"}},
                {"status": 6}):
        with pytest.raises(ProtocolError):
            relay_lite._parse_answer(bad, 0)
