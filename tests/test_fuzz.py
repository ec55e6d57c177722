"""Property-based and fuzz tests: everything that parses bytes from outside, and the running server
under random and malformed bytes on both of its sides.

The first half is Hypothesis properties of the sans-IO parts, synchronous and fast: each parser
either returns what it promises or raises the one error its callers handle (ProtocolError,
ConfigError), never anything else, and what it produces stays within its bounds.

The second half throws seeded random bytes at a running relay, on the HTTP side (request lines,
header blocks, chunked bodies, huge numbers, invalid bytes) and on the WebSocket side (random
client frames after a valid handshake and, for some, a valid auth). Meanwhile a good subscriber
stays connected and a good sender posts webhooks. Afterwards: no ERROR or traceback was logged,
every connection ended within the relay's own deadlines, the good subscriber got every good
webhook in order, and the relay's connection count is back to the good connections.
RELAY_FUZZ_SEED picks another seed; a failure names the seed and the case.
"""

import base64
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import socket
import struct
import uuid

import h2.config
import h2.connection
import h11
import pytest
import trio
import wsproto
from h11._headers import normalize_and_validate
from hypercorn.utils import build_and_validate_headers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from quart import Response
from quart.utils import encode_headers
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode

import relay_lite
from relay_lite import ConfigError, ProtocolError, Webhook, parse_client_frame, status_frame, wire_frame

from conftest import GITHUB_ID, GITHUB_INPUT, KEY, SECRET, post, relay_config, subscriber
from helpers import closed_by_relay, tcp_from

# Fast and repeatable: no example database, no deadline (a busy machine must not turn a slow
# example into a failure).
PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEAVY = settings(PROPERTY, max_examples=60)

MESSAGE_BOUND = 1000  # characters in a ProtocolError's message, whatever the client sent

# ============================================================================ strategies

surrogates = st.characters(categories=["Cs"])
# text with lone surrogates mixed in: what JSON's "\udXXX" escapes make of a string
texts = st.one_of(st.text(max_size=30), st.lists(st.one_of(st.characters(), surrogates), max_size=30).map("".join))
big_ints = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**308, 10**309, 2**1024, -(10**400), 10**4000])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), big_ints, st.floats(), texts,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)),
    max_leaves=20,
)
uuid_texts = st.one_of(
    st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.uuids().map(lambda u: "{%s}" % u),
    st.uuids().map(lambda u: "urn:uuid:" + u.hex), st.uuids().map(lambda u: u.hex),
    st.text("0123456789abcdefABCDEF-{}:urn \u0661\u0662", max_size=45),
)


def _deep(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return '{"action":' + "[" * depth + "]" * depth + "}"


deep_json = st.builds(_deep, st.integers(1, 50_000), st.sampled_from(["array", "object", "action"]))

frame_dicts = st.fixed_dictionaries({}, optional={
    "action": st.one_of(st.sampled_from(["auth", "subscribe", "pong", "AUTH", "", "auth\x00"]), json_values),
    "key": st.one_of(texts, json_values),
    "secret": st.one_of(texts, json_values),
    "buckets": st.one_of(st.lists(texts, max_size=5), json_values),
    "since": st.one_of(uuid_texts, json_values),
}).flatmap(lambda frame: st.dictionaries(texts, json_values, max_size=2).map(lambda extra: {**extra, **frame}))


@st.composite
def client_frame_texts(draw) -> str:
    """A client frame as text: JSON of frame-shaped objects and of anything (with lone surrogates
    as escapes, or raw), deeply nested JSON, mutated JSON, or any text at all."""
    kind = draw(st.sampled_from(["frame", "value", "deep", "mutated", "text"]))
    if kind == "frame":
        return json.dumps(draw(frame_dicts), ensure_ascii=draw(st.booleans()))
    if kind == "value":
        return json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()))
    if kind == "deep":
        return draw(deep_json)
    if kind == "mutated":
        text = json.dumps(draw(frame_dicts))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            insert = draw(st.one_of(st.sampled_from(['\\ud800', '\\udfff', '\\u0000', '"', "\\", "{", "]", ",",
                                                     "1" * 5000, "1e999999", "-", "NaN", "\ud800"]), texts))
            cut = draw(st.integers(0, 3))
            text = text[:at] + insert + text[at + cut:]
        return text
    return draw(texts)


# ============================================================================ helpers


def decode_server_frame(data: bytes) -> tuple[int, bytes]:
    """One RFC 6455 server frame, parsed by hand and checked: FIN, no reserved bits, no mask,
    the shortest length encoding, nothing after it. Returns (opcode, payload)."""
    assert len(data) >= 2
    first, second = data[0], data[1]
    assert first & 0x80, "FIN is set"
    assert first & 0x70 == 0, "no reserved bit"
    assert second & 0x80 == 0, "a server frame is not masked"
    length, at = second & 0x7F, 2
    if length == 126:
        length, at = int.from_bytes(data[2:4], "big"), 4
        assert length >= 126, "the shortest length encoding"
    elif length == 127:
        length, at = int.from_bytes(data[2:10], "big"), 10
        assert 2**16 <= length < 2**63, "the shortest length encoding, the top bit clear"
    assert len(data) == at + length, "exactly one frame"
    return first & 0x0F, data[at:]


def parsed_by_wsproto(data: bytes) -> str:
    """The text message a client's wsproto reads from `data`."""
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(data)
    parts, finished = [], False
    for frame in protocol.received_frames():
        assert frame.opcode in (Opcode.TEXT, Opcode.CONTINUATION)
        parts.append(frame.payload)
        finished = frame.message_finished
    assert finished
    return "".join(parts)


def check_protocol_error(error: ProtocolError) -> None:
    """A ProtocolError's message goes back to the client in a status frame: short, UTF-8, and framable."""
    message = str(error)
    assert isinstance(message, str) and message
    assert len(message) <= MESSAGE_BOUND, len(message)
    message.encode("utf-8")  # no lone surrogate: a text frame is UTF-8
    framed = wire_frame(status_frame("error", message))
    opcode, payload = decode_server_frame(framed)
    assert opcode == 1
    assert json.loads(payload.decode("utf-8")) == {"type": "status", "status": "error", "message": message}


