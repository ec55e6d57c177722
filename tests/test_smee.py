"""A bucket's smee channel: webhooks in at /smee/<name>, and out as smee.io's and gosmee's event
streams, resumable from the log. (tests/test_smee_clients.py drives the real clients.)"""

import base64
import json
import uuid

import httpx
import pytest
import trio
from hypothesis import given, strategies as st

import relay_lite
from conftest import KEY, SECRET, eventually, post, relay_config, subscriber
from helpers import CHANNEL, EventStream, closed_by_relay, place, to_channel

SIGNED = "signed-channel-0123456789abcdef"
HOOK_SECRET = "hook-secret-0123456789"


def smee_config(**server):
    config = relay_config(**server)
    github, stripe = config["buckets"][0], config["buckets"][1]
    github["smee_channel"] = CHANNEL
    stripe["smee_channel"] = SIGNED  # through its input: its verify, its answer
    stripe["smee_input"] = "stripe in"
    stripe["inputs"][0].update(status_code=202, body="taken",
                               verify={"scheme": "github", "secrets": [HOOK_SECRET]})
    return config


@pytest.fixture
def config():
    return smee_config()


def signed(body: bytes) -> dict:
    import hashlib
    import hmac
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()}


# ---- webhooks in ------------------------------------------------------------------------------


async def test_a_webhook_sent_to_a_channel_is_the_buckets_as_an_inputs_is(relay, http):
    async with subscriber(relay, ["github"]) as client:
        answer = await to_channel(relay, b'{"zen": "hi"}', path="/extra?x=1", headers={"X-GitHub-Event": "ping"})
        assert (answer.status_code, answer.content) == (200, b"")  # as smee.io answers
        frame = await client.webhook()
    assert frame["body"] == '{"zen": "hi"}' and frame["query"] == "x=1" and frame["method"] == "POST"
    assert frame["headers"]["X-Github-Event"] == ["ping"] and frame["meta"]["bucket_name"] == "github"
    assert frame["meta"]["input_name"] == relay_lite.SMEE_INPUT_NAME
    log = (await http.get(f"/v1/logs/{frame['meta']['id']}", auth=(KEY, SECRET))).json()
    assert log["extra_path"] == "/extra" and log["input_name"] == "smee"


async def test_a_channel_with_smee_input_takes_webhooks_as_that_input_verify_and_answer_included(relay):
    body = b'{"signed": true}'
    refused = await to_channel(relay, body, name=SIGNED)
    assert refused.status_code == 401
    async with subscriber(relay, ["stripe"]) as client:
        taken = await to_channel(relay, body, name=SIGNED, headers=signed(body))
        assert (taken.status_code, taken.text) == (202, "taken")
        frame = await client.webhook()
    assert frame["meta"]["input_id"] == "in-stripe"


async def test_an_unknown_channel_is_a_404_that_names_nothing(relay):
    for answer in (await to_channel(relay, name="no-such-channel-0123456789"),
                   await to_channel(relay, name=CHANNEL[:-1])):
        assert answer.status_code == 404
        assert CHANNEL not in answer.text and "github" not in answer.text
    stream = await EventStream.open(relay, "no-such-channel-0123456789")
    assert stream.status == 404 and b"github" not in stream.head
    assert relay.metrics.rejected["unknown_channel"] == 2
    assert relay.metrics.auth_failures["smee"] == 3


async def test_guessing_channel_names_locks_the_guesser_out_but_never_refuses_the_right_name(relay):
    """Senders share addresses (GitHub's): a stranger guessing names from one must not shut it
    out of the channel it knows."""
    for n in range(10):  # auth_failures_per_minute
        assert (await to_channel(relay, name=f"guess-{n}-0123456789abcdef")).status_code == 404
    refused = await to_channel(relay, name="guess-more-0123456789abcdef")
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    stream = await EventStream.open(relay, "guess-more-0123456789abcdef")
    assert stream.status == 429 and b"Retry-After:" in stream.head
    assert (await to_channel(relay)).status_code == 200
    assert (await EventStream.open(relay)).status == 200