def check_config_error(error: ConfigError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"


def is_token(name: str) -> bool:
    return relay_lite._HEADER_NAME.fullmatch(name) is not None


# ============================================================================ parse_client_frame


@PROPERTY
@given(client_frame_texts())
@example('{"action":"auth","key":"\\ud800","secret":"\\udfff"}')
@example('{"action":"\\ud800' + "\\udfff" * 100 + '"}')
@example('{"action":"subscribe","since":"\\ud800"}')
@example('{"action":"subscribe","buckets":["\\ud800"]}')
@example('{"action":"subscribe","since":"' + "\u0661" * 32 + '"}')
@example("[" * 100_000 + "]" * 100_000)
@example("1" * 5000)
@example('{"action":' + "1" * 5000 + "}")
@example('{"action":"' + "\x1b" * 10_000 + '"}')
def test_parse_client_frame_returns_a_frame_or_raises_protocol_error(message):
    try:
        frame = parse_client_frame(message)
    except ProtocolError as error:
        check_protocol_error(error)
        return
    assert isinstance(frame, (relay_lite._Auth, relay_lite._Subscribe, relay_lite._Pong))
    decoded = json.loads(message)
    if isinstance(frame, relay_lite._Auth):
        assert (frame.key, frame.secret) == (decoded["key"], decoded["secret"])
        assert isinstance(frame.key, str) and isinstance(frame.secret, str)
    elif isinstance(frame, relay_lite._Subscribe):
        assert isinstance(frame.buckets, tuple)
        assert all(isinstance(ref, str) and ref for ref in frame.buckets)
        assert len(set(frame.buckets)) == len(frame.buckets)
        if frame.since is not None:  # canonical: what the relay writes, and stable
            assert frame.since == str(uuid.UUID(frame.since)) == relay_lite._canonical_log_id(frame.since)


@PROPERTY
@given(st.one_of(st.binary(max_size=200), client_frame_texts().map(lambda text: text.encode("utf-8", "surrogatepass"))))
def test_parse_client_frame_refuses_every_binary_frame(message):
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(message)
    check_protocol_error(caught.value)


@PROPERTY
@given(json_values)
def test_canonical_log_id_is_a_lower_case_uuid_or_none(value):
    canonical = relay_lite._canonical_log_id(value)
    assert canonical is None or canonical == str(uuid.UUID(canonical))


# ============================================================================ wire_frame and status_frame

# Sizes around the three length encodings (125 | 126..65535 | 65536..), in bytes of UTF-8
boundary_sizes = st.sampled_from([0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537, 70_000])


@PROPERTY
@given(st.one_of(st.text(), st.builds(lambda size, tail: "a" * size + tail, boundary_sizes, st.text(max_size=3))))
@example("")
@example("x" * 125)
@example("x" * 126)
@example("\u00e9" * 63)  # 126 bytes of 63 characters
@example("x" * 65535)
@example("x" * 65536)
@example("\U0001f600" * 16384)  # 65536 bytes
def test_wire_frame_is_one_valid_server_text_frame(text):
    framed = wire_frame(text)
    opcode, payload = decode_server_frame(framed)
    assert opcode == 1
    assert payload.decode("utf-8") == text
    assert parsed_by_wsproto(framed) == text


@PROPERTY
@given(st.text(max_size=50), st.text())
def test_status_frames_are_json_in_valid_frames(status, message):
    framed = wire_frame(status_frame(status, message))
    assert json.loads(parsed_by_wsproto(framed)) == {"type": "status", "status": status, "message": message}


# ============================================================================ Webhook.from_request

# What h11 lets through to the app: a request target of visible ASCII, header names that are
# tokens, header values of visible bytes and obs-text with inner spaces and tabs
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=20)
h11_targets = st.binary(max_size=60).map(lambda raw: bytes(byte for byte in raw if 0x21 <= byte <= 0x7E))
h11_values = st.binary(max_size=60).map(
    lambda raw: bytes(byte for byte in raw if byte in (0x20, 0x09) or byte >= 0x21 and byte != 0x7F).strip(b" \t"))
# bodies rich in what JSON escapes: quotes, backslashes, control characters, and UTF-8 of every width
body_atoms = st.sampled_from([b'"', b"\\", b"\n", b"\t", b"\r", b"\x00", b"\x01", b"\x1f", b"\x7f", b"a", b" ",
                              "\u00e9".encode(), "\u2603".encode(), "\U0001f600".encode(), "\u2028".encode(),
                              b"\xff", b"\xc3", b"\xed\xa0\x80"])
bodies = st.one_of(st.binary(max_size=300), st.lists(body_atoms, max_size=300).map(b"".join),
                   st.text(max_size=200).map(str.encode))


@PROPERTY
@given(st.sampled_from(relay_lite.WEBHOOK_METHODS) | st.text(max_size=8), st.text(max_size=30),
       st.binary(max_size=40), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=6), bodies)
@example("POST", "", b"", [], b"\x01" * 1000)
@example("POST", "", b"", [], b'"' * 1000)
@example("POST", "", b"", [], b"\n" * 1000)
@example("POST", "", b"", [], b'"\x01' * 500)
@example("POST", "", b"", [], b"\xed\xa0\x80")  # a surrogate in UTF-8 form: not UTF-8
def test_webhook_body_round_trips_within_twice_its_size(method, path, query, headers, body):
    webhook = Webhook.from_request(method, path, query, headers, body)
    assert webhook.body_encoding in ("", "base64")
    if webhook.body_encoding == "base64":
        assert base64.b64decode(webhook.body, validate=True) == body
    else:
        assert webhook.body.encode("utf-8") == body
    empty = len(relay_lite._encode({"body": ""}).encode())
    cost = len(relay_lite._encode({"body": webhook.body}).encode()) - empty
    assert cost <= 2 * len(body) + 4, (cost, len(body))
    assert webhook.path == (path or "/") and webhook.method == method.upper()
    assert "Host" not in webhook.headers
    assert all(isinstance(value, str) for values in webhook.headers.values() for value in values)
    # what goes to sockets and the log is text that JSON and UTF-8 can carry
    relay_lite._encode(dataclasses.asdict(webhook)).encode("utf-8")


_FRAME_BUCKET = relay_lite.load_config({"buckets": [{"name": "github", "id": GITHUB_ID,
                                                     "inputs": [{"id": GITHUB_INPUT}]}]}).buckets[0]


def _frame_bytes(webhook: Webhook) -> int:
    routes = relay_lite._routes(_FRAME_BUCKET)
    (entry,) = relay_lite._entries([str(uuid.uuid4())], _FRAME_BUCKET, _FRAME_BUCKET.inputs[0].id, _FRAME_BUCKET.inputs[0].name, webhook, routes, 0.0)
    return len(wire_frame(entry.frame()))


_EMPTY_FRAME = _frame_bytes(Webhook.from_request("GET", "/", b"", [], b""))


@PROPERTY
@given(st.sampled_from(relay_lite.WEBHOOK_METHODS), h11_targets.map(lambda raw: "/" + raw.decode("ascii")),
       h11_targets, st.lists(st.tuples(tokens.map(str.encode), h11_values), max_size=8), bodies)
def test_no_frame_costs_more_than_twice_its_webhook(method, path, query, headers, body):
    """The whole wire frame, for what h11 lets through: at most twice the request's own bytes
    (request line, header lines, body), past what any frame costs (ids, names)."""
    webhook = Webhook.from_request(method, path, query, headers, body)
    request_bytes = (len(method) + len(path) + 1 + len(query)
                     + sum(len(name) + 4 + len(value) for name, value in headers) + len(body))
    assert _frame_bytes(webhook) <= _EMPTY_FRAME + len(',"body_encoding":"base64"') + 2 * request_bytes + 8


# ============================================================================ _shown

any_texts = st.lists(st.one_of(st.characters(), surrogates, st.sampled_from("\x00\x1b\n\r\x7f\x85\u2028\ufeff")),
                     max_size=400).map("".join)


@PROPERTY
@given(any_texts, st.integers(0, 300))
@example("\ud800" * 100, 80)
@example("\x1b[31m\n", 80)
@example("\U0010ffff" * 90, 80)
def test_shown_is_printable_and_bounded(text, limit):
    shown = relay_lite._shown(text, limit)
    assert shown.isprintable(), shown
    shown.encode("utf-8")
    assert len(shown) <= 10 * limit + len(f"... ({len(text)} more)")
    if len(text) <= limit:
        assert "more)" not in shown or "more)" in text


# ============================================================================ _parse_secret_hash


@st.composite
def secret_hash_texts(draw) -> str:
    """scrypt:N:r:p$salt$hex, each part well-formed or not; or any text at all."""
    if draw(st.booleans()):
        return draw(any_texts)
    number = st.one_of(st.integers(-10, 2**21).map(str),
                       st.sampled_from(["1024", "2048", "16384", "1048576", "2097152", "0", "-1024", " 1024", "1_024",
                                        "\u0661\u0660\u0662\u0664", "9" * 5000, "", "0x400", "1024:1"]))
    name = draw(st.sampled_from(["scrypt", "pbkdf2", "", "SCRYPT"]) | st.text(max_size=8))
    salt = draw(st.sampled_from(["", "salt", "$", ":"]) | st.text(max_size=10))
    digest = draw(st.one_of(st.binary(max_size=64).map(bytes.hex), st.text("0123456789abcdefg ", max_size=70)))
    return f"{name}:{draw(number)}:{draw(number)}:{draw(number)}${salt}${digest}"


@PROPERTY
@given(secret_hash_texts())
@example("scrypt:1024:8:1$salt$" + "00" * 16)
@example("scrypt:1024:8:1$salt$" + "0" * 33)
@example("scrypt:" + "9" * 5000 + ":8:1$salt$" + "00" * 16)
@example("scrypt:1048576:32:16$salt$" + "00" * 16)
def test_parse_secret_hash_returns_or_raises_config_error(text):
    try:
        parsed = relay_lite._parse_secret_hash(text, "tokens[0].secret_hash")
    except ConfigError as error:
        check_config_error(error)
        return
    assert 2**10 <= parsed.n <= 2**20 and parsed.n & (parsed.n - 1) == 0
    assert 1 <= parsed.r <= 32 and 1 <= parsed.p <= 16 and 128 * parsed.n * parsed.r * parsed.p <= 2**28
    assert parsed.salt and len(parsed.digest) >= 16


# ============================================================================ _parse_answer

answer_bodies = st.one_of(
    st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode()), st.text(max_size=20), texts,
    st.lists(st.integers(-2, 300), max_size=10), st.lists(st.one_of(st.booleans(), st.integers(0, 255), st.floats()),
                                                          max_size=5),
    json_values,
)
header_values = st.one_of(texts, st.text(max_size=20), st.sampled_from([" a ", "a\r\nb", "\t", "", " ", "\u00a0",
                                                                        "\u2028", "\x7f", "\x85", "caf\u00e9 \u2603",
                                                                        "\U0001f600", "\ufeff"]))
answer_headers = st.one_of(
    st.dictionaries(st.one_of(tokens, texts, st.sampled_from(["Date", "Content-Length", "Transfer-Encoding",
                                                                "Connection", "Set-Cookie", "Server"])),
                    st.one_of(header_values, st.lists(header_values, max_size=3), json_values), max_size=5),
    json_values,
)
answers = st.one_of(
    st.fixed_dictionaries({}, optional={
        "status_code": st.one_of(st.integers(-1, 700), st.sampled_from([0, 100, 101, 199, 200, 204, 304, 599, 600]),
                                 big_ints, st.booleans(), st.floats(), st.text(max_size=5), st.none()),
        "response_body": answer_bodies,
        "response_headers": answer_headers,
        "status": st.one_of(st.sampled_from(relay_lite.LOG_STATUSES), st.integers(-2, 8), st.booleans(),
                            st.none(), st.just(""), texts, json_values),
    }),
    json_values,
)


def hypercorn_could_send(status_code: int, body: bytes, headers: dict[str, list[str]]) -> None:
    """What the held sender's answer goes through: Quart's Response and header encoding, then
    Hypercorn's header check, then h11's."""
    response = Response(body, status_code, relay_lite._answer_headers(headers.items()))
    raw = build_and_validate_headers(encode_headers(response.headers))
    normalize_and_validate(raw)
    h11.Response(status_code=status_code, headers=raw)


@PROPERTY
@given(answers, st.floats(0, 2e9))
@example({"status_code": 200, "response_headers": {"X(Test)": "1"}}, 0.0)
@example({"status_code": 200, "response_headers": {"X-Ok": "a\r\nSet-Cookie: b"}}, 0.0)
@example({"status_code": 200, "response_headers": {"X-Ok": [" padded ", "caf\u00e9", ""]}}, 0.0)
@example({"status_code": 200, "response_headers": {"\ud800": "x"}}, 0.0)
@example({"status_code": 200, "response_body": "\ud800"}, 0.0)
@example({"status_code": 200, "response_body": [True, False, 255]}, 0.0)
@example({"status_code": 204, "response_body": [1]}, 0.0)
@example({"status_code": 10**400}, 0.0)
@example({"status": 5}, 0.0)
@example({"status": True}, 0.0)
def test_parse_answer_returns_an_answer_http_can_carry_or_raises_protocol_error(data, now):
    try:
        answer, status = relay_lite._parse_answer(data, now)
    except ProtocolError as error:
        check_protocol_error(error)
        return
    assert isinstance(answer, relay_lite._Answer) and status in relay_lite.LOG_STATUSES
    assert type(answer.status_code) is int and (answer.status_code == 0 or 200 <= answer.status_code <= 599)
    assert isinstance(answer.body, bytes) and answer.at == now
    for name, values in answer.headers.items():
        assert is_token(name), name
        assert isinstance(values, list)
        for value in values:
            assert isinstance(value, str) and value.isprintable() and "\r" not in value and "\n" not in value
    if answer.status_code:
        hypercorn_could_send(answer.status_code, answer.body, answer.headers)
    # what the logs API returns and the log stores: JSON in UTF-8
    relay_lite._encode({"response_headers": answer.headers}).encode("utf-8")


# ============================================================================ load_config

# Every key the TOML may hold, per table
SERVER_FIELDS = {field.name: field.type for field in dataclasses.fields(relay_lite.ServerConfig)}
ALL_KEYS = sorted({field.name for cls in (relay_lite.Config, relay_lite.ServerConfig, relay_lite.StorageConfig,
                                          relay_lite.TokenConfig, relay_lite.InputConfig, relay_lite.OutputConfig,
                                          relay_lite.BucketConfig) for field in dataclasses.fields(cls)})
GOOD_SECRET = "fuzz-secret-0123456789abcdef"
GOOD_HASH = str(relay_lite._SecretHash.of("hashed-secret-0123456789", n=2**10))