async def test_a_stream_asked_for_after_another_request_on_its_connection_is_a_stream_too(relay):
    """Clients and proxies keep connections alive: gosmee asks for /version first."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    await stream.send_all(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    with trio.fail_after(5):
        while b'"dev"' not in answer:
            answer += await stream.receive_some()
    await stream.send_all(f"GET /smee/{CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                          f"\r\n".encode())
    with trio.fail_after(5):
        while b"event: ready" not in answer:
            answer += await stream.receive_some()
    await to_channel(relay, b'{"second": 1}')
    with trio.fail_after(5):
        while b'"body":{"second": 1}' not in answer:
            answer += await stream.receive_some()
    assert b"text/event-stream" in answer and relay.metrics.received["github"] == 1  # not taken for a webhook
    assert relay.metrics.auth_failures["smee"] == 0 and len(relay.sockets.streams) == 1


async def test_a_webhook_sent_to_two_internal_outputs_is_one_event():
    config = smee_config()
    config["buckets"][2]["smee_channel"] = "two-outputs-0123456789abcdef"
    async with relay_lite.open_relay(config) as relay:
        stream = await EventStream.open(relay, "two-outputs-0123456789abcdef", gosmee=True)
        await stream.event()
        for n in range(2):
            await to_channel(relay, b"%d" % n, name="two-outputs-0123456789abcdef")
        assert [base64.b64decode((await stream.message())["bodyB"]) for _ in range(2)] == [b"0", b"1"]
        resumed = await EventStream.open(relay, "two-outputs-0123456789abcdef", gosmee=True, last_event_id="0-0")
        await resumed.event()
        got = [await resumed.message() for _ in range(2)]
        assert [base64.b64decode(message["bodyB"]) for message in got] == [b"0", b"1"], got


async def test_streams_from_one_address_are_capped_as_its_pending_connections_are():
    async with relay_lite.open_relay(smee_config(max_pending_per_ip=2)) as relay:
        streams = [await EventStream.open(relay) for _ in range(2)]
        assert [stream.status for stream in streams] == [200, 200]
        assert (await EventStream.open(relay)).status == 429


# ---- the streams ------------------------------------------------------------------------------


async def test_smee_clients_get_ready_then_each_webhook_as_smee_io_writes_it(relay):
    stream = await EventStream.open(relay)
    assert stream.status == 200
    assert b"Content-Type: text/event-stream" in stream.head and b"Transfer-Encoding: chunked" in stream.head
    assert await stream.event() == {"event": "ready", "data": "{}"}
    await to_channel(relay, b'{\n  "pretty": [1, 2.50, "\\u00e9"]\n}', path="?a=1&a=2&b=",
                     headers={"Content-Type": "application/json", "X-GitHub-Event": "push", "Connection": "close"})
    await post(relay, content=b"a=1&b=\xff", headers={"Content-Type": "application/x-www-form-urlencoded"})
    await post(relay, content=b"")
    json_one, form, empty = [await stream.message() for _ in range(3)]
    assert json_one["body"] == {"pretty": [1, 2.5, "\u00e9"]}  # the JSON itself, as JSON
    assert json_one["query"] == {"a": ["1", "2"], "b": ""}  # as Node's querystring reads it
    assert json_one["x-github-event"] == "push" and json_one["content-type"] == "application/json"
    assert "connection" not in json_one and "host" not in json_one and "content-length" not in json_one
    assert isinstance(json_one["timestamp"], int)
    assert form["body"] == base64.b64encode(b"a=1&b=\xff").decode()  # not JSON: a string (here base64)
    assert empty["body"] == {}
    ids = [json_one["id"], form["id"], empty["id"]]
    assert all(relay_lite._STREAM_ID.fullmatch(event_id) for event_id in ids) and ids == sorted(ids, key=place)
    await stream.aclose()


async def test_gosmee_clients_get_every_body_byte_for_byte_in_bodyB_and_no_body(relay):
    stream = await EventStream.open(relay, gosmee=True)
    assert await stream.event() == {"data": '{"message":"ready"}'}
    bodies = [b"payload=%7B%7D&x=\xff\xfe", b'{"json": true}', b"", "é".encode()]
    for body in bodies:
        await to_channel(relay, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    for body in bodies:
        message = await stream.message()
        assert base64.b64decode(message["bodyB"]) == body
        assert "body" not in message and "query" not in message
        assert message["content-type"] == "application/x-www-form-urlencoded"
        assert message["timestamp"].isdigit()


async def test_a_stream_resumes_after_its_last_event_id_in_order_then_goes_live(relay):
    stream = await EventStream.open(relay, gosmee=True)
    for n in range(5):
        await to_channel(relay, b'{"n": %d}' % n)
    sent = [await stream.message() for _ in range(5)]
    await stream.aclose()
    resumed = await EventStream.open(relay, last_event_id=sent[1]["id"])
    await resumed.event()  # ready
    assert [(await resumed.message())["body"] for _ in range(3)] == [{"n": 2}, {"n": 3}, {"n": 4}]
    await to_channel(relay, b'{"n": 5}')
    live = await resumed.message()
    assert live["body"] == {"n": 5}
    assert place(sent[-1]["id"]) < place(live["id"])


async def test_a_resume_from_before_the_log_begins_says_so_then_sends_what_it_holds(relay):
    await to_channel(relay, b'{"kept": 1}')
    stream = await EventStream.open(relay, gosmee=True, last_event_id="1000-0")  # long before this relay started
    await stream.event()
    gap = await stream.event()
    assert gap["event"] == "gosmee-gap" and json.loads(gap["data"])["error"] == "missed_history"
    assert base64.b64decode((await stream.message())["bodyB"]) == b'{"kept": 1}'
    smee = await EventStream.open(relay, last_event_id="1000-0")
    await smee.event()
    assert (await smee.event())["event"] == "history_gap"  # a named event smee-client ignores


async def test_last_event_id_0_0_is_before_every_webhook_and_no_gap(relay):
    await to_channel(relay, b'{"n": 1}')  # Redis's first id, as gosmee's server takes it
    stream = await EventStream.open(relay, gosmee=True, last_event_id="0-0")
    await stream.event()
    assert base64.b64decode((await stream.message())["bodyB"]) == b'{"n": 1}'


@pytest.mark.parametrize("last_event_id", ["garbage", "3", "99999999999999-0", "1-99999999999999999"])
async def test_a_last_event_id_that_is_no_place_in_the_log_starts_live_and_says_so(relay, last_event_id):
    await to_channel(relay, b'{"before": 1}')
    stream = await EventStream.open(relay, last_event_id=last_event_id)
    assert stream.status == 200
    await stream.event()
    assert (await stream.event())["event"] == "history_gap"
    await to_channel(relay, b'{"after": 1}')
    assert (await stream.message())["body"] == {"after": 1}


async def test_pings_keep_a_stream_alive_in_each_clients_own_way():
    async with relay_lite.open_relay(smee_config(ping_interval=0.3)) as relay:
        smee, gosmee = await EventStream.open(relay), await EventStream.open(relay, gosmee=True)
        await smee.event(), await gosmee.event()
        assert await smee.event() == {"event": "ping", "data": "{}"}
        assert await gosmee.event() == {"comment": "keepalive"}


async def test_a_stream_resumes_across_a_restart_of_a_relay_with_storage(tmp_path):
    config = smee_config()
    config["storage"] = {"path": str(tmp_path / "relay.db")}
    async with relay_lite.open_relay(config) as relay:
        stream = await EventStream.open(relay, gosmee=True)
        await stream.event()
        await to_channel(relay, b"one")
        first = await stream.message()
        await to_channel(relay, b"two")
    async with relay_lite.open_relay(config) as relay:
        resumed = await EventStream.open(relay, gosmee=True, last_event_id=first["id"])
        await resumed.event()
        assert base64.b64decode((await resumed.message())["bodyB"]) == b"two"  # first: no gap
        await to_channel(relay, b"three")
        assert base64.b64decode((await resumed.message())["bodyB"]) == b"three"


async def test_an_http_1_0_stream_ends_with_its_connection():
    async with relay_lite.open_relay(smee_config()) as relay:
        stream = await EventStream.open(relay, version="1.0")
        assert b"Transfer-Encoding" not in stream.head and b"Connection: close" in stream.head
        await stream.event()
        await to_channel(relay, b'{"old": 1}')
        assert (await stream.message())["body"] == {"old": 1}
        relay.shutdown()
        await closed_by_relay(stream.stream, timeout=10)


async def test_a_shutdown_ends_each_stream_with_its_last_chunk():
    async with relay_lite.open_relay(smee_config()) as relay:
        stream = await EventStream.open(relay)
        await stream.event()
        relay.shutdown()
        stream._raw += await closed_by_relay(stream.stream, timeout=10)
        stream._dechunk()
        assert stream.ended


# ---- bounds -----------------------------------------------------------------------------------


async def test_a_reader_that_never_reads_is_cut_off_and_a_good_one_alongside_loses_nothing(caplog):
    config = smee_config(send_queue_size=20, send_queue_bytes=2**20)
    async with relay_lite.open_relay(config) as relay:
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect((relay.host, relay.port))
        await sock.send(f"GET /smee/events/{CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        good = await EventStream.open(relay, gosmee=True)
        await good.event()
        await eventually(lambda: len(relay.sockets.streams) == 2)
        body = b"x" * 20_000
        async with trio.open_nursery() as nursery:
            async def read_all():
                for n in range(60):
                    assert base64.b64decode((await good.message(timeout=20))["bodyB"]) == body + b"%d" % n
            nursery.start_soon(read_all)
            for n in range(60):
                assert (await to_channel(relay, body + b"%d" % n)).status_code == 200
        await eventually(lambda: len(relay.sockets.streams) == 1, timeout=10)
        assert relay.metrics.cutoffs["too_slow"] == 1
        sock.close()
    assert not [record for record in caplog.records if record.exc_info]


async def test_streams_count_against_max_connections():
    async with relay_lite.open_relay(smee_config(max_connections=3, max_pending_per_ip=3)) as relay:
        streams = [await EventStream.open(relay) for _ in range(3)]
        for stream in streams:
            await stream.event()
        extra = await trio.open_tcp_stream(relay.host, relay.port)
        assert await closed_by_relay(extra, timeout=5) == b""  # refused: none of them is pending
        await streams[0].aclose()
        await eventually(lambda: relay.services.connections.count == 2)
        again = await EventStream.open(relay)
        assert again.status == 200


async def test_metrics_count_each_channels_streams_by_client():
    config = smee_config()
    config["metrics"] = {"enabled": True}
    async with relay_lite.open_relay(config) as relay:
        streams = [await EventStream.open(relay), await EventStream.open(relay, gosmee=True),
                   await EventStream.open(relay, gosmee=True)]
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{relay.url}/metrics")).text
        assert 'relay_lite_smee_streams{bucket="github",client="smee"} 1.0' in text
        assert 'relay_lite_smee_streams{bucket="github",client="gosmee"} 2.0' in text
        assert 'relay_lite_sockets{state="authenticated"} 0.0' in text
        for stream in streams:
            await stream.aclose()


async def test_a_reload_that_renames_a_channel_ends_its_streams_and_the_old_name_opens_nothing():
    async with relay_lite.open_relay(smee_config()) as relay:
        stream = await EventStream.open(relay)
        await stream.event()
        renamed = smee_config()
        renamed["buckets"][0]["smee_channel"] = "renamed-channel-0123456789abcdef"
        relay.reload(renamed)
        await closed_by_relay(stream.stream, timeout=5)
        assert (await EventStream.open(relay)).status == 404
        assert (await to_channel(relay)).status_code == 404
        assert (await EventStream.open(relay, "renamed-channel-0123456789abcdef")).status == 200


async def test_no_stream_or_webhook_on_the_inspectors_host_name():
    config = smee_config()
    config["inspector"] = {"host": "inspect.localhost"}
    async with relay_lite.open_relay(config) as relay:
        assert (await EventStream.open(relay, host="inspect.localhost:1234")).status == 404
        assert (await to_channel(relay, headers={"Host": "inspect.localhost"})).status_code == 404
        assert (await EventStream.open(relay, host="localhost")).status == 200


async def test_a_loopback_relay_with_a_weak_channel_name_serves_no_stream_from_beyond():
    config = smee_config()
    config["buckets"][0]["smee_channel"] = "weak"
    async with relay_lite.open_relay(config) as relay:
        assert (await EventStream.open(relay, "weak", host="relay.example.com")).status == 421
        assert (await EventStream.open(relay, "weak")).status == 200


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bucket", "message"), [
    ({"smee_channel": "short-name"}, "too easy to guess"),
    ({"smee_channel": "<your channel name>"}, "placeholder"),
    ({"smee_channel": "has/a/slash-0123456789abcdef"}, "letters, digits"),
    ({"smee_channel": "x" * 129}, "letters, digits"),
    ({"smee_input": "nope"}, "needs smee_channel"),
    ({"smee_channel": CHANNEL, "smee_input": "nope"}, "no input named 'nope'"),
])
def test_a_bad_channel_is_a_config_error_naming_its_place(bucket, message):
    config = relay_config(host="0.0.0.0")
    config["buckets"][0].update(bucket)
    with pytest.raises(relay_lite.ConfigError, match=r"buckets\[0\]\.smee_\w+: .*" + message):
        relay_lite.load_config(config)


def test_two_buckets_cannot_share_a_channel():
    config = relay_config()
    config["buckets"][0]["smee_channel"] = config["buckets"][1]["smee_channel"] = CHANNEL
    with pytest.raises(relay_lite.ConfigError, match=r"buckets\[1\]\.smee_channel: already used by buckets\[0\]"):
        relay_lite.load_config(config)


def test_the_demo_and_init_make_a_strong_channel(tmp_path):
    demo = relay_lite._demo_config(relay_lite.ServerConfig(port=0))
    assert relay_lite._is_strong(demo.buckets[0].smee_channel)
    template = relay_lite._config_template()
    line = next(line for line in template.splitlines() if line.startswith("# smee_channel"))
    uncommented = template.replace(line, line[2:])
    (tmp_path / "relay.toml").write_text(uncommented)
    config = relay_lite.load_config(tmp_path / "relay.toml")
    assert relay_lite._is_strong(config.buckets[0].smee_channel)


# ---- sans-IO: ids and events --------------------------------------------------------------------


def ids_of_one_relay(count: int) -> list[str]:
    ids = relay_lite._LogIds()
    return [ids.next() for _ in range(count)]


@given(st.lists(st.integers(0, 2**20), min_size=2, max_size=50, unique=True).map(sorted),
       st.integers(1_600_000_000_000, 2**47))
def test_a_clusters_event_ids_map_back_to_exactly_their_place(sequences, millis):
    ids = [relay_lite._stream_log_id(f"{millis + sequence // 7}-{sequence}") for sequence in sequences]
    ids.sort()
    for n, log_id in enumerate(ids):
        event_id = relay_lite._smee_id(log_id, True)
        least, greatest = relay_lite._smee_place(event_id, True)
        assert least == greatest == log_id
        assert all(later > greatest for later in ids[n + 1:])


@given(st.integers(2, 300))
def test_one_relays_event_ids_order_its_entries_and_resume_after_exactly_one(count):
    ids = ids_of_one_relay(count)
    event_ids = [relay_lite._smee_id(log_id, False) for log_id in ids]
    assert len(set(event_ids)) == count
    for n, event_id in enumerate(event_ids):
        least, greatest = relay_lite._smee_place(event_id, False)
        assert least <= ids[n] <= greatest
        assert all(earlier < least for earlier in ids[:n]) and all(later > greatest for later in ids[n + 1:])


@given(st.text(max_size=40))
def test_anything_given_as_last_event_id_is_a_place_or_none(text):
    for shared in (True, False):
        place = relay_lite._smee_place(text, shared)
        assert place is None or place == (relay_lite.NIL_LOG_ID,) * 2 or (
            uuid.UUID(place[0]).version == 7 and place[0] <= place[1])


def entry_of(body: bytes, headers=(), query="") -> "relay_lite._Entry":
    webhook = relay_lite.Webhook.from_request("POST", "/", query.encode(), list(headers), body)
    bucket = relay_lite.load_config(relay_config()).buckets[0]
    return relay_lite._Entry(ids_of_one_relay(1)[0], bucket, "in", "in", "", "", webhook, 1_700_000_000.123)


def parsed(event: bytes) -> tuple[str, str]:
    """An event's id and data, as an EventSource reads them."""
    fields = {"data": []}
    for line in event.decode().removesuffix("\n\n").split("\n"):
        name, _, value = line.partition(": ")
        fields["data"].append(value) if name == "data" else fields.__setitem__(name, value)
    return fields["id"], "\n".join(fields["data"])