# What TOML can hold: strings (never a lone surrogate), integers of any size tomllib reads,
# floats with nan and inf, booleans, dates and times, arrays, tables
toml_keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=10), st.sampled_from(["a\nb", "\r", "\x1b[2J", ""]))
toml_scalars = st.one_of(
    st.text(max_size=20), st.integers(), big_ints, st.floats(), st.booleans(),
    st.datetimes(), st.dates(), st.times(),
    st.sampled_from(["github", "http://localhost:8080", "anyOutput", "0.0.0.0", GOOD_SECRET, GOOD_HASH, "changeme",
                     "scrypt:1024:8:1$s$00", "a/b", " x", "<secret-value-012345>"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(toml_keys, children, max_size=3)),
    max_leaves=12,
)
numbers = st.one_of(st.integers(-5, 70_000), big_ints, st.floats(), st.sampled_from([0, 1, 0.5, -1.0]))


def table(slots: dict, extra=toml_values) -> st.SearchStrategy:
    """A TOML table: some of `slots` (key -> strategy), now and then a random key too."""
    return st.tuples(
        st.fixed_dictionaries({}, optional={key: st.one_of(value, toml_values) for key, value in slots.items()}),
        st.dictionaries(toml_keys, extra, max_size=1),
    ).map(lambda parts: {**parts[1], **parts[0]})


server_tables = table({name: (st.text(max_size=20) if kind == "str" else numbers)
                       for name, kind in SERVER_FIELDS.items()})
token_tables = table({
    "key": st.sampled_from(["k", "k2", "whr", ""]) | st.text(max_size=5),
    "secret": st.sampled_from([GOOD_SECRET, GOOD_SECRET + "2", "short", ""]),
    "secret_hash": st.sampled_from([GOOD_HASH, "", "scrypt:1024:8:1$$00"]),
    "buckets": st.lists(st.sampled_from(["b", "c", "missing"]) | st.text(max_size=3), max_size=3),
})
input_tables = table({
    "id": st.sampled_from(["in-1", "in-2", "a/b", " x", ""]) | st.text(max_size=5),
    "name": st.sampled_from(["i", "j"]),
    "status_code": st.integers(100, 700) | big_ints,
    "body": st.text(max_size=5),
    "headers": st.dictionaries(st.one_of(tokens, toml_keys), st.one_of(st.text(max_size=5), toml_scalars),
                               max_size=3),
    "response_from_output": st.sampled_from(["anyOutput", "o", "nope", ""]),
    "response_timeout": numbers,
})
output_tables = table({
    "name": st.sampled_from(["o", "p"]), "destination": st.text(max_size=10),
    "internal": st.booleans(), "lock_path": st.booleans(), "disabled": st.booleans(),
})
bucket_tables = table({
    "name": st.sampled_from(["b", "c", ""]) | st.text(max_size=3),
    "id": st.sampled_from(["b", "bid", ""]) | st.text(max_size=3),
    "inputs": st.lists(input_tables, max_size=3), "outputs": st.lists(output_tables, max_size=3),
    "history_size": numbers, "history_ttl": numbers, "history_bytes": numbers,
})
config_tables = st.one_of(
    table({"server": server_tables, "storage": table({"path": st.text(max_size=5)}),
           "tokens": st.lists(token_tables, max_size=3), "buckets": st.lists(bucket_tables, max_size=3)}),
    st.dictionaries(toml_keys, toml_values, max_size=4),
)


def load_or_config_error(source) -> relay_lite.Config | None:
    try:
        config = relay_lite.load_config(source)
    except ConfigError as error:
        check_config_error(error)
        return None
    assert isinstance(config, relay_lite.Config)
    return config


@HEAVY
@given(config_tables)
@example({"tokens": [{"key": "k", "secret": GOOD_SECRET}], "buckets": [{"name": "b", "inputs": [{"id": "in-1"}]}]})
def test_load_config_on_toml_shaped_dicts_returns_a_config_or_raises_config_error(raw):
    config = load_or_config_error(raw)
    if config is not None:  # checked: what the relay relies on holds
        assert 0 <= config.server.port <= 65535
        assert all(math.isfinite(getattr(config.server, key)) and getattr(config.server, key) > 0
                   for key in ("ping_interval", "auth_timeout", "request_timeout", "idle_timeout", "send_timeout"))
        assert all(bucket.id and bucket.inputs for bucket in config.buckets)


@pytest.mark.parametrize("raw", [
    pytest.param({"server": {"ping_interval": 10**400}}, id="float-field-past-float-range"),
    pytest.param({"server": {"max_body_size": 10**400}}, id="int-field-past-float-range"),
    pytest.param({"buckets": [{"name": "b", "history_ttl": 10**400}]}, id="bucket-history-past-float-range"),
    pytest.param({"a\nb": 1}, id="newline-in-unknown-key"),
    pytest.param({"buckets": [{"name": "b", "inputs": [{"headers": {"X\nY": 1}}]}]}, id="newline-in-header-name"),
])
def test_load_config_on_dicts_a_toml_file_can_hold(raw):
    """Each of these is also a TOML file (see the next tests); each was not a ConfigError of one line."""
    load_or_config_error(raw)


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("raw", [
    pytest.param({"buckets": [{"name": "\ud800"}]}, id="surrogate-in-bucket-name"),
    pytest.param({"buckets": [{"name": "b", "inputs": [{"headers": {1: "x"}}]}]}, id="non-string-header-name"),
    pytest.param({"server": {"host": 10**5000}}, id="int-past-str-conversion-limit"),
    pytest.param({"buckets": [{"name": "b", "inputs": [{"status_code": 10**5000}]}]}, id="status-past-str-limit"),
    pytest.param({"server": {"port": -(10**5000)}}, id="port-past-str-limit"),
    pytest.param({"server": {"host": nested_list(5000)}}, id="deeply-nested-value"),
])
def test_load_config_on_dicts_no_toml_file_can_hold(raw):
    """A dict config (embedding) can hold what TOML cannot; still a ConfigError, not a crash."""
    load_or_config_error(raw)


def toml_string(text: str) -> str:
    return '"' + "".join('\\"' if char == '"' else "\\\\" if char == "\\" else
                         f"\\u{ord(char):04x}" if char < " " or char == "\x7f" else char for char in text) + '"'


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_string(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


def toml_document(raw: dict) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in raw.items())


TEMPLATE = relay_lite._config_template()
toml_snippets = st.sampled_from(["\n", "=", "[", "]]", '"', "'", "1e999", "9" * 400, "9" * 5000, "nan", "-inf",
                                 "[[buckets]]\n", "[server]\n", '"\\u0000"', '"a\\nb" = 1\n', "[" * 3000,
                                 "{a={a={a=", "0x7fffffffffffffffffff", "1979-05-27T07:32:00Z", "\\ud800"])


@st.composite
def toml_files(draw) -> bytes:
    kind = draw(st.sampled_from(["document", "mutated", "text", "bytes"]))
    if kind == "document":
        return toml_document(draw(config_tables)).encode()
    if kind == "mutated":
        text = TEMPLATE
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.one_of(toml_snippets, st.text(max_size=5))) + text[at + draw(st.integers(0, 5)):]
        return text.encode()
    if kind == "text":
        return draw(st.text(max_size=200)).encode()
    return draw(st.binary(max_size=200))


@HEAVY
@given(toml_files())
@example(TEMPLATE.encode())
def test_load_config_on_toml_files_returns_a_config_or_raises_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("toml") / "relay.toml"
    path.write_bytes(content)
    load_or_config_error(path)
    load_or_config_error(str(path))


@pytest.mark.parametrize("content", [
    pytest.param(b"[server]\nping_interval = " + b"9" * 400 + b"\n", id="float-field-past-float-range"),
    pytest.param(b"[server]\nmax_body_size = " + b"9" * 400 + b"\n", id="int-field-past-float-range"),
    pytest.param(b"[server]\nhost = " + b"9" * 5000 + b"\n", id="int-past-str-conversion-limit"),
    pytest.param(b"a = " + b"[" * 1000 + b"]" * 1000 + b"\n", id="deeply-nested-array"),
    pytest.param(b'[server]\nhost = "caf\xe9"\n', id="latin-1-not-utf-8"),
    pytest.param(b'"a\\nb" = 1\n', id="newline-in-unknown-key"),
    pytest.param(b'[[buckets]]\nname = "b"\n[[buckets.inputs]]\nheaders = {"X\\nY" = 1}\n',
                 id="newline-in-header-name"),
])
def test_load_config_on_toml_files_that_were_not_a_config_error(tmp_path, content):
    path = tmp_path / "relay.toml"
    path.write_bytes(content)
    load_or_config_error(path)


# ============================================================================ the running relay

FUZZ_SEED = int(os.environ.get("RELAY_FUZZ_SEED", "0"))
# fuzz frames carry wrong secrets: the limiter on failed authentications (tested elsewhere) is off
FUZZ_SERVER = {"request_timeout": 2, "idle_timeout": 1, "auth_timeout": 1, "auth_failures_per_minute": 1_000_000}
FUZZ_SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]  # the good clients are 127.0.0.1
HELD_TIMEOUT = 1  # an input that holds its senders for a client's answer (PUT /v1/logs/<id>), this long


def fuzz_config() -> dict:
    config = relay_config(**FUZZ_SERVER)
    config["buckets"][0]["inputs"].append({"id": "in-held", "name": "held", "response_from_output": "anyOutput",
                                           "response_timeout": HELD_TIMEOUT})
    return config


# How long a connection may last, at most: its phase's deadline, the relay's grace, a closing
# handshake and the linger, with slack for a busy machine
HTTP_BOUND = (2 * FUZZ_SERVER["request_timeout"] + HELD_TIMEOUT + FUZZ_SERVER["idle_timeout"] + relay_lite._GRACE
              + relay_lite._LINGER + 8)
SOCKET_BOUND = (FUZZ_SERVER["auth_timeout"] + relay_lite._CLOSE_TIMEOUT + relay_lite._GRACE + relay_lite._LINGER + 8)
GOOD_MARK = "X-Fuzz-Good"


@dataclasses.dataclass
class Case:
    name: str
    chunks: list[bytes]  # sent one after another; LOG_ID is replaced with a real log id
    ending: str = "eof"  # "eof": half-close at once; "wait": let the relay end it; "reset": an RST
    auth: bool = False  # sockets: authenticate (and subscribe) first
    source: str = "127.0.0.2"

    def __str__(self) -> str:
        data = b"".join(self.chunks)
        shown = repr(data[:300]) + (f"... ({len(data)} bytes)" if len(data) > 300 else "")
        return f"{self.name} (seed {FUZZ_SEED}, ending {self.ending}, auth {self.auth}): {shown}"


LOG_ID = b"{LOG_ID}"


class GoodTraffic:
    """A subscriber connected throughout, and a sender posting to its bucket meanwhile."""

    def __init__(self, relay, client, rng: random.Random) -> None:
        self.relay, self.client, self.rng = relay, client, rng
        self.posted: list[bytes] = []
        self.received: list[bytes] = []
        self.log_ids: list[str] = []  # of every webhook the subscriber got, the good ones and the fuzz's
        self.held_ids: list[str] = []
        self.stop = trio.Event()

    async def receive(self) -> None:
        while True:
            frame = json.loads(await self.client.ws.get_message())
            if frame["type"] != "webhook":
                continue
            self.log_ids.append(frame["meta"]["id"])
            if frame["meta"]["input_id"] == "in-held":  # a sender waits for an answer to it
                self.held_ids.append(frame["meta"]["id"])
            if GOOD_MARK in frame["headers"]:
                body = frame["body"]
                self.received.append(base64.b64decode(body) if frame.get("body_encoding") else body.encode())

    async def send(self) -> None:
        n = 0
        while not self.stop.is_set():
            body = f"good {n} ".encode() + self.rng.choice([b"", b"\xff\xfe binary", b'"quoted"\n', "\u2603".encode()])
            response = await post(self.relay, content=body, headers={GOOD_MARK: str(n)})
            assert response.status_code == 200, response.text
            self.posted.append(body)
            n += 1
            with trio.move_on_after(0.05):  # a pace, not a wait: about 20 webhooks a second
                await self.stop.wait()

    def log_id(self) -> bytes:
        """What LOG_ID stands for in a case: a recent webhook's id (a held one's, half the time)."""
        ids = self.held_ids if self.held_ids and self.rng.random() < 0.5 else self.log_ids
        return (self.rng.choice(ids[-20:]) if ids else str(uuid.uuid4())).encode()


def log_problems(caplog) -> list[str]:
    """Records at ERROR or above, and any record with a traceback."""
    return [f"{record.name} {record.levelname}: {record.getMessage()}" for record in caplog.records
            if record.levelno >= logging.ERROR or record.exc_info or "Traceback" in record.getMessage()]