def no_constant(name):
    raise ValueError(name)  # JavaScript's JSON.parse reads neither NaN nor Infinity


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(), lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                           max_leaves=20)


@given(st.one_of(st.binary(max_size=300), json_values.map(lambda value: json.dumps(value, indent=2).encode())),
       st.lists(st.tuples(st.sampled_from(["x-a", "X-GitHub-Event", "Body", "Query", "Connection", "Te", "timestamp"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10)), max_size=5))
def test_every_body_becomes_an_event_smee_client_reads_and_gosmee_gets_byte_for_byte(body, headers):
    entry = entry_of(body, [(name.encode(), value.encode()) for name, value in headers])
    event_id, data = parsed(relay_lite._SMEE_WIRE.webhook(entry, False))
    message = json.loads(data, parse_constant=no_constant)  # smee-client's JSON.parse would read it
    assert set(message) >= {"body", "query", "timestamp"} and event_id == relay_lite._smee_id(entry.id, False)
    assert not {"connection", "te", "bodyb"} & set(message)
    try:
        expected = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError):
        expected = entry.webhook.body or {}
    assert message["body"] == expected
    _, data = parsed(relay_lite._GOSMEE_WIRE.webhook(entry, False))
    message = json.loads(data)
    assert base64.b64decode(message["bodyB"]) == body and "body" not in message