async def settles(condition, timeout: float) -> bool:
    """Whether `condition()` comes to hold within `timeout` (polled, like conftest.eventually)."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return True
    return False


async def fuzz_running_relay(caplog, run_case, cases: list[Case], concurrency: int) -> None:
    """Run `cases` against a relay (at most `concurrency` at a time) while good traffic flows; then
    check each case's end, the good subscriber's webhooks, the connection count and the log."""
    caplog.set_level(logging.DEBUG, logger="relay_lite")
    caplog.set_level(logging.INFO, logger="hypercorn.error")
    problems: list[str] = []  # everything that went wrong, reported together
    failures: list[str] = []
    async with relay_lite.open_relay(fuzz_config()) as relay:
        async with subscriber(relay, ["github"]) as client:
            traffic = GoodTraffic(relay, client, random.Random(FUZZ_SEED))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(traffic.receive)
                async with trio.open_nursery() as sending:
                    sending.start_soon(traffic.send)
                    limiter = trio.CapacityLimiter(concurrency)
                    async with trio.open_nursery() as fuzzing:
                        for case in cases:
                            fuzzing.start_soon(run_bounded, relay, traffic, run_case, case, limiter, failures)
                    traffic.stop.set()
                # the last good webhook, after all of the fuzz: the subscriber is alive and in order
                last = b"good after the fuzz"
                assert (await post(relay, content=last, headers={GOOD_MARK: "last"})).status_code == 200
                traffic.posted.append(last)
                await settles(lambda: len(traffic.received) >= len(traffic.posted), timeout=10)
                nursery.cancel_scope.cancel()
            if failures:
                problems.append(f"{len(failures)} of {len(cases)} cases failed:\n  " + "\n  ".join(failures[:10]))
            if traffic.received != traffic.posted or len(traffic.posted) < 10:
                problems.append(f"the good subscriber got {len(traffic.received)} of {len(traffic.posted)} good "
                                f"webhooks (in order: {traffic.received == traffic.posted[:len(traffic.received)]})")
            # every fuzz connection (and every sender's) is gone: only the subscriber is left
            if not await settles(lambda: relay.services.connections.count == 1, timeout=HTTP_BOUND):
                problems.append(f"{relay.services.connections.count} connections open, not 1 (the good subscriber)")
            if relay.services.connections.pending or len(relay.sockets.open) != 1 or relay._port.requests:
                problems.append(f"left behind: pending {relay.services.connections.pending}, sessions "
                                f"{len(relay.sockets.open)}, requests {relay._port.requests}")
        if not await settles(lambda: relay.services.connections.count == 0, timeout=5):
            problems.append(f"{relay.services.connections.count} connections open after the subscriber left")
    logged = log_problems(caplog)
    if logged:
        problems.append("logged:\n  " + "\n  ".join(logged[:20]))
    assert not problems, "\n".join(problems)


async def run_bounded(relay, traffic, run_case, case: Case, limiter, failures: list[str]) -> None:
    async with limiter:
        started = trio.current_time()
        try:
            problem = await run_case(relay, traffic, case)
        except trio.TooSlowError:
            problem = f"did not end within its bound ({trio.current_time() - started:.1f} s)"
        if problem:
            failures.append(f"{problem}: {case}")


async def send_chunks(stream: trio.SocketStream, chunks: list[bytes], log_id: bytes) -> bool:
    """Send each chunk (a checkpoint between them); False if the relay closed first."""
    try:
        for chunk in chunks:
            await stream.send_all(chunk.replace(LOG_ID, log_id))
            await trio.sleep(0)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


def split(rng: random.Random, data: bytes, cuts: int) -> list[bytes]:
    """`data` cut in up to `cuts` places, at random."""
    at = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, cuts))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *at], [*at, len(data)])]


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST, as a client that crashed does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---------------------------------------------------------------------------- HTTP side


def http_cases(rng: random.Random, count: int) -> list[Case]:
    """Requests that are valid, then mutated (0 to 3 times); pipelines; requests in pieces; HTTP/2
    with prior knowledge; other protocols' openings; noise."""
    input_path = f"/v1/webhooks/{GITHUB_INPUT}".encode()
    auth = b"Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode())

    def pick(*options):
        return rng.choice(options)

    def noise(size: int) -> bytes:
        return rng.randbytes(size)

    def number() -> bytes:
        return pick(b"0", b"1", b"5", b"100", b"-1", b"+5", b" 7 ", b"0x10", b"1e3", b"99999999999999999999999999",
                    b"9" * 5000, b"18446744073709551616", b"1, 1", b"1,2", b"", b"abc", b"\xff",
                    str(rng.randrange(2000)).encode())

    def answer_json() -> bytes:
        answer = {"status_code": pick(200, 200, 201, 204, 304, 404, 599, 600, 0, 10**30, "200", None, True),
                  "response_body": pick("aGk=", "", "!!", [104, 105], [300], "\ud800", None),
                  "response_headers": pick({"X-A": "1"}, {"X-A": [" a ", "\u2603", ""]}, {"X(A)": "1"},
                                           {"X-A": "a\r\nb"}, {"Content-Length": "5", "Transfer-Encoding": "x"},
                                           {"Date": "x", "Server": "y", "Connection": "close"},
                                           {"Set-Cookie": ["a=1", "b=2"], "X-Empty": []}, [], None),
                  "status": pick("sent", "failed", 5, 9, "nope", None)}
        return json.dumps({key: value for key, value in answer.items() if rng.random() < 0.8}).encode()

    def valid_request() -> tuple[list[bytes], bytes, bool]:
        """A request the relay answers (200, 401, 404, 426...): its head lines and body, and
        whether it is chunked."""
        kind = rng.choice(["webhook"] * 5 + ["logs", "answer", "answer", "answer", "socket", "unknown"])
        headers = [b"Host: relay"]
        body = b""
        if kind == "webhook":
            method = pick(b"POST", b"POST", b"PUT", b"PATCH", b"GET", b"HEAD", b"DELETE", b"OPTIONS")
            target = pick(input_path, input_path + b"/extra/path", input_path + b"?a=1&b=%ff&c",
                          b"/v1/webhooks/in-stripe", b"/v1/webhooks/in-two/deep?x", b"/v1/webhooks/in-public",
                          b"/v1/webhooks/in-held", b"/v1/webhooks/in-held")
            body = pick(b"", b"{}", b'{"hi": "there"}', noise(rng.randrange(0, 3000)), b"\x01" * 500,
                        b'"\\' * 300, "caf\u00e9 \u2603\n".encode() * 20)
            headers += rng.sample([b"Content-Type: application/json", b"X-Hub-Signature-256: sha256=00",
                                   b"X-Test: " + noise(5).hex().encode(), b"X-Obs-Text: caf\xe9 \xff",
                                   b"User-Agent: fuzz/1.0", b"Expect: 100-continue", b"Connection: keep-alive",
                                   b"Connection: close", b"Accept: */*", b"X-Tab: a\tb"], rng.randrange(0, 5))
        elif kind == "logs":
            method = b"GET"
            target = pick(b"/v1/logs", b"/v1/logs?limit=" + number(), b"/v1/logs?offset=" + number(),
                          b"/v1/logs?status=" + pick(b"sent", b"bogus", b"%00"), b"/v1/logs?bucket=" + pick(
                              b"github", b"nope", b"%ff", b"stripe-id"), b"/v1/logs/" + LOG_ID, b"/v1/logs/nope")
            headers.append(b"Authorization: " + pick(
                auth, auth, b"Basic !!!", b"Basic " + base64.b64encode(b"\xff:\xfe"), b"Bearer " + SECRET.encode(),
                b"Bearer \xff\xfe", b"Digest x", b""))
        elif kind == "answer":
            method = b"PUT"
            target = pick(b"/v1/logs/" + LOG_ID, b"/v1/logs/" + str(uuid.UUID(int=rng.getrandbits(128))).encode())
            headers += [b"Authorization: " + auth, b"Content-Type: application/json"]
            body = pick(answer_json(), answer_json(), b"[" * 50_000, b"1" * 5000, b"{", noise(20))
        elif kind == "socket":  # the socket path without (or with half) an upgrade
            method, target = b"GET", pick(b"/v1/socket", b"/v1/socket/", b"/v1/socket?x=1")
            headers += rng.sample([b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
                                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], rng.randrange(0, 4))
        else:
            method = pick(b"GET", b"POST")
            target = pick(b"/", b"/v1", b"/v1/webhooks/", b"/v1/webhooks/unknown", b"/v1/webhooks/%2e%2e/x", b"*",
                          b"http://relay" + input_path, b"/" + b"a" * rng.choice([10, 5000, 20_000]))
        chunked = bool(body) and rng.random() < 0.3
        if chunked:
            headers.append(b"Transfer-Encoding: chunked")
            pieces, at = [], 0
            while at < len(body):
                size = rng.randrange(1, 500)
                piece = body[at:at + size]
                pieces.append(b"%x%s\r\n%s\r\n" % (len(piece), pick(b"", b"", b";ext=1"), piece))
                at += size
            body = b"".join(pieces) + pick(b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n")
        elif body or method in (b"POST", b"PUT"):
            headers.append(b"Content-Length: %d" % len(body))
        return [method + b" " + target + b" HTTP/1.1", *headers], body, chunked

    bad_headers = [
        b"Host:", b"Host: a\r\nHost: b", b"Content-Length: " + b"9" * 30, b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: \xffchunked", b"Upgrade: websocket",
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings",
        b"X-Obs: a\r\n folded", b" leading-space: x", b"No-Colon", b": empty-name", b"X(Y): 1", b"X-Nul: a\x00b",
        b"X-Del: \x7f", b"X-Big: " + b"v" * 17_000, b"Name : space", b"Content-Length: -1", b"Content-Length: 1, 2",
    ]

    def mutated(lines: list[bytes], body: bytes, chunked: bool) -> bytes:
        crlf = b"\r\n"
        end = crlf
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            mutation = rng.randrange(13)
            if mutation == 0:
                method = pick(b"P\x00ST", b"get", b"CONNECT", b"PRI", b"X" * 100, noise(3))
                lines[0] = method + lines[0][lines[0].index(b" "):]
            elif mutation == 1:
                lines[0] = lines[0].rsplit(b" ", 1)[0] + b" " + pick(b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.",
                                                                      b"http/1.1", b"HTTP/1.1 x", b"", noise(4))
            elif mutation == 2:
                method, _, version = lines[0].split(b" ", 2)
                target = pick(b"/\x00", b"/\xff\xfe", b"/%", b"", b"//" + noise(8), b"/a b")
                lines[0] = b" ".join((method, target, version))
            elif mutation == 3:
                lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(bad_headers))
            elif mutation == 4:
                lines += [b"X-%d: v" % n for n in range(120)]
            elif mutation == 5:
                lines = [line for line in lines if not line.startswith((b"Content-Length", b"Transfer-Encoding"))]
                lines.append(b"Content-Length: " + number())
            elif mutation == 6:
                lines.append(pick(b"Content-Length: 5", b"Transfer-Encoding: chunked"))
            elif mutation == 7:
                crlf = pick(b"\n", b"\r", b"\n\r")
            elif mutation == 8:
                end = b""
            elif mutation == 9 and chunked:
                body = pick(b"ffffffffffffffffffff\r\n", b"zz\r\n", b"-1\r\n\r\n", b"10\r\nshort\r\n", b"3\r\nabcdef",
                            b"0\r\n", b"5;" + noise(5) + b"\r\nabcde\r\n0\r\n\r\n") + pick(b"", body)
            elif mutation == 10:
                lines = [line for line in lines if not line.startswith(b"Host")]
            else:
                data = crlf.join(lines) + crlf + end + body
                at = rng.randrange(len(data) + 1)
                return pick(data[:at], data[:at] + noise(rng.randrange(1, 50)) + data[at:],
                            data[:at] + bytes((rng.randrange(256),)) + data[at + 1:])
        return crlf.join(lines) + crlf + end + body

    def request() -> bytes:
        return mutated(*valid_request())

    def h2_connection() -> bytes:
        """HTTP/2 with prior knowledge (the relay serves HTTP/1.1 only): a few streams to the relay's
        inputs, then maybe raw frames."""
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        connection.initiate_connection()
        for stream_id in range(1, 2 * rng.randrange(1, 4), 2):
            body = pick(b"", b"h2 body", noise(rng.randrange(0, 2000)))
            connection.send_headers(stream_id, [
                (b":method", pick(b"POST", b"PUT", b"GET")), (b":scheme", b"http"), (b":authority", b"relay"),
                (b":path", pick(input_path, b"/v1/webhooks/in-stripe", b"/v1/logs", b"/v1/socket", b"/nope")),
                (b"content-length", str(len(body)).encode()),
                *([(b"authorization", auth)] if rng.random() < 0.3 else []),
            ], end_stream=not body)
            if body:
                connection.send_data(stream_id, body, end_stream=rng.random() < 0.9)
        data = connection.data_to_send()

        def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
            return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload

        for _ in range(rng.choice([0, 0, 1, 3])):
            data += pick(raw_frame(0x8, 0, 0, b"\x00\x00\x00\x00"),  # WINDOW_UPDATE of 0
                         raw_frame(0x1, 0x4, 2, b"\x82"),  # HEADERS on an even stream
                         raw_frame(0x0, 0x1, 99, b"data"),  # DATA on an idle stream
                         raw_frame(0x4, 0, 0, b"\x00\x05\xff\xff\xff\xff"),  # SETTINGS_MAX_FRAME_SIZE too big
                         raw_frame(0x6, 0, 0, b"12345678"),  # PING
                         raw_frame(0x3, 0, 1, b"\x00\x00\x00\x08"),  # RST_STREAM
                         raw_frame(0x7, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x00"),  # GOAWAY
                         b"\xff\xff\xff\x00\x00\x00\x00\x00\x01", noise(rng.randrange(1, 60)))
        return data

    cases = []
    for n in range(count):
        kind = rng.choice(["request"] * 6 + ["pipelined", "pipelined", "pieces", "pieces", "h2", "h2", "preface",
                                             "noise"])
        if kind == "request":
            chunks = [request()]
        elif kind == "pipelined":
            chunks = [b"".join(request() for _ in range(rng.randrange(2, 5)))]
        elif kind == "pieces":  # a request in small pieces, each a write of its own
            data = request()
            chunks = split(rng, data, rng.randrange(1, 6))
        elif kind == "h2":
            chunks = [h2_connection()]
        elif kind == "preface":  # what other protocols open with, and heads the router must wait on
            chunks = [pick(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + noise(40), b"SSH-2.0-OpenSSH_9.0\r\n",
                           b"\r\n\r\n\r\n", b"\x00" * 100, b"GET /v1/socket", b"GET /v1/sock", b"G",
                           b"GET /v1/socket " + b"x" * 17_000)]
        else:
            chunks = [noise(rng.randrange(1, 3000))]
        ending = rng.choice(["eof"] * 6 + ["wait"] * 3 + ["reset"])
        cases.append(Case(f"http-{n}-{kind}", chunks, ending, source=FUZZ_SOURCES[n % len(FUZZ_SOURCES)]))
    return cases


async def run_http_case(relay, traffic: GoodTraffic, case: Case) -> str | None:
    stream = await tcp_from(relay, case.source)
    try:
        with trio.fail_after(HTTP_BOUND):
            sent = await send_chunks(stream, case.chunks, traffic.log_id())
            if case.ending == "reset":
                reset(stream)
                return None
            if sent and case.ending == "eof":
                try:
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            answer = await closed_by_relay(stream)
    finally:
        await stream.aclose()
    for status in answer.split(b"HTTP/1.1 ")[1:]:
        if status.startswith(b"500"):  # an exception inside (501, h11's answer to a transfer coding, is fine)
            return f"answered {status[:60]!r}"
    return None


async def test_fuzz_http_side_of_the_running_relay(caplog):
    cases = http_cases(random.Random(f"http {FUZZ_SEED}"), 240)
    await fuzz_running_relay(caplog, run_http_case, cases, concurrency=30)


# ---------------------------------------------------------------------------- WebSocket side


def client_frame(rng: random.Random, opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                 masked: bool = True, length: int | None = None, form: str = "short") -> bytes:
    """A client frame, as RFC 6455 lays it out, or not: any opcode, reserved bits, unmasked, a
    length that is not the payload's or not in its shortest encoding."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    size = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if size < 126 and form == "short":
        head = bytes((first, mask_bit | size))
    elif size < 2**16 and form in ("short", "16"):
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + (size % 2**64).to_bytes(8, "big")
    if not masked:
        return head + payload
    key = rng.randbytes(4)
    return head + key + bytes(byte ^ key[n % 4] for n, byte in enumerate(payload))


def json_texts(rng: random.Random, depth: int = 0) -> str:
    """Random JSON text (or nearly), with what trips parsers: lone surrogates, huge numbers, depth."""
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(["null", "true", "false", "0", "-0", "1e999", "-1e999", "1" * 5000, "NaN", "Infinity", "1.5"])
    if kind in (1, 2):
        atoms = ["a", "\\ud800", "\\udfff", "\\ud83d\\ude00", "\\u0000", "\u00e9", "\\\"", "\\n", "\u2603", "\x1b",
                 "\\x"]
        return '"' + "".join(rng.choice(atoms) for _ in range(rng.randrange(0, 12))) + '"'
    if kind == 3:
        return rng.choice(['"github"', '"stripe"', '"two-outputs"', f'"{GITHUB_ID}"', '""', f'"{uuid.uuid4()}"',
                           '"00000000-0000-0000-0000-000000000000"', '"ffffffff-ffff-ffff-ffff-ffffffffffff"'])
    if kind == 4:
        return rng.choice(["[" * 3000 + "]" * 3000, '{"a":' * 2000 + "1" + "}" * 2000, "{", "[1,", '"unterminated'])
    if kind in (5, 6):
        return "[" + ",".join(json_texts(rng, depth + 1) for _ in range(rng.randrange(0, 4))) + "]"
    keys = ['"action"', '"key"', '"secret"', '"buckets"', '"since"']
    members = [(json_texts(rng, 3) if rng.random() < 0.2 else rng.choice(keys)) + ":" + json_texts(rng, depth + 1)
               for _ in range(rng.randrange(0, 4))]
    return "{" + ",".join(members) + "}"


def socket_payloads(rng: random.Random) -> bytes:
    action = rng.choice(['"auth"', '"subscribe"', '"pong"', '"dance"', json_texts(rng)])
    buckets = rng.choice(['["github"]', '["stripe","two-outputs"]', json_texts(rng)])
    frame = rng.choice([
        f'{{"action":{action},"key":{json_texts(rng)},"secret":{json_texts(rng)}}}',
        f'{{"action":"auth","key":"{KEY}","secret":"{SECRET}"}}',
        '{"action":"subscribe","buckets":' + buckets + ',"since":' + json_texts(rng) + "}",
        f'{{"action":"subscribe","since":"{uuid.UUID(int=rng.getrandbits(128))}"}}',
        '{"action":"pong"}', json_texts(rng), f'{{"action":{action}}}',
    ])
    encoded = frame.encode("utf-8", "surrogatepass")
    return rng.choice([encoded, encoded, encoded, encoded[:rng.randrange(len(encoded) + 1)],
                       b"\xff\xfe" + encoded, encoded + b"\xed\xa0\x80", encoded.replace(b"a", b"\xc3", 1),
                       rng.randbytes(rng.randrange(0, 200))])


def close_payloads(rng: random.Random) -> bytes:
    code = rng.choice([1000, 1001, 1002, 1005, 1006, 1015, 999, 0, 2999, 3000, 4999, 5000, 65535])
    reason = rng.choice([b"", b"bye", b"\xff\xfe", b"x" * 123, "\u2603".encode()[:2]])
    return rng.choice([code.to_bytes(2, "big") + reason, b"", b"\x03", code.to_bytes(2, "big") + b"x" * 200])


def socket_frames(rng: random.Random) -> list[bytes]:
    """A run of client frames, well-formed or not."""
    frames: list[bytes] = []
    for _ in range(rng.randrange(1, 7)):
        kind = rng.choice(["text"] * 5 + ["binary", "fragmented", "utf8-split", "control", "close",
                                          "reserved-opcode", "rsv", "unmasked", "lying-length", "huge-length",
                                          "non-minimal", "continuation", "long", "pongs", "noise"])
        if kind == "text":
            frames.append(client_frame(rng, 0x1, socket_payloads(rng)))
        elif kind == "binary":
            frames.append(client_frame(rng, 0x2, socket_payloads(rng)))
        elif kind == "fragmented":  # a text message in pieces, maybe with a control frame between, maybe broken
            data = socket_payloads(rng)
            cuts = sorted({rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 4))})
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for n, piece in enumerate(pieces):
                opcode = 0x1 if n == 0 else rng.choice([0x0] * 6 + [0x1, 0x2])
                frames.append(client_frame(rng, opcode, piece, fin=n == len(pieces) - 1 and rng.random() < 0.9))
                if rng.random() < 0.3:
                    frames.append(client_frame(rng, rng.choice([0x9, 0xA]), b"mid", fin=rng.random() < 0.8))
        elif kind == "utf8-split":  # a character split across fragments: valid, unless the tail is missing
            data = '{"action":"dance \u2603\U0001f600"}'.encode()
            at = data.index("\u2603".encode()) + rng.randrange(1, 3)
            frames.append(client_frame(rng, 0x1, data[:at], fin=False))
            frames.append(client_frame(rng, 0x0, data[at:] if rng.random() < 0.7 else b'"}'))
        elif kind == "control":
            frames.append(client_frame(rng, rng.choice([0x9, 0xA]), rng.randbytes(rng.choice([0, 5, 125, 126, 300])),
                                       fin=rng.random() < 0.8))
        elif kind == "close":
            frames.append(client_frame(rng, 0x8, close_payloads(rng)))
        elif kind == "reserved-opcode":
            frames.append(client_frame(rng, rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), socket_payloads(rng)))
        elif kind == "rsv":
            frames.append(client_frame(rng, rng.choice([0x1, 0x2, 0x9]), socket_payloads(rng), rsv=rng.randrange(1, 8)))
        elif kind == "unmasked":
            frames.append(client_frame(rng, rng.choice([0x1, 0x8, 0x9]), socket_payloads(rng), masked=False))
        elif kind == "lying-length":  # says more than it carries: the relay waits for the rest
            payload = socket_payloads(rng)
            frames.append(client_frame(rng, 0x1, payload, length=len(payload) + rng.choice([1, 100, 70_000])))
        elif kind == "huge-length":
            frames.append(client_frame(rng, rng.choice([0x1, 0x2, 0x0, 0x9]), b"x" * 10,
                                       length=rng.choice([2**20 + 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])))
        elif kind == "non-minimal":
            frames.append(client_frame(rng, 0x1, socket_payloads(rng), form=rng.choice(["16", "64"])))
        elif kind == "continuation":  # with no message to continue
            frames.append(client_frame(rng, 0x0, socket_payloads(rng)))
        elif kind == "long":  # 16- and 64-bit lengths, and past MAX_CLIENT_FRAME (1009)
            size = rng.choice([200, 70_000, relay_lite.MAX_CLIENT_FRAME + 10])
            frames.append(client_frame(rng, 0x1, b'{"action":"pong","pad":"' + b"p" * size + b'"}'))
        elif kind == "pongs":
            frames.extend(client_frame(rng, 0x1, b'{"action":"pong"}') for _ in range(100))
        else:
            frames.append(rng.randbytes(rng.randrange(1, 300)))
    return frames


def socket_cases(rng: random.Random, count: int) -> list[Case]:
    cases = []
    for n in range(count):
        frames = socket_frames(rng)
        if rng.random() < 0.15:  # cut the last frame short
            frames[-1] = frames[-1][:rng.randrange(1, max(len(frames[-1]), 2))]
        data = b"".join(frames)
        chunks = split(rng, data, rng.randrange(0, 4))  # in one write, or split anywhere
        ending = rng.choice(["eof"] * 4 + ["wait"] * 5 + ["reset"])
        cases.append(Case(f"socket-{n}", chunks, ending, auth=rng.random() < 0.5,
                          source=FUZZ_SOURCES[n % len(FUZZ_SOURCES)]))
    return cases


async def run_socket_case(relay, traffic: GoodTraffic, case: Case) -> str | None:
    stream = await tcp_from(relay, case.source)
    protocol = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    events: list = []
    after_close: list[bytes] = []  # bytes the relay sent after its close frame

    async def receive(until) -> bool:
        """Read, answering the relay's close frame, until `until(event)`; False at the end of the stream."""
        while True:
            for event in protocol.events():
                events.append(event)
                if isinstance(event, CloseConnection):
                    try:
                        await stream.send_all(protocol.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, wsproto.utilities.LocalProtocolError):
                        pass
                if until(event):
                    return True
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return False
            if protocol.state is wsproto.connection.ConnectionState.CLOSED:
                after_close.append(data)
            else:
                protocol.receive_data(data)

    def status_is(status):
        def matches(event) -> bool:
            try:
                return isinstance(event, TextMessage) and json.loads(event.data).get("status") == status
            except ValueError:  # a part of a long frame
                return False
        return matches

    async def exchange() -> str | None:
        await stream.send_all(protocol.send(Request(host=relay.host, target="/v1/socket")))
        if not await receive(lambda event: isinstance(event, AcceptConnection)):
            return "the handshake failed"
        if case.auth:
            auth = json.dumps({"action": "auth", "key": KEY, "secret": SECRET})
            await stream.send_all(protocol.send(TextMessage(auth)))
            if not await receive(status_is("authenticated")):
                return "closed before authenticating"
            await stream.send_all(protocol.send(TextMessage('{"action":"subscribe","buckets":["github"]}')))
            if not await receive(status_is("subscribed")):
                return "closed before subscribing"
        if not await send_chunks(stream, case.chunks, traffic.log_id()):
            await receive(lambda event: False)  # the relay closed first: read what it said
            return None
        if case.ending == "reset":
            reset(stream)
            return None
        if case.ending == "wait" and not case.auth:
            # the relay must end it by auth_timeout, unless the fuzz frames themselves authenticated
            if not await receive(status_is("authenticated")):
                return None
        elif case.ending == "wait":  # an authenticated socket may stay open: give the relay a moment
            with trio.move_on_after(1):
                if not await receive(lambda event: False):
                    return None
        try:
            await stream.send_eof()  # then the relay must end it at once
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await receive(lambda event: False)
        return None

    try:
        with trio.fail_after(SOCKET_BOUND):
            problem = await exchange()
    finally:
        await stream.aclose()
    if problem:
        return problem
    closes = [n for n, event in enumerate(events) if isinstance(event, CloseConnection)]
    data_after = [event for event in events[closes[0]:] if isinstance(event, wsproto.events.Message)] if closes else []
    if after_close or data_after:  # RFC 6455, section 5.5.1: no data frame after a close frame
        return f"sent data after its close frame {events[closes[0]]}: {data_after[:1]} {b''.join(after_close)[:200]!r}"
    if closes and events[closes[0]].code == 1011:  # an internal error
        return f"closed with {events[closes[0]]}"
    return None


async def test_fuzz_socket_side_of_the_running_relay(caplog):
    cases = socket_cases(random.Random(f"socket {FUZZ_SEED}"), 240)
    await fuzz_running_relay(caplog, run_socket_case, cases, concurrency=40)


# ============================================================================ found on the way


async def test_an_absolute_form_request_reaches_its_input():
    """RFC 9112, section 3.2.2: a server MUST accept the absolute-form of a request target (what a
    client sends through a forward proxy). The relay routed it by path, then cut the input id
    out of the raw target, "http://host/v1/webhooks/<id>", and answered 404."""
    async with relay_lite.open_relay(relay_config()) as relay, subscriber(relay, ["github"]) as client:
        stream = await tcp_from(relay)
        await stream.send_all(b"POST http://%s:%d/v1/webhooks/%s HTTP/1.1\r\nHost: %s\r\nContent-Length: 8\r\n"
                              b"Connection: close\r\n\r\nabsolute" % (relay.host.encode(), relay.port,
                                                                       GITHUB_INPUT.encode(), relay.host.encode()))
        answer = await closed_by_relay(stream, timeout=10)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert (await client.webhook())["body"] == "absolute"


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each whole server frame in `data`."""
    frames = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + length:
            break
        frames.append((data[0] & 0x0F, data[at:at + length]))
        data = data[at + length:]
    return frames


@pytest.mark.parametrize("frames", [
    pytest.param([(0x2, b"binary"), (0x4, b"a reserved opcode")], id="error-status-then-1002"),
    pytest.param([(0x1, b'{"action":"dance"}'), (0x1, b"\xff")], id="error-status-then-1007"),
])
async def test_no_data_frame_follows_the_relays_close_frame(frames):
    """RFC 6455, section 5.5.1: after sending a close frame, an endpoint MUST NOT send data
    frames. Found by the socket fuzzer: a frame the relay answers (a status "error" here, a
    webhook elsewhere) followed by one it fails the connection for, in one write, and the
    relay's answer went out after its close frame."""
    async with relay_lite.open_relay(relay_config()) as relay:
        for _ in range(5):
            stream = await tcp_from(relay)
            protocol = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(protocol.send(Request(host=relay.host, target="/v1/socket")))
            head = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
            rng = random.Random(0)
            await stream.send_all(b"".join(client_frame(rng, opcode, payload) for opcode, payload in frames))
            sent = server_frames(head.partition(b"\r\n\r\n")[2] + await closed_by_relay(stream, timeout=10))
            await stream.aclose()
            opcodes = [opcode for opcode, _ in sent]
            assert 0x8 in opcodes, sent
            assert opcodes.index(0x8) == len(opcodes) - 1, f"frames after the close frame: {sent}"