def test_what_smee_client_cannot_send_stays_out_and_gosmee_always_gets_a_header():
    entry = entry_of(b"x", [(b"Expect", b"100-continue"), (b"Sec-Fetch-Mode", b"navigate")])
    message = json.loads(parsed(relay_lite._SMEE_WIRE.webhook(entry, False))[1])
    assert "expect" not in message and "sec-fetch-mode" not in message  # undici's fetch throws on them
    bare = json.loads(parsed(relay_lite._GOSMEE_WIRE.webhook(entry_of(b""), False))[1])
    assert bare["content-type"] == "application/octet-stream"  # with no header gosmee's client gives up for good


@pytest.mark.parametrize("body", [b"NaN", b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000, b"\xef\xbb\xbf{}"])
def test_bodies_that_python_reads_as_json_and_javascript_does_not_go_as_text(body):
    entry = entry_of(body)
    _, data = parsed(relay_lite._SMEE_WIRE.webhook(entry, False))
    assert json.loads(data)["body"] == entry.webhook.body


def test_header_values_go_to_smee_client_as_node_has_them_and_to_gosmee_as_text():
    """smee-client's fetch refuses a header value with a character past 255, and writes each
    character as a byte: the UTF-8 bytes as characters reach the app as the sender sent them."""
    entry = entry_of(b"{}", [(b"X-Name", "caf\u00e9 \u2603".encode())])
    _, data = parsed(relay_lite._SMEE_WIRE.webhook(entry, False))
    assert json.loads(data)["x-name"] == "caf\u00e9 \u2603".encode().decode("latin-1")
    _, data = parsed(relay_lite._GOSMEE_WIRE.webhook(entry, False))
    assert json.loads(data)["x-name"] == "caf\u00e9 \u2603"  # Go writes a string's UTF-8 bytes
