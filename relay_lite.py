"""relay_lite: a self-hosted webhook relay that speaks the Webhook Relay socket protocol.

Webhook senders (GitHub, Stripe, Slack, CI) call a public input URL,
``http://HOST:PORT/v1/webhooks/<input id>``. Code behind NAT connects to
``ws://HOST:PORT/v1/socket`` on the same port, authenticates with a token's key and secret,
subscribes to buckets and receives every webhook live, as JSON frames in the hosted service's
schema, so the hosted service's existing clients work with nothing changed but the URL. A
bucket's smee channel, ``http://HOST:PORT/smee/<name>``, serves smee-client and gosmee's
client the same way, as smee.io's and gosmee's servers do.

Nothing is lost: every webhook is logged per bucket (optionally in SQLite, before its sender
gets a 2xx), a client that was away subscribes with ``"since": <the last meta.id it processed>``
and gets the rest in order, and the logs API (``/v1/logs``) shows the log and takes clients'
answers, which inputs with ``response_from_output`` hand back to the webhook's sender.

Run it::

    python relay_lite.py                        # demo: a bucket, an input and a token, printed
    python relay_lite.py init relay.toml        # write a config with fresh ids and a token
    python relay_lite.py --config relay.toml    # serve it until SIGINT or SIGTERM

Embed it (tests, programs)::

    async with relay_lite.open_relay("relay.toml", port=0) as relay:
        print(relay.socket_url, relay.input_url("github"))

or, in a nursery, ``relay = await nursery.start(relay_lite.serve_relay, config)``.

The module, top to bottom; each layer calls only those above it (a layer called back from
below declares what it is called as, as a typing.Protocol: _Subscriber, _Backend, _Owner;
tests/test_structure.py holds the module to it):

    1. Constants, errors and helpers    every layer's vocabulary
    2. Configuration                    the TOML file, parsed and checked: pure; _preflight
                                        asks what the machine must provide
    3. The model and the protocol       webhooks, log entries, answers, frames, wires (the
                                        socket's, smee's, gosmee's), queries, cursors, client
                                        addresses, signatures: sans-IO
    4. State                            the store, the log, the backends that keep it
    5. Services                         the throttle, metrics, connections' bounds,
                                        credentials, the core, ingest: all through _Services
    6. Library glue                     trio-websocket's and Hypercorn's internals, checked
    7. Adapters                         what a subscriber is sent: the socket session, the
                                        smee stream; the HTTP routes, deliveries
    8. Transport                        the one port, Relay (which wires, serves, stops and
                                        reloads), open_relay, serve_relay
    9. The agent                        `relay_lite.py forward`
    10. The pytest plugin and the command line
    Appendix                            the web inspector's page, script and style
"""

import argparse
import base64
import bisect
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import fractions
import functools
import gc
import getpass
import hashlib
import heapq
import hmac
import http.cookiejar
import importlib.metadata
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import reprlib
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import ssl
import sys
import threading
import time
import tomllib
import traceback
import types
import typing
import urllib.parse
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# The libraries whose internals relay_lite (or quart-trio) drives, and the minor versions tested,
# as pyproject.toml pins them (with the reasons). Checked before they are imported, so that an
# unsupported one fails with one line naming it, not a traceback from inside another library.
_DEPENDENCIES: dict[str, tuple[str, str]] = {  # name: (lowest supported, first unsupported)
    "trio-websocket": ("0.12", "0.13"),
    "wsproto": ("1.2", "2"),  # _WebSocket relies on how it reports a frame it cannot parse
    "hypercorn": ("0.18", "0.19"),
    "quart": ("0.22", "0.23") if sys.version_info < (3, 13) else ("0.23", "0.24"),
    "quart-trio": ("0.12", "0.13") if sys.version_info < (3, 13) else ("0.13", "0.14"),
}


def _unsupported_dependency() -> str | None:
    """What makes the installed libraries unusable, in one line, or None."""
    python = "Python {}.{}".format(*sys.version_info)
    for name, (low, high) in _DEPENDENCIES.items():
        wanted = f"{name}>={low},<{high}"
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return f"relay_lite needs {wanted} on {python}, and {name} is not installed: pip install '{wanted}'"
        if not _release(low) <= _release(found) < _release(high):
            return f"relay_lite supports {wanted} on {python}, not {name} {found}: pip install '{wanted}'"
    return None


def _release(version: str) -> tuple[int, ...]:
    """The release numbers a version starts with: "0.13.0rc1" -> (0, 13, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


if (_problem := _unsupported_dependency()) is not None:
    if __name__ == "__main__":
        sys.exit(f"relay_lite: error: {_problem}")
    raise ImportError(_problem)

import h11
import httpx  # noqa: E402 (after the version check above)
import trio
import trio_websocket
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as _HypercornConfig
from hypercorn.trio.lifespan import Lifespan as _Lifespan
from hypercorn.trio.tcp_server import TCPServer as _TCPServer
from hypercorn.trio.worker_context import WorkerContext as _WorkerContext
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

try:  # Quart 0.23 raises it when a client left before its answer, and quart-trio 0.13 lets it out
    from quart.wrappers.base import ClientDisconnectedError as _ClientLeft  # type: ignore[attr-defined]
except ImportError:  # Quart 0.22 (Python 3.11 and 3.12) has none
    class _ClientLeft(Exception):  # type: ignore[no-redef]
        pass
from wsproto.connection import ConnectionState as _WSState
from wsproto import WSConnection as _WSConnection
from wsproto.connection import ConnectionType as _WSConnectionType
from wsproto.events import BytesMessage as _BytesMessage
from wsproto.utilities import ProtocolError as _WSProtocolError
from wsproto.events import CloseConnection as _CloseConnection
from wsproto.events import TextMessage as _TextMessage
from wsproto.utilities import LocalProtocolError

__all__ = [  # the public API, as the README's Embedding section names it
    # serving
    "Relay", "serve_relay", "open_relay", "main",
    # configuration
    "load_config", "Config", "ServerConfig", "StorageConfig", "ClusterConfig", "MetricsConfig", "InspectorConfig",
    "BucketConfig", "InputConfig", "OutputConfig", "VerifyConfig", "TokenConfig",
    # errors
    "RelayError", "ConfigError", "StorageError", "ProtocolError", "NotFound", "Forbidden", "Conflict",
    "Unauthorized", "TooManyFailures", "HashingBusy", "AgentError",
    # the protocol, sans-IO
    "Webhook", "parse_client_frame", "parse_server_frame", "status_frame", "wire_frame", "query_parameters",
    "parse_time", "parse_go_duration", "encode_cursor", "decode_cursor", "client_address", "check_signature",
    "verified",
    # the agent
    "AgentConfig", "forward",
    # the pytest plugin's fixtures
    "RelayFixture", "TrioRelayFixture",
]
__version__ = "0.1.0"

logger = logging.getLogger("relay_lite")


# ==== 1. Constants, errors and helpers ========================================================
#
# What a reader meets everywhere: defaults (the config's and the protocol's), limits with the
# figures that chose them, the errors (each knows its HTTP status), and the helpers for the log
# and the clock. Constants used by one function alone sit just above it instead.

# ---- constants and defaults ------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PING_INTERVAL = 30.0  # seconds; the old SDK gives up after 90 s of silence, the Go agent after 53 s
DEFAULT_AUTH_TIMEOUT = 10.0  # seconds a new socket may take to authenticate
DEFAULT_MAX_BODY_SIZE = 10 * 2**20  # 10 MiB; larger webhooks get 413
DEFAULT_BODY_BYTES_IN_FLIGHT = 64 * 2**20  # 64 MiB of request bodies being received at once, at least
DEFAULT_SEND_QUEUE_SIZE = 1000  # frames a socket may leave unread before it is cut off
DEFAULT_SEND_QUEUE_BYTES = 64 * 2**20  # 64 MiB of frames, likewise (one frame always fits)
DEFAULT_SHUTDOWN_TIMEOUT = 5.0  # seconds in-flight requests get to finish on shutdown
DEFAULT_INPUT_NAME = "Default public endpoint"
DEFAULT_HISTORY_SIZE = 1000  # log entries a bucket keeps for resume and the logs API
DEFAULT_HISTORY_TTL = 86400.0  # seconds a bucket keeps a log entry (a day)
DEFAULT_HISTORY_BYTES = 64 * 2**20  # 64 MiB of memory a bucket's log may hold, about
DEFAULT_RESPONSE_TIMEOUT = 10.0  # seconds an answer to a webhook is accepted (and a held sender waits)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds a request's head and body may take to arrive, together
DEFAULT_IDLE_TIMEOUT = 5.0  # seconds a kept-alive HTTP connection may wait for its next request
DEFAULT_SEND_TIMEOUT = 30.0  # seconds a socket may leave the relay's writes unread before it is cut off
DEFAULT_MAX_HEADER_BYTES = 16 * 2**10  # a request's head (line and headers); larger ones get 431
DEFAULT_MAX_HEADERS = 100  # headers a request may carry; more get 431
DEFAULT_AUTH_FAILURES_PER_MINUTE = 10  # failed authentications an address may make (a burst, then a
# steady rate); past them, its attempts are refused unchecked
MIN_SECRET_LENGTH = 16
_SCRYPT_N = 2**14  # hash-secret's scrypt cost: 16 MiB and 40 ms a check here, about 0.4 s on a Raspberry Pi 3
_SESSION_PREFIX = "relay_lite-session."  # what an inspector's session looks like (see _Credentials)
_SESSION_SECONDS = 15 * 60  # an inspector's session lasts this long unless the page renews it...
_SESSION_MOST = 12 * 3600  # ...and this long from its sign-in at most
_SESSION_TIME = re.compile(r"[1-9][0-9]{0,11}")  # a time in a session, as issue() writes it
ANY_OUTPUT = "anyOutput"  # response_from_output: the first answer from any output
DEFAULT_DELIVERY_TIMEOUT = 30.0  # seconds a delivery attempt may take, the destination's answer read
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds it may take to connect
DEFAULT_RETRIES = 5  # attempts after the first: backoff from 1 s, doubling to 60 s at most, with jitter

WEBHOOK_PREFIX = "/v1/webhooks/"
SOCKET_PATH = "/v1/socket"
LOGS_PATH = "/v1/logs"
EVENTS_PATH = "/v1/events"
BUCKETS_PATH = "/v1/buckets"
HEALTH_PATH, READY_PATH, METRICS_PATH = "/healthz", "/readyz", "/metrics"
NIL_LOG_ID = "00000000-0000-0000-0000-000000000000"  # a resume point before every webhook
WEBHOOK_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# A bucket's smee channel (smee_channel): webhooks in at SMEE_PREFIX + name, and out to smee-client
# (a GET of the same URL that accepts text/event-stream) and to gosmee's client (SMEE_EVENTS_PREFIX)
SMEE_PREFIX = "/smee/"
SMEE_EVENTS_PREFIX = SMEE_PREFIX + "events/"
SMEE_VERSION_PATHS = ("/version", SMEE_PREFIX + "version")  # gosmee's client asks its server's root
SMEE_INPUT_NAME = "smee"  # the input a channel's webhooks are logged as coming from, without smee_input

MAX_CLIENT_FRAME = 2**20  # 1 MiB of memory a client message may hold; more closes the socket with 1009
MAX_FRAME_BEFORE_AUTH = 64 * 2**10  # the same before it authenticates (an auth frame needs under 1 KiB)
MAX_AUTH_ATTEMPTS = 3  # failed auth frames before the socket is closed
MAX_FRAMES_BEFORE_AUTH = 20  # client frames a socket may send before it authenticates
API_KEY_USER = "whr"  # the new SDK authenticates with this key and an API key as the secret

# A log entry's status; the JS SDK numbers them in this order (0 preparing ... 5 rejected)
LOG_STATUSES = ("preparing", "sent", "failed", "stalled", "received", "rejected")

CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_POLICY = 1008  # not authenticated, too slow
_CLOSE_TRY_AGAIN = 1013  # the relay is full

_CLOSE_TIMEOUT = 5.0  # seconds a closing handshake (or the frame on the wire before it) may take
_CLOSE_AT_ONCE = 0.5  # seconds a close frame may take to go out when its handshake is not waited for
_RECEIVE_SIZE = 2**16
_READ_SIZE = 16 * 2**10  # an HTTP connection's reads, at most, while the bodies in flight crowd: see _ConnectionStream
_CONNECTION = "relay_lite.connection"  # in a request's ASGI scope: its _Connection
_BODY = "relay_lite.body"  # in a request's ASGI scope: its body, read whole (see _request_body)
_CLIENT = "relay_lite.client"  # in a request's ASGI scope: the address it came from (see _request_client)
_HTTP2_PREFACE = b"PRI * HTTP/2.0"
_LINGER = 2.0  # seconds a connection the relay closed may still read (and drop) what its peer sends,
# so an answer sent before the request was read is not lost to a reset (Apache's lingering close)
_LINGER_BYTES = 2 * 2**20  # and bytes (a socket's largest message, twice): a peer sending on at full speed
# was read for all of _LINGER, and strangers refused (a body with no room) came back to do it again
_GRACE = 1.0  # seconds past a deadline that Quart's 408 and Hypercorn's keep-alive timer get first
_ACCEPT_RETRY = 0.1  # seconds between tries to accept while out of file descriptors
_ACCEPT_CAPACITY_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_WRITE_BATCH_FRAMES = 256  # queued frames one socket write may carry
_WRITE_BATCH_BYTES = 2**20  # 1 MiB: a larger frame goes alone
_JOIN_BELOW = 64 * 2**10  # frames smaller than this are joined into one write; larger ones are not copied
_WRITE_STEP = 64 * 2**10  # a write goes out this much at a time: a client must take this much per send_timeout
_SOCKET_SEND_BUFFER = 256 * 2**10  # kernel send buffer of a WebSocket connection; see _serve_socket
_PING_SLOTS = 30  # pings go out in 30 ticks per ping_interval (1 s ticks at the default 30 s)
_GC_THRESHOLD = 10_000  # allocations between young collections in the CLI; Python's default is 700
# What a log entry counts against history_bytes: these plus the size of every string it holds.
# Measured with tracemalloc: a header value held about 170 bytes more than its text.
_ENTRY_OVERHEAD = 512  # the entry, its webhook and answer objects
_HEADER_OVERHEAD = 120  # a header's name and its list of values
_VALUE_OVERHEAD = 60  # each value
_BODY_ROOM_WAIT = 1.0  # seconds a request body's chunk may wait for room among the bodies in flight...
_BODY_WAITERS = 256  # ...and requests that may wait at once (each holds what the HTTP server read ahead for it)
_BODY_RETRY_AFTER = 5  # seconds a request refused for want of room is told to wait (Retry-After)
_SWEEP_INTERVAL = 1.0  # seconds between checks for log entries past history_ttl and stalled writes
_LOGS_LIMIT = 100  # GET /v1/logs entries per page by default
_LOGS_MAX_LIMIT = 1000
_EVENTS_LIMIT = 100  # GET /v1/events entries per call, by default and at most (the hosted API's)
_EVENTS_MAX_AGE = "24h"  # how far back a pull queue's first call looks, by default (the hosted API's)
_FRAME_CACHE_BYTES = 16 * 2**20  # wire frames of recent entries kept for resumes to share
_HASHES_WAITING = 8  # secret-hash checks that may wait for the one running; past that, attempts are refused
_FRESH_ATTEMPTS, _FRESH_WINDOW = 3, 60.0  # an address's first attempts in this many seconds go first
_LOGS_PAGE_BYTES = 8 * 2**20  # about the most a GET /v1/logs page holds; it stops short of `limit` past it
_DELIVERY_BODY_KEPT = 2**20  # bytes of a destination's answer kept (for the log, and a held sender)
_ANSWER_BODY_MOST = _DELIVERY_BODY_KEPT  # and of a client's answer (PUT /v1/logs/<id>): the rest is dropped
_FORWARD_BATCH = 64  # log entries a forwarder takes up at a time
_REJECTED_KEPT = 50  # webhooks refused by a signature check each bucket keeps for the logs API...
_REJECTED_BODY_KEPT = 16 * 2**10  # ...with this much of each body
_NONCES_KEPT = 10_000  # signatures (with timestamps) each input remembers, to refuse replays
_BACKOFF_FIRST, _BACKOFF_MOST = 1.0, 60.0  # seconds before the first retry, and before any
_RETRY_AFTER_MOST = 600.0  # seconds of a destination's Retry-After honoured at most
_RECONNECT_FIRST, _RECONNECT_MOST = 1.0, 30.0  # seconds the agent waits to reconnect, at first and at most
_AGENT_CONNECT_TIMEOUT = 10.0  # seconds the agent's socket may take to connect, authenticate and subscribe
_AGENT_MAX_FRAME = 2**27  # 128 MiB: the largest frame the agent takes (a relay's max_body_size, as JSON)
_AGENT_QUEUE_BYTES = 32 * 2**20  # webhooks the agent holds for the app; past this it pauses the socket
_AGENT_STOP_GRACE = 10.0  # seconds a delivery in flight, and the reports, get to finish when the agent stops
_AGENT_REPORTERS = 4  # PUT /v1/logs/<id> requests the agent has in flight at most...
_AGENT_REPORTS_QUEUED = 64  # ...and outcomes waiting for one
_AGENT_REPORT_TIMEOUT = 10.0  # seconds a report may take
_MOST_CONCURRENCY = 64  # deliveries an output, or the agent, may have in flight
_TRACKED_ADDRESSES = 10_000  # addresses whose failed authentications are remembered, the latest
# headers of an answer that describe its connection, not its content, and Date: Hypercorn writes its own
_SERVERS_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                              "upgrade", "proxy-connection", "date"})

# Ids a config leaves out are derived from names under this namespace, so they stay the same
# across restarts. `python relay_lite.py init` writes random ones instead.
_ID_NAMESPACE = uuid.UUID("33eac5c9-178f-4eaa-8b1a-dbfae32f7081")

AUTHENTICATED_MESSAGE = "connected successfully, subscribe to buckets"

INSPECTOR_PATH = "/inspector/"
INSPECTOR_SESSION_PATH = INSPECTOR_PATH + "session"

SIGNATURE_SCHEMES = ("github", "stripe", "slack", "shopify", "standard-webhooks", "hmac", "basic", "bearer", "token")
_BODILESS_STATUSES = (204, 304)

LOGS_PARAMETERS = frozenset({"bucket", "status", "from", "to", "limit", "offset", "cursor"})
EVENTS_PARAMETERS = frozenset({"bucket", "output", "limit", "max_age", "cursor"})

# Every answer of the relay's but the inspector's files is served as content from nowhere: a
# sandbox (no script runs, its origin is no origin), nothing loaded, no type guessed. Answers to
# webhooks carry what a sender's input or a client gave (a text/html answer set with PUT
# /v1/logs/<id>, an app echoing a request): on the inspector's origin it could read the
# inspector's session and call the API as its user.
_SANDBOXED = (("Content-Security-Policy", "sandbox; default-src 'none'"), ("X-Content-Type-Options", "nosniff"))
_OWN_ANSWER_HEADERS = tuple((name.lower().encode(), value.encode()) for name, value in _SANDBOXED)

_WORKER = "RELAY_LITE_WORKER"  # in a worker's environment: its number

_FIXTURE_TIMEOUT = 10.0  # seconds a fixture relay may take to start or stop, and a helper to get a frame
_HISTORY_KEYS = ("history_size", "history_ttl", "history_bytes")


# ---- errors ----------------------------------------------------------------------------------


class RelayError(Exception):
    """What relay_lite raises on purpose; its message is for the user, in one line.

    `status` is the HTTP status a request that meets it is answered with (the message as its
    body, JSON on the REST API), and `close_code` what a socket that meets it is closed with;
    None: the socket stays open, and is told in a status "error" frame.
    """

    status = 500
    close_code: int | None = 1011
    headers: Mapping[str, str] = {}  # for the HTTP answer


class ConfigError(RelayError):
    """A configuration that cannot be served; the message names the file, the key and the fault."""


class ProtocolError(RelayError):
    """A request or a client frame that cannot be acted on."""

    status = 400
    close_code = None


class NotFound(ProtocolError):
    """What a request names (a bucket, a log entry, an output) is not there, or not for this token."""

    status = 404


class Forbidden(ProtocolError):
    """What a request names is there, but not for this token."""

    status = 403


class Conflict(ProtocolError):
    """What a request asks cannot be done to the thing as it is now (a second answer)."""

    status = 409


class Unauthorized(RelayError):
    """No key and secret, or wrong ones."""

    status = 401
    close_code = CLOSE_POLICY

    def __init__(self, message: str, challenge: str = 'Basic realm="relay_lite"') -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": challenge}


class TooManyFailures(RelayError):
    """An address may not try to authenticate now: it failed too often. `wait`: seconds before it may."""

    status = 429
    close_code = CLOSE_POLICY

    def __init__(self, message: str, wait: float) -> None:
        super().__init__(message)
        self.wait = wait
        self.headers = {"Retry-After": str(math.ceil(wait))}


class HashingBusy(TooManyFailures):
    """No attempt may be checked now: too many wait for the secret hashes' one thread."""

    status = 503
    close_code = _CLOSE_TRY_AGAIN


class StorageError(RelayError):
    """The webhook log's store cannot be opened or written."""

    status = 503


class _Replayed(RelayError):
    """A signed webhook that was accepted before (see _Nonce): its sender gets the input's own
    answer, as the first time, and nothing is relayed."""


class AgentError(RelayError):
    """The forward agent cannot go on: the relay refused its key or a bucket, or its state file is
    not its own. The message says which, in one line."""


# ---- helpers ---------------------------------------------------------------------------------
#
# Whatever a client controls reaches the log only through _shown, and what a stranger can make
# the relay say over and over only through _Throttle (see Services): an SD card must not fill
# with log. Wall time comes from _wall_time; durations and deadlines from trio.current_time().
# Addresses and networks are parsed here too (_ip, _network): the config checks them, and the
# model reads requests' with them.


def _wall_time() -> float:
    """Unix seconds, for every time the relay keeps or compares (when a webhook came, when a
    session expires); log ids take their milliseconds from time_ns (_LogIds), and the agent's
    checkpoint is stamped by datetime. Durations and deadlines come from trio.current_time(),
    which Trio's autojump clock drives in tests."""
    return time.time()


def _shown(text: str, limit: int = 80) -> str:
    """User-controlled `text` fit for a log line or a message: at most `limit` characters of it,
    anything unprintable escaped (a terminal's escape sequences, newlines, lone surrogates)."""
    shown = repr(text[:limit])[1:-1]
    return shown + f"... ({len(text) - limit} more)" if len(text) > limit else shown


def _sole(error: BaseException) -> BaseException:
    """`error`, or the one error a group of them holds (nested as deep as the nurseries it
    crossed): what a caller can catch by its type. A group of several stays a group."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _innermost(error: BaseException) -> BaseException:
    """The first error inside `error`, a group of them (nested as deep as the nurseries it crossed)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.removeprefix("[").removesuffix("]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _network(text: str) -> "_IPNetwork | None":
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(_utf8(secret)).digest()


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, lone surrogates too (JSON's "\\ud800" makes one): they never match a secret."""
    return text.encode("utf-8", "surrogatepass")


# ==== 2. Configuration ========================================================================
#
# The TOML file maps one to one onto these frozen dataclasses: a table per class, a key per field.
# `_build` walks the type hints, so a new key is a new field, with its type and default. _load
# parses and checks, the config alone; what must also hold on this machine (the TLS files, the
# open-file limit, the optional extras) is _preflight's, asked once by a start, a reload and
# load_config; the command line's start and `check` also try the log's database (_check_storage).


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The `[server]` table."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    ping_interval: float = DEFAULT_PING_INTERVAL
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    max_body_bytes_in_flight: int | None = None  # None: 64 MiB, or 4 x max_body_size if more (see _Inflows)
    send_queue_size: int = DEFAULT_SEND_QUEUE_SIZE
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    public_url: str = ""
    history_size: int = DEFAULT_HISTORY_SIZE  # defaults for every bucket's log; see BucketConfig
    history_ttl: float = DEFAULT_HISTORY_TTL
    history_bytes: int = DEFAULT_HISTORY_BYTES
    # Bounds on what one client can make the relay hold (README, "Security")
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_connections: int | None = None  # None: the open-file limit less 64, 20,000 at most
    max_pending_per_ip: int | None = None  # None: an eighth of max_connections, 256 at most
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    auth_failures_per_minute: int = DEFAULT_AUTH_FAILURES_PER_MINUTE
    # TLS on the one port (https and wss): a PEM certificate chain and its key
    certfile: str = ""
    keyfile: str = ""
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the real client
    trusted_proxies: tuple[str, ...] = ()
    # Let other processes listen on the same port (SO_REUSEPORT; Linux spreads connections among
    # them): several relays of one cluster on one machine, as --workers runs them
    reuse_port: bool = False
    inspector: bool = True  # the older spelling of [inspector] enabled: false turns the inspector off too


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """The `[storage]` table: with a `path`, the webhook log is kept in that SQLite file."""

    path: str = ""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """The `[cluster]` table: with a `redis_url`, relays sharing that Redis share their buckets'
    logs (see the Redis backend). Needs the extra `redis` (_install)."""

    redis_url: str = ""
    prefix: str = "relay_lite"  # of every Redis key it uses


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """The `[metrics]` table: GET /metrics, in the Prometheus text format, when enabled (it needs
    the extra `metrics`, _install); with a `token`, only for `Authorization: Bearer <token>`."""

    enabled: bool = False
    token: str = ""


@dataclasses.dataclass(frozen=True)
class InspectorConfig:
    """The `[inspector]` table: the web inspector at / (see "the web inspector")."""

    enabled: bool = True
    # Serve it only to requests for this host name (a name of its own, pointing at the relay, is
    # an origin of its own), and on that host nothing else a stranger controls: no webhooks.
    host: str = ""


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """A `[[tokens]]` entry: a key and secret, optionally limited to some buckets (names or ids).

    The secret may be given as `secret_hash` instead (`python relay_lite.py hash-secret`), so the
    config file does not hold it.
    """

    key: str
    secret: str = ""
    secret_hash: str = ""  # scrypt:N:r:p$salt$hex, as werkzeug.security writes it
    buckets: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """An input's `verify` table: how its sender proves that a webhook is its own (see
    check_signature). Any one of `secrets` may match, so a secret can be rotated without a gap."""

    scheme: str  # one of SIGNATURE_SCHEMES
    secrets: tuple[str, ...] = ()  # "user:password" for basic, the token for bearer
    tolerance: float = 300.0  # seconds a signed timestamp may be off (stripe, slack, standard-webhooks)
    header: str = ""  # hmac: the header that carries the signature...
    algorithm: str = "sha256"  # ...made with sha1, sha256 or sha512...
    encoding: str = "hex"  # ...written as hex or base64...
    prefix: str = ""  # ...after this text ("sha256=", say)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """A `[[buckets.inputs]]` entry: a public URL, `/v1/webhooks/<id>`, and how it answers senders.

    Senders get `status_code`, `body` and `headers`. With `response_from_output` (an output's name,
    or "anyOutput"), the sender waits up to `response_timeout` for a socket client to answer
    through `PUT /v1/logs/<id>` and gets that answer; the static one is the fallback.
    """

    id: str = ""
    name: str = DEFAULT_INPUT_NAME
    status_code: int = 200
    body: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    response_from_output: str = ""
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    verify: VerifyConfig | None = None  # a signature check; a webhook that fails it gets 401


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """A `[[buckets.outputs]]` entry. Sockets get a frame for each internal, enabled output, and
    an agent (`relay_lite.py forward`) delivers it; the relay delivers to each public one itself.
    """

    name: str
    destination: str = ""
    internal: bool = True
    lock_path: bool = False  # do not append the request's extra path to the destination
    disabled: bool = False
    headers: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)  # replace the request's
    # How the relay delivers to a public output (see "delivery"):
    timeout: float = DEFAULT_DELIVERY_TIMEOUT  # seconds an attempt may take, its answer read
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retries: int = DEFAULT_RETRIES  # attempts after the first, for failures worth another
    concurrency: int = 1  # requests in flight at once; with one, webhooks arrive in order


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """A `[[buckets]]` entry."""

    name: str
    id: str = ""
    inputs: tuple[InputConfig, ...] = ()
    outputs: tuple[OutputConfig, ...] = ()
    history_size: int | None = None  # None: the [server] value
    history_ttl: float | None = None
    history_bytes: int | None = None
    # A smee channel: /smee/<smee_channel> takes webhooks as an input does, and streams the
    # bucket's webhooks to smee-client and gosmee's client. The name is the only credential, as a
    # smee.io URL's is: as hard to guess as a secret. Its webhooks are an input's, by smee_input's
    # name (its verify, its answer); without one they answer 200, as smee.io does.
    smee_channel: str = ""
    smee_input: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole relay configuration, checked: ids filled in, names unique, token scopes known."""

    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    metrics: MetricsConfig = MetricsConfig()
    inspector: InspectorConfig = InspectorConfig()
    tokens: tuple[TokenConfig, ...] = ()
    buckets: tuple[BucketConfig, ...] = ()


def load_config(source: "Config | Mapping[str, Any] | str | Path") -> Config:
    """Return a checked Config from a TOML file path, a dict shaped like the TOML, or a Config,
    as this machine would serve it (see _preflight: its defaults filled in from the machine).

    Raises ConfigError with a message naming the file, the key and what is wrong.
    """
    return _prepare(source)[0]


def _load(source: "Config | Mapping[str, Any] | str | Path", **server: Any) -> Config:
    """load_config(source) with `server`'s [server] keys in place of its own (--host and --port,
    serve_relay's host and port, a fixture's loopback): checked once, as it will be served, so
    a rule that depends on the address (weak secrets, metrics without a token) sees the real one."""
    def served(config: Config) -> Config:
        return _checked(dataclasses.replace(config, server=dataclasses.replace(config.server, **server)))

    if isinstance(source, Config):
        return served(source)
    if isinstance(source, Mapping):
        return served(_build(Config, source, ""))
    path = Path(source)
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, bad UTF-8, a 5,000-digit number, [[[[...
        raise ConfigError(f"{path}: not valid TOML: {_shown(str(error), 200)}") from None
    try:
        return served(_files_beside(_build(Config, raw, ""), path.absolute().parent))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _files_beside(config: Config, folder: Path) -> Config:
    """`config` with its relative file paths (TLS files, the log's database) made relative to
    `folder`, its file's: a service manager starts the relay in /, not where its config is."""
    def beside(name: str) -> str:
        return str(folder / name) if name and not os.path.isabs(name) else name

    database = config.storage.path
    if database and not os.path.isabs(database) and Path(database).exists() and not (folder / database).exists() \
            and Path(database).resolve() != (folder / database).resolve():  # where a relay before this one kept it
        logger.warning("storage.path %r is now beside the config file, %s, which holds no database yet; the one in "
                       "the working folder, %s, is not used: move it there, or give an absolute path", database,
                       folder / database, Path(database).absolute())
    server = dataclasses.replace(config.server, certfile=beside(config.server.certfile),
                                 keyfile=beside(config.server.keyfile))
    return dataclasses.replace(config, server=server,
                               storage=dataclasses.replace(config.storage, path=beside(config.storage.path)))


def _build(cls: type, raw: object, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'the file'}: expected a table, got {_describe(raw)}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{where or 'the file'}: keys must be strings, got {_describe(key)}")
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{_key_path(where, key)}: unknown key (known keys: {known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _key_path(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_key_path(where, name)}: missing (it is required)")
    return cls(**values)


def _coerce(hint: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so X
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if origin is dict:
        value_hint = typing.get_args(hint)[1]
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {_describe(value)}")
        return {_coerce(str, key, f"{where} (a key)"): _coerce(value_hint, item, _key_path(where, str(key)))
                for key, item in value.items()}
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {_describe(value)}")
        return tuple(_coerce(item_hint, item, f"{where}[{index}]") for index, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, where)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise ConfigError(f"{where}: {_describe(value)} is out of range (TOML integers are 64-bit)")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[hint]
        raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")
    if isinstance(value, str) and not _is_unicode(value):
        raise ConfigError(f"{where}: not valid Unicode (a lone surrogate), got {_describe(value)}")
    return value


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_REPR = reprlib.Repr()  # what _describe shows of a value: a little of it, however large or deep
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60


def _describe(value: object) -> str:
    kind = {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)
    if kind == "a table":
        return kind
    if isinstance(value, int) and abs(value) >= 10**40:  # its repr might be refused (over 4,300 digits)
        return f"{kind} ({value.bit_length()} bits)"
    return f"{kind} ({_shown(_REPR.repr(value), 40)})"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(where: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else f'"{_shown(key, 40)}"'  # as TOML would quote it
    return f"{where}.{shown}" if where else shown


def _derived_id(*names: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, "\x1f".join(names)))


def _output_id(bucket_id: str, name: str) -> str:
    """An output's id in the hosted API (outputs have none in the config)."""
    return _derived_id("output", bucket_id, name)


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]+\]")


def _checked(config: Config) -> Config:
    """Fill in derived ids and default inputs, then check what one table cannot check alone."""
    server = _checked_server(config.server)
    reachable = _reachable(config)  # from other machines: secrets must be strong
    buckets, bucket_refs = _checked_buckets(config.buckets, server, reachable)
    _check_tokens(config.tokens, bucket_refs, reachable)
    if config.metrics.token:
        _check_secret(config.metrics.token, "metrics.token", strong=reachable)
    else:  # /metrics names every bucket and output: a stranger must not read them
        _require(not config.metrics.enabled or not reachable, "metrics.token",
                 f"required when other machines can reach the relay (host {server.host!r}, or a proxy's way in: "
                 "trusted_proxies, public_url, [inspector] host): /metrics names every bucket and output; give "
                 "one: python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if config.cluster.redis_url:
        _require(urllib.parse.urlsplit(config.cluster.redis_url).scheme in ("redis", "rediss", "unix"),
                 "cluster.redis_url", "must be a redis://, rediss:// or unix:// URL")
        _require(not config.storage.path, "cluster.redis_url",
                 "the cluster keeps the log in Redis: leave out [storage] (Redis's own persistence keeps it)")
    inspector = config.inspector
    _require(inspector.host == "" or _HOST_NAME.fullmatch(inspector.host) is not None, "inspector.host",
             f"must be a host name (no scheme, no port), got {_shown(inspector.host, 60)!r}")
    inspector = dataclasses.replace(inspector, enabled=inspector.enabled and server.inspector,
                                    host=inspector.host.lower().rstrip("."))
    return dataclasses.replace(config, server=server, buckets=tuple(buckets), inspector=inspector)


def _checked_server(server: ServerConfig) -> ServerConfig:
    _require(0 <= server.port <= 65535, "server.port", f"must be 0 to 65535, got {server.port}")
    for key in ("ping_interval", "auth_timeout", "max_body_size", "send_queue_size", "send_queue_bytes",
                "shutdown_timeout", "request_timeout", "idle_timeout", "send_timeout", "max_header_bytes",
                "max_headers", "auth_failures_per_minute", *_HISTORY_KEYS):
        _require_positive(getattr(server, key), f"server.{key}")
    if server.max_connections is not None:  # else the machine's (see _preflight)
        _require_positive(server.max_connections, "server.max_connections")
    if server.max_pending_per_ip is not None and server.max_connections is not None:  # else by _preflight
        _check_pending(server.max_pending_per_ip, server.max_connections)
    in_flight = (max(DEFAULT_BODY_BYTES_IN_FLIGHT, 4 * server.max_body_size) if server.max_body_bytes_in_flight is None
                 else server.max_body_bytes_in_flight)
    _require(in_flight >= server.max_body_size, "server.max_body_bytes_in_flight",
             f"must be at least max_body_size ({server.max_body_size}), got {in_flight}: else no body that large "
             "could ever be received")
    server = dataclasses.replace(server, max_body_bytes_in_flight=in_flight)
    for n, proxy in enumerate(server.trusted_proxies):
        _require(_network(proxy) is not None, f"server.trusted_proxies[{n}]",
                 f"must be an IP address or network, got {_shown(proxy, 60)!r}")
    _require(bool(server.certfile) == bool(server.keyfile), "server.certfile" if server.keyfile else "server.keyfile",
             "TLS needs both certfile and keyfile")
    _require(
        not server.public_url or server.public_url.startswith(("http://", "https://")),
        "server.public_url", f"must start with http:// or https://, got {server.public_url!r}",
    )
    return server


def _checked_buckets(buckets_given: tuple[BucketConfig, ...], server: ServerConfig, reachable: bool,
                     ) -> tuple[list[BucketConfig], dict[str, str]]:
    """The buckets with their ids, inputs and history bounds filled in, and where each name and id
    was first seen."""
    buckets = []
    bucket_refs: dict[str, str] = {}  # name or id -> where it was first seen
    input_ids: dict[str, str] = {}
    channels: dict[str, str] = {}  # smee channel -> where it was first seen
    for b, bucket in enumerate(buckets_given):
        where = f"buckets[{b}]"
        _require(bucket.name != "", f"{where}.name", "must not be empty")
        bucket_id = bucket.id or _derived_id("bucket", bucket.name)
        for key, ref in (("name", bucket.name), ("id", bucket_id)):
            if ref in bucket_refs and not (key == "id" and ref == bucket.name):
                raise ConfigError(f"{where}.{key}: {ref!r} is already used by {bucket_refs[ref]}")
        bucket_refs.setdefault(bucket.name, f"{where}.name")
        bucket_refs.setdefault(bucket_id, f"{where}.id")

        history = {}
        for key in _HISTORY_KEYS:
            value = getattr(bucket, key)
            if value is None:
                value = getattr(server, key)
            _require_positive(value, f"{where}.{key}")
            history[key] = value

        inputs = bucket.inputs or (InputConfig(),)
        filled_inputs = []
        input_names: set[str] = set()
        for i, input_ in enumerate(inputs):
            input_where = f"{where}.inputs[{i}]"
            _require(input_.name not in input_names, f"{input_where}.name",
                     f"{input_.name!r} is already used in this bucket")
            input_names.add(input_.name)
            input_id = input_.id or _derived_id("input", bucket_id, input_.name)
            _require("/" not in input_id and "?" not in input_id and input_id.strip() == input_id,
                     f"{input_where}.id", f"must be a single URL path segment, got {input_id!r}")
            if input_id in input_ids:
                raise ConfigError(f"{input_where}.id: {input_id!r} is already used by {input_ids[input_id]}")
            input_ids[input_id] = f"{input_where}.id"
            _check_answer(input_, input_where, bucket)
            if input_.verify is not None:
                _check_verify(input_.verify, f"{input_where}.verify")
            filled_inputs.append(dataclasses.replace(input_, id=input_id))

        output_names: set[str] = set()
        for o, output in enumerate(bucket.outputs):
            _require(output.name not in output_names, f"{where}.outputs[{o}].name",
                     f"{output.name!r} is already used in this bucket")
            output_names.add(output.name)
            _check_output(output, f"{where}.outputs[{o}]")
        _check_channel(bucket, where, input_names, channels, reachable)
        buckets.append(dataclasses.replace(bucket, id=bucket_id, inputs=tuple(filled_inputs), **history))
    return buckets, bucket_refs


_SMEE_CHANNEL = re.compile(r"[A-Za-z0-9_-]{1,128}")  # smee.io's names: one URL path segment, unescaped


def _check_channel(bucket: BucketConfig, where: str, input_names: set[str], channels: dict[str, str],
                   reachable: bool) -> None:
    """A bucket's smee channel: a name as smee.io's are, as hard to guess as a secret (it is the
    only credential its stream asks for), used once; and the input it names, if any."""
    if not bucket.smee_channel:
        _require(not bucket.smee_input, f"{where}.smee_input", "needs smee_channel: the channel whose input it names")
        return
    name, at = bucket.smee_channel, f"{where}.smee_channel"
    _require(_SMEE_CHANNEL.fullmatch(name) is not None or _is_placeholder(name), at,
             "must be 1 to 128 letters, digits, - or _ (one URL path segment, as smee.io's channels are)")
    _check_secret(name, at, strong=reachable)
    if name in channels:
        raise ConfigError(f"{at}: already used by {channels[name]}")
    channels[name] = at
    _require(not bucket.smee_input or bucket.smee_input in input_names, f"{where}.smee_input",
             f"this bucket has no input named {bucket.smee_input!r}")


def _channel_input(bucket: BucketConfig) -> InputConfig | None:
    """The input a bucket's smee channel takes webhooks as: the one smee_input names, else one of
    its own that answers 200 (not a public input: its id has no URL); None without a channel."""
    if not bucket.smee_channel:
        return None
    named = next((input_ for input_ in bucket.inputs if input_.name == bucket.smee_input), None)
    return named or InputConfig(id=_derived_id("smee", bucket.id), name=SMEE_INPUT_NAME)


def _streamed_output(bucket: BucketConfig) -> str:
    """The output whose entries a smee channel streams, one event a webhook: the first internal,
    enabled one ("" without outputs). A smee client forwards to one target: an event per output
    would deliver a webhook twice."""
    return next((output.name for output in bucket.outputs if output.internal and not output.disabled), "")


def _check_tokens(tokens: tuple[TokenConfig, ...], bucket_refs: Mapping[str, str], reachable: bool) -> None:
    keys: dict[str, str] = {}
    secrets_seen: dict[str, str] = {}
    for t, token in enumerate(tokens):
        where = f"tokens[{t}]"
        _require(token.key != "", f"{where}.key", "must not be empty")
        if token.key in keys:
            raise ConfigError(f"{where}.key: {token.key!r} is already used by {keys[token.key]}")
        keys[token.key] = f"{where}.key"
        if token.secret and token.secret_hash:
            raise ConfigError(f"{where}: give secret or secret_hash, not both")
        if token.secret_hash:
            _parse_secret_hash(token.secret_hash, f"{where}.secret_hash")
        else:
            _check_secret(token.secret, f"{where}.secret", strong=reachable)
        secret = token.secret or token.secret_hash
        if secret in secrets_seen:  # Bearer <secret> and the key "whr" find a token by its secret alone
            raise ConfigError(f"{where}.secret: the same as {secrets_seen[secret]}'s; give each token its own")
        secrets_seen[secret] = where
        if token.buckets is not None:
            _require(token.buckets != (), f"{where}.buckets",
                     "is empty: name the buckets this token may see, or leave the key out for all")
            for n, ref in enumerate(token.buckets):
                _require(ref in bucket_refs, f"{where}.buckets[{n}]", f"no bucket is named or has the id {ref!r}")


_MOST_PENDING_PER_IP = 256  # the default max_pending_per_ip at most


def _check_pending(max_pending: int, max_connections: int) -> None:
    _require(0 < max_pending <= max_connections, "server.max_pending_per_ip",
             f"must be 1 to max_connections ({max_connections}), got {max_pending}")


def _preflight(config: Config) -> tuple[Config, ssl.SSLContext | None]:
    """What serving `config` needs of this machine, which _load's checks (of the config alone)
    leave: the defaults taken from it (max_connections from the open-file limit, and
    max_pending_per_ip from that), the optional extras the config names, its TLS files. Return
    the config with those defaults in, and its TLS context; raise ConfigError naming the key.
    A start, a reload and load_config call it once, through _prepare (a reload loaded the
    certificate three times); the command line's start and `check` also try the log's database
    (_check_storage). The command line and the pytest plugin prepare a file's config to name it
    in its errors, then hand the relay the Config: their relays load the certificate twice."""
    server = config.server
    max_connections = _default_max_connections() if server.max_connections is None else server.max_connections
    max_pending = (min(max(max_connections // 8, 1), _MOST_PENDING_PER_IP) if server.max_pending_per_ip is None
                   else server.max_pending_per_ip)
    _check_pending(max_pending, max_connections)
    _require(not config.metrics.enabled or importlib.util.find_spec("prometheus_client") is not None,
             "metrics.enabled", f"needs the Prometheus client: {_install('metrics')}")
    _require(not config.cluster.redis_url or importlib.util.find_spec("redis") is not None, "cluster.redis_url",
             f"needs the Redis client: {_install('redis')}")
    server = dataclasses.replace(server, max_connections=max_connections, max_pending_per_ip=max_pending)
    return dataclasses.replace(config, server=server), _tls_for(server)


def _prepare(source: "Config | Mapping[str, Any] | str | Path", **server: Any) -> tuple[Config, ssl.SSLContext | None]:
    """_load(source, **server), then _preflight: the config as this machine will serve it, and
    its TLS context. A file's errors name it, _preflight's as _load's do."""
    config = _load(source, **server)
    try:
        return _preflight(config)
    except ConfigError as error:
        if isinstance(source, (str, Path)):
            raise ConfigError(f"{Path(source)}: {error}") from None
        raise


def _tls_for(server: ServerConfig) -> ssl.SSLContext | None:
    """The relay's TLS context, None without certfile; ConfigError, naming the files, if they do
    not load."""
    if not server.certfile:
        return None
    try:
        return _tls_context(server)
    except (OSError, ssl.SSLError, ConfigError) as error:
        raise ConfigError(f"server.certfile: cannot load {server.certfile} with {server.keyfile}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def _tls_context(server: ServerConfig) -> ssl.SSLContext:
    """The relay's TLS: its certificate and key, HTTP/1.1 by ALPN, TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.certfile, server.keyfile, password=_no_password)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _no_password() -> bytes:
    """An encrypted key fails to load, rather than ask for its passphrase on a terminal."""
    raise ConfigError("the key is encrypted: give it unencrypted, readable by the relay's user only")


_EXTRAS = {"metrics": "prometheus-client>=0.17", "redis": "redis>=5,<9"}  # as pyproject.toml's extras say


def _install(extra: str) -> str:
    """The command that installs an optional extra's libraries where this relay runs: the pip of
    this very Python (in a venv, pipx's or the checkout's, as much as a system one), by
    requirement, which works wherever relay_lite came from; `relay-lite[extra]` only resolves
    where the package itself is installable."""
    return f"{shlex.quote(sys.executable)} -m pip install {shlex.quote(_EXTRAS[extra])}"


_RESERVED_FILES = 64  # open files the relay needs besides connections: listeners, storage, logs, trio's own
_MOST_CONNECTIONS = 20_000  # the default max_connections at most: about 600 MB of idle sockets


def _default_max_connections() -> int:
    """What the open-file limit (`ulimit -n`, systemd's LimitNOFILE) leaves room for, up to
    _MOST_CONNECTIONS (containers often allow a million open files; memory would not)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 2**20
    return min(max(soft - _RESERVED_FILES, 16), _MOST_CONNECTIONS)


def _check_secret(secret: str, where: str, *, strong: bool = True) -> None:
    """A secret must not be text copied from an example and, unless `strong` is false (a relay
    only this machine can reach), must be hard to guess: long and varied."""
    how = ("make one with `relay-lite init` or "
           "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`")
    _require(secret != "", where, f"missing (give secret or secret_hash); {how}")
    _require(not _is_placeholder(secret), where, f"looks like a placeholder from an example; {how}")
    _require(not strong or _is_strong(secret), where,
             f"too easy to guess: use at least {MIN_SECRET_LENGTH} varied characters; {how}")


_PLACEHOLDERS = ("...", "\u2026", "changeme", "change-me", "change_me", "your-secret", "your_secret", "placeholder")


def _is_placeholder(text: str) -> bool:
    """Whether `text` is one an example stood in for a value with: "...", "<your secret>"."""
    lowered = text.lower()
    return any(example in lowered for example in _PLACEHOLDERS) or (text[:1] == "<" and text[-1:] == ">")


def _is_strong(secret: str) -> bool:
    return len(secret) >= MIN_SECRET_LENGTH and len(set(secret)) >= 8


def _reachable(config: "Config") -> bool:
    """Whether other machines may reach the relay: it listens beyond loopback, or says that a
    proxy forwards to it (trusted_proxies), where the world finds it (public_url), or a host
    name of the inspector's own (which only DNS and a proxy give a loopback relay)."""
    server = config.server
    return not _is_loopback_host(server.host) or bool(server.trusted_proxies or server.public_url
                                                      or config.inspector.host)


def _is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address, as a Host header or --host gives it, a port or not)
    is this machine's loopback: localhost (and its subdomains), 127.0.0.0/8, ::1."""
    name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or getattr(_ip(name), "is_loopback", False)


def _weak_secrets(config: "Config") -> list[str]:
    """Where `config` has secrets too easy to guess, which only a relay that other machines
    cannot reach accepts (see _checked)."""
    if _reachable(config):
        return []
    weak = [f"tokens[{t}].secret" for t, token in enumerate(config.tokens) if token.secret and not _is_strong(token.secret)]
    weak += [f"buckets[{b}].smee_channel" for b, bucket in enumerate(config.buckets)
             if bucket.smee_channel and not _is_strong(bucket.smee_channel)]
    return weak + ["metrics.token"] * bool(config.metrics.token and not _is_strong(config.metrics.token))


_SCHEME_KEYS = {"header": ("hmac", "token"), "algorithm": ("hmac",), "encoding": ("hmac",), "prefix": ("hmac",)}  # and
# the schemes that take them


def _webhook_key(secret: str) -> bytes | None:
    """A Standard Webhooks secret's key: the base64 after "whsec_"."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True) or None
    except ValueError:
        return None


def _check_verify(verify: VerifyConfig, where: str) -> None:
    _require(verify.scheme in SIGNATURE_SCHEMES, f"{where}.scheme",
             f"must be one of {', '.join(SIGNATURE_SCHEMES)}, got {_shown(verify.scheme, 40)!r}")
    _require(bool(verify.secrets) and all(verify.secrets), f"{where}.secrets", "must list one secret or more")
    _require(verify.tolerance > 0, f"{where}.tolerance", f"must be above 0, got {verify.tolerance:g}")
    for key, schemes in _SCHEME_KEYS.items():
        if verify.scheme not in schemes:
            named = " or ".join(f'"{scheme}"' for scheme in schemes)
            _require(getattr(verify, key) == getattr(VerifyConfig, key), f"{where}.{key}", f"is for scheme {named} only")
    if verify.scheme in _SCHEME_KEYS["header"]:
        _require(_is_header_name(verify.header), f"{where}.header", "must name the header with the signature")
    if verify.scheme == "hmac":
        _require(verify.algorithm in ("sha1", "sha256", "sha512"), f"{where}.algorithm",
                 f"must be sha1, sha256 or sha512, got {_shown(verify.algorithm, 40)!r}")
        _require(verify.encoding in ("hex", "base64"), f"{where}.encoding",
                 f"must be hex or base64, got {_shown(verify.encoding, 40)!r}")
    for n, secret in enumerate(verify.secrets):
        _require(not _is_placeholder(secret), f"{where}.secrets[{n}]", "looks like a placeholder from an example: "
                 "give the secret the sender signs with (its webhook settings show it)")
        if verify.scheme == "basic":
            _require(":" in secret, f"{where}.secrets[{n}]", 'must be "user:password"')
        if verify.scheme == "standard-webhooks":
            _require(_webhook_key(secret) is not None, f"{where}.secrets[{n}]",
                     'must be base64, as the sender gives it ("whsec_..." included)')


def _check_output(output: OutputConfig, where: str) -> None:
    """An output's headers, and what the relay needs to deliver to a public one."""
    _check_headers(output.headers, f"{where}.headers")
    for key in ("timeout", "connect_timeout"):
        _require_positive(getattr(output, key), f"{where}.{key}")
    _require(0 <= output.retries <= 100, f"{where}.retries", f"must be 0 to 100, got {output.retries}")
    _require(1 <= output.concurrency <= _MOST_CONCURRENCY, f"{where}.concurrency",
             f"must be 1 to {_MOST_CONCURRENCY}, got {output.concurrency}")
    if not output.internal and not output.disabled:
        _require(output.destination.startswith(("http://", "https://")), f"{where}.destination",
                 f"a public output is delivered to by the relay: give an http:// or https:// URL, "
                 f"got {output.destination!r}")


def _check_headers(headers: Mapping[str, str], where: str) -> None:
    for name, value in headers.items():
        _require(_is_header_name(name), where, f"{name!r} is not a header name")
        _require(value.isprintable(), f"{where}.{name}", "must be printable text on one line")


def _check_answer(input_: InputConfig, where: str, bucket: BucketConfig) -> None:
    """An input's answer to senders: a real status, headers HTTP can carry, an output that answers."""
    _require(200 <= input_.status_code <= 599, f"{where}.status_code", f"must be 200 to 599, got {input_.status_code}")
    _require(not input_.body or input_.status_code not in _BODILESS_STATUSES, f"{where}.body",
             f"must be empty with status_code {input_.status_code}: HTTP sends no body with it")
    _check_headers(input_.headers, f"{where}.headers")
    _require_positive(input_.response_timeout, f"{where}.response_timeout")
    wanted = input_.response_from_output
    if wanted:
        answering = [output.name for output in bucket.outputs if not output.disabled] if bucket.outputs else [""]
        if wanted == ANY_OUTPUT:
            _require(bool(answering), f"{where}.response_from_output",
                     "the bucket has no enabled output, so none can answer")
        else:
            _require(wanted in answering, f"{where}.response_from_output",
                     f"{wanted!r} is not an enabled output: expected {ANY_OUTPUT!r} or one of {answering}")


@dataclasses.dataclass(frozen=True)
class _SecretHash:
    """A token's `secret_hash`: scrypt:N:r:p$salt$hex, the format werkzeug.security writes, so a
    hash made by `python relay_lite.py hash-secret` or by werkzeug's generate_password_hash works."""

    n: int
    r: int
    p: int
    salt: str
    digest: bytes

    def matches(self, secret: str) -> bool:
        """Blocking, and slow on purpose (tens of milliseconds): call it in a thread."""
        computed = hashlib.scrypt(secret.encode("utf-8", "surrogatepass"), salt=self.salt.encode(), n=self.n,
                                  r=self.r, p=self.p, maxmem=132 * self.n * self.r * self.p, dklen=len(self.digest))
        return hmac.compare_digest(computed, self.digest)

    def __str__(self) -> str:
        return f"scrypt:{self.n}:{self.r}:{self.p}${self.salt}${self.digest.hex()}"

    @classmethod
    def of(cls, secret: str, n: int = _SCRYPT_N) -> "_SecretHash":
        salt = secrets.token_urlsafe(12)
        digest = hashlib.scrypt(secret.encode(), salt=salt.encode(), n=n, r=8, p=1, maxmem=132 * n * 8, dklen=64)
        return cls(n, 8, 1, salt, digest)


def _parse_secret_hash(text: str, where: str) -> _SecretHash:
    try:
        method, salt, digest = text.split("$")
        name, n, r, p = method.split(":")
        parsed = _SecretHash(int(n), int(r), int(p), salt, bytes.fromhex(digest))
    except ValueError:
        raise ConfigError(f"{where}: must be scrypt:N:r:p$salt$hex, as `relay-lite hash-secret` "
                          "prints it") from None
    _require(name == "scrypt", where, f"only scrypt hashes are supported, got {name[:20]!r}")
    _require(2**10 <= parsed.n <= 2**20 and parsed.n & (parsed.n - 1) == 0, where,
             f"N must be a power of 2 from 1024 to 1048576, got {parsed.n}")
    _require(1 <= parsed.r <= 32 and 1 <= parsed.p <= 16 and 128 * parsed.n * parsed.r * parsed.p <= 2**28, where,
             "r must be 1 to 32 and p 1 to 16, and 128 * N * r * p bytes at most 256 MiB")
    _require(salt != "" and len(parsed.digest) >= 16, where, "needs a salt and a hash of at least 16 bytes")
    return parsed


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_header_name(name: str) -> bool:
    """An RFC 9110 token: what HTTP allows as a field name."""
    return _HEADER_NAME.fullmatch(name) is not None


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


def _require_positive(value: float, where: str) -> None:
    _require(value > 0 and math.isfinite(value), where, f"must be positive, got {value}")


def _advice(config: Config) -> list[str]:
    """What a good config's owner should hear before it runs: a relay nobody can send to, or
    nobody can receive from; and, on an address other machines reach, input URLs anyone who
    knows the names can guess; on loopback, weak secrets accepted there only (one line)."""
    problems = []
    if weak := _weak_secrets(config):  # only where other machines cannot reach the relay
        problems.append(f"{', '.join(weak)}: too easy to guess, accepted because the relay listens on loopback "
                        f"({config.server.host}) only, and serves only requests to a loopback host; on any "
                        "other address, or behind a proxy (trusted_proxies, public_url), it is refused")
    if _reachable(config):
        problems += [f"input {input_.name!r} of bucket {bucket.name!r} has no id: its URL is derived from names, "
                     "stable but guessable; give it an id (`relay-lite init` writes random ones)"
                     for bucket in config.buckets for input_ in bucket.inputs
                     if input_.id == _derived_id("input", bucket.id, input_.name)]
    problems += [f"bucket {bucket.name!r} has a smee channel but no internal output: its streams get nothing (they "
                 "get what sockets get)" for bucket in config.buckets
                 if bucket.smee_channel and bucket.outputs and not _streamed_output(bucket)]
    if not config.buckets:
        problems.append("the config has no buckets, so no webhook can come in: add a [[buckets]] table "
                        "(`relay-lite init` writes a config with one)")
    if not config.tokens:
        problems.append("the config has no tokens, so no client can connect: add a [[tokens]] table "
                        "(`relay-lite init` writes a config with one)")
    return problems


def _demo_config(server: ServerConfig) -> Config:
    """A bucket, an input and a token with fresh random ids, for a first run without a config."""
    return load_config(Config(
        server=server,
        tokens=(TokenConfig(key=str(uuid.uuid4()), secret=secrets.token_urlsafe(24)),),
        buckets=(BucketConfig(name="demo", id=str(uuid.uuid4()), inputs=(InputConfig(id=str(uuid.uuid4())),),
                              smee_channel=secrets.token_urlsafe(18)),),
    ))


def _config_template() -> str:
    """The text `python relay_lite.py init` writes: fresh random ids and a token."""
    return f"""\
# relay_lite configuration. Run: relay-lite --config <this file>

[server]
host = "{DEFAULT_HOST}"         # "0.0.0.0" to listen on every interface
port = {DEFAULT_PORT}                # webhooks AND the socket, one port
ping_interval = {DEFAULT_PING_INTERVAL:g}          # seconds between status "ping" frames
auth_timeout = {DEFAULT_AUTH_TIMEOUT:g}           # seconds a new socket may take to authenticate
max_body_size = {DEFAULT_MAX_BODY_SIZE}     # bytes; larger webhooks get 413
send_queue_size = {DEFAULT_SEND_QUEUE_SIZE}       # frames a socket may leave unread before it is cut off...
send_queue_bytes = {DEFAULT_SEND_QUEUE_BYTES}  # ...or bytes of them (it can resume: see "since")
# public_url = "https://relay.example.com"   # used when printing input URLs
history_size = {DEFAULT_HISTORY_SIZE}          # webhooks each bucket keeps for clients that resume...
history_ttl = {DEFAULT_HISTORY_TTL:g}          # ...for at most this many seconds

# [storage]                  # keep the webhook log in SQLite: a restart loses nothing
# path = "relay.db"          # beside this file

# [metrics]                  # GET /metrics for Prometheus; it needs: {_install('metrics')}
# enabled = true
# token = "{secrets.token_urlsafe(24)}"   # its scraper sends Authorization: Bearer <token>

[[tokens]]
key = "{uuid.uuid4()}"
secret = "{secrets.token_urlsafe(24)}"
# buckets = ["github"]      # limit this token to some buckets (names or ids)

[[buckets]]
id = "{uuid.uuid4()}"
name = "github"
# smee_channel = "{secrets.token_urlsafe(18)}"   # /smee/<it>: for smee-client and gosmee (README)
  [[buckets.inputs]]
  id = "{uuid.uuid4()}"    # the URL is /v1/webhooks/<id>
  name = "{DEFAULT_INPUT_NAME}"
  # status_code = 200       # what senders get back
  # response_from_output = "anyOutput"   # or: hold senders until a socket client answers
  # verify = {{ scheme = "github", secrets = ["<the webhook's secret>"] }}   # relay only signed webhooks
  # [[buckets.outputs]]     # no outputs: every webhook reaches sockets once
  # name = "local"
  # destination = "http://localhost:3000"
  # internal = true         # an agent (relay_lite.py forward) delivers it; false: the relay does
"""


_RELOADABLE_SERVER_KEYS = frozenset({"certfile", "keyfile", "trusted_proxies", "public_url", "inspector", "history_size",
                                     "history_ttl", "history_bytes"})


def _reloadable(old: Config, new: Config) -> None:
    """Raise ConfigError if going from `old` to `new` needs a restart."""
    for key in (field.name for field in dataclasses.fields(ServerConfig)):
        if key not in _RELOADABLE_SERVER_KEYS and getattr(old.server, key) != getattr(new.server, key):
            raise ConfigError(f"server.{key}: changing it needs a restart, not a reload")
    if bool(old.server.certfile) != bool(new.server.certfile):
        raise ConfigError("server.certfile: turning TLS on or off needs a restart, not a reload")
    if old.storage != new.storage:
        raise ConfigError("storage.path: changing it needs a restart, not a reload")
    if old.cluster != new.cluster:
        raise ConfigError("cluster.redis_url: changing it needs a restart, not a reload")
    if old.metrics.enabled != new.metrics.enabled:
        raise ConfigError("metrics.enabled: changing it needs a restart, not a reload")


# ==== 3. The model and the protocol (sans-IO) =================================================
#
# Client frames in, server frames out, as PROTOCOL.md describes them; webhooks, log entries and
# answers; the REST API's queries and cursors; who a request comes from; signatures. Pure
# functions and plain data (a held sender's event aside): no I/O, no clock but the `now` they are
# given (and the log ids', which are made of the time: _LogIds).

# ---- frames ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Auth:
    key: str
    secret: str


@dataclasses.dataclass(frozen=True)
class _Subscribe:
    buckets: tuple[str, ...]  # ids or names; empty means every bucket the token may see
    since: str | None = None  # resume after this log id (a meta.id), in canonical form
    observe: bool = False  # relay_lite's own: a watcher (the web inspector), whose frames mark nothing "sent"


@dataclasses.dataclass(frozen=True)
class _Pong:
    pass


def parse_client_frame(message: str | bytes) -> _Auth | _Subscribe | _Pong:
    """Parse one client frame; raise ProtocolError saying what is wrong with it."""
    if isinstance(message, bytes):
        raise ProtocolError("binary frames are not accepted: send JSON in a text frame")
    frame = _json_object(message)
    action = frame.get("action")
    if action == "auth":
        key, secret = frame.get("key"), frame.get("secret")
        if not isinstance(key, str) or not isinstance(secret, str):
            raise ProtocolError('auth needs "key" and "secret" strings')
        return _Auth(key, secret)
    if action == "subscribe":
        buckets = frame.get("buckets")
        since = frame.get("since")
        if since is None or since == "":
            since = None
        elif (since := _canonical_log_id(since)) is None:
            raise ProtocolError('"since" must be the meta.id of the last webhook you processed')
        observe = frame.get("observe") is True
        if buckets is None:
            return _Subscribe((), since, observe)
        if not isinstance(buckets, list) or not all(isinstance(ref, str) for ref in buckets):
            raise ProtocolError('subscribe "buckets" must be an array of bucket names or ids')
        return _Subscribe(tuple(dict.fromkeys(ref for ref in buckets if ref)), since, observe)
    if action == "pong":
        return _Pong()
    if not isinstance(action, str):
        raise ProtocolError('frame needs an "action": "auth", "subscribe" or "pong"')
    raise ProtocolError(f'unknown action {action[:64]!r}: expected "auth", "subscribe" or "pong"')


def _canonical_log_id(text: object) -> str | None:
    """`text` written as the relay writes log ids (a lower-case UUID), or None if it is not one."""
    try:
        return str(uuid.UUID(text)) if isinstance(text, str) else None
    except ValueError:
        return None


def _json_object(message: str | bytes) -> dict[str, Any]:
    """A frame's JSON object; ProtocolError when it is not one."""
    try:
        frame = json.loads(message)
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(f"frame must be a JSON object, got {_json_type(frame)}")
    return frame


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps with these
# arguments would build a new encoder for every frame


def _encode(frame: Mapping[str, Any] | list[Any]) -> str:
    return _ENCODER.encode(frame)


def status_frame(status: str, message: str) -> str:
    """A server status frame, e.g. status_frame("ping", "ping")."""
    return _encode({"type": "status", "status": status, "message": message})


def wire_frame(text: str) -> bytes:
    """`text` as a server-to-client WebSocket text frame (RFC 6455: FIN, opcode 1, unmasked).

    Server frames carry no mask, so the bytes are the same for every client: a webhook is framed
    once and the same bytes go to every subscriber.
    """
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 2**16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


@dataclasses.dataclass(frozen=True)
class Webhook:
    """One accepted HTTP request, as sockets will see it."""

    method: str
    path: str  # the extra path after the input id, "/" when none
    query: str  # raw, without "?"
    headers: dict[str, list[str]]  # canonical names, no Host
    body: str  # the body as text, or base64 when body_encoding says so
    body_encoding: str = ""  # "" for UTF-8 text, "base64" for bytes that are not UTF-8
    sender: str = ""  # the sender's address (for X-Forwarded-For and the logs API's ip_address)
    size: int = dataclasses.field(init=False, compare=False)  # about the bytes of memory it holds

    def __post_init__(self) -> None:
        # sys.getsizeof: a str of one emoji among ASCII holds 4 bytes a character
        object.__setattr__(self, "size", sys.getsizeof(self.body) + sys.getsizeof(self.path)
                           + sys.getsizeof(self.query) + _headers_size(self.headers))

    @classmethod
    def from_request(
        cls, method: str, path: str, query: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes,
        sender: str = "",
    ) -> "Webhook":
        grouped: dict[str, list[str]] = {}
        for name, value in headers:
            if name.lower() != b"host":
                grouped.setdefault(_canonical_header(name.decode("latin-1")), []).append(_text(value))
        text = _body_text(body)
        if text is None:
            return cls(method.upper(), path or "/", _text(query), grouped, base64.b64encode(body).decode("ascii"),
                       "base64", sender)
        return cls(method.upper(), path or "/", _text(query), grouped, text, "", sender)

    @property
    def body_bytes(self) -> bytes:
        """The body as the sender sent it."""
        return base64.b64decode(self.body) if self.body_encoding else self.body.encode()


def _headers_size(headers: Mapping[str, list[str]]) -> int:
    size = 0
    for name, values in headers.items():  # loops, not nested sum()s: this runs for every webhook
        size += _HEADER_OVERHEAD + len(name)
        for value in values:
            size += _VALUE_OVERHEAD + len(value)
    return size


_NOT_CONTROL = bytes(range(0x20, 0x100))


def _body_text(body: bytes) -> str | None:
    """`body` as text, if it is UTF-8 that a JSON frame carries in at most twice its size; else
    None, and it goes base64 (4/3 of its size). JSON writes most control characters in six
    (\\u0001): a body of them made frames six times its size, and cut healthy clients off."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    controls = body.translate(None, _NOT_CONTROL)
    if controls:
        short = sum(controls.count(char) for char in b"\b\t\n\f\r")  # \n and the like: two characters
        if body.count(b'"') + body.count(b"\\") + short + 5 * (len(controls) - short) > len(body):
            return None
    return text


@functools.lru_cache(maxsize=1024)  # senders send the same few names over and over
def _canonical_header(name: str) -> str:
    """`x-hub-signature-256` -> `X-Hub-Signature-256`, as Go's net/http canonicalises names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@dataclasses.dataclass(frozen=True)
class _Route:
    """Where a bucket's webhooks go: one log entry per route, a socket frame for each internal one."""

    output_name: str
    destination: str | None  # None: the request's extra path itself (a bucket with no outputs)
    lock_path: bool = False
    internal: bool = True  # else the relay delivers it (a public output)
    headers: tuple[tuple[str, str], ...] = ()  # the output's, replacing the request's of those names

    def webhook_for(self, webhook: "Webhook") -> "Webhook":
        """`webhook` as this route carries it: with the output's headers in place of its own."""
        if not self.headers:
            return webhook
        replaced = {_canonical_header(name) for name, _ in self.headers}
        headers = {name: values for name, values in webhook.headers.items() if name not in replaced}
        for name, value in self.headers:
            headers.setdefault(_canonical_header(name), []).append(value)
        return dataclasses.replace(webhook, headers=headers)

    def destination_for(self, path: str) -> str:
        if self.destination is None:
            return path
        if self.lock_path or path == "/":
            return self.destination
        return self.destination.rstrip("/") + path


def _routes(bucket: BucketConfig) -> tuple[_Route, ...]:
    """No outputs: one route, for sockets. Otherwise one per enabled output."""
    if not bucket.outputs:
        return (_Route("", None),)
    return tuple(
        _Route(output.name, output.destination, output.lock_path, output.internal, tuple(output.headers.items()))
        for output in bucket.outputs
        if not output.disabled
    )


class _Entry:
    """A log entry: one webhook for one output (one entry in a bucket without outputs).

    Its id is the frame's meta.id; the answer a client PUTs to /v1/logs/<id>, or the relay's own
    delivery's outcome for a public output, is recorded on it.
    """

    __slots__ = ("id", "bucket", "input_id", "input_name", "output_name", "destination", "internal", "webhook",
                 "received_at", "status", "answer", "hold", "size", "resent_from", "request_headers")

    def __init__(self, log_id: str, bucket: BucketConfig, input_id: str, input_name: str, output_name: str,
                 destination: str, webhook: Webhook, received_at: float, status: str = "received",
                 answer: "_Answer | None" = None, internal: bool = True, resent_from: str = "",
                 request_headers: dict[str, list[str]] | None = None) -> None:
        self.id = log_id
        self.bucket = bucket
        self.input_id = input_id
        self.input_name = input_name
        self.output_name = output_name
        self.destination = destination
        self.internal = internal  # sockets get it; else the relay delivers it
        self.webhook = webhook
        self.received_at = received_at  # unix time
        self.status = status  # one of LOG_STATUSES
        self.answer = answer
        self.hold: _Hold | None = None  # the sender waiting for this entry's answer, if one is
        self.resent_from = resent_from  # the entry this one delivers again (POST /v1/logs/<id>/action)
        self.request_headers = request_headers  # the sender's, where its output replaced some (for a resend)
        self.size = (_ENTRY_OVERHEAD + webhook.size + (answer.size if answer else 0)  # against history_bytes
                     + (_headers_size(request_headers) if request_headers is not None else 0))

    def frame(self) -> str:
        """The socket frame, in the hosted service's schema."""
        webhook = self.webhook
        frame = {
            "type": "webhook",
            "meta": {
                "id": self.id,
                "bucked_id": self.bucket.id,  # sic: the wire spelling the Go agent and Jenkins read
                "bucket_id": self.bucket.id,  # what the old SDK and the C# client read
                "bucket_name": self.bucket.name,
                "input_id": self.input_id,
                "input_name": self.input_name,
                "output_name": self.output_name,
                "output_destination": self.destination,
            },
            "headers": webhook.headers,
            "query": webhook.query,
            "body": webhook.body,
            "method": webhook.method,
        }
        if webhook.body_encoding:
            frame["body_encoding"] = webhook.body_encoding
        return _encode(frame)

    def as_log(self) -> dict[str, Any]:
        """The entry as the logs API shows it: the hosted API's Log (`status` a number, the answer's
        body an array of bytes, times in Unix seconds), and a few fields of relay_lite's own."""
        webhook, answer = self.webhook, self.answer
        return {
            "id": self.id,
            "bucket_id": self.bucket.id,
            "input_id": self.input_id,
            "output_id": _output_id(self.bucket.id, self.output_name) if self.output_name else "",
            "method": webhook.method,
            "status": LOG_STATUSES.index(self.status),
            "status_code": answer.status_code if answer else 0,
            "body": webhook.body,
            "headers": webhook.headers,
            "raw_query": webhook.query,
            "extra_path": webhook.path,
            "ip_address": webhook.sender,
            "response_body": list(answer.body) if answer else [],
            "response_headers": answer.headers if answer else {},
            "duration_ms": round((answer.at - self.received_at) * 1000) if answer else 0,
            "retries": answer.retries if answer else 0,
            "internal": self.internal,
            "created_at": int(self.received_at),
            "updated_at": int(answer.at if answer else self.received_at),
            # relay_lite's own
            "bucket_name": self.bucket.name,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "output_destination": self.destination,
            "received_at": self.received_at,
            "body_encoding": webhook.body_encoding,
            "resent_from": self.resent_from,
            "request_headers": self.request_headers,  # the sender's, where the output replaced some
        }


def _entries(log_ids: Iterable[str], bucket: BucketConfig, input_id: str, input_name: str, webhook: Webhook,
             routes: Iterable[_Route], received_at: float, resent_from: str = "") -> list[_Entry]:
    """The log entries (and so the socket frames) of `webhook`: one per route, with its id."""
    entries = []
    for log_id, route in zip(log_ids, routes):
        routed = route.webhook_for(webhook)
        entries.append(_Entry(log_id, bucket, input_id, input_name, route.output_name,
                              route.destination_for(webhook.path), routed, received_at, internal=route.internal,
                              resent_from=resent_from, request_headers=None if routed is webhook else webhook.headers))
    return entries


class _LogIds:
    """Log ids: UUIDv7 (RFC 9562), a millisecond timestamp, a counter and random bits.

    Each id is greater than the one before, even within a millisecond or if the clock steps back,
    so ids sort in arrival order, as numbers and as strings: resuming after an id means sending
    the greater ones.
    """

    def __init__(self, after: str = "") -> None:
        self._last = uuid.UUID(after).int if after else 0

    @property
    def last(self) -> str:
        return str(uuid.UUID(int=self._last)) if self._last else ""

    def next(self) -> str:
        millis = time.time_ns() // 1_000_000
        last_millis, counter = self._last >> 80, (self._last >> 64) & 0xFFF
        if millis <= last_millis:
            millis, counter = (last_millis, counter + 1) if counter < 0xFFF else (last_millis + 1, 0)
        else:
            counter = 0
        self._last = millis << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | secrets.randbits(62)
        return str(uuid.UUID(int=self._last))


@dataclasses.dataclass(frozen=True)
class _Answer:
    """A response to a webhook, as a client reported it with PUT /v1/logs/<id>."""

    status_code: int  # 0: none (the client reported a status only)
    headers: dict[str, list[str]]
    body: bytes
    at: float  # unix time it was given
    retries: int = 0  # attempts after the first it took (the relay's own deliveries)

    @property
    def size(self) -> int:
        return len(self.body) + _headers_size(self.headers)


def _parse_answer(data: object, now: float) -> tuple[_Answer, str]:
    """A PUT /v1/logs/<id> body: the answer and the log status; ProtocolError says what is wrong.

    Clients differ: the Go agent sends null for what it leaves out and the body as base64, the
    JS SDK may send the body as an array of bytes and the status as a number, Jenkins sends
    header values as strings. All are accepted. The body is kept to its first _ANSWER_BODY_MOST
    bytes, as the relay's own deliveries keep an answer: 100 answers of 7 MiB held 86 MB.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"the body must be a JSON object, got {_json_type(data)}")
    status_code = data.get("status_code") or 0
    if not isinstance(status_code, int) or isinstance(status_code, bool) or not (
            status_code == 0 or 200 <= status_code <= 599):
        raise ProtocolError('"status_code" must be an HTTP status, 200 to 599')
    body = data.get("response_body") or b""
    if isinstance(body, str):  # only what is kept is decoded: 4 characters a 3 bytes
        try:
            body = base64.b64decode(body[:-(-_ANSWER_BODY_MOST // 3) * 4], validate=True)
        except ValueError:
            raise ProtocolError('"response_body" must be base64') from None
    elif isinstance(body, list) and all(isinstance(byte, int) and 0 <= byte <= 255 for byte in body):
        body = bytes(body[:_ANSWER_BODY_MOST])
    elif body != b"":
        raise ProtocolError('"response_body" must be base64 (or an array of bytes)')
    body = body[:_ANSWER_BODY_MOST]  # as the relay's own deliveries keep an answer: the rest is dropped
    if body and status_code in _BODILESS_STATUSES:
        raise ProtocolError(f'"response_body" must be empty: a {status_code} answer has no body')
    headers: dict[str, list[str]] = {}
    raw_headers = data.get("response_headers") or {}
    if not isinstance(raw_headers, dict):
        raise ProtocolError('"response_headers" must be an object of names to values')
    for name, values in raw_headers.items():
        values = [values] if isinstance(values, str) else values
        if not (isinstance(values, list) and all(isinstance(value, str) and value.isprintable() for value in values)
                and _is_header_name(name)):
            raise ProtocolError(f"response header '{_shown(name, 64)}' must be a name with a string or strings")
        headers[name] = values
    retries = data.get("retries") or 0  # the hosted Log's field: how many more attempts it took
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 2**31:
        raise ProtocolError('"retries" must be a count')
    status = data.get("status")
    if isinstance(status, int) and not isinstance(status, bool) and 0 <= status < len(LOG_STATUSES):
        status = LOG_STATUSES[status]
    elif status in (None, ""):
        if not status_code:
            raise ProtocolError('nothing to record: give a "status_code" or a "status"')
        status = "sent"
    elif status not in LOG_STATUSES:
        raise ProtocolError(f'"status" must be one of {", ".join(LOG_STATUSES)}')
    return _Answer(status_code, headers, body, now, retries), status


class _Hold:
    """A webhook's sender, held until a socket client answers it (an input's response_from_output)."""

    __slots__ = ("output", "answer", "answered", "open")

    def __init__(self, output: str) -> None:
        self.output = output  # the output whose answer counts, or ANY_OUTPUT
        self.answer: _Answer | None = None
        self.answered = trio.Event()  # set by the answer, or by a shutdown
        self.open = True  # False once the sender has been answered

    def offer(self, entry: _Entry, answer: _Answer) -> None:
        if self.open and self.answer is None and answer.status_code and self.output in (ANY_OUTPUT, entry.output_name):
            self.answer = answer
            self.answered.set()


@dataclasses.dataclass(frozen=True)
class _StatusFrame:
    status: str
    message: str


@dataclasses.dataclass(frozen=True)
class _WebhookFrame:
    """A webhook as a socket client receives it."""

    id: str  # meta.id: its log entry, where its outcome is reported
    bucket: str  # meta.bucket_name
    output_destination: str
    webhook: Webhook

    @property
    def size(self) -> int:
        return self.webhook.size


_FRAME_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # a relay's log id, which goes into a URL path


def parse_server_frame(message: str | bytes) -> _StatusFrame | _WebhookFrame:
    """Parse one frame a relay sent a client (the forward agent reads them); raise ProtocolError
    saying what is wrong with it. A webhook's method and headers must be ones HTTP can carry."""
    frame = _json_object(message)
    kind = frame.get("type")
    if kind == "status":
        status, text = frame.get("status"), frame.get("message")
        if not isinstance(status, str):
            raise ProtocolError('a status frame needs a "status" string')
        return _StatusFrame(status, text if isinstance(text, str) else "")
    if kind != "webhook":
        raise ProtocolError(f"unknown frame type {_shown(str(kind), 64)!r}")
    meta = frame.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str) or not _FRAME_ID.fullmatch(meta["id"]):
        raise ProtocolError('a webhook frame needs "meta" with an "id" (letters, digits, "-", "_", ".", ":")')
    method, query, body = frame.get("method"), frame.get("query") or "", frame.get("body") or ""
    encoding = frame.get("body_encoding") or ""
    if not isinstance(method, str) or not _is_header_name(method):
        raise ProtocolError(f"webhook {_shown(meta['id'], 64)}: \"method\" must be an HTTP method")
    if not (isinstance(query, str) and isinstance(body, str) and _is_unicode(query) and _is_unicode(body)
            and encoding in ("", "base64")):
        raise ProtocolError(f'webhook {_shown(meta["id"], 64)}: "query" and "body" must be Unicode strings, '
                            '"body_encoding" "base64" or none')
    if encoding:
        try:
            base64.b64decode(body, validate=True)
        except ValueError:
            raise ProtocolError(f"webhook {_shown(meta['id'], 64)}: its body is not base64") from None
    headers: dict[str, list[str]] = {}
    raw_headers = frame.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise ProtocolError(f"webhook {_shown(meta['id'], 64)}: \"headers\" must map names to values")
    for name, values in raw_headers.items():
        values = [values] if isinstance(values, str) else values
        if not (_is_header_name(name) and isinstance(values, list)
                and all(isinstance(value, str) and _is_header_value(value) and _is_unicode(value)
                        for value in values)):
            raise ProtocolError(f"webhook {_shown(meta['id'], 64)}: header '{_shown(name, 64)}' is not one HTTP "
                                "can carry")
        headers[name] = values
    texts = {key: value for key, value in meta.items() if isinstance(value, str)}
    return _WebhookFrame(meta["id"], texts.get("bucket_name") or texts.get("bucked_id") or texts.get("bucket_id", ""),
                         texts.get("output_destination", ""), Webhook(method.upper(), "/", query, headers, body, encoding))


_HEADER_VALUE = re.compile(r"(?:[^\x00-\x20\x7f](?:[ \t]*[^\x00-\x20\x7f])*)?")


def _is_header_value(value: str) -> bool:
    """A value HTTP can carry: no control characters (tab inside it aside), no space around it."""
    return _HEADER_VALUE.fullmatch(value) is not None


def _has_dot_segment(path: str) -> bool:
    return any(urllib.parse.unquote(segment) in (".", "..") for segment in path.split("/"))


def _answer_headers(headers: Iterable[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """The headers of an answer a webhook's sender gets (an input's own, or a client's), less
    what Hypercorn writes itself."""
    return [(name, value) for name, values in headers if name.lower() not in _SERVERS_HEADERS for value in values]


def _listed(entries: Iterable[_Entry], limit: int) -> list[_Entry]:
    """Up to `limit` of `entries`, stopping short at about _LOGS_PAGE_BYTES of them (never at the
    first), an answer's body counted as the numbers JSON writes for its bytes."""
    page: list[_Entry] = []
    size = 0
    for entry in itertools.islice(entries, limit):
        size += entry.size + 3 * len(entry.answer.body if entry.answer else b"")
        if page and size > _LOGS_PAGE_BYTES:
            break
        page.append(entry)
    return page


# ---- wires: how a subscriber's client is sent webhooks ---------------------------------------
#
# A bucket's subscribers are sent each webhook framed for their client: a socket frame in the
# relay's own protocol, or an event of a smee channel's stream (text/event-stream), as smee.io's
# server writes them for smee-client or as gosmee's server writes them for gosmee's client. Each
# wire frames a webhook once for all its subscribers.
#
# smee-client turns every field of an event but `body` and `query` into a header of the request
# it makes, re-encodes `body` as JSON, and sets Content-Type: application/json; gosmee's client
# takes the raw body from `bodyB` (base64), and would take `body` instead if both came. Both send
# the last event id they saw as Last-Event-ID when they reconnect; gosmee keeps only ids shaped
# as Redis stream ids, "<milliseconds>-<sequence>", in its --resume-state-file, so every event's
# id is its log entry's place in that shape (see _smee_id).

_CONNECTION_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                                 "trailer", "upgrade"})


def _is_connection_header(name: str, named_by_connection: set[str]) -> bool:
    lowered = name.lower()
    return lowered in _CONNECTION_HEADERS or lowered.startswith("proxy-") or lowered in named_by_connection


class _Wire:
    """The relay's own socket protocol: a WebSocket frame per webhook and status."""

    name = "socket"
    ping = wire_frame(status_frame("ping", "ping"))
    opening = b""  # what a client is sent first

    def webhook(self, entry: _Entry, shared: bool) -> bytes:
        return wire_frame(entry.frame())

    def status(self, status: str, message: str) -> bytes:
        """A status for the client; b"" if it has no word for it."""
        return wire_frame(status_frame(status, message))


_SOCKET_WIRE = _Wire()


class _EventWire(_Wire):
    """A smee channel's stream (text/event-stream): an event a webhook (see _streamed_output), its
    id the webhook's place in the log (see _smee_id), its data the client's own fields."""

    def webhook(self, entry: _Entry, shared: bool) -> bytes:
        if entry.output_name != _streamed_output(entry.bucket):
            return b""
        return _sse_event(_smee_id(entry.id, shared), self.data(entry))

    def data(self, entry: _Entry) -> str:
        raise NotImplementedError


class _SmeeWire(_EventWire):
    """A smee channel's stream as smee.io writes it, for smee-client: a "ready" event, "ping"
    events, and a message per webhook: its headers (lower-cased), `body` (the JSON itself when it
    is JSON), `query` and `timestamp`. Named events other than messages are ones smee-client
    ignores, such as "history_gap".

    Header values are Node's: each byte a character (latin-1), as smee.io's req.headers has them
    and as smee-client's fetch writes them back; a character past 255 makes it refuse the request."""

    name = "smee"
    ping = b"event: ping\ndata: {}\n\n"
    opening = b"event: ready\ndata: {}\n\n"

    def data(self, entry: _Entry) -> str:
        webhook = entry.webhook
        fields: dict[str, Any] = {name: value.encode().decode("latin-1") if not value.isascii() else value
                                  for name, value in _smee_headers(webhook).items()
                                  if name not in _FETCH_REFUSES}  # see below
        fields["query"] = _smee_query(webhook.query)
        fields["timestamp"] = round(entry.received_at * 1000)
        body = None if webhook.body_encoding else _json_text(webhook.body)
        if body is None:  # smee-client can carry JSON only: text goes as a JSON string (base64 if not UTF-8)
            fields["body"] = webhook.body or {}
            return _encode(fields)
        return _encode(fields)[:-1] + ',"body":' + body + "}"

    def status(self, status: str, message: str) -> bytes:
        return _sse_event("", _encode({"message": message}), status) if status == "history_gap" else b""


class _GosmeeWire(_EventWire):
    """A channel's stream as gosmee's server writes it, for gosmee's client: "ready" and
    comments to keep it alive as control, a message per webhook with its headers, `timestamp`
    and the body, byte for byte, in `bodyB`; and the "gosmee-gap" event where history is gone.
    Anything else with data would be taken for a webhook and forwarded, so nothing else goes."""

    name = "gosmee"
    ping = b": keepalive\n\n"
    opening = b'data: {"message":"ready"}\n\n'

    def data(self, entry: _Entry) -> str:
        webhook = entry.webhook
        # gosmee's client gives up for good on an event with no header it keeps: one it would take
        fields: dict[str, Any] = _smee_headers(webhook) or {"content-type": "application/octet-stream"}
        fields["timestamp"] = str(round(entry.received_at * 1000))
        fields["bodyB"] = webhook.body if webhook.body_encoding else base64.b64encode(webhook.body.encode()).decode()
        return _encode(fields)

    def status(self, status: str, message: str) -> bytes:
        if status != "history_gap":
            return b""
        return _sse_event("", _encode({"error": "missed_history", "message": message}), "gosmee-gap")


_SMEE_FIELDS = frozenset({"body", "bodyb", "query", "timestamp"})  # an event's own, not a header's
# headers smee-client's fetch (undici) refuses to send, or to send with their values: the webhook would be lost
_FETCH_REFUSES = frozenset({"expect", "sec-fetch-mode"})


def _smee_headers(webhook: Webhook) -> dict[str, Any]:
    """A webhook's headers as smee.io's events carry them: lower-cased names, values joined as
    Node joins a repeated header; not those of the sender's connection (smee-client's fetch
    refuses a request with Connection or Transfer-Encoding), nor any named as an event's own field."""
    named = {name.strip().lower() for value in webhook.headers.get("Connection", ()) for name in value.split(",")}
    return {name.lower(): ", ".join(values) for name, values in webhook.headers.items()
            if not _is_connection_header(name, named) and name.lower() not in _SMEE_FIELDS}


def _smee_query(query: str) -> dict[str, str | list[str]]:
    """A query string as Node's querystring parses it (smee.io's req.query): a repeated name's values in a list."""
    parsed: dict[str, str | list[str]] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        before = parsed.get(name)
        parsed[name] = value if before is None else [*before, value] if isinstance(before, list) else [before, value]
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity; JavaScript's JSON.parse refuses them


def _json_text(text: str) -> str | None:
    """`text` itself, stripped, if it is one JSON value that JavaScript's JSON.parse reads; else None."""
    try:
        json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # nested deeper than Python's stack: not for smee-client either
        return None
    return text.strip()


def _sse_event(event_id: str, data: str, event: str = "") -> bytes:
    """One event of a text/event-stream; `data` of several lines goes as a data field each."""
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {event}\n" if event else "")
    if "\n" in data or "\r" in data:  # JSON whitespace: the client joins the lines with "\n"
        data = "\ndata: ".join(data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return f"{head}data: {data}\n\n".encode()


def _smee_id(log_id: str, shared: bool) -> str:
    """A log entry's place as a stream event's id, shaped as a Redis stream id: the
    milliseconds of its UUIDv7 and, of a cluster's ids (see _stream_log_id), the journal's
    sequence in them; of one relay's, the counter that orders ids within a millisecond (see
    _LogIds): the rest of such an id is random."""
    value = uuid.UUID(log_id).int
    return f"{value >> 80}-{value & (2**62 - 1) if shared else value >> 64 & 0xFFF}"


_STREAM_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,19})")


def _smee_place(event_id: str, shared: bool) -> tuple[str, str] | None:
    """The log ids an event id _smee_id gave (a Last-Event-ID) stands for: the least and the
    greatest of its place, so a resume after the greatest sends every later entry and none
    before; "0-0" (Redis's, before every entry) is NIL_LOG_ID. None if `event_id` is not one."""
    match = _STREAM_ID.fullmatch(event_id.strip())
    if match is None:
        return None
    millis, sequence = int(match[1]), int(match[2])
    if millis == sequence == 0:
        return NIL_LOG_ID, NIL_LOG_ID
    if millis >= 2**48 or sequence > (2**62 - 1 if shared else 0xFFF):
        return None
    if shared:
        exact = str(uuid.UUID(int=millis << 80 | 0x7 << 76 | 0b10 << 62 | sequence))
        return exact, exact
    least = millis << 80 | 0x7 << 76 | sequence << 64 | 0b10 << 62
    return str(uuid.UUID(int=least)), str(uuid.UUID(int=least | (2**62 - 1)))


_SMEE_WIRE, _GOSMEE_WIRE = _SmeeWire(), _GosmeeWire()


# ---- REST API queries and cursors ------------------------------------------------------------
#
# GET /v1/logs and GET /v1/events take their parameters as the hosted API does. A parameter the
# relay does not know, or one given twice, is refused by name: never silently ignored.


def query_parameters(pairs: Iterable[tuple[str, str]], known: frozenset[str]) -> dict[str, str]:
    """The parameters of a query string (as name, value pairs), empty ones left out as absent."""
    found: dict[str, str] = {}
    for name, value in pairs:
        if name not in known:
            raise ProtocolError(f"unknown parameter {_shown(name, 40)!r}: this endpoint takes "
                                f"{', '.join(sorted(known))}")
        if name in found:
            raise ProtocolError(f"parameter {name!r} given twice")
        found[name] = value
    return {name: value for name, value in found.items() if value}


_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
                      re.ASCII)


def parse_time(text: str, name: str, *, end: bool = False) -> float:
    """`from` or `to` as Unix seconds: a date (UTC) or an RFC 3339 time. A date as an `end` is the
    end of that day, so `to=2026-11-28` takes in all of the 28th."""
    try:
        if (date := _DATE.fullmatch(text)) is not None:
            year, month, day = map(int, date.groups())
            return datetime.datetime(year, month, day, tzinfo=datetime.timezone.utc).timestamp() + (86400 if end else 0)
        if (stamp := _RFC3339.fullmatch(text)) is not None:
            year, month, day, hours, minutes, seconds = map(int, stamp.groups()[:6])
            fraction, zone = stamp.group(7) or "", stamp.group(8)
            offset = datetime.timedelta(0) if zone in "Zz" else (1 if zone[0] == "+" else -1) * datetime.timedelta(
                hours=int(zone[1:3]), minutes=int(zone[4:]))
            moment = datetime.datetime(year, month, day, hours, minutes, seconds, tzinfo=datetime.timezone(offset))
            # to an RFC 3339 time takes in that instant, to its last microsecond. The bound is the
            # smallest float at or past the exact time: the nearest one could fall below it, onto
            # a time logged within the microsecond before, which `to` then left out (and `from`
            # let in one logged just before it)
            micros = int(moment.timestamp()) * 1_000_000 + int(fraction.ljust(6, "0")[:6]) + (1 if end else 0)
            bound = micros / 1_000_000
            return math.nextafter(bound, math.inf) if fractions.Fraction(bound) * 1_000_000 < micros else bound
    except (ValueError, OverflowError):  # a month 13, a minute 61, an offset past 24 h, the end of 9999
        pass
    raise ProtocolError(f"{name} must be a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-28T09:30:00Z), "
                        f"not {_shown(text, 40)!r}")


_GO_DURATION_PART = r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"  # in this order: "ms" before "m"
_GO_DURATION = re.compile(f"(?:{_GO_DURATION_PART})+", re.ASCII)
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str, name: str) -> float:
    """A duration in Go's syntax (`24h`, `1h30m`, `90s`, `1.5h`, `0`), as seconds; not negative."""
    if text == "0":
        return 0.0
    if len(text) > 64 or not _GO_DURATION.fullmatch(text):
        raise ProtocolError(f"{name} must be a duration such as 24h, 90m or 30s, not {_shown(text, 40)!r}")
    return sum(float(number) * _GO_UNITS[unit] for number, unit in re.findall(_GO_DURATION_PART, text, re.ASCII))


def encode_cursor(kind: str, scope: Sequence[str], after: str) -> str:
    """An opaque cursor: where a listing of `kind` goes on (past the log id `after`), and the
    query it belongs to (`scope`), which a request bringing it back must match."""
    return base64.urlsafe_b64encode(_encode([kind, *scope, after]).encode()).decode().rstrip("=")


def decode_cursor(text: str, kind: str, size: int) -> tuple[list[str], str]:
    """The scope (`size` strings) and the log id of a cursor from `encode_cursor(kind, ...)`;
    ProtocolError if it is not one."""
    try:
        fields = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, RecursionError):  # also binascii.Error and UnicodeDecodeError; "[[[[..." too
        fields = None
    if not (isinstance(fields, list) and len(fields) == size + 2 and fields[0] == kind
            and all(isinstance(field, str) for field in fields) and _canonical_log_id(fields[-1]) == fields[-1]):
        raise ProtocolError("cursor is not one this relay gave: pass next_cursor as it came")
    return fields[1:-1], fields[-1]


def _int_arg(args: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = args.get(name) or ""
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not low <= int(raw) <= high:
        raise ProtocolError(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


@dataclasses.dataclass(frozen=True)
class _LogsQuery:
    """GET /v1/logs's query, checked: newest first, by pages, with `offset` and `limit`, or
    `cursor` and `next_cursor`, which stay put while webhooks arrive (a page goes on below the
    last id of the one before). A cursor carries the query's filters and its token's tag: a
    filter given again with it must be the same."""

    tag: str  # the token's (see _token_tag)
    filters: dict[str, str]  # bucket, status, from and to, as given ("": none)
    status: str | None
    since: float
    until: float
    limit: int
    offset: int
    before: str  # the cursor's: the page starts below this id

    FILTERS: typing.ClassVar = ("bucket", "status", "from", "to")

    @classmethod
    def parse(cls, pairs: Iterable[tuple[str, str]], tag: str) -> "_LogsQuery":
        params = query_parameters(pairs, LOGS_PARAMETERS)
        before = ""
        if "cursor" in params:
            kept, before = decode_cursor(params["cursor"], "logs", 1 + len(cls.FILTERS))
            if kept[0] != tag:
                raise ProtocolError("cursor belongs to another token")
            for name, value in zip(cls.FILTERS, kept[1:]):
                if params.get(name, value) != value:
                    raise ProtocolError(f"cursor belongs to another query: its {name} is {_shown(value, 64)!r}")
                if value:
                    params[name] = value
            if params.get("offset", "0") != "0":
                raise ProtocolError("offset and cursor cannot go together: a cursor says where the page starts")
        status = params.get("status")
        if status is not None:
            status = LOG_STATUSES[int(status)] if status in ("0", "1", "2", "3", "4", "5") else status
            if status not in LOG_STATUSES:
                raise ProtocolError(f"status must be one of {', '.join(LOG_STATUSES)} (or 0 to 5)")
        since = parse_time(params["from"], "from") if "from" in params else -math.inf
        until = parse_time(params["to"], "to", end=True) if "to" in params else math.inf
        if since >= until:
            raise ProtocolError("from must come before to")
        return cls(tag, {name: params.get(name, "") for name in cls.FILTERS}, status, since, until,
                   _int_arg(params, "limit", _LOGS_LIMIT, 1, _LOGS_MAX_LIMIT), _int_arg(params, "offset", 0, 0, 2**31),
                   before)

    def page(self, newest: Iterable[_Entry]) -> dict[str, Any]:
        """The page of `newest` (its buckets' entries, newest first) this query asks for, as the
        hosted API writes it."""
        matching = [entry for entry in newest if (self.status is None or entry.status == self.status)
                    and self.since <= entry.received_at < self.until]
        start = self.offset + (next((n for n, entry in enumerate(matching) if entry.id < self.before), len(matching))
                               if self.before else 0)
        page = _listed(itertools.islice(matching, start, None), self.limit)
        more = start + len(page) < len(matching)
        limit = len(page) if more and len(page) < self.limit else self.limit  # stopped short at _LOGS_PAGE_BYTES:
        # "limit" says how many it holds
        cursor = encode_cursor("logs", [self.tag, *self.filters.values()], page[-1].id) if page and more else ""
        return {"data": [entry.as_log() for entry in page], "total": len(matching), "limit": limit,
                "offset": self.offset, "next_cursor": cursor}


# ---- client addresses ------------------------------------------------------------------------
#
# Who a request comes from: its peer, or, behind a trusted proxy, the X-Forwarded-For address
# before it; an IPv6 /64 counts as one address.


def client_address(peer: str, forwarded_for: Iterable[str], trusted: Iterable["_IPNetwork"]) -> str:
    """The address a request came from: its peer's, or, when the peer is a trusted proxy, the
    nearest address in its X-Forwarded-For values that is not a trusted proxy too (each proxy
    appends the address it was reached from, so the ones to its right are the trusted ones').
    An entry that is not an address stops the walk at the proxy that wrote it."""
    trusted = tuple(trusted)
    nearest = peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in [peer, *reversed(hops)]:
        address = _ip(hop)
        if address is None:
            return nearest
        nearest = str(address)
        if not any(address in network for network in trusted):
            return nearest
    return nearest


def _host_name(host: str) -> str:
    """The host name a Host header names, in lower case, without its port."""
    host = host.lower().rstrip(".")
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0].rstrip(".")


def _head_values(head: bytes, name: bytes) -> list[str]:
    """The values of header `name` (lower case) in a request's raw head."""
    values = []
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            values.append(value.strip().decode("latin-1"))
    return values


def _address_key(host: str) -> str:
    """What connections and failed authentications are counted by: an IPv4 address, or an IPv6
    /64, the share of a network one host is usually given."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    return str(address.ipv4_mapped or ipaddress.IPv6Network((address, 64), strict=False))


# ---- signatures ------------------------------------------------------------------------------
#
# An input with `verify` relays only webhooks whose signature one of its secrets made. Each scheme
# is the sender's own (GitHub, Stripe, Slack, Shopify, Standard Webhooks and Svix), plus a
# configurable HMAC and HTTP Basic or Bearer for senders that only do that. Every comparison is
# constant-time (hmac.compare_digest), and every secret is tried, matched or not.


@dataclasses.dataclass(frozen=True)
class _Nonce:
    """What a webhook was verified by, which a replay of it is verified by too: the timestamp
    and a digest of what its signature covers (Standard Webhooks: of the signed message id, which
    its sender keeps across retries). Never the header's text: `t=T,v1=S,v1=00`, `t=T, v1=S`,
    `v1=S,t=T` and a trailing comma each replayed a signed Stripe webhook."""

    key: str
    until: float  # when its timestamp is past the tolerance, and the check refuses a replay anyway


class _HeaderLookup:
    """A request's headers by name, any case: the first value of each."""

    def __init__(self, headers: Mapping[str, list[str]]) -> None:
        self._first = {name.lower(): values[0] for name, values in headers.items() if values}

    def get(self, *names: str) -> tuple[str, str]:
        """The first of `names` present, and its value; ("", "") when none is."""
        for name in names:
            value = self._first.get(name.lower())
            if value is not None:
                return name, value
        return "", ""


# What a check returns: why the webhook fails it ("" if it passes); for a scheme with a signed
# timestamp, what it was verified by and that timestamp (see _Nonce), else "" and 0.
_Checked = tuple[str, str, int]


def _hmac_of(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _matched(given: Iterable[str], expected: Iterable[bytes]) -> bytes | None:
    """Which of `expected` one of `given` equals (None: none), every pair compared in constant time."""
    matched = None
    expected = list(expected)
    for candidate in given:
        for value in expected:
            if hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), value):
                matched = value
    return matched


def _unix_time(text: str) -> int | None:
    """A signed timestamp: ASCII digits, 12 at most (the year 33658), so no int is too large."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def _timestamp_problem(text: str, verify: VerifyConfig, now: float, header: str) -> str:
    stamp = _unix_time(text)
    if stamp is None:
        return f"{header} is not a Unix time"
    if abs(now - stamp) > verify.tolerance:
        return f"{header} is {abs(now - stamp):.0f} s off (tolerance {verify.tolerance:g} s): a replay, or a clock"
    return ""


def _passed(matched: bool, problem: str) -> _Checked:
    """The answer of a check without a timestamp."""
    return ("" if matched else problem), "", 0


def _timed(matched: bytes | None, problem: str, stamp: str, signed: bytes) -> _Checked:
    """The answer of a check with a signed timestamp `stamp` (checked already), whose signature
    covers `signed`: what a replay is known by is that, as a digest. (Not the signature that
    matched: with two secrets during a rotation, `v1=S1,v1=S2` and `v1=S2` are one webhook.)"""
    if matched is None:
        return problem, "", 0
    return "", f"{int(stamp)}:{hashlib.sha256(signed).hexdigest()}", int(stamp)


def _check_github(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get("X-Hub-Signature-256")
    if not name:
        return _passed(False, "X-Hub-Signature-256 is missing")
    expected = (b"sha256=" + _hmac_of(secret.encode(), body).hex().encode() for secret in verify.secrets)
    return _passed(_matched([value], expected) is not None, "X-Hub-Signature-256 does not match")


def _check_stripe(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get("Stripe-Signature")
    if not name:
        return _passed(False, "Stripe-Signature is missing")
    fields: dict[str, list[str]] = {}
    for item in value.split(","):
        key, _, field = item.strip().partition("=")
        fields.setdefault(key, []).append(field)
    if len(fields.get("t", [])) != 1 or not fields.get("v1"):
        return _passed(False, "Stripe-Signature needs one t= and a v1=")
    stamp = fields["t"][0]
    if problem := _timestamp_problem(stamp, verify, now, "Stripe-Signature's t="):
        return _passed(False, problem)
    signed = stamp.encode() + b"." + body
    expected = (_hmac_of(secret.encode(), signed).hex().encode() for secret in verify.secrets)
    return _timed(_matched(fields["v1"], expected), "Stripe-Signature does not match", stamp, signed)


def _check_slack(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    stamp_name, stamp = headers.get("X-Slack-Request-Timestamp")
    name, value = headers.get("X-Slack-Signature")
    if not (stamp_name and name):
        return _passed(False, "X-Slack-Signature or X-Slack-Request-Timestamp is missing")
    if problem := _timestamp_problem(stamp, verify, now, "X-Slack-Request-Timestamp"):
        return _passed(False, problem)
    signed = b"v0:" + stamp.encode() + b":" + body
    expected = (b"v0=" + _hmac_of(secret.encode(), signed).hex().encode() for secret in verify.secrets)
    return _timed(_matched([value], expected), "X-Slack-Signature does not match", stamp, signed)


def _check_shopify(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get("X-Shopify-Hmac-Sha256")
    if not name:
        return _passed(False, "X-Shopify-Hmac-Sha256 is missing")
    expected = (base64.b64encode(_hmac_of(secret.encode(), body)) for secret in verify.secrets)
    return _passed(_matched([value], expected) is not None, "X-Shopify-Hmac-Sha256 does not match")


def _check_standard_webhooks(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    """Standard Webhooks (standardwebhooks.com), which Svix sends with its own header names. A
    message's id is signed with it, and its sender keeps it across retries: what tells a replay."""
    id_name, message_id = headers.get("webhook-id", "svix-id")
    stamp_name, stamp = headers.get("webhook-timestamp", "svix-timestamp")
    name, value = headers.get("webhook-signature", "svix-signature")
    if not (id_name and stamp_name and name):
        return _passed(False, "webhook-id, webhook-timestamp or webhook-signature is missing")
    if problem := _timestamp_problem(stamp, verify, now, stamp_name):
        return _passed(False, problem)
    given = [signature[3:] for signature in value.split(" ") if signature.startswith("v1,")]
    signed = f"{message_id}.{stamp}.".encode("utf-8", "surrogateescape") + body
    keys = [key for key in map(_webhook_key, verify.secrets) if key is not None]
    expected = (base64.b64encode(_hmac_of(key, signed)) for key in keys)
    return _timed(_matched(given, expected), f"{name} does not match", stamp, _utf8(message_id))


def _check_hmac(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get(verify.header)
    if not name:
        return _passed(False, f"{verify.header} is missing")
    prefix = verify.prefix.encode()

    def signature(secret: str) -> bytes:
        digest = _hmac_of(secret.encode(), body, verify.algorithm)
        return prefix + (digest.hex().encode() if verify.encoding == "hex" else base64.b64encode(digest))

    return _passed(_matched([value], map(signature, verify.secrets)) is not None, f"{verify.header} does not match")


def _check_basic(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get("Authorization")
    scheme, _, credentials = value.partition(" ")
    if not name or scheme.lower() != "basic":
        return _passed(False, "Authorization: Basic is missing")
    try:
        given = base64.b64decode(credentials.strip(), validate=True).decode("utf-8", "surrogateescape")
    except ValueError:
        return _passed(False, "Authorization: Basic is not base64")
    return _passed(_matched([given], (secret.encode() for secret in verify.secrets)) is not None,
                   "wrong user or password")


def _check_bearer(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    name, value = headers.get("Authorization")
    scheme, _, token = value.partition(" ")
    if not name or scheme.lower() != "bearer":
        return _passed(False, "Authorization: Bearer is missing")
    return _passed(_matched([token.strip()], (secret.encode() for secret in verify.secrets)) is not None, "wrong token")


def _check_token(verify: VerifyConfig, headers: _HeaderLookup, body: bytes, now: float) -> _Checked:
    """A secret sent as it is in a header of its own, as GitLab sends X-Gitlab-Token."""
    name, value = headers.get(verify.header)
    if not name:
        return _passed(False, f"{verify.header} is missing")
    return _passed(_matched([value], (secret.encode() for secret in verify.secrets)) is not None,
                   f"wrong {verify.header}")


_SIGNATURE_CHECKS: dict[str, Callable[[VerifyConfig, _HeaderLookup, bytes, float], _Checked]] = {
    "github": _check_github, "stripe": _check_stripe, "slack": _check_slack, "shopify": _check_shopify,
    "standard-webhooks": _check_standard_webhooks, "hmac": _check_hmac, "basic": _check_basic,
    "bearer": _check_bearer, "token": _check_token,
}


def check_signature(verify: VerifyConfig, headers: Mapping[str, list[str]], body: bytes, now: float) -> str:
    """Why `body` with `headers` does not prove it came from the sender `verify` names, in a few
    words; "" when it does. `now` is the time signed timestamps are held against."""
    return verified(verify, headers, body, now)[0]


def verified(verify: VerifyConfig, headers: Mapping[str, list[str]], body: bytes,
             now: float) -> tuple[str, "_Nonce | None"]:
    """check_signature's answer, and, for a webhook that passed a scheme whose signature covers
    a timestamp (which a replay would pass within its tolerance), what tells it from a replay
    (see _Nonce)."""
    check = _SIGNATURE_CHECKS[verify.scheme]
    problem, key, stamp = check(verify, _HeaderLookup(headers), body, now)
    return problem, (_Nonce(key, stamp + verify.tolerance) if key and not problem else None)


# ==== 4. State: the store, the log, and the backends that keep it =============================
#
# Synchronous where it can be: every change to the store and the log happens between two
# checkpoints, so no lock is needed. The core (below) makes every change; they call back only
# through the Protocols declared here (_Subscriber, _Owner).

# ---- the store and the log -------------------------------------------------------------------
#
# Buckets, inputs and tokens from the config, who is subscribed to what, and the webhook log,
# indexed in memory per bucket.


class _Subscriber(typing.Protocol):
    """A bucket's subscriber (a socket session, a smee channel's stream), as the core sends to it."""

    observer: bool  # what it is sent is not "sent" for the log (an inspector watching)
    wire: _Wire  # how its client is sent webhooks and statuses

    def deliver(self, frame: bytes) -> None: ...


class _Bucket:
    __slots__ = ("config", "routes", "subscribers", "_logged", "history", "history_bytes", "trimmed", "dropped",
                 "rejected", "positions", "_queue_locks")

    def __init__(self, config: BucketConfig) -> None:
        self.config = config
        self.routes = _routes(config)
        self.subscribers: set[_Subscriber] = set()
        self._logged: trio.Event | None = None  # see logged()
        self.history: deque[_Entry] = deque()  # its log, oldest first; see _Log
        self.history_bytes = 0
        self.trimmed = ""  # entries up to this id may be gone: a resume from before it may miss some...
        self.dropped = ""  # ...and up to this one some are: this process dropped them (its bounds, a cluster's)
        self.rejected: deque[_Entry] = deque()  # the last webhooks refused by a signature check; see _Log
        self.positions: dict[str, str] = {}  # its pull queues (GET /v1/events): output name ("": every
        # internal one) -> the id of the last entry handed out
        self._queue_locks: dict[str, trio.Lock] = {}

    def logged(self) -> trio.Event:
        """An event set once entries are next logged in this bucket (what its forwarders wait for)."""
        if self._logged is None:
            self._logged = trio.Event()
        return self._logged

    def wake(self) -> None:
        """Entries were logged: wake whoever waits for them."""
        if self._logged is not None:
            self._logged.set()
            self._logged = None

    def queue_lock(self, output: str) -> trio.Lock:
        """Held by a pull queue's call from reading its position until the new one is stored."""
        return self._queue_locks.setdefault(output, trio.Lock())


class _Store:
    def __init__(self, config: Config, kept: Mapping[str, _Bucket] = {}) -> None:
        """The buckets of `config`; those in `kept` (by id: a reload) keep their log and
        subscribers, and take their new config."""
        pairs = [(kept.get(bucket_config.id) or _Bucket(bucket_config), bucket_config)
                 for bucket_config in config.buckets]
        self._buckets = [bucket for bucket, _ in pairs]
        self._adopt = [(bucket, bucket_config) for bucket, bucket_config in pairs if bucket.config is not bucket_config]
        self._by_ref: dict[str, _Bucket] = {}
        for bucket, bucket_config in pairs:
            self._by_ref[bucket_config.name] = bucket
            self._by_ref.setdefault(bucket_config.id, bucket)
        self._inputs = {input_.id: (bucket, input_) for bucket, bucket_config in pairs for input_ in bucket_config.inputs}
        self._channels = {bucket_config.smee_channel: (bucket, channel_input) for bucket, bucket_config in pairs
                          if (channel_input := _channel_input(bucket_config)) is not None}
        self._visible: dict[str, tuple[_Bucket, ...]] = {
            token.key: tuple(self._buckets) if token.buckets is None
            else tuple(dict.fromkeys(self._by_ref[ref] for ref in token.buckets))
            for token in config.tokens
        }

    def resolve(self, token: TokenConfig, refs: tuple[str, ...]) -> tuple[_Bucket, ...]:
        """The buckets `refs` (names or ids; none: all) name, if `token` may see them all."""
        visible = self.visible(token)
        if not refs:
            return visible
        missing = [ref for ref in refs if self._by_ref.get(ref) not in visible]
        if missing:
            raise NotFound(f"no such bucket for this token: {_shown(', '.join(missing), 256)}")
        return tuple(dict.fromkeys(self._by_ref[ref] for ref in refs))

    def adopt(self) -> None:
        """Give kept buckets their new config (a reload, once nothing can fail any more)."""
        for bucket, bucket_config in self._adopt:
            bucket.config, bucket.routes = bucket_config, _routes(bucket_config)

    def visible(self, token: TokenConfig) -> tuple[_Bucket, ...]:
        return self._visible.get(token.key, ())  # none for a token a reload removed

    def has(self, bucket: _Bucket) -> bool:
        """Whether `bucket` is one of these (not one a reload removed)."""
        return self._by_ref.get(bucket.config.id) is bucket

    @property
    def buckets(self) -> list[_Bucket]:
        return self._buckets

    def find_input(self, input_id: str) -> tuple[_Bucket, InputConfig] | None:
        return self._inputs.get(input_id)

    def find_channel(self, name: str) -> tuple[_Bucket, InputConfig] | None:
        """The bucket whose smee channel `name` is, and the input its webhooks come in as."""
        return self._channels.get(name)

    def find_bucket(self, ref: str) -> BucketConfig | None:
        bucket = self._by_ref.get(ref)
        return bucket.config if bucket else None

    def bucket_of(self, entry: _Entry) -> _Bucket | None:
        return self._by_ref.get(entry.bucket.id)

    def by_id(self, bucket_id: str) -> _Bucket | None:
        bucket = self._by_ref.get(bucket_id)
        return bucket if bucket is not None and bucket.config.id == bucket_id else None  # not a bucket so named


def _entry_id(entry: _Entry) -> str:
    return entry.id


class _Log:
    """The webhook log: each bucket's history of entries, in arrival (and so id) order.

    A history is bounded by its bucket's history_size, history_ttl and history_bytes; the oldest
    entries go first, and the bucket's `trimmed` mark moves past them, so a client resuming from
    an id before the mark is told it may have missed some. With storage, this is the database's
    content, loaded at start, and the database is trimmed the same way (see `on_trim`).

    The wire frames of the entries sent last are kept a while (_FRAME_CACHE_BYTES), so clients
    resuming from the same point share one copy of each.
    """

    def __init__(self, after: str = "") -> None:
        self.ids = _LogIds(after)
        self._entries: dict[str, _Entry] = {}
        self.on_trim: Callable[[_Bucket], None] = lambda bucket: None
        self._frames: dict[str, bytes] = {}  # entry id -> its wire frame, least recently used first
        self._frames_bytes = 0

    def frame(self, entry: _Entry) -> bytes:
        """`entry` as the bytes of a WebSocket frame, built once while it is in use."""
        frame = self._frames.pop(entry.id, None)
        if frame is None:
            frame = wire_frame(entry.frame())
            self._frames_bytes += len(frame)
            while self._frames and self._frames_bytes > _FRAME_CACHE_BYTES:
                self._frames_bytes -= len(self._frames.pop(next(iter(self._frames))))
        self._frames[entry.id] = frame  # the most recently used, last
        return frame

    def get(self, log_id: str) -> _Entry | None:
        return self._entries.get(log_id)

    def record(self, bucket: _Bucket, input_: InputConfig, webhook: Webhook) -> list[_Entry]:
        """New entries for `webhook`, with ids, not yet in the history (see `add`)."""
        ids = [self.ids.next() for _ in bucket.routes]
        return _entries(ids, bucket.config, input_.id, input_.name, webhook, bucket.routes, _wall_time())

    def resend(self, bucket: _Bucket, entry: _Entry, route: _Route) -> _Entry:
        """A new entry that delivers `entry`'s webhook again, along `route`, and names the one it
        repeats; not yet in the history (see `add`)."""
        webhook = entry.webhook if entry.request_headers is None else dataclasses.replace(
            entry.webhook, headers=entry.request_headers)  # as its sender sent it: the route sets its own headers
        [resent] = _entries([self.ids.next()], bucket.config, entry.input_id, entry.input_name, webhook, [route],
                            _wall_time(), resent_from=entry.id)
        return resent

    def add(self, bucket: _Bucket, entries: Iterable[_Entry]) -> None:
        for entry in entries:
            bucket.history.append(entry)
            bucket.history_bytes += entry.size
            self._entries[entry.id] = entry
        self._trim(bucket, _wall_time())

    def reject(self, bucket: _Bucket, input_: InputConfig, webhook: Webhook, reason: str) -> _Entry:
        """Keep a webhook its input's signature check refused, for the logs API (status
        "rejected", its 401 as the answer): the last _REJECTED_KEPT of each bucket, in a list of
        their own, so a stranger's forgeries never push an accepted webhook out of the history.
        No socket or output sees them, and storage does not keep them."""
        entry = _Entry(self.ids.next(), bucket.config, input_.id, input_.name, "", "", webhook, _wall_time(),
                       status="rejected", internal=False)
        entry.answer = _Answer(401, {}, f"signature check failed: {reason}".encode(), entry.received_at)
        bucket.rejected.append(entry)
        self._entries[entry.id] = entry
        while len(bucket.rejected) > _REJECTED_KEPT:
            del self._entries[bucket.rejected.popleft().id]
        return entry

    def forget(self, bucket: _Bucket) -> None:
        """Drop the whole log of a bucket the config no longer has."""
        for entry in itertools.chain(bucket.history, bucket.rejected):
            self._entries.pop(entry.id, None)
        bucket.history.clear()
        bucket.rejected.clear()
        bucket.history_bytes = 0

    def answered(self, bucket: _Bucket | None, entry: _Entry, answer: _Answer) -> None:
        """Record `answer` on `entry`; it counts against history_bytes too."""
        entry.answer = answer
        entry.size += answer.size
        if bucket is not None and entry.id in self._entries:  # else trimmed already, or its bucket removed
            bucket.history_bytes += answer.size
            self._trim(bucket, _wall_time())

    def expire(self, buckets: Iterable[_Bucket], now: float) -> None:
        """Drop entries older than their bucket's history_ttl."""
        for bucket in buckets:
            self._trim(bucket, now)
            while bucket.rejected and bucket.rejected[0].received_at < now - (bucket.config.history_ttl or 0):
                del self._entries[bucket.rejected.popleft().id]

    def _trim(self, bucket: _Bucket, now: float) -> None:
        """Drop the oldest entries while the history is over a bound (history_bytes never drops
        the newest entry, however large)."""
        config, history, dropped = bucket.config, bucket.history, None
        assert config.history_size and config.history_ttl and config.history_bytes  # filled in by _checked
        oldest = now - config.history_ttl
        while history and (len(history) > config.history_size or history[0].received_at < oldest
                           or (bucket.history_bytes > config.history_bytes and len(history) > 1)):
            dropped = history.popleft()
            bucket.history_bytes -= dropped.size
            del self._entries[dropped.id]
        if dropped is not None:
            bucket.trimmed = bucket.dropped = max(bucket.trimmed, dropped.id)
            self.on_trim(bucket)

    def after(self, buckets: Iterable[_Bucket], cursor: str, limit: int,
              keep: Callable[[_Entry], bool] = lambda entry: entry.internal) -> list[_Entry]:
        """Up to `limit` entries of `buckets` with ids after `cursor`, oldest first: those sockets
        get, or those `keep` says."""
        streams: list[Iterator[_Entry]] = []
        for bucket in buckets:
            start = bisect.bisect_right(bucket.history, cursor, key=_entry_id)
            streams.append(filter(keep, itertools.islice(bucket.history, start, None)))
        return list(itertools.islice(heapq.merge(*streams, key=_entry_id), limit))

    def newest(self, buckets: Iterable[_Bucket]) -> Iterator[_Entry]:
        """Every entry of `buckets`, newest first."""
        return heapq.merge(*(reversed(bucket.history) for bucket in buckets),
                           *(reversed(bucket.rejected) for bucket in buckets), key=_entry_id, reverse=True)


# ---- backends --------------------------------------------------------------------------------
#
# The _Log indexes the webhook log in memory; a backend keeps it. Every backend takes the same
# calls (_Backend): `insert` a webhook's new entries (published, by the owner it was made with,
# once they are kept, in id order; not kept at all if the webhook's nonce was taken: a replay),
# `update` a changed one, `trim` a bucket, `committed()` to wait until all that is kept, `move` a
# pull queue (and wait until that is kept); `load` at start, `run` while serving, `aclose` at the
# end. The nonces of signed webhooks (see _Nonce) are kept where the log is: a replay is refused
# across a restart, and across a cluster.
#
# _Memory keeps nothing past the process, and publishes at once. _Storage (`[storage] path`)
# keeps it in SQLite: one task gathers what the event loop asked for into one transaction, runs
# it in a thread, and only then publishes the new entries, so a sender's 2xx, and a socket's
# frame, come after the webhook is on disk. Everything is read at start, into the _Log.


class _Kept(typing.NamedTuple):
    """What a backend holds when the relay starts."""

    last: str  # the greatest log id it ever held: new ones must be greater
    trimmed: dict[str, str]  # bucket id -> its trim mark (see _Bucket.trimmed)
    entries: dict[str, list[_Entry]]  # bucket id -> its entries, oldest first
    positions: list[tuple[str, str, str]]  # pull queues: bucket id, output, position


class _Insert:
    """A webhook's new entries, for a backend to keep, and the nonce it was verified by, if one
    (see _Nonce); `replayed` once the backend found that nonce taken, and kept nothing."""

    __slots__ = ("bucket", "entries", "input_id", "nonce", "replayed", "behind")

    def __init__(self, bucket: _Bucket, entries: list[_Entry], input_id: str = "", nonce: _Nonce | None = None) -> None:
        self.bucket, self.entries, self.input_id, self.nonce = bucket, entries, input_id, nonce
        self.replayed = False
        self.behind: _Batch | None = None  # a replay's: the batch keeping the webhook it repeats, if not kept yet


class _Backend(typing.Protocol):
    """Where the log is kept (see above): what the core calls, and all it calls."""

    session_key: bytes  # the key inspectors' sessions are signed with, as the backend keeps it
    failing: str  # why it cannot keep what it is given now, or ""
    shared: bool  # kept by a cluster: another relay may have given a log id a moment before this one saw it

    async def load(self, buckets: Mapping[str, BucketConfig]) -> _Kept: ...
    async def run(self) -> None: ...
    async def aclose(self) -> None: ...
    def insert(self, insert: _Insert) -> None: ...
    def update(self, entry: _Entry) -> None: ...
    def trim(self, bucket: _Bucket) -> None: ...
    async def committed(self) -> None: ...
    async def move(self, bucket: _Bucket, output: str) -> None: ...
    async def claim_answer(self, entry: _Entry, answer: _Answer, status: str) -> bool: ...
    def queue(self, bucket: _Bucket, output: str) -> contextlib.AbstractAsyncContextManager[None]: ...
    def leading(self, name: str) -> contextlib.AbstractAsyncContextManager[trio.CancelScope]: ...
    def reloaded(self, buckets: list[_Bucket], added: list[_Bucket]) -> None: ...


class _Owner(typing.Protocol):
    """What a backend hands back to the log's owner (the core): its new entries once they are
    kept; and, a cluster's, what the other relays did."""

    def publish(self, bucket: _Bucket, entries: list[_Entry]) -> None: ...
    def bucket_by_id(self, bucket_id: str) -> _Bucket | None: ...
    def apply_change(self, bucket: _Bucket, row: Mapping[str, Any]) -> None: ...
    def adopt(self, bucket: _Bucket, entries: list[_Entry], trimmed: str) -> None: ...
    def missed(self, mark: str, count: int) -> None: ...


class _Replays:
    """The nonces (see _Nonce) of the webhooks a relay alone accepted, each until it is past
    (the signature check refuses a replay then anyway): the newest _NONCES_KEPT of each input,
    so a flood of signed webhooks costs bounded memory."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, float]] = {}  # input id -> nonce key -> until when, oldest first

    def claim(self, input_id: str, nonce: _Nonce, now: float) -> bool:
        """Take `nonce` for a webhook being accepted; False if it was taken before: a replay."""
        seen = self._seen.setdefault(input_id, {})
        while seen and next(iter(seen.values())) < now:
            del seen[next(iter(seen))]
        if nonce.key in seen:
            return False
        seen[nonce.key] = nonce.until
        if len(seen) > _NONCES_KEPT:
            del seen[next(iter(seen))]
        return True

    def give_back(self, input_id: str, nonce: _Nonce) -> None:
        """Its webhook was not kept after all (its sender got 503): a retry must pass."""
        self._seen.get(input_id, {}).pop(nonce.key, None)


class _Alone:
    """What a backend of one relay alone need not share with other relays: the first answer to
    an entry, a pull queue's lock, the lead of a public output's deliveries, the nonces taken."""

    shared = False
    _replays: _Replays

    def claim(self, insert: _Insert) -> bool:
        """Take `insert`'s nonce, if it has one; False, and `insert.replayed`, if it was taken."""
        if insert.nonce is not None and not self._replays.claim(insert.input_id, insert.nonce, _wall_time()):
            insert.replayed = True
        return not insert.replayed

    async def claim_answer(self, entry: _Entry, answer: _Answer, status: str) -> bool:
        return True  # the core already checked this relay's own entry

    @asynccontextmanager
    async def queue(self, bucket: _Bucket, output: str) -> AsyncIterator[None]:
        yield  # the core's lock of the queue is the only one

    @asynccontextmanager
    async def leading(self, name: str) -> AsyncIterator[trio.CancelScope]:
        yield trio.CancelScope()  # this relay leads, for good

    def reloaded(self, buckets: list[_Bucket], added: list[_Bucket]) -> None:
        pass  # no other relay logged into a bucket this one did not have


class _Memory(_Alone):
    """The log in memory only: a restart starts it empty. A new entry is published at once."""

    failing = ""  # it never fails to keep what it is given

    def __init__(self, publish: Callable[[_Bucket, list[_Entry]], None]) -> None:
        self._publish = publish
        self._replays = _Replays()
        self.session_key = secrets.token_bytes(32)  # a restart ends inspectors' sessions

    async def load(self, buckets: Mapping[str, BucketConfig]) -> _Kept:
        return _Kept("", {}, {}, [])

    def insert(self, insert: _Insert) -> None:
        if self.claim(insert):
            self._publish(insert.bucket, insert.entries)

    def update(self, entry: _Entry) -> None:
        pass

    def trim(self, bucket: _Bucket) -> None:
        pass

    async def move(self, bucket: _Bucket, output: str) -> None:
        pass

    async def committed(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id TEXT PRIMARY KEY,  -- UUIDv7: sorts in arrival order
    bucket_id TEXT NOT NULL, input_id TEXT NOT NULL, input_name TEXT NOT NULL,
    output_name TEXT NOT NULL, output_destination TEXT NOT NULL, received_at REAL NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL, query TEXT NOT NULL, headers TEXT NOT NULL,
    body TEXT NOT NULL, body_encoding TEXT NOT NULL, status TEXT NOT NULL,
    status_code INTEGER, response_headers TEXT, response_body BLOB, answered_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logs_by_bucket ON logs (bucket_id, id);
CREATE TABLE IF NOT EXISTS buckets (id TEXT PRIMARY KEY, trimmed TEXT NOT NULL) WITHOUT ROWID;
"""
# What each schema version adds to the one before; PRAGMA user_version says which a file has.
_MIGRATIONS = (
    "ALTER TABLE logs ADD COLUMN sender TEXT NOT NULL DEFAULT '';"  # 1: sender, retries
    "ALTER TABLE logs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;",
    "ALTER TABLE logs ADD COLUMN resent_from TEXT NOT NULL DEFAULT '';"  # 2: resends, and pull queues
    "ALTER TABLE logs ADD COLUMN request_headers TEXT NOT NULL DEFAULT '';"
    "CREATE TABLE positions (bucket_id TEXT NOT NULL, output TEXT NOT NULL, last TEXT NOT NULL,"
    " PRIMARY KEY (bucket_id, output)) WITHOUT ROWID;",
    "CREATE TABLE nonces (input_id TEXT NOT NULL, nonce TEXT NOT NULL, until REAL NOT NULL,"  # 3: replays, and
    " PRIMARY KEY (input_id, nonce)) WITHOUT ROWID;"  # the key inspectors' sessions are signed with
    "CREATE INDEX nonces_by_until ON nonces (until);"
    "CREATE TABLE keys (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
)
_COLUMNS = ("id", "bucket_id", "input_id", "input_name", "output_name", "output_destination", "received_at",
            "method", "path", "query", "headers", "body", "body_encoding", "sender", "resent_from", "request_headers",
            "status", "status_code", "response_headers", "response_body", "answered_at", "retries")
_UPDATED = _COLUMNS[_COLUMNS.index("status"):]
_WAL_PAGES = 256  # checkpoint once the write-ahead log holds this many pages (SQLite's default: 1,000)
_WAL_BYTES = 2**20  # and cut it back to this size after a checkpoint (SQLite's default: never)
_INSERT = f"INSERT INTO logs ({', '.join(_COLUMNS)}) VALUES ({', '.join(f':{column}' for column in _COLUMNS)})"
_UPDATE = f"UPDATE logs SET {', '.join(f'{column} = :{column}' for column in _UPDATED)} WHERE id = :id"


def _check_storage(path: str) -> None:
    """That the SQLite file at `path` can be the log's database, writing nothing into it: an
    existing one is a database this relay_lite can read, in a folder it may write (its journal
    lives beside it); a new one's folder exists and may be written. As the user who runs it:
    check as the service's user what the service will open."""
    target = Path(path)
    try:
        if target.exists():
            _require(os.access(target, os.R_OK | os.W_OK) and os.access(target.parent, os.W_OK | os.X_OK),
                     "storage.path", f"cannot use {path!r} as the log's database: this user may not write it, "
                     "or its folder")
            db = sqlite3.connect(f"{target.absolute().as_uri()}?mode=ro", uri=True)
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                db.close()
            _check_schema(version, path)
        else:
            _require(target.parent.is_dir(), "storage.path",
                     f"cannot use {path!r} as the log's database: its folder {str(target.parent)!r} does not exist")
            _require(os.access(target.parent, os.W_OK | os.X_OK), "storage.path",
                     f"cannot use {path!r} as the log's database: this user may not write its folder")
    except (sqlite3.Error, OSError) as error:  # OSError: a folder on the way this user may not enter
        raise ConfigError(f"storage.path: cannot use {path!r} as the log's database: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def _check_schema(version: int, path: str) -> None:
    _require(version <= len(_MIGRATIONS), "storage.path", f"{path!r} was written by a newer relay_lite (schema {version})")


class _Batch:
    """What one transaction carries; callers wait for it to commit."""

    def __init__(self) -> None:
        self.inserts: list[_Insert] = []
        self.updates: dict[str, _Entry] = {}
        self.trims: dict[str, str] = {}  # bucket id -> delete its entries up to this id
        self.positions: dict[tuple[str, str], str] = {}  # (bucket id, output) -> a pull queue's position
        self.committed = trio.Event()
        self.error: BaseException | None = None


class _Batching:
    """What the backends that write in batches share (_Storage, _Redis): the batch the event loop
    fills, the task (`run`) that writes it, and the waits for it."""

    _failed = "the webhook log could not be written"  # a StorageError's opening words

    def __init__(self) -> None:
        self._batch = _Batch()
        self._work = trio.Event()
        self._closing = False
        self.failing = ""  # why the last write failed; "" once one succeeds
        self.stopped = trio.Event()

    async def committed(self) -> None:
        """Wait until what was asked for so far is written; raise StorageError if it failed."""
        batch = self._batch
        self._work.set()
        await batch.committed.wait()
        if batch.error is not None:
            raise StorageError(f"{self._failed}: {batch.error}")

    async def aclose(self) -> None:
        """Stop once what was asked for so far is written."""
        self._closing = True
        self._work.set()
        await self.stopped.wait()


class _Storage(_Alone, _Batching):
    """The log's SQLite file. `insert`, `update` and `trim` ask for writes; `run` makes them, a
    transaction at a time; `committed()` waits for what was asked so far."""

    def __init__(self, path: str, publish: Callable[[_Bucket, list[_Entry]], None]) -> None:
        self.path = path
        self._publish = publish
        self._db: sqlite3.Connection | None = None
        self._replays = _Replays()
        self._pending: dict[tuple[str, str], _Batch] = {}  # nonces taken, not yet kept: (input id, key) -> batch
        self.session_key = b""  # kept in the file: a restart keeps inspectors signed in
        # the one fault hook, for tests: called in the writer's thread before each transaction;
        # what it raises, the transaction raises (a disk that fails, or fails once, slowly)
        self.fault: Callable[[], None] | None = None
        _Batching.__init__(self)

    def open(self) -> tuple[str, dict[str, str], list[sqlite3.Row], list[tuple[str, str, str]],
                            list[tuple[str, str, float]]]:
        """Open (or create) the file; return the greatest id in it, each bucket's trim mark, every
        row, the pull queues' positions, and the nonces not yet past.

        Blocking: run it in a thread.
        """
        db = None
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a commit is on disk, not only handed to the OS
            db.execute("PRAGMA busy_timeout = 5000")  # someone reading the file with sqlite3 may lock it a while
            # A checkpoint needs room in the file for what the WAL holds, and by default the WAL
            # keeps its largest size: on a small disk that filled up, a 4 MiB WAL that could not be
            # checkpointed kept every write failing after room was freed. Checkpoint often, give
            # the room back.
            db.execute(f"PRAGMA wal_autocheckpoint = {_WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit = {_WAL_BYTES}")
            db.executescript(_SCHEMA)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            _check_schema(version, self.path)
            for number, migration in enumerate(_MIGRATIONS[version:], version + 1):  # each whole, or not at all
                db.executescript(f"BEGIN; {migration} PRAGMA user_version = {number}; COMMIT;")
            trimmed = dict(db.execute("SELECT id, trimmed FROM buckets"))
            reading = db.cursor()
            reading.row_factory = sqlite3.Row  # columns by name: a later schema may add some anywhere
            rows = reading.execute(f"SELECT {', '.join(_COLUMNS)} FROM logs ORDER BY id").fetchall()
            positions = db.execute("SELECT bucket_id, output, last FROM positions").fetchall()
            nonces = db.execute("SELECT input_id, nonce, until FROM nonces WHERE until >= ? ORDER BY until",
                                (_wall_time(),)).fetchall()
            db.execute("INSERT OR IGNORE INTO keys VALUES ('inspector sessions', ?)", (secrets.token_bytes(32),))
            self.session_key = db.execute("SELECT value FROM keys WHERE name = 'inspector sessions'").fetchone()[0]
        except (sqlite3.Error, OSError, ConfigError) as error:
            if db is not None:
                db.close()  # and with it a migration's transaction, rolled back
            raise StorageError(f"storage.path: cannot use {self.path!r} as the log's database: {error}") from None
        self._db = db
        last = rows[-1]["id"] if rows else ""  # ids sort as strings
        return max([last, *trimmed.values()]), trimmed, rows, positions, nonces

    async def load(self, buckets: Mapping[str, BucketConfig]) -> _Kept:
        """Open the file, and read what it holds of `buckets` (by id)."""
        last, trimmed, rows, positions, nonces = await trio.to_thread.run_sync(self.open)
        now = _wall_time()
        for input_id, key, until in nonces:
            self._replays.claim(input_id, _Nonce(key, until), now)
        entries: dict[str, list[_Entry]] = {}
        unknown = 0
        for row in rows:
            if row["bucket_id"] in buckets:
                entries.setdefault(row["bucket_id"], []).append(_entry_from_row(row, buckets[row["bucket_id"]]))
            else:
                unknown += 1
        logger.info("webhook log %s: %d entries loaded", self.path, len(rows) - unknown)
        if unknown:
            logger.warning("webhook log %s: %d entries belong to buckets no longer configured; they stay "
                           "in the file, unused", self.path, unknown)
        return _Kept(last, trimmed, entries, positions)

    def insert(self, insert: _Insert) -> None:
        nonce = (insert.input_id, insert.nonce.key) if insert.nonce is not None else None
        if nonce in self._pending:  # the same webhook, not yet kept: its outcome is this one's
            insert.replayed, insert.behind = True, self._pending[nonce]
        elif self.claim(insert):  # its nonce is written with it
            if nonce is not None:
                self._pending[nonce] = self._batch
            self._batch.inserts.append(insert)
            self._work.set()

    def update(self, entry: _Entry) -> None:
        self._batch.updates[entry.id] = entry
        self._work.set()

    def trim(self, bucket: _Bucket) -> None:
        self._batch.trims[bucket.config.id] = bucket.trimmed
        self._work.set()

    async def move(self, bucket: _Bucket, output: str) -> None:
        """Keep the pull queue's position, `bucket.positions[output]`; StorageError if it is not kept."""
        self._batch.positions[bucket.config.id, output] = bucket.positions[output]
        await self.committed()

    async def run(self) -> None:
        """Commit batches until aclose(); inserted entries are published once committed."""
        try:
            while (not self._closing or self._batch.inserts or self._batch.updates or self._batch.trims
                   or self._batch.positions):
                await self._work.wait()
                self._work = trio.Event()
                batch, self._batch = self._batch, _Batch()
                inserts = [_row(entry) for insert in batch.inserts for entry in insert.entries]
                updates = [_update_row(entry) for entry in batch.updates.values()]
                trims = list(batch.trims.items())
                positions = [(*key, last) for key, last in batch.positions.items()]
                nonces = [(insert.input_id, insert.nonce.key, insert.nonce.until) for insert in batch.inserts
                          if insert.nonce is not None]
                try:
                    await trio.to_thread.run_sync(self._commit, inserts, updates, trims, positions, nonces)
                except (sqlite3.Error, OSError) as error:
                    batch.error = error
                    self.failing = _shown(str(error), 200)
                    logger.error("webhook log not written to %s: %s (%d new, %d changed entries)",
                                 self.path, error, len(inserts), len(updates))
                    for insert in batch.inserts:  # refused: their senders got 503, and a retry must pass
                        if insert.nonce is not None:
                            self._replays.give_back(insert.input_id, insert.nonce)
                    if not self._closing:  # changes to kept entries and trims go with the next
                        # transaction, unless newer ones replace them
                        self._batch.updates = {**batch.updates, **self._batch.updates}
                        self._batch.trims = {**batch.trims, **self._batch.trims}
                else:
                    if inserts or updates or trims or positions:  # an empty transaction proves nothing
                        self.failing = ""
                    for insert in batch.inserts:
                        self._publish(insert.bucket, insert.entries)
                for insert in batch.inserts:
                    if insert.nonce is not None:
                        self._pending.pop((insert.input_id, insert.nonce.key), None)
                batch.committed.set()
        finally:
            with trio.CancelScope(shield=True):
                if self._db is not None:
                    await trio.to_thread.run_sync(self._db.close)
                    self._db = None
                self.stopped.set()

    def _commit(self, inserts: list[dict[str, Any]], updates: list[dict[str, Any]], trims: list[tuple[str, str]],
                positions: list[tuple[str, str, str]], nonces: list[tuple[str, str, float]]) -> None:
        assert self._db is not None
        if self.fault is not None:
            self.fault()
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(_INSERT, inserts)
            if nonces:  # those past are no use: the signature check refuses a replay of them
                db.execute("DELETE FROM nonces WHERE until < ?", (_wall_time(),))
                db.executemany("INSERT OR REPLACE INTO nonces VALUES (?, ?, ?)", nonces)
            db.executemany(_UPDATE, updates)
            for bucket_id, trimmed in trims:
                db.execute("DELETE FROM logs WHERE bucket_id = ? AND id <= ?", (bucket_id, trimmed))
                db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?)", (bucket_id, trimmed))
            db.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?, ?)", positions)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLITE_FULL, _IOERR and _NOMEM may have rolled it back already,
                db.execute("ROLLBACK")  # and a failed ROLLBACK's error would hide the real one
            raise


# _Redis (`[cluster] redis_url`) is the log of every relay sharing that Redis: one Redis Stream,
# the cluster's journal, of events in the order Redis took them: a new entry of some bucket, or
# a change to one (its status and answer). A relay appends to it (in a worker thread: Trio has
# no maintained Redis client, and redis-py's own is synchronous and thread-safe) and tails it (a
# blocking XREAD, in a thread of its own), applying each event in journal order: a new entry is
# published to its own sockets, a change is applied to its copy (and offered to a sender it
# holds). So every relay holds the same log in the same order, and a log id is made from the
# journal entry's id (milliseconds, sequence): one id space, the same on every relay, in
# arrival order across buckets, as one relay's are. A sender's 2xx goes out once Redis has it.
#
# The journal keeps the last 4 x (the buckets' history_size added up) events (MAXLEN ~), and
# each event is numbered (`n`, from one counter): a relay that finds a number missing fell so
# far behind that Redis trimmed events it had not read, and says so (see _Core.missed).

_TAIL_BLOCK = 1000  # ms an XREAD waits for news before it asks again (and notices a stop)
_TAIL_TIMEOUT = _TAIL_BLOCK / 1000 + 5  # seconds the tail's client waits for an answer
_WRITE_TIMEOUT = 2.0  # seconds any other call waits for Redis; asked again _APPEND_TRIES times at most
_ANSWER_KEPT_MORE = 60.0  # seconds Redis remembers an answer's claim past the longest history_ttl
_QUEUE_LOCK_SECONDS = 10.0  # a pull queue's call holds its lock this long at most
_LEASE_SECONDS = 10.0  # the lead of a public output passes on this long after its relay is gone
_LEASE_MARGIN = 2.0  # seconds before its lease could pass on that a relay stops leading if it could not renew
_APPEND_TRIES = 3  # times an append is asked for before its webhook's sender gets 503
_APPENDED_KEPT = 120  # seconds Redis remembers an event's journal id, so asking again appends it once
_JOURNAL_PER_ENTRY = 4  # journal events kept per entry a history holds (its entry and its changes)
# Appends a webhook's events (or a change's one), once however often asked, and none if the
# webhook's nonce (see _Nonce) is taken: then "replayed". KEYS: the journal, the counter, the
# events' "appended" mark, and the nonce if there is one; ARGV: MAXLEN, how long the mark lasts,
# how long the nonce lasts, the count of an event's fields, then each event's fields. Returns the
# events' journal ids.
_APPEND_ONCE = """
local seen = redis.call('GET', KEYS[3])
if seen then return cjson.decode(seen) end
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 'replayed' end
local ids = {}
local width = tonumber(ARGV[4])
for start = 5, #ARGV, width do
    local n = redis.call('INCR', KEYS[2])
    ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'n', n,
                               unpack(ARGV, start, start + width - 1))
end
if KEYS[4] then redis.call('SET', KEYS[4], '1', 'EX', ARGV[3]) end
redis.call('SET', KEYS[3], cjson.encode(ids), 'EX', ARGV[2])
return ids
"""
# KEYS: the journal, the counter, the entry's claim; ARGV: MAXLEN, the claim's token, how long the
# claim lasts, then the event's fields. 1 if this claim holds (asked again: the same token), else 0.
_CLAIM_AND_APPEND = """
local held = redis.call('GET', KEYS[3])
if held then
    if held == ARGV[2] then return 1 end
    return 0
end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'n', n, unpack(ARGV, 4))
return 1
"""
_MOVE_IF_LOCKED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_REDIS_RETRY_FIRST, _REDIS_RETRY_MOST = 0.2, 5.0  # seconds the tail waits to ask a Redis that failed
_T = typing.TypeVar("_T")
_Event = tuple[bytes, dict[bytes, bytes]]  # a journal entry: its id, its fields


def _stream_log_id(stream_id: str) -> str:
    """The log id of the journal entry `stream_id` ("<ms>-<seq>"): a UUIDv7 whose order is the journal's."""
    millis, _, sequence = stream_id.partition("-")
    return str(uuid.UUID(int=int(millis) << 80 | 0x7 << 76 | 0b10 << 62 | int(sequence) & (2**62 - 1)))


def _just_before(log_id: str) -> str:
    """A mark just before `log_id` (a UUID's text sorts as its number does)."""
    return str(uuid.UUID(int=uuid.UUID(log_id).int - 1))


def _event(kind: str, bucket_id: str, row: dict[str, Any], origin: str, number: int) -> dict[str, str]:
    """A journal event's fields: a new entry's `row` (see _row), or a change's (see _change_row)."""
    if row.get("response_body") is not None:
        row["response_body"] = base64.b64encode(row["response_body"]).decode("ascii")
    return {"kind": kind, "bucket": bucket_id, "origin": origin, "number": str(number), "row": _encode(row)}


def _row_of(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(fields[b"row"])
    if row.get("response_body") is not None:
        row["response_body"] = base64.b64decode(row["response_body"])
    return row


class _Redis(_Batching):
    """The log in a Redis Stream, shared by every relay configured with the same Redis (see above)."""

    _failed = "the webhook log could not be written to Redis"
    shared = True

    def __init__(self, cluster: ClusterConfig, owner: _Owner) -> None:
        import redis  # the optional extra, relay-lite[redis]: imported only when configured
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Three clients. The tail's blocks in XREAD, so it waits longer. The others fail fast and
        # are asked again here (_asked_again), not by redis-py, whose retries kept a call waiting
        # 26 s against a stopped Redis: past a sender's patience, and past a lease.
        self._reader: Any = redis.Redis.from_url(cluster.redis_url, socket_timeout=_TAIL_TIMEOUT,
                                            socket_connect_timeout=_WRITE_TIMEOUT)
        self._redis: Any = redis.Redis.from_url(cluster.redis_url, socket_timeout=_WRITE_TIMEOUT,
                                           socket_connect_timeout=_WRITE_TIMEOUT, retry=Retry(NoBackoff(), 0))
        self._leases: Any = redis.Redis.from_url(cluster.redis_url, socket_timeout=_LEASE_SECONDS / 5,
                                            socket_connect_timeout=_LEASE_SECONDS / 5, retry=Retry(NoBackoff(), 0))
        self._append_once = self._redis.register_script(_APPEND_ONCE)
        self._claim_script = self._redis.register_script(_CLAIM_AND_APPEND)
        self._move_script = self._redis.register_script(_MOVE_IF_LOCKED)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        self._prefix = cluster.prefix
        self._journal, self._counter = f"{cluster.prefix}:journal", f"{cluster.prefix}:count"
        self._core = owner
        self._origin = uuid.uuid4().hex  # this relay, in the events it appends
        self._numbers = itertools.count()
        self._mine: dict[str, _Entry] = {}  # number -> an entry this relay appended, not yet read back
        self._claimed: set[str] = set()  # entries whose answer the claim journaled: no update follows
        # This relay's claims by number: None while asked and not yet read back; its row if the tail
        # read it back meanwhile; True once this relay applied it, so the tail passes it by.
        self._claims: dict[str, Mapping[str, Any] | bool | None] = {}
        self._read_from = "0-0"  # the last journal id applied
        self._last_n: int | None = None  # the number of that event
        self._loading: dict[str, str] = {}  # bucket id -> the journal id read when a reload added it
        self._queues: dict[tuple[str, str], str] = {}  # (bucket id, output) -> the token of its lock, while held
        self._journal_size = self._answer_kept = 0
        self._busy = 0  # calls in worker threads now
        self.session_key = b""  # one for the cluster, kept in Redis: read at load()
        self._resettled = False  # Redis lost its data: the session key is to be kept there again
        super().__init__()

    def _size_for(self, buckets: Iterable[BucketConfig]) -> None:
        buckets = list(buckets)
        self._journal_size = _JOURNAL_PER_ENTRY * max(sum(bucket.history_size or 0 for bucket in buckets), 1)
        self._answer_kept = math.ceil(_ANSWER_KEPT_MORE + max(  # an entry takes an answer while it is kept
            (bucket.history_ttl or 0 for bucket in buckets), default=0))

    # ---------------------------------------------------------------- reading the journal

    async def load(self, buckets: Mapping[str, BucketConfig]) -> _Kept:
        """Read the journal; what it holds of `buckets` is the log, and the tail goes on after it."""
        self._size_for(buckets.values())
        wait = _REDIS_RETRY_FIRST
        while True:  # Redis down at start: wait for it, as the tail does later (a 503 beats no relay)
            try:
                events, count = await self._in_thread(self._read, "+")
                self.session_key = await self._in_thread(self._shared_session_key)
                break
            except self._errors as error:
                logger.warning("cannot read the log from Redis: %s; trying again in %g s", error, wait)
                await trio.sleep(wait)
                wait = min(wait * 2, _REDIS_RETRY_MOST)
        entries = self._entries_of(events, buckets)
        mark = self._trim_mark(events)
        self._read_from = events[-1][0].decode() if events else "0-0"
        self._last_n = int(events[-1][1][b"n"]) if events else count
        last = max((entry.id for bucket_entries in entries.values() for entry in bucket_entries), default="")
        logger.info("webhook log in Redis: %d entries loaded", sum(map(len, entries.values())))
        return _Kept(last, {bucket_id: mark for bucket_id in buckets}, entries, [])

    def _shared_session_key(self, mine: bytes = b"") -> bytes:
        """The key inspectors' sessions are signed with: the first relay's, for every relay
        (`mine`, the one this relay had before Redis lost its data, if it is first). In a thread."""
        name = f"{self._prefix}:session_key"
        self._reader.set(name, mine or secrets.token_bytes(32), nx=True)
        return typing.cast(bytes, self._reader.get(name))

    def _read(self, upto: str) -> tuple[list[_Event], int]:
        """The journal up to `upto` (an id, or "+"), and the count of events ever appended; in a thread."""
        pipeline = self._reader.pipeline(transaction=True)  # both at one moment
        pipeline.xrange(self._journal, "-", upto)
        pipeline.get(self._counter)
        events, count = pipeline.execute()
        return events, int(count or 0)

    @staticmethod
    def _trim_mark(events: list[_Event]) -> str:
        """The trim mark (see _Bucket.trimmed) of what the journal holds: just before its first
        event if MAXLEN dropped any before it (it is not the first ever appended); else none."""
        if not events or int(events[0][1][b"n"]) == 1:
            return NIL_LOG_ID
        return _just_before(_stream_log_id(events[0][0].decode()))

    def _entry_of(self, stream_id: bytes, fields: Mapping[bytes, bytes], bucket: BucketConfig) -> _Entry:
        """The entry an "entry" event brings: this relay's own object if it appended it (a
        sender it holds may wait on it), else a new one."""
        entry = self._mine.pop(fields[b"number"].decode(), None) if fields[b"origin"].decode() == self._origin \
            else None
        if entry is None:
            row = _row_of(fields)
            row["id"] = _stream_log_id(stream_id.decode())
            entry = _entry_from_row(row, bucket)
        entry.id = _stream_log_id(stream_id.decode())
        return entry

    def _entries_of(self, events: list[_Event], buckets: Mapping[str, BucketConfig]) -> dict[str, list[_Entry]]:
        """What the journal's `events` hold of `buckets`, each entry with every change to it applied."""
        by_id: dict[str, _Entry] = {}
        entries: dict[str, list[_Entry]] = {}
        for stream_id, fields in events:
            bucket = buckets.get(fields[b"bucket"].decode())
            if bucket is None:
                self._forget_mine(fields)
            elif fields[b"kind"] == b"entry":
                entry = by_id[_stream_log_id(stream_id.decode())] = self._entry_of(stream_id, fields, bucket)
                entries.setdefault(bucket.id, []).append(entry)
            elif (changed := by_id.get((row := _row_of(fields))["id"])) is not None:
                if (answer := _change(changed, row)) is not None:
                    changed.answer, changed.size = answer, changed.size + answer.size
        return entries

    def _forget_mine(self, fields: Mapping[bytes, bytes]) -> None:
        """An event of a bucket this relay no longer has: if it was its own entry, nobody waits for it."""
        if fields[b"origin"].decode() == self._origin and fields[b"kind"] == b"entry":
            self._mine.pop(fields[b"number"].decode(), None)

    async def _tail(self) -> None:
        """Apply the journal's new events, in order, for good; wait and ask again while Redis fails."""
        wait = _REDIS_RETRY_FIRST
        while True:
            if self._loading:
                await self._load_added()
            try:
                if self._resettled:  # the session key went with Redis's data: this relay's again, if first
                    self.session_key = await self._in_thread(self._shared_session_key, self.session_key)
                    self._resettled = False
                found = await self._in_thread(functools.partial(
                    self._reader.xread, {self._journal: self._read_from}, block=_TAIL_BLOCK, count=1000),
                    abandon_on_cancel=True)
            except self._errors as error:
                logger.warning("cannot read the log from Redis: %s; trying again in %g s", error, wait)
                await trio.sleep(wait)
                wait = min(wait * 2, _REDIS_RETRY_MOST)
                continue
            wait = _REDIS_RETRY_FIRST
            new: list[_Entry] = []
            for stream_id, fields in found[0][1] if found else ():
                self._read_from = stream_id.decode()
                n = int(fields[b"n"])
                if self._last_n is not None and n != self._last_n + 1:
                    self._publish(new)
                    mark = _just_before(_stream_log_id(self._read_from))
                    if n > self._last_n:
                        self._core.missed(mark, n - self._last_n - 1)
                    else:  # its count began again: Redis lost its data, and "fell -1990 events behind" was said
                        logger.warning("the cluster's journal in Redis began again (event %d, after %d): Redis lost "
                                       "its data (restarted without persistence?); this relay keeps the log it had",
                                       n, self._last_n)
                        if n > 1:
                            self._core.missed(mark, n - 1)
                        self._resettled = True
                self._last_n = n
                bucket = self._core.bucket_by_id(fields[b"bucket"].decode())
                if bucket is None or bucket.config.id in self._loading:  # not this relay's, or not yet
                    self._forget_mine(fields)
                    continue
                if fields[b"kind"] == b"entry":
                    if fields[b"origin"].decode() == self._origin:  # what it appended before is never coming
                        self._drop_mine_before(int(fields[b"number"]))
                    entry = self._entry_of(stream_id, fields, bucket.config)
                    if new and new[-1].bucket.id != entry.bucket.id:
                        self._publish(new)
                    new.append(entry)
                else:
                    self._publish(new)  # in order: what came before this change first
                    self._change(bucket, fields)
            self._publish(new)

    def _change(self, bucket: _Bucket, fields: Mapping[bytes, bytes]) -> None:
        """Apply a change event: another relay's; or this relay's own, which it applied already
        (a second time does nothing: _change takes only an entry's first answer), but for a
        claim whose outcome it does not know yet (see claim_answer)."""
        row = _row_of(fields)
        number = fields[b"number"].decode()
        if fields[b"origin"].decode() == self._origin and number in self._claims:
            if self._claims[number] is True:
                del self._claims[number]  # applied by claim_answer's caller
            else:
                self._claims[number] = row  # claim_answer decides
            return
        self._core.apply_change(bucket, row)

    def _publish(self, new: list[_Entry]) -> None:
        """Publish `new` (one bucket's entries, in order), and empty it."""
        if new and (bucket := self._core.bucket_by_id(new[0].bucket.id)) is not None:
            self._core.publish(bucket, list(new))
        new.clear()

    def _drop_mine_before(self, number: int) -> None:
        """This relay appends in order, so its entries numbered below one just read were dropped
        from the journal before it read them (see _Core.missed): nobody will read them back."""
        while self._mine and int(next(iter(self._mine))) < number:
            self._mine.pop(next(iter(self._mine)))

    async def _load_added(self) -> None:
        """Take the buckets a reload added: what the journal held of them up to then is their
        history (other relays may have had them for long), what came after is news for their
        sockets. The tail goes on after it."""
        added = dict(self._loading)
        try:
            events, _ = await self._in_thread(self._read, self._read_from)
        except self._errors as error:
            logger.warning("cannot read the log of a bucket the config added from Redis: %s", error)
            await trio.sleep(_REDIS_RETRY_FIRST)
            return  # asked again next time round
        buckets = {bucket_id: bucket for bucket_id in added if (bucket := self._core.bucket_by_id(bucket_id))}
        entries = self._entries_of(events, {bucket_id: bucket.config for bucket_id, bucket in buckets.items()})
        mark = self._trim_mark(events)
        for bucket_id, bucket in buckets.items():
            if self._loading.get(bucket_id) != added[bucket_id]:
                continue  # removed (or removed and added again) meanwhile
            del self._loading[bucket_id]
            at_reload = _stream_log_id(added[bucket_id]) if added[bucket_id] != "0-0" else NIL_LOG_ID
            history = [entry for entry in entries.get(bucket_id, []) if entry.id <= at_reload]
            self._core.adopt(bucket, history, mark)
            if news := entries.get(bucket_id, [])[len(history):]:
                self._core.publish(bucket, news)

    # ---------------------------------------------------------------- writing it

    def insert(self, insert: _Insert) -> None:
        self._batch.inserts.append(insert)  # its nonce is taken, or found taken, with its append
        self._work.set()

    def update(self, entry: _Entry) -> None:
        if entry.status == "sent" and entry.answer is None:
            return  # one of this relay's sockets got it: every relay says so of its own, so nobody is told
        if entry.id in self._claimed:
            self._claimed.discard(entry.id)  # its answer went into the journal with its claim
            return
        self._batch.updates[entry.id] = entry
        self._work.set()

    def trim(self, bucket: _Bucket) -> None:
        pass  # each XADD trims the journal

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tail)
                await self._write()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_WRITE_TIMEOUT * _APPEND_TRIES):  # a client closed under a call in
                    while self._busy:  # flight (a lease's release, as the relay stops) breaks it with a traceback
                        await trio.sleep(0.01)
                for client in (self._redis, self._reader, self._leases):
                    await trio.to_thread.run_sync(client.close)
                self.stopped.set()

    async def _write(self) -> None:
        """Append batches until aclose(). Changes a failed append could not write are tried
        again with the next batch, or after a wait that doubles while Redis fails."""
        retry_in, wait = math.inf, _REDIS_RETRY_FIRST
        while not self._closing or self._batch.inserts or self._batch.updates:
            with trio.move_on_after(retry_in):
                await self._work.wait()
            self._work = trio.Event()
            batch, self._batch = self._batch, _Batch()
            groups: list[tuple[_Insert | None, list[dict[str, str]]]] = []  # a webhook's events, or a change's
            for new in batch.inserts:
                group = []
                for entry in new.entries:
                    number = next(self._numbers)
                    self._mine[str(number)] = entry
                    group.append(_event("entry", entry.bucket.id, _row(entry), self._origin, number))
                groups.append((new, group))
            groups += [(None, [_event("update", entry.bucket.id, _update_row(entry), self._origin,
                                      next(self._numbers))]) for entry in batch.updates.values()]
            if not groups:
                batch.committed.set()
                continue
            appends = [self._append_call(insert, group) for insert, group in groups]
            try:  # each group appended once, however often asked
                results = await self._asked_again(functools.partial(self._scripted, self._append_once, appends))
            except self._errors as error:
                batch.error = error
                self.failing = _shown(str(error), 200)
                logger.error("webhook log not written to Redis: %s (%d events)", error, sum(map(len, groups)))
                for _, group in groups:
                    for fields in group:
                        self._mine.pop(fields["number"], None)  # refused: their senders got 503
                if not self._closing:  # changes to kept entries go with the next batch, unless newer replace them
                    self._batch.updates = {**batch.updates, **self._batch.updates}
                    retry_in, wait = wait, min(wait * 2, _REDIS_RETRY_MOST)
            else:
                self.failing = ""
                retry_in, wait = math.inf, _REDIS_RETRY_FIRST
                for (insert, group), result in zip(groups, results):
                    if result == b"replayed":
                        typing.cast(_Insert, insert).replayed = True
                        for fields in group:
                            self._mine.pop(fields["number"], None)  # never appended: nobody reads them back
                        continue
                    for fields, stream_id in zip(group, result):  # ids, for whoever awaits them (a resend's
                        if (appended := self._mine.get(fields["number"])) is not None:  # answer), unless the tail
                            appended.id = _stream_log_id(stream_id.decode())  # was first
            batch.committed.set()

    def _append_call(self, insert: _Insert | None, group: list[dict[str, str]]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of _APPEND_ONCE for `group`, the events of `insert` or of a change."""
        keys = [self._journal, self._counter, f"{self._prefix}:event:{self._origin}:{group[0]['number']}"]
        nonce_kept = 1
        if insert is not None and insert.nonce is not None:
            digest = hashlib.sha256(_utf8(insert.nonce.key)).hexdigest()[:32]
            keys.append(f"{self._prefix}:nonce:{insert.input_id}:{digest}")
            nonce_kept = max(math.ceil(insert.nonce.until - _wall_time()), 1)
        return keys, [self._journal_size, _APPENDED_KEPT, nonce_kept, 2 * len(group[0]),
                      *itertools.chain.from_iterable(itertools.chain(*fields.items()) for fields in group)]

    async def _in_thread(self, call: Callable[..., _T], *args: Any, abandon_on_cancel: bool = False) -> _T:
        """`call(*args)` in a worker thread, counted while it runs (see run())."""
        self._busy += 1
        try:
            return await trio.to_thread.run_sync(call, *args, abandon_on_cancel=abandon_on_cancel)
        finally:
            self._busy -= 1

    def _scripted(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run `script` with each call's keys and arguments, in one round trip (redis-py's own
        pipelined scripts first ask Redis whether it has them: a round trip more each time). In
        a worker thread."""
        for attempt in range(2):
            pipeline = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipeline.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return typing.cast(list[Any], pipeline.execute())
            except self._no_script:
                if attempt:
                    raise
                self._redis.script_load(script.script)  # a restarted Redis has forgotten it
        raise AssertionError("unreachable")

    async def _asked_again(self, call: Callable[[], _T]) -> _T:
        """What `call()`, a write Redis makes once however often asked, answers; asked again
        while Redis fails, _APPEND_TRIES times at most (about 7 s in all). A write whose answer
        was lost may have been made, and asking again tells, rather than a 503 for a webhook
        that is kept (each event is appended once: see _APPEND_ONCE)."""
        for attempt in range(_APPEND_TRIES):
            try:
                return await self._in_thread(call)
            except self._errors:
                if attempt == _APPEND_TRIES - 1 or self._closing:
                    raise
                await trio.sleep(_REDIS_RETRY_FIRST * 2 ** attempt)
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- what relays share

    async def claim_answer(self, entry: _Entry, answer: _Answer, status: str) -> bool:
        """Whether this is the first answer to `entry`, whichever relay took the others; if it
        is, it is in the journal already, in the same step (asked again with the same token if
        Redis's reply is lost: a claim made but not known here would refuse every answer)."""
        fields = _event("update", entry.bucket.id, _change_row(entry.id, status, answer), self._origin,
                        next(self._numbers))
        number = fields["number"]  # how the tail knows it again (see _change)
        keys = [self._journal, self._counter, f"{self._prefix}:answered:{entry.id}"]
        args: list[str | int] = [self._journal_size, f"{self._origin}:{number}", self._answer_kept,
                                 *itertools.chain(*fields.items())]
        self._claims[number] = None
        try:
            claimed = await self._asked_again(functools.partial(self._claim_script, keys=keys, args=args))
        except self._errors as error:
            if isinstance(seen := self._claims.pop(number), Mapping):  # made after all: the tail read it
                if (bucket := self._core.bucket_by_id(entry.bucket.id)) is not None:
                    self._core.apply_change(bucket, seen)
            raise StorageError(f"the answer could not be recorded in Redis: {error}; try again") from None
        if not claimed or isinstance(self._claims[number], Mapping):
            del self._claims[number]  # nothing appended; or read back already, and passed by
        else:
            self._claims[number] = True  # the tail passes it by: the caller applies it
        if claimed and entry.answer is None:  # else the caller refuses it (see _Core.answer)
            self._claimed.add(entry.id)
        return bool(claimed)

    @asynccontextmanager
    async def queue(self, bucket: _Bucket, output: str) -> AsyncIterator[None]:
        """Hold the queue's lock in Redis, its position read from there into `bucket.positions`."""
        lock = self._redis.lock(f"{self._prefix}:queue:{bucket.config.id}:{output}", timeout=_QUEUE_LOCK_SECONDS,
                                blocking_timeout=_QUEUE_LOCK_SECONDS, thread_local=False)  # threads differ
        token = uuid.uuid4().hex  # the lock's value while this call holds it: see move()
        try:
            if not await self._in_thread(functools.partial(lock.acquire, token=token)):
                raise StorageError("the pull queue is busy on another relay; try again")
        except self._errors as error:
            raise StorageError(f"the pull queue could not be locked in Redis: {error}; try again") from None
        try:
            position = await self._in_thread(self._redis.hget, f"{self._prefix}:positions:{bucket.config.id}",
                                                     output)
        except self._errors as error:
            with trio.CancelScope(shield=True), contextlib.suppress(*self._errors):
                await self._in_thread(lock.release)
            raise StorageError(f"the pull queue could not be read from Redis: {error}; try again") from None
        if position is None:
            bucket.positions.pop(output, None)
        else:
            bucket.positions[output] = position.decode()
        self._queues[bucket.config.id, output] = token
        try:
            yield
        finally:
            del self._queues[bucket.config.id, output]
            with trio.CancelScope(shield=True):
                try:
                    await self._in_thread(lock.release)
                except self._errors:
                    pass  # it expires by itself

    async def move(self, bucket: _Bucket, output: str) -> None:
        """Write the pull queue's position, if this call still holds the queue's lock: a call that
        outlived its lock (Redis slow for _QUEUE_LOCK_SECONDS) must not move a queue another call
        has moved since. StorageError if it is not written (or not known to be: then the page is
        handed out to nobody, as an answer lost in transit is; it stays in GET /v1/logs)."""
        config = bucket.config
        keys = [f"{self._prefix}:queue:{config.id}:{output}", f"{self._prefix}:positions:{config.id}"]
        args: list[str] = [self._queues[config.id, output], output, bucket.positions[output]]
        try:
            moved = await self._asked_again(functools.partial(self._move_script, keys=keys, args=args))
        except self._errors as error:
            raise StorageError(f"the pull queue's position could not be written to Redis: {error}") from None
        if not moved:
            raise StorageError(f"the pull queue's call took over {_QUEUE_LOCK_SECONDS:g} s, and lost its lock")

    @asynccontextmanager
    async def leading(self, name: str) -> AsyncIterator[trio.CancelScope]:
        """Once this relay holds the lead of `name` (a lease in Redis, renewed while it is held),
        a cancel scope cancelled when the lead is lost: one relay of the cluster at a time does
        what it leads (a public output's deliveries). A renewal that fails is tried again until
        _LEASE_MARGIN before the lease could pass on, by this relay's clock: a Redis restart of a
        few seconds does not stop the deliveries under way."""
        lock = self._leases.lock(f"{self._prefix}:lead:{name}", timeout=_LEASE_SECONDS, thread_local=False)
        while True:
            asked = trio.current_time()
            try:
                if await self._in_thread(functools.partial(lock.acquire, blocking=False)):
                    break
            except self._errors:
                pass
            await trio.sleep(_LEASE_SECONDS / 3)
        lead = trio.CancelScope()
        held_until = asked + _LEASE_SECONDS  # by this relay's clock, from before it asked: on the safe side

        async def renew() -> None:
            nonlocal held_until
            problem = "no answer from Redis in time"
            while True:
                await trio.sleep(_LEASE_SECONDS / 3)
                with trio.move_on_at(held_until - _LEASE_MARGIN):  # stop leading before the lease can pass on
                    while True:
                        asked = trio.current_time()
                        try:
                            await self._in_thread(functools.partial(
                                lock.extend, _LEASE_SECONDS, replace_ttl=True), abandon_on_cancel=True)
                            held_until = asked + _LEASE_SECONDS
                            break
                        except self._errors as error:
                            problem = str(error)
                            await trio.sleep(_REDIS_RETRY_FIRST)
                    continue
                logger.warning("lost the lead of %s: %s", name, _shown(problem, 200))
                lead.cancel()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew)
            try:
                yield lead
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    try:
                        await self._in_thread(lock.release)
                    except self._errors:
                        pass  # it expires by itself

    def reloaded(self, buckets: list[_Bucket], added: list[_Bucket]) -> None:
        """Take the buckets a reload added from the journal (see _load_added)."""
        self._size_for(bucket.config for bucket in buckets)
        for bucket in added:
            self._loading[bucket.config.id] = self._read_from


def _change(entry: _Entry, row: Mapping[str, Any]) -> _Answer | None:
    """Apply a change event's `row` to `entry`; the answer it brings, if it brings one. An
    entry's first answer decides its status: a later change without one does not undo it."""
    if entry.answer is not None:
        return None
    entry.status = row["status"]
    if row["answered_at"] is None:
        return None
    return _Answer(row["status_code"], json.loads(row["response_headers"]), row["response_body"],
                   row["answered_at"], row["retries"])


def _row(entry: _Entry) -> dict[str, Any]:
    """An entry as a row: every one of _COLUMNS, by name."""
    webhook = entry.webhook
    return {"id": entry.id, "bucket_id": entry.bucket.id, "input_id": entry.input_id, "input_name": entry.input_name,
            "output_name": entry.output_name, "output_destination": entry.destination,
            "received_at": entry.received_at, "method": webhook.method, "path": webhook.path, "query": webhook.query,
            "headers": _encode(webhook.headers), "body": webhook.body, "body_encoding": webhook.body_encoding,
            "sender": webhook.sender, "resent_from": entry.resent_from,
            "request_headers": "" if entry.request_headers is None else _encode(entry.request_headers),
            **_update_row(entry)}


def _update_row(entry: _Entry) -> dict[str, Any]:
    """What can change of an entry: _UPDATED, and its id."""
    return _change_row(entry.id, entry.status, entry.answer)


def _change_row(log_id: str, status: str, answer: _Answer | None) -> dict[str, Any]:
    """The entry `log_id`'s _UPDATED columns with this status and answer (an answer being claimed
    is not the entry's yet: see _Redis.claim_answer)."""
    return {"id": log_id, "status": status, "status_code": answer.status_code if answer else None,
            "response_headers": _encode(answer.headers) if answer else None,
            "response_body": answer.body if answer else None, "answered_at": answer.at if answer else None,
            "retries": answer.retries if answer else 0}


def _entry_from_row(row: "sqlite3.Row | Mapping[str, Any]", bucket: BucketConfig) -> _Entry:
    answer = None
    if row["answered_at"] is not None:
        answer = _Answer(row["status_code"], json.loads(row["response_headers"]), row["response_body"],
                         row["answered_at"], row["retries"])
    webhook = Webhook(row["method"], row["path"], row["query"], json.loads(row["headers"]), row["body"],
                      row["body_encoding"], row["sender"])
    output = next((output for output in bucket.outputs if output.name == row["output_name"]), None)
    return _Entry(row["id"], bucket, row["input_id"], row["input_name"], row["output_name"], row["output_destination"],
                  webhook, row["received_at"], row["status"], answer, internal=output is None or output.internal,
                  resent_from=row["resent_from"],
                  request_headers=json.loads(row["request_headers"]) if row["request_headers"] else None)


# ==== 5. Services =============================================================================
#
# What the adapters call, and nothing else reaches into; each takes what it needs in its
# constructor. _Services holds them for a running relay, and only Relay changes it (a reload).

# ---- the throttle ----------------------------------------------------------------------------


class _Throttle:
    """Warnings a stranger could repeat at will: the first of a kind is logged, then at most one
    each `interval`, saying how many like it were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}  # kind -> when the next may be logged; kinds are the relay's own
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object, level: int = logging.WARNING) -> bool:
        """Log it, unless one of its kind was lately; whether it was."""
        now = trio.current_time()
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        self._next[kind] = now + self._interval
        held = self._held.pop(kind, 0)
        if held:
            message += f" ({held} more like it since the last such line)"
        logger.log(level, message, *args)
        return True


def _unexpected(throttle: _Throttle, what: str, error: BaseException) -> None:
    """A bug met while doing `what`, as one ERROR line, rate-limited like a stranger's warnings
    (a stranger may be the one triggering it): the error and where it was raised. The whole
    traceback goes to DEBUG."""
    error = _innermost(error)
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename or '?').name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    throttle.warning(f"unexpected {what}", "unexpected error while %s: %s: %s%s; the relay goes on", what,
                     type(error).__name__, _shown(str(error), 200), where, level=logging.ERROR)
    logger.debug("the unexpected error while %s", what, exc_info=error)


# ---- metrics ---------------------------------------------------------------------------------
#
# Counts kept as plain numbers wherever things happen (a dict increment: cheap enough to keep
# always), and gauges read from the relay when /metrics is asked; the Prometheus client only
# writes the text, and is imported only then. Labels come from the config or a fixed set, never
# from a request.


class _Histogram:
    """Durations in seconds, counted into fixed buckets, as Prometheus histograms are."""

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts by upper bound, "+Inf" last."""
        return list(zip([*map(str, self.BOUNDS), "+Inf"], itertools.accumulate(self.counts)))


class _Metrics:
    """The relay's counts since it started."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()  # accepted webhooks, by bucket name
        self.rejected: Counter[str] = Counter()  # refused ones, by _REJECTIONS
        self.frames: Counter[str] = Counter()  # webhook frames queued to sockets, by bucket
        self.cutoffs: Counter[str] = Counter()  # sockets the relay closed, by reason
        self.auth_failures: Counter[str] = Counter()  # by kind: socket, api, metrics, locked_out
        self.deliveries: Counter[tuple[str, str, str]] = Counter()  # bucket, output, outcome
        self.delivery_seconds = _Histogram()  # a public output's delivery, retries included
        self.ingest_seconds = _Histogram()  # a webhook's request, from its head to its acceptance


# ---- connections -----------------------------------------------------------------------------
#
# Every TCP connection, from accept to close, is a _Connection: the relay knows who it is from,
# whether it is pending, and the one deadline that ends it, whatever state the library serving it
# (Hypercorn, trio-websocket) has left it in. _Connections holds them all and keeps the bounds a
# stranger could otherwise exhaust: file descriptors, and (_Inflows) the memory behind them.


def _shut_down(stream: trio.SocketStream) -> None:
    """End what the relay sends on `stream` (a FIN): synchronous, so no cancellation can skip it."""
    if not stream.socket.did_shutdown_SHUT_WR:
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already


class _Connection:
    """One connection: its peer, its deadline (a cancel scope around all of its serving), and
    whether it is pending: neither an authenticated socket nor a request being answered."""

    __slots__ = ("stream", "address", "peer", "client", "scope", "head_start", "pending", "requests", "is_closing",
                 "ended_by", "http", "linger_left")

    def __init__(self, stream: trio.SocketStream, address: str, peer: str, deadline: float) -> None:
        self.stream = stream
        self.address = address  # what max_pending_per_ip counts by: an IPv4 address or an IPv6 /64
        self.peer = peer  # host:port, for log lines
        self.client = address  # what failed authentications count by: `address`, or behind a trusted proxy its client's
        self.scope = trio.CancelScope(deadline=deadline)
        self.head_start = trio.current_time()  # when its next request's head began, at the latest
        self.pending = False
        self.requests = 0  # HTTP requests the app is answering on it (Hypercorn may start the next first)
        self.is_closing = False
        self.ended_by: tuple[int, str] = (CLOSE_POLICY, "out of time")  # what a socket is told when it ends
        self.http = False  # served by Hypercorn (else a socket, or not yet routed)
        self.linger_left = _LINGER_BYTES  # what it may still read, once closing

    def end_by(self, deadline: float) -> None:
        """From now on, serve it until `deadline` at most (a closing connection keeps its own)."""
        if not self.is_closing:
            self.scope.deadline = deadline

    def end(self, code: int, reason: str) -> None:
        """End it now, whatever it is doing: a socket is told `code` and `reason`; an HTTP
        connection's socket is shut down, which also ends a write Hypercorn shields."""
        self.ended_by = (code, reason)
        self.scope.cancel()
        if self.http:
            try:
                self.stream.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # gone already

    def closing(self) -> None:
        """Its library closed it: end what the relay sends, once the answer being written is
        whole, and give the peer _LINGER seconds (and _LINGER_BYTES) to read it and leave.
        (Hypercorn closes at once when a pipelined request follows an answer that said
        "Connection: close".)"""
        if not self.requests:
            _shut_down(self.stream)
        if not self.is_closing:
            self.is_closing = True
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + _LINGER)

    def answered(self) -> None:
        """An HTTP request on it has had its answer; its last one may let a close go ahead."""
        self.requests -= 1
        if self.is_closing and not self.requests:
            _shut_down(self.stream)


class _Connections:
    """Every open connection, within max_connections and max_pending_per_ip.

    Pending connections (idle keep-alive ones, requests still arriving or holding their sender
    for a client's answer, sockets not yet authenticated) cost a stranger nothing to open and
    hold, so one address may hold only
    max_pending_per_ip of them. At max_connections, a new connection takes the place of the
    oldest pending one of the address that holds the most, if that is more than its own would
    then hold; else it is refused. So an address with few connections (a webhook sender, a
    client reconnecting) gets in while others hold many, and those others cannot churn each
    other's connections. Authenticated sockets never count: 10,000 clients behind one NAT work.
    """

    def __init__(self, server: ServerConfig, throttle: _Throttle) -> None:
        assert server.max_connections and server.max_pending_per_ip  # filled in by _preflight
        self._most, self._most_pending = server.max_connections, server.max_pending_per_ip
        self._head_time = server.idle_timeout + _GRACE  # a new connection's first head must be in by then
        self.count = 0
        self._open: set[_Connection] = set()
        self._pending: dict[str, dict[_Connection, None]] = {}  # address -> its pending ones, oldest first
        self._throttle = throttle

    def open(self, stream: trio.SocketStream) -> _Connection | None:
        """A newly accepted connection, or None if it must be refused."""
        peer, address = _peer(stream.socket)
        held = len(self._pending.get(address, ()))
        if held >= self._most_pending:
            self._throttle.warning("pending", "refused connections from %s: it holds %d pending (max_pending_per_ip)",
                                   address, held)
            return None
        if self.count >= self._most:
            crowd = max(self._pending.values(), key=len, default={})  # scanned only at the cap
            if len(crowd) <= held + 1:
                self._throttle.warning("full", "refused connections: %d open (max_connections), none to close for "
                                       "them", self.count)
                return None
            oldest = next(iter(crowd))
            self.busy(oldest)  # no longer pending: the next one to make room is another
            oldest.end(_CLOSE_TRY_AGAIN, "too many connections; try again later")
            self._throttle.warning("evicted", "closed a pending connection from %s, which held %d, to make room "
                                   "for one from %s (max_connections: %d)", oldest.address, len(crowd) + 1,
                                   address, self._most)
        connection = _Connection(stream, address, peer, trio.current_time() + self._head_time)
        self.count += 1
        self._open.add(connection)
        self.idle(connection)
        return connection

    @property
    def pending(self) -> int:
        """How many addresses hold pending connections (an address goes with its last one)."""
        return len(self._pending)

    def closed(self, connection: _Connection) -> None:
        self.count -= 1
        self._open.discard(connection)
        self.busy(connection)

    def busy(self, connection: _Connection) -> None:
        """It is being answered, or authenticated: not pending."""
        if connection.pending:
            connection.pending = False
            held = self._pending[connection.address]
            del held[connection]
            if not held:
                del self._pending[connection.address]

    def idle(self, connection: _Connection) -> None:
        """It waits for its peer: pending."""
        if not connection.pending:
            connection.pending = True
            self._pending.setdefault(connection.address, {})[connection] = None

    def end_idle(self) -> None:
        """End every pending connection with no request on it now (a shutdown)."""
        for held in self._pending.values():
            for connection in list(held):
                if not connection.requests:
                    connection.end(CLOSE_GOING_AWAY, "server shutting down")

    def end_overdue(self, now: float) -> None:
        """End the HTTP connections still open past their deadline: Hypercorn writes under a
        shielded cancel scope, so a peer that reads a segment now and then would otherwise keep
        its connection past every deadline (1,700 pipelined requests whose answers it never read)."""
        for connection in [connection for connection in self._open
                           if connection.http and connection.scope.deadline < now - _GRACE]:
            connection.end(CLOSE_POLICY, "out of time")

    def end_all(self) -> None:
        """End every connection now (a shutdown that ran out of time)."""
        for connection in list(self._open):
            connection.end(CLOSE_GOING_AWAY, "server shutting down")


class _Inflow:
    """A request body being received: the address it is counted by, and the bytes it holds."""

    __slots__ = ("address", "held", "scope")

    def __init__(self, address: str) -> None:
        self.address = address
        self.held = 0
        self.scope = trio.CancelScope()  # cancelled when its room is given to another (see _Inflows)


class _Inflows:
    """Every request body being received, within max_body_bytes_in_flight bytes together.

    A body is read whole before it is acted on (a signature covers all of it), so a stranger who
    declares 10 MiB and sends all but its last byte holds 10 MiB until request_timeout: 240 such
    connections from 4 addresses took a relay from 65 MB to 2.4 GB. A chunk that finds no room
    takes it, if its address holds under half of a fair share (the room over the addresses holding
    some), from the address holding the most, if that is over its share: that address's largest
    body is ended (503 and Retry-After). Else it waits up to _BODY_ROOM_WAIT for room (at most
    _BODY_WAITERS requests wait at once), then its request gets 503. So an address sending little
    gets in while others hold partial bodies, and those others cannot take room from each other.
    An address is what max_pending_per_ip counts by (behind trusted_proxies, the client's).
    """

    def __init__(self, capacity: int, throttle: _Throttle) -> None:
        self.capacity = capacity
        self.used = 0
        self._held: dict[str, int] = {}  # address -> the bytes its bodies hold
        self._bodies: dict[str, set[_Inflow]] = {}  # address -> its bodies holding bytes
        self._freed = trio.Event()  # set, and replaced, when bytes are released
        self._waiting = 0
        self._throttle = throttle

    @property
    def crowded(self) -> bool:
        """An eighth of the room is taken: connections read less at a time (see _ConnectionStream)."""
        return 8 * self.used > self.capacity

    async def take(self, inflow: _Inflow, size: int) -> bool:
        """Room for `size` more bytes of `inflow`, at once, or after a short wait; False if none came."""
        if self._take_nowait(inflow, size):
            return True
        if self._waiting >= _BODY_WAITERS:
            return False
        self._waiting += 1
        try:
            with trio.move_on_after(_BODY_ROOM_WAIT):
                while True:
                    await self._freed.wait()
                    if self._take_nowait(inflow, size):
                        return True
        finally:
            self._waiting -= 1
        return False

    def release(self, inflow: _Inflow) -> None:
        """`inflow` holds nothing any more (its request ended, or it was evicted)."""
        if not inflow.held:
            return
        address = inflow.address
        self.used -= inflow.held
        left = self._held[address] - inflow.held
        inflow.held = 0
        if left:
            self._held[address] = left
            self._bodies[address].discard(inflow)
        else:
            del self._held[address], self._bodies[address]
        self._freed.set()
        self._freed = trio.Event()

    def _take_nowait(self, inflow: _Inflow, size: int) -> bool:
        address = inflow.address
        while self.used + size > self.capacity:
            # A fair share is the room over the addresses holding some (this one too); an address
            # well under its share takes room from the one most over it, and only then: strangers
            # holding about their shares do not end each other's bodies over and over.
            held = self._held.get(address, 0)
            share = self.capacity / (len(self._held) + (0 if held else 1))
            heaviest = max(self._held, key=self._held.__getitem__)  # scanned only when full
            if held + size > share / 2 or self._held[heaviest] <= share:
                return False
            victim = max(self._bodies[heaviest], key=lambda body: body.held)
            self._throttle.warning("inflow", "ended a request body of %d bytes from %s, whose bodies held %d, to "
                                   "make room for one from %s (max_body_bytes_in_flight: %d)", victim.held,
                                   heaviest, self._held[heaviest], address, self.capacity)
            self.release(victim)
            victim.scope.cancel()
        if not inflow.held:
            self._bodies.setdefault(address, set()).add(inflow)
        inflow.held += size
        self._held[address] = self._held.get(address, 0) + size
        self.used += size
        return True


def _peer(sock: trio.socket.SocketType) -> tuple[str, str]:
    """A connection's peer as host:port, and the address it is counted by (see _address_key)."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?", "?"
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), _address_key(host)


# ---- credentials -----------------------------------------------------------------------------
#
# Who a key and secret belong to, and how often an address may be wrong about it.


@dataclasses.dataclass(frozen=True)
class _Grant:
    """Who a key and secret (or a session) belong to."""

    token: TokenConfig
    inspector: bool = False  # an inspector session: it may read the log, resend, and watch; no more
    signed_in: int = 0  # an inspector session's: when it was signed in...
    expires: float = math.inf  # ...and when it expires (Unix seconds)


class _Credentials:
    """Tokens' secrets, checked in constant time, and secret hashes, checked with scrypt in a
    worker thread, one at a time (16 MiB and tens of milliseconds each): a secret proven right
    is remembered, so a client pays that once. Failed attempts are limited per address (an
    IPv6 /64 counts as one): a burst of auth_failures_per_minute, then that many a minute; past
    them, the address's attempts are refused unchecked, and other addresses are not affected.

    The web inspector signs in once with a key and secret and keeps only a session (`issue`):
    a credential that stands in for the secret, given with the key as a secret is (HTTP Basic,
    an auth frame), for _SESSION_SECONDS, renewed while the page is open, _SESSION_MOST at the
    most; signed with the relay's session key (see _Core.session_key), and with the token's
    secret as it is now, so a changed secret ends it. It may only read the log, resend and
    watch: a script that steals it from the page's storage cannot answer webhooks, move a pull
    queue, or learn the secret.
    """

    def __init__(self, config: Config, session_key: Callable[[], bytes] = lambda: b"",
                 throttle: _Throttle | None = None) -> None:
        self._session_key = session_key  # the backend's (see _Core.session_key), as it is now
        self._by_key = {token.key: token for token in config.tokens}
        self._by_secret = {_digest(token.secret): token for token in config.tokens if token.secret}
        self._hashes = {token.key: _parse_secret_hash(token.secret_hash, f"tokens {token.key!r}")
                        for token in config.tokens if token.secret_hash}
        self._proven: set[bytes] = set()  # digests of (key, secret) pairs that matched a hash
        self._hashing = _HashQueue()
        per_minute = config.server.auth_failures_per_minute
        self._burst, self._refill = float(per_minute), per_minute / 60.0  # failures forgiven a second
        # address -> (failures allowed, at, whether its lockout was logged); oldest first
        self._failures: dict[str, tuple[float, float, bool]] = {}
        self._throttle = throttle or _Throttle()
        self._attempts: dict[str, tuple[int, float]] = {}  # address -> (attempts, since when); see _fresh

    async def check(self, address: str, key: str, secret: str) -> _Grant | None:
        """Who `key` and `secret` name (a token, or an inspector's session of one), or None if
        nobody. The key "whr" (the new SDK) or a Bearer secret names a token by its secret alone.

        Raise TooManyFailures if `address` may not try now. Each attempt is charged to its
        address before it is checked and refunded if it was right, so attempts made at once
        cannot outrun the limit while slow checks run. A secret hash is checked sooner for an
        address that has tried little lately (see _HashQueue)."""
        clean = self._fresh(address)
        self._charge(address)
        if secret.startswith(_SESSION_PREFIX) and (session := self._session(key, secret)) is not None:
            self._charge(address, -1.0)  # a session signed here: no failure, even once expired
            owner, signed_in, expires = session
            return _Grant(owner, inspector=True, signed_in=signed_in, expires=expires) if _wall_time() < expires \
                else None
        token: TokenConfig | None
        try:
            if key == API_KEY_USER and key not in self._by_key:
                token = await self._by_secret_alone(address, secret, clean)
            else:
                token = self._by_key.get(key)
                if token is not None and not await self._matches(token, secret, clean):
                    token = None
        except HashingBusy:
            self._charge(address, -1.0)  # not its failure
            raise
        if token is not None:
            self._charge(address, -1.0)
        return None if token is None else _Grant(token)

    def issue(self, token: TokenConfig, signed_in: float | None = None) -> tuple[str, int]:
        """A session of `token` for the inspector, and when it expires (Unix seconds); a renewal
        carries the time its first sign-in was (`signed_in`, a session's: see `check`)."""
        now = _wall_time()
        signed_in = int(now if signed_in is None else min(signed_in, now))
        expires = int(min(now + _SESSION_SECONDS, signed_in + _SESSION_MOST))
        return f"{_SESSION_PREFIX}{signed_in}.{expires}.{self._session_mac(token, signed_in, expires)}", expires

    def _session(self, key: str, secret: str) -> tuple[TokenConfig, int, int] | None:
        """The token of a session `issue` gave for `key`, when it was signed in and when it
        expires; None if it is not one (a forgery, a session of a secret since changed, or a real
        secret that looks like one). Each time is read as `issue` wrote it, or not at all: a
        padded one passed the signature on its first 12 digits and renewed a session for ever."""
        token = self._by_key.get(key)
        parts = secret[len(_SESSION_PREFIX):].split(".")
        if token is None or len(parts) != 3 or not self._session_key() \
                or not all(_SESSION_TIME.fullmatch(part) for part in parts[:2]):
            return None
        signed_in, expires = int(parts[0]), int(parts[1])
        if not hmac.compare_digest(_utf8(parts[2]), self._session_mac(token, signed_in, expires).encode()):
            return None
        return token, signed_in, expires

    def _session_mac(self, token: TokenConfig, signed_in: int, expires: int) -> str:
        proof = _digest(token.secret or token.secret_hash)  # another secret, another session key
        mac = hmac.new(self._session_key(), b"relay_lite inspector session\0%s\0%d\0%d\0%s"
                       % (_utf8(token.key), signed_in, expires, proof), "sha256").digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def carry_failures(self, before: "_Credentials") -> None:
        """Keep the failed attempts counted before a reload (a reload is no amnesty), and the queue
        of secret hashes being checked (one at a time, whatever the config)."""
        self._failures, self._attempts = before._failures, before._attempts
        self._hashing = before._hashing

    def check_other(self, address: str, given: str, expected: str) -> bool:
        """Whether `given` is `expected`, a secret that is no token's (the metrics token), checked
        in constant time and limited per address as tokens' secrets are."""
        self._charge(address)
        if hmac.compare_digest(_utf8(given), _utf8(expected)):
            self._charge(address, -1.0)
            return True
        return False

    def attempt(self, address: str, right: bool) -> None:
        """Count a failed attempt of `address`, unless `right`, with a credential that is no
        secret's (a smee channel's name, which every sender to it knows: a stranger guessing
        names from a sender's address must not shut that sender out), limited as secrets are."""
        if not right:
            self._charge(address)

    def _fresh(self, address: str) -> bool:
        """Count an attempt of `address`; whether it is among its first _FRESH_ATTEMPTS in
        _FRESH_WINDOW seconds, refused ones (busy) included."""
        now = trio.current_time()
        count, since = self._attempts.pop(address, (0, now))  # re-inserted last: oldest first
        if now - since > _FRESH_WINDOW:
            count, since = 0, now
        self._attempts[address] = (count + 1, since)
        if len(self._attempts) > _TRACKED_ADDRESSES:
            del self._attempts[next(iter(self._attempts))]
        return count < _FRESH_ATTEMPTS

    def _charge(self, address: str, failures: float = 1.0) -> None:
        """Count `failures` against `address` (negative: forgive them); raise TooManyFailures,
        counting nothing, if it has none left to spend."""
        now = trio.current_time()
        allowed, at, told = self._failures.pop(address, (self._burst, now, False))  # re-inserted last: oldest first
        allowed = min(self._burst, allowed + (now - at) * self._refill)
        if failures > 0 and allowed < 1:
            wait = (1 - allowed) / self._refill
            if not told:  # once a lockout: behind a proxy not in trusted_proxies, it may lock out everyone
                told = self._throttle.warning("lockout", "%s is locked out: %d failed authentications; its "
                                              "attempts are refused unchecked for %d s (auth_failures_per_minute)",
                                              address, int(self._burst), math.ceil(wait))
            self._failures[address] = (allowed, now, told)
            raise TooManyFailures(f"too many failed authentications from {address}: try again in "
                                   f"{math.ceil(wait)} s", wait)
        allowed = min(self._burst, allowed - failures)
        if allowed < self._burst:  # an address with its whole allowance is not remembered
            self._failures[address] = (allowed, now, told and allowed < 1)
            if len(self._failures) > _TRACKED_ADDRESSES:
                del self._failures[next(iter(self._failures))]

    async def _by_secret_alone(self, address: str, secret: str, clean: bool) -> TokenConfig | None:
        token = self._by_secret.get(_digest(secret))  # a plain secret, or a hashed one proven before
        if token is not None:
            return token if await self._matches(token, secret, clean) else None
        for n, key in enumerate(self._hashes):  # each hash checked costs the address a failure
            if n:
                self._charge(address)
            if await self._matches(self._by_key[key], secret, clean and not n):
                self._charge(address, -float(n))
                self._by_secret[_digest(secret)] = self._by_key[key]
                return self._by_key[key]
        return None

    async def _matches(self, token: TokenConfig, secret: str, clean: bool = False) -> bool:
        if token.secret:
            return hmac.compare_digest(token.secret.encode(), _utf8(secret))
        proof = hashlib.sha256(token.key.encode() + b"\0" + _utf8(secret)).digest()
        if proof in self._proven:
            return True
        matches = await self._hashing.run(clean, self._hashes[token.key].matches, secret)
        if matches:
            self._proven.add(proof)
        return matches


class _HashQueue:
    """Secret-hash checks, run one at a time in a worker thread (scrypt: 16 MiB and tens of
    milliseconds each), those of fresh addresses first (their first _FRESH_ATTEMPTS attempts in
    _FRESH_WINDOW, busy refusals counted). At most _HASHES_WAITING wait; past that an attempt is
    refused (HashingBusy, no failure of its address's), but a fresh address's attempt takes the
    place of the last one of another. So strangers guessing from many addresses keep the checker
    busy with each other's guesses, and a first sign-in with the right secret waits for the check
    running, not for theirs: 150 attacking addresses made one wait 5.6 s, then refused it busy."""

    def __init__(self) -> None:
        self._running = False  # a check runs, or the turn was handed to a waiter that will run it
        self._waiting: tuple[deque[trio.Event], deque[trio.Event]] = (deque(), deque())  # clean ones, the others
        self._refused: set[trio.Event] = set()

    async def run(self, clean: bool, check: Callable[[str], bool], secret: str) -> bool:
        if self._running:
            await self._turn(clean)
        self._running = True
        try:
            return await trio.to_thread.run_sync(check, secret)
        finally:
            self._hand_over()

    async def _turn(self, clean: bool) -> None:
        """Wait until the turn is handed to this attempt; HashingBusy if it gets none."""
        clean_ones, others = self._waiting
        if len(clean_ones) + len(others) >= _HASHES_WAITING:
            if not clean or not others:
                raise self._busy()
            bumped = others.pop()
            self._refused.add(bumped)
            bumped.set()
        turn = trio.Event()
        queue = clean_ones if clean else others
        queue.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn in queue:
                queue.remove(turn)
            elif turn not in self._refused:  # handed the turn as it was cancelled: the next one's
                self._hand_over()
            self._refused.discard(turn)
            raise
        if turn in self._refused:
            self._refused.discard(turn)
            raise self._busy()

    @staticmethod
    def _busy() -> HashingBusy:
        return HashingBusy("too many authentications are waiting to be checked: try again in a second", 1.0)

    def _hand_over(self) -> None:
        """The check running ended: the turn goes to the first clean waiter, else the first other."""
        for queue in self._waiting:
            if queue:
                queue.popleft().set()
                return
        self._running = False


# ---- the core --------------------------------------------------------------------------------
#
# The buckets and tokens (the store), the webhook log and the backend keeping it, who is
# subscribed to what, senders held for an answer, and answers. New webhooks come in through
# `accept`; the backend hands them back to `publish` once they are kept, which logs them and
# sends them out.


_CLOCKS_APART = 5.0  # seconds a relay's clock may be behind Redis's (log ids carry Redis's time)


class _Core:
    """The relay's state and what may be done to it, for every part that serves clients. Made
    with the config; `load` before serving, `run` while serving, `aclose` after."""

    def __init__(self, config: Config, metrics: _Metrics) -> None:
        self._store = _Store(config)
        self._log = _Log()  # replaced by the one loaded from the backend in load()
        self._backend: _Backend
        if config.cluster.redis_url:
            self._backend = _Redis(config.cluster, self)
        elif config.storage.path:
            self._backend = _Storage(config.storage.path, self.publish)
        else:
            self._backend = _Memory(self.publish)
        self._holds: set[_Hold] = set()  # senders waiting for an answer
        self._metrics = metrics

    @property
    def backend(self) -> _Backend:
        """The backend keeping the log: what a test waits for (committed), or makes fail (see
        _Storage.fault)."""
        return self._backend

    @property
    def held(self) -> int:
        """How many senders wait for a client's answer."""
        return len(self._holds)

    # ---------------------------------------------------------------- buckets and tokens

    @property
    def buckets(self) -> list[_Bucket]:
        return self._store.buckets

    def visible(self, token: TokenConfig) -> tuple[_Bucket, ...]:
        return self._store.visible(token)

    def resolve(self, token: TokenConfig, refs: tuple[str, ...]) -> tuple[_Bucket, ...]:
        """The buckets `refs` (names or ids; none: all) name, if `token` may see them all; else NotFound."""
        return self._store.resolve(token, refs)

    def find_input(self, input_id: str) -> tuple[_Bucket, InputConfig] | None:
        return self._store.find_input(input_id)

    def find_channel(self, name: str) -> tuple[_Bucket, InputConfig] | None:
        return self._store.find_channel(name)

    def find_bucket(self, ref: str) -> BucketConfig | None:
        return self._store.find_bucket(ref)

    # ---------------------------------------------------------------- the log

    def entry(self, token: TokenConfig, log_id: str) -> _Entry:
        """The log entry `log_id`, if `token` may see it; else NotFound or Forbidden."""
        entry = self._log.get(_canonical_log_id(log_id) or "")
        if entry is None:
            raise NotFound(f"no webhook log {_shown(log_id, 64)!r}: not an id this relay gave, or no longer kept "
                           "(see history_size and history_ttl)")
        if self._store.bucket_of(entry) not in self._store.visible(token):
            raise Forbidden(f"log {entry.id} belongs to a bucket this token may not see")
        return entry

    def newest(self, buckets: Iterable[_Bucket]) -> Iterator[_Entry]:
        """Every entry of `buckets`, newest first (refused webhooks too)."""
        return self._log.newest(buckets)

    def after(self, buckets: Iterable[_Bucket], cursor: str, limit: int,
              keep: Callable[[_Entry], bool] = lambda entry: entry.internal) -> list[_Entry]:
        """Up to `limit` entries of `buckets` after `cursor`, oldest first: those sockets get, or those `keep` says."""
        return self._log.after(buckets, cursor, limit, keep)

    def frame(self, entry: _Entry, wire: _Wire = _SOCKET_WIRE) -> bytes:
        """`entry` framed for `wire`: a socket's frame is shared by the sessions resuming through it."""
        return self._log.frame(entry) if wire is _SOCKET_WIRE else wire.webhook(entry, self._backend.shared)

    @staticmethod
    def output_named(bucket: _Bucket, ref: str) -> str:
        """The name of the output of `bucket` that `ref` names (by its id or its name); else NotFound."""
        for output in bucket.config.outputs:
            if ref in (output.name, _output_id(bucket.config.id, output.name)):
                return output.name
        raise NotFound(f"bucket {bucket.config.name!r} has no output {_shown(ref, 64)!r}")

    def known_point(self, since: str, buckets: Iterable[_Bucket]) -> bool:
        """Whether a resume from `since` makes sense: an id this relay gave, or may yet learn of
        (in a cluster, another relay may have given it a moment before this one read it)."""
        if since <= self.newest_id(buckets) or since == NIL_LOG_ID:
            return True
        return self._backend.shared and uuid.UUID(since).int >> 80 <= (_wall_time() + _CLOCKS_APART) * 1000

    @staticmethod
    def newest_id(buckets: Iterable[_Bucket]) -> str:
        """The newest id `buckets` have logged (or trimmed), "" if none."""
        return max((max(bucket.trimmed, bucket.history[-1].id if bucket.history else "") for bucket in buckets),
                   default="")

    # ---------------------------------------------------------------- webhooks in

    async def accept(self, bucket: _Bucket, input_: InputConfig, webhook: Webhook,
                     hold: _Hold | None = None, nonce: _Nonce | None = None) -> list[_Entry]:
        """Log `webhook`'s entries (one per output), and send them out once the backend keeps
        them: on return they are kept, or StorageError says they are not, or _Replayed that
        `nonce`, what its signature was verified by, was an accepted webhook's (nothing kept)."""
        entries = self._log.record(bucket, input_, webhook)
        if not entries:
            logger.info("webhook %s %s -> bucket %s: every output is disabled, so nothing gets it", webhook.method,
                        _shown(webhook.path), bucket.config.name)
            return entries
        for entry in entries:
            entry.hold = hold
        await self._keep(_Insert(bucket, entries, input_.id, nonce))
        return entries

    def reject(self, bucket: _Bucket, input_: InputConfig, webhook: Webhook, reason: str) -> None:
        """Log a webhook its input's signature check refused; nothing else gets it (see _Log.reject)."""
        self._log.reject(bucket, input_, webhook, reason)

    async def resend(self, entry: _Entry, output_ref: str = "") -> _Entry:
        """Log `entry`'s webhook again, as a new entry naming it, along its output or the one
        `output_ref` (an id or a name) names, and send it out once kept."""
        if entry.status == "rejected":
            raise Conflict(f"log {entry.id} is a webhook its input refused: it was never relayed")
        bucket = self._store.bucket_of(entry)
        if bucket is None:
            raise NotFound(f"log {entry.id}: its bucket is no longer in the relay's config")
        if output_ref:
            name = self.output_named(bucket, output_ref)
        else:  # its own output, if the bucket still has it; else the route of a bucket without outputs, if any
            name = entry.output_name if any(output.name == entry.output_name for output in bucket.config.outputs) \
                else ""
        route = next((route for route in bucket.routes if route.output_name == name), None)
        if route is None:
            raise Conflict(f"bucket {bucket.config.name!r} no longer has an enabled output "
                           f"{_shown(output_ref or entry.output_name, 64)!r} to send it along")
        resent = self._log.resend(bucket, entry, route)
        try:
            await self._keep(_Insert(bucket, [resent]))
        except StorageError as error:
            raise StorageError(f"{error}; try again") from None
        logger.info("webhook %s resent as %s", entry.id, resent.id)
        return resent

    async def _keep(self, insert: _Insert) -> None:
        self._backend.insert(insert)
        await self._backend.committed()  # the backend publishes them once kept, in id order
        if insert.replayed:
            if insert.behind is not None and insert.behind.error is not None:  # the one it repeats was not
                raise StorageError(f"the webhook log could not be written: {insert.behind.error}")  # kept either
            raise _Replayed(f"a replay of a webhook input {insert.input_id} accepted")

    # What a cluster's backend (_Redis) calls as it applies the journal

    def bucket_by_id(self, bucket_id: str) -> _Bucket | None:
        return self._store.by_id(bucket_id)

    def apply_change(self, bucket: _Bucket, row: Mapping[str, Any]) -> None:
        """Another relay changed an entry (a cluster's backend): its status, or its answer, which
        a sender this relay holds may be waiting for."""
        entry = self._log.get(row["id"])
        if entry is None:
            return
        answer = _change(entry, row)
        if answer is not None:
            self._log.answered(bucket, entry, answer)
            if entry.hold is not None:
                entry.hold.offer(entry, answer)

    def adopt(self, bucket: _Bucket, entries: list[_Entry], trimmed: str) -> None:
        """A bucket a reload added, with what other relays of a cluster logged of it before: its
        history, not news, so no socket is sent it."""
        bucket.trimmed = trimmed
        self._log.add(bucket, entries)

    def missed(self, mark: str, count: int) -> None:
        """This relay fell so far behind a cluster's journal that Redis dropped `count` events
        before `mark` unread: it may lack webhooks (and answers) the other relays have. A resume
        from before `mark` is told so, and so is every socket now."""
        logger.warning("fell %d events behind the cluster's journal in Redis, which dropped them unread: webhooks "
                       "before %s may be missing on this relay (the journal keeps 4 x the buckets' history_size)",
                       count, mark)
        message = f"this relay fell behind the cluster and may have missed webhooks up to {mark}; other relays have them"
        sessions: set[_Subscriber] = set()
        for bucket in self._store.buckets:
            bucket.trimmed = bucket.dropped = max(bucket.trimmed, mark)
            sessions.update(bucket.subscribers)
        for session in sessions:
            if frame := session.wire.status("history_gap", message):
                session.deliver(frame)

    def publish(self, bucket: _Bucket, entries: list[_Entry]) -> None:
        """Log `entries`, kept by the backend, and send them out: to sockets, or a forwarder."""
        if not self._store.has(bucket):  # a reload removed it while its webhook came in: nobody to give it
            return
        self._log.add(bucket, entries)
        frames = 0
        shared = self._backend.shared
        for entry in entries:
            if not entry.internal:
                continue  # the relay delivers it: see _Forwarder
            frames += 1
            framed: dict[_Wire, bytes] = {}  # framed once for each wire, for all its subscribers
            for session in bucket.subscribers:
                frame = framed.get(session.wire)
                if frame is None:
                    frame = framed[session.wire] = session.wire.webhook(entry, shared)
                if frame:  # b"": not for this wire (see _streamed_output)
                    session.deliver(frame)
            self._metrics.frames[bucket.config.name] += len(bucket.subscribers)
            if any(not session.observer for session in bucket.subscribers):
                self.sent(entry)
        if frames < len(entries):
            bucket.wake()  # its forwarders
        webhook = entries[0].webhook
        logger.info("webhook %s %s %s -> bucket %s: %d frame(s) to %d subscriber(s), %d to deliver", entries[0].id,
                    webhook.method, _shown(webhook.path), bucket.config.name, frames, len(bucket.subscribers),
                    len(entries) - frames)

    # ---------------------------------------------------------------- webhooks out

    def subscribe(self, session: _Subscriber, buckets: Iterable[_Bucket]) -> None:
        """Send `session` every webhook of `buckets` published from now on."""
        for bucket in buckets:
            bucket.subscribers.add(session)

    def unsubscribe(self, session: _Subscriber, buckets: Iterable[_Bucket]) -> None:
        for bucket in buckets:
            bucket.subscribers.discard(session)

    def sent(self, entry: _Entry) -> None:
        """A socket was given `entry`."""
        if entry.status == "received":
            entry.status = "sent"
            self._backend.update(entry)

    async def poll(self, bucket: _Bucket, output: str, cursor: str, limit: int,
                   max_age: float) -> tuple[list[_Entry], bool, str]:
        """A pull queue's next entries (`output`'s, or "": what sockets get), its has_more, and
        the id it reached; from `cursor` if given, else from the queue's position (at its first
        call, from `max_age` seconds ago). The position moves past what is handed out, never back,
        and only to ids of entries it holds; a call holds the queue's lock until it is kept."""
        async with bucket.queue_lock(output), self._backend.queue(bucket, output):
            position = bucket.positions.get(output)
            start = cursor or position  # a cursor reads from where it says, the queue from where it is
            oldest = _wall_time() - max_age if start is None else -math.inf
            found = self._log.after([bucket], start or "", limit + 1, lambda entry: entry.received_at >= oldest and (
                entry.output_name == output if output else entry.internal))
            page = _listed(found, limit)
            # At its first call, with nothing to hand out, a queue starts after what the bucket holds now.
            reached = page[-1].id if page else None if start is not None else max(self.newest_id([bucket]), NIL_LOG_ID)
            if reached is not None and reached > (position or ""):
                bucket.positions[output] = reached
                try:
                    await self._backend.move(bucket, output)
                except StorageError as error:  # hand these out again: no other call moved it meanwhile
                    if position is None:
                        del bucket.positions[output]
                    else:
                        bucket.positions[output] = position
                    raise StorageError(f"{error}; try again") from None
        return page, len(found) > len(page), reached or start or NIL_LOG_ID

    def leading(self, name: str) -> typing.AsyncContextManager[trio.CancelScope]:
        """See _Alone.leading and _Redis.leading."""
        return self._backend.leading(name)

    # ---------------------------------------------------------------- answers

    async def wait_for_answer(self, hold: _Hold, entries: list[_Entry], timeout: float) -> _Answer | None:
        """Hold the sender until a client answers, for `timeout` seconds at most."""
        self._holds.add(hold)
        try:
            with trio.move_on_after(timeout):
                await hold.answered.wait()
        finally:
            hold.open = False
            self._holds.discard(hold)
        if hold.answer is None:
            for entry in entries:
                if entry.answer is None and entry.internal:  # a public output's delivery goes on
                    entry.status = "stalled"  # nobody answered in time: the sender got the fallback
                    self._backend.update(entry)
        return hold.answer

    def release_holds(self) -> None:
        """No answer will come now (a shutdown): held senders get their input's own answer."""
        for hold in self._holds:
            hold.answered.set()

    async def answer(self, entry: _Entry, answer: _Answer, status: str) -> None:
        """Record a client's answer to `entry` (an agent's outcome of its delivery), and pass it
        to its sender if one is still held; Conflict says why not, StorageError that it is
        recorded in memory only. However late it comes, the log takes it: the sender's time
        decides only whether the sender sees it. (A delivery retried past response_timeout was
        refused 409, and its failure stayed "sent" in the log, out of the "failed" filter.)"""
        if entry.status == "rejected":
            raise Conflict(f"log {entry.id} is a webhook its input refused: it takes no answer")
        if entry.answer is not None:
            raise Conflict(f"log {entry.id} was already answered; the first answer counts")
        hold = entry.hold
        if not await self._backend.claim_answer(entry, answer, status) or entry.answer is not None:  # another's first
            raise Conflict(f"log {entry.id} was already answered; the first answer counts")
        entry.status = status
        self._log.answered(self._store.bucket_of(entry), entry, answer)
        if hold is not None:
            hold.offer(entry, answer)
        self._backend.update(entry)
        logger.info("answer to webhook %s: %s (%s)", entry.id, answer.status_code or "-", status)
        try:
            await self._backend.committed()
        except StorageError as error:
            raise StorageError(f"{error}; the answer is recorded in memory only") from None

    def delivered(self, entry: _Entry, answer: _Answer) -> None:
        """The relay's own delivery to a public output ended: its outcome goes in the log, and to
        a sender held for that output's answer."""
        entry.status = "sent" if 200 <= answer.status_code < 400 else "failed"
        self._metrics.deliveries[entry.bucket.name, entry.output_name, entry.status] += 1
        self._log.answered(self._store.bucket_of(entry), entry, answer)
        if entry.hold is not None:
            entry.hold.offer(entry, answer)
        self._backend.update(entry)
        logger.info("delivered webhook %s to %s: %s after %d retries", entry.id, _shown(entry.destination),
                    answer.status_code or _shown(answer.body.decode(errors="replace")), answer.retries)

    # ---------------------------------------------------------------- its life

    @property
    def failing(self) -> str:
        """Why the backend cannot keep webhooks now, or ""."""
        return self._backend.failing

    @property
    def session_key(self) -> bytes:
        """What inspectors' sessions are signed with (see _Credentials): kept where the log is,
        so every relay of a cluster takes them, and with storage a restart does."""
        return self._backend.session_key

    async def load(self) -> None:
        """Start the log with what the backend kept. A bucket it kept nothing of starts after every
        id the relay gave before, so a resume from before that is told it may have missed some."""
        kept = await self._backend.load({bucket.config.id: bucket.config for bucket in self._store.buckets})
        self._log = log = _Log(kept.last)
        log.on_trim = self._backend.trim
        start = log.ids.next()
        for bucket in self._store.buckets:
            bucket.trimmed = kept.trimmed.get(bucket.config.id, start)
            if bucket.config.id not in kept.trimmed:
                self._backend.trim(bucket)  # remember where its log starts
            log.add(bucket, kept.entries.get(bucket.config.id, []))  # within today's bounds
        by_id = {bucket.config.id: bucket for bucket in self._store.buckets}
        for bucket_id, output, position in kept.positions:
            if bucket_id in by_id:
                by_id[bucket_id].positions[output] = position

    async def run(self) -> None:
        """Keep what is asked for until aclose()."""
        await self._backend.run()

    async def aclose(self) -> None:
        await self._backend.aclose()

    def expire(self, now: float) -> None:
        """Drop log entries past their bucket's history_ttl."""
        self._log.expire(self._store.buckets, now)

    def reload(self, config: Config) -> tuple[list[_Bucket], list[_Bucket]]:
        """Take `config`'s buckets: those it keeps (by id) keep their log, subscribers and pull
        queues; a new one starts its log now. Return the buckets now, and those removed
        (their log is gone; their subscribers, and what delivers their outputs, are the caller's to end)."""
        old = {bucket.config.id: bucket for bucket in self._store.buckets}
        store = _Store(config, kept={bucket.id: old[bucket.id] for bucket in config.buckets if bucket.id in old})
        for bucket in store.buckets:
            if bucket.config.id not in old:  # as at start: a resume from before now may have missed some
                bucket.trimmed = self._log.ids.next()
        store.adopt()
        kept = {bucket.config.id for bucket in store.buckets}
        removed = [bucket for bucket_id, bucket in old.items() if bucket_id not in kept]
        for bucket in removed:
            self._log.forget(bucket)
        self._store = store
        self._backend.reloaded(store.buckets, [bucket for bucket in store.buckets if bucket.config.id not in old])
        return store.buckets, removed


# ---- the services, and ingest ----------------------------------------------------------------
#
# _Services is what the adapters (socket sessions, HTTP routes, forwarders, metrics) are given
# instead of the Relay. _Ingest is the way in of every webhook, every rule of it, without HTTP.


class _Services:
    """A running relay's parts, as the adapters use them. `config` is the config in force."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = _Metrics()
        self.throttle = _Throttle()  # warnings a stranger could repeat at will
        self.core = _Core(config, self.metrics)
        self.credentials = _Credentials(config, lambda: self.core.session_key, self.throttle)
        self.ingest = _Ingest(config, self.core, self.metrics, self.throttle, self.find_channel)
        self.connections = _Connections(config.server, self.throttle)
        assert config.server.max_body_bytes_in_flight  # filled in by _checked
        self.inflows = _Inflows(config.server.max_body_bytes_in_flight, self.throttle)  # request bodies in flight
        self.loaded_at = _wall_time()  # when the config in force was loaded: the buckets API's created_at
        self.stopping = trio.Event()  # set by Relay.shutdown

    def reloaded(self, config: Config, credentials: "_Credentials") -> None:
        """The parts a reload changes, changed together (the core's buckets changed before)."""
        self.config, self.credentials = config, credentials
        self.ingest.reload(config)
        self.loaded_at = _wall_time()

    def current_token(self, token: TokenConfig | None) -> TokenConfig | None:
        """`token`, as the config in force has it: None if a reload removed or changed it while
        its secret was being checked."""
        return next((current for current in self.config.tokens if current == token), None)

    async def authenticate(self, address: str, key: str, secret: str, *, inspector: bool = False) -> _Grant:
        """Who a REST API request's key and secret (from `address`) belong to; Unauthorized, or
        TooManyFailures, if nobody. An inspector's session passes only where `inspector` says
        the inspector may go."""
        try:
            grant = await self.credentials.check(address, key, secret) if key else None
        except TooManyFailures as error:
            if not isinstance(error, HashingBusy):
                self.metrics.auth_failures["locked_out"] += 1
            raise
        token = self.current_token(grant.token if grant else None)
        if grant is None or token is None:
            if key:
                self.metrics.auth_failures["api"] += 1
                self.throttle.warning("auth", "failed authentication from %s (key %s)", address, _shown(key, 64))
            raise Unauthorized("authenticate with HTTP Basic key:secret, or Authorization: Bearer <secret>")
        if grant.inspector and not inspector:
            raise Forbidden("an inspector's session may read the log and resend, no more: use the token's secret")
        return dataclasses.replace(grant, token=token)

    def find_channel(self, address: str, name: str) -> tuple[_Bucket, InputConfig] | None:
        """The bucket whose smee channel `name` is, and the input its webhooks come in as; None if
        no bucket's is. The name is the channel's only credential, so each one asked for is an
        attempt of `address`'s (TooManyFailures past its allowance), as a secret's is."""
        found = self.core.find_channel(name)
        try:
            self.credentials.attempt(address, found is not None)
        except TooManyFailures:
            self.metrics.auth_failures["locked_out"] += 1
            raise
        if found is None:
            self.metrics.auth_failures["smee"] += 1
            self.throttle.warning("smee", "%s asked for a smee channel no bucket has", address)
        return found

    def authenticate_metrics(self, address: str, authorization: str) -> None:
        """Unauthorized (or TooManyFailures) unless a request for /metrics from `address`, with
        the Authorization header `authorization`, gives Bearer <[metrics] token>, if one is set."""
        expected = self.config.metrics.token
        if not expected:
            return
        scheme, _, given = authorization.strip().partition(" ")
        try:
            right = scheme.lower() == "bearer" and self.credentials.check_other(address, given.strip(), expected)
        except TooManyFailures:
            self.metrics.auth_failures["locked_out"] += 1
            raise
        if not right:
            self.metrics.auth_failures["metrics"] += 1
            raise Unauthorized("the metrics need Authorization: Bearer <[metrics] token>",
                               'Bearer realm="relay_lite metrics"')


class _Reply(typing.NamedTuple):
    """What a webhook's sender is answered: an input's own answer, or a client's, with its
    headers; or, with `headers` None, the relay's refusal: a line saying why."""

    status: int
    body: bytes | str
    headers: list[tuple[str, str]] | None = None


class _Ingest:
    """Receiving a webhook, every rule of it, without HTTP: the input it is for (not on the
    inspector's host name), its path, its signature, a replay of one accepted before, the log
    failing, a sender held for a client's answer, and the metrics of each. The HTTP route hands
    it the request and answers what it returns."""

    def __init__(self, config: Config, core: _Core, metrics: _Metrics, throttle: _Throttle,
                 find_channel: Callable[[str, str], tuple[_Bucket, InputConfig] | None]) -> None:
        self._core, self._metrics, self._throttle = core, metrics, throttle
        self._find_channel = find_channel  # see _Services.find_channel
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take the config in force: the inspector's host name, and each input's own answer to
        its senders (a smee channel's own input's too), built once."""
        self._inspector_host = config.inspector.host
        inputs = [*(input_ for bucket in config.buckets for input_ in bucket.inputs),
                  *filter(None, map(_channel_input, config.buckets))]
        self._answers = {input_.id: _Reply(input_.status_code, input_.body, _answer_headers(
            (name, [value]) for name, value in input_.headers.items())) for input_ in inputs}

    async def receive(self, target: str, method: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                      sender: str, host: str, holding: Callable[[], None] = lambda: None) -> _Reply:
        """A webhook: `method` to `target` (the request's path as sent, /v1/webhooks/<input id>
        or /smee/<channel>, and what follows) with `query`, `headers` and `body`, from `sender`,
        for `host`; what to answer it. `holding` is called when the sender is to wait for a
        client's answer. TooManyFailures if `sender` may not try another smee channel now."""
        started = trio.current_time()
        if self._inspector_host and host == self._inspector_host:
            return _Reply(404, "webhooks are not taken on the inspector's host name ([inspector] host)")
        if target.startswith(SMEE_PREFIX):
            name, slash, extra = target[len(SMEE_PREFIX):].partition("/")
            found = self._find_channel(_address_key(sender), name)
            if found is None:
                self._metrics.rejected["unknown_channel"] += 1
                return _Reply(404, "no such smee channel")
        else:
            input_id, slash, extra = target[len(WEBHOOK_PREFIX):].partition("/")
            found = self._core.find_input(input_id)
            if found is None:
                self._metrics.rejected["unknown_input"] += 1
                return _Reply(404, f"no input with id {input_id[:64]!r}")
        own = self._answers[found[1].id]  # as it is now: a reload may come while the sender is held
        if _has_dot_segment(extra):  # a client joining it to a URL would climb out of its destination
            self._metrics.rejected["bad_path"] += 1
            return _Reply(400, "the path after the input's URL must not have . or .. segments")
        webhook = Webhook.from_request(method, slash + extra, query, headers, body, sender)
        bucket, input_ = found
        problem, nonce = verified(input_.verify, webhook.headers, body, _wall_time()) if input_.verify else ("", None)
        if problem:
            self._throttle.warning(f"verify {input_.id}", "input %r of bucket %r refused a webhook from %s: %s",
                                   input_.name, bucket.config.name, sender, problem)
            if len(body) > _REJECTED_BODY_KEPT:
                webhook = Webhook.from_request(method, slash + extra, query, headers, body[:_REJECTED_BODY_KEPT],
                                               sender)
            self._core.reject(bucket, input_, webhook, problem)
            self._metrics.rejected["signature"] += 1
            return _Reply(401, f"signature check failed: {problem}")
        hold = _Hold(input_.response_from_output) if input_.response_from_output else None
        try:
            entries = await self._core.accept(bucket, input_, webhook, hold, nonce)
        except StorageError as error:
            self._metrics.rejected["storage"] += 1
            return _Reply(503, f"{error}; try again")
        except _Replayed:
            self._throttle.warning(f"replay {input_.id}", "input %r of bucket %r ignored a replay of a webhook it "
                                   "had accepted, from %s", input_.name, bucket.config.name, sender)
            self._metrics.rejected["replay"] += 1
            return own  # as the first time
        self._metrics.received[bucket.config.name] += 1
        self._metrics.ingest_seconds.observe(trio.current_time() - started)
        if hold is not None and entries:
            holding()
            answer = await self._core.wait_for_answer(hold, entries, input_.response_timeout)
            if answer is not None:
                return _Reply(answer.status_code, answer.body, _answer_headers(answer.headers.items()))
        return own


# ==== 6. Library glue =========================================================================
#
# Everything that drives trio-websocket's or Hypercorn's internals, which are not their public
# API, is here: pyproject pins the versions it was written for (_DEPENDENCIES checks them before
# the import), and _missing_internals checks, at import, that each private name used here is
# still there, so a version that renamed one fails at once, with one line, not mid-request.

_MessageEvent = _BytesMessage | _TextMessage


class _WebSocket(trio_websocket.WebSocketConnection):
    """trio-websocket's connection, failing a connection as RFC 6455 asks: with a close frame.

    wsproto reports a frame it cannot accept (not UTF-8: 1007; a reserved bit, no mask: 1002)
    as a CloseConnection event, its state still OPEN, as if the peer had sent one; trio-websocket
    0.12 then ends the TCP connection without a close frame, and the client never learns why.
    Overrides a private method of trio-websocket, pinned in pyproject.
    """

    async def _handle_message_event(self, event: _MessageEvent) -> None:
        """A message's parts count the memory they hold, not their length: one million
        one-character fragments held 82 MiB within a 1 MiB max_message_size, and text of emoji
        holds 4 bytes a character."""
        self._message_size += sys.getsizeof(event.data) - len(event.data) + 8  # and its list slot
        try:
            await super()._handle_message_event(event)
        except LocalProtocolError:  # too big, while this side was closing: no second close frame can
            self._reader_running = False  # go out, and nothing more the peer sends matters
            self._close_handshake.set()

    async def _send(self, event: Any) -> None:
        """A close frame, once wsproto has made it, goes out even if the task sending it is being
        cancelled (the session ending for its own reason), for _CLOSE_AT_ONCE at most: else the
        peer got no close frame at all."""
        if isinstance(event, _CloseConnection):
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_AT_ONCE):
                await super()._send(event)
        else:
            await super()._send(event)

    async def _handle_close_connection_event(self, event: _CloseConnection) -> None:
        if self._wsproto.state != _WSState.OPEN:  # the peer's own close frame
            await super()._handle_close_connection_event(event)
            return
        try:
            await self._send(_CloseConnection(code=event.code, reason=event.reason))
        except trio_websocket.ConnectionClosed:
            pass  # gone already
        await self._close_web_socket(event.code, event.reason or None)
        self._close_handshake.set()
        await self._close_stream()


async def _websocket_handshake(nursery: trio.Nursery, stream: trio.abc.Stream) -> _WebSocket:
    """trio_websocket.wrap_server_stream and accept(), with the _WebSocket class."""
    ws = _WebSocket(stream, _WSConnection(_WSConnectionType.SERVER), max_message_size=MAX_FRAME_BEFORE_AUTH)
    nursery.start_soon(ws._reader_task)
    request = await ws._get_request()
    return typing.cast(_WebSocket, await request.accept())


async def _send(send_all: Callable[[bytes | memoryview], Awaitable[None]], data: bytes,
                progressed: Callable[[], None]) -> None:
    """`send_all(data)` (a stream's, or what writes an ASGI answer's body), _WRITE_STEP bytes at
    a time, calling `progressed` after each."""
    if len(data) <= _WRITE_STEP:
        await send_all(data)
    else:
        view = memoryview(data)
        for start in range(0, len(data), _WRITE_STEP):
            await send_all(view[start:start + _WRITE_STEP])
            progressed()


async def _close_at_once(ws: trio_websocket.WebSocketConnection, code: int, reason: str) -> None:
    """Send a close frame and wait for nothing: trio-websocket's aclose() would wait for the
    peer's close frame, which nobody reads once the connection has been ended."""
    if ws._wsproto.state == _WSState.OPEN:
        await ws._stream.send_all(ws._wsproto.send(_CloseConnection(code=code, reason=reason)))


async def _write(ws: trio_websocket.WebSocketConnection, frames: list[bytes], progressed: Callable[[], None]) -> None:
    """Send frames built by wire_frame on `ws`: small ones joined into one write, large ones as
    they are (they may be shared with other sockets: no copy), _WRITE_STEP bytes at a time,
    calling `progressed` after each (see _Sockets.sweep: no step may take send_timeout).

    trio-websocket frames each message anew for each connection (send_message), and each
    send_message costs a whole trio scheduling round even when the socket has room, while a busy
    relay completes several webhooks in one round: a writer sending a frame a round falls behind
    a client that reads everything. So the relay frames a webhook once (no extension is ever
    negotiated, so a frame is just RFC 6455 framing) and writes queued frames together, doing
    what send_message and _send do in trio-websocket 0.12 (pinned in pyproject).
    """
    if ws._close_reason:
        raise trio_websocket.ConnectionClosed(ws._close_reason)
    lock = ws._stream_lock  # shared with trio-websocket's reader, which sends pongs and closes
    try:
        lock.acquire_nowait()  # acquire() would spend a scheduling round even when it is free
    except trio.WouldBlock:
        await lock.acquire()
    try:
        if ws._wsproto.state in (_WSState.LOCAL_CLOSING, _WSState.CLOSED):  # a close frame went out while
            raise trio_websocket.ConnectionClosed(ws._close_reason)  # this waited: nothing may follow it
        small: list[bytes] = []
        for frame in frames:
            if len(frame) < _JOIN_BELOW:
                small.append(frame)
                continue
            if small:
                await _send(ws._stream.send_all, b"".join(small), progressed)
                small = []
            await _send(ws._stream.send_all, frame, progressed)
        if small:
            await _send(ws._stream.send_all, small[0] if len(small) == 1 else b"".join(small), progressed)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        raise trio_websocket.ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()


def _set_max_message_size(ws: trio_websocket.WebSocketConnection, size: int) -> None:
    """Let `ws`'s peer send messages of up to `size` bytes (trio-websocket fixes it at creation)."""
    ws._max_message_size = size


def _hypercorn(server: ServerConfig, asgi: Callable[..., Awaitable[None]]) -> tuple[
        _HypercornConfig, _WorkerContext, _Lifespan]:
    """What serving HTTP with Hypercorn's trio worker, a connection at a time, takes: its config,
    its worker context (shared by every connection), and the app's lifespan."""
    config = _HypercornConfig()
    config.include_server_header = False  # no version banner, and a client's answer may set one
    config.keep_alive_timeout = server.idle_timeout
    config.h11_max_incomplete_size = server.max_header_bytes  # a head that arrives in parts
    # What Hypercorn reads ahead of the app, a chunk (up to 64 KiB) a message: while a body waits
    # for room (see _Inflows), or after it was refused, that is memory outside the bodies' bound
    config.max_app_queue_size = 1
    return config, _WorkerContext(None), _Lifespan(ASGIWrapper(asgi), config, {})


async def _serve_http(asgi: Callable[..., Awaitable[None]], config: _HypercornConfig, context: _WorkerContext,
                      stream: trio.abc.Stream) -> None:
    """Serve HTTP on one connection's `stream` (any trio Stream) with Hypercorn, until it ends."""
    await _TCPServer(ASGIWrapper(asgi), config, context, {}, stream)  # type: ignore[arg-type]  # any Stream


# The private names used above (methods, and attributes their __init__ sets), by library.
_INTERNALS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    "trio-websocket": (trio_websocket.WebSocketConnection,
                       ("_reader_task", "_get_request", "_handle_message_event", "_handle_close_connection_event",
                        "_send", "_close_web_socket", "_close_stream", "_abort_web_socket"),
                       ("_wsproto", "_stream", "_close_reason", "_stream_lock", "_message_size", "_reader_running",
                        "_close_handshake", "_max_message_size")),
    "hypercorn": (_Lifespan, ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"), ()),
}


def _missing_internals() -> str | None:
    """What of the libraries' internals relay_lite drives is gone, in one line, or None."""
    for name, (cls, methods, attributes) in _INTERNALS.items():
        missing = [method for method in methods if not callable(getattr(cls, method, None))]
        missing += [attribute for attribute in attributes if attribute not in getattr(cls, "__init__").__code__.co_names]
        if missing:
            low, high = _DEPENDENCIES[name]
            return (f"relay_lite drives internals of {name} that the installed {importlib.metadata.version(name)} "
                    f"lacks ({', '.join(missing)}); it supports {name}>={low},<{high}")
    if "terminated" not in _WorkerContext.__init__.__code__.co_names:
        return "relay_lite drives internals of hypercorn that the installed one lacks (WorkerContext.terminated)"
    return None


if (_problem := _missing_internals()) is not None:
    if __name__ == "__main__":
        sys.exit(f"relay_lite: error: {_problem}")
    raise ImportError(_problem)


# ==== 7. Adapters: the socket session, the smee stream, the HTTP routes, deliveries ==========
#
# Each turns what comes over the wire into calls to the services, and their answers into what
# goes back: a socket's frames, a smee stream's events, an HTTP answer, a delivery to a
# destination. A route reads its request, calls the services, and answers; the rules are the
# services'.

# ---- what subscribers are sent: the socket session, the smee stream --------------------------


class _Outbox:
    """What a subscriber's client is sent, waiting to be written, as framed bytes: bounded by
    `max_frames` and `max_bytes`. Sans-IO: the session puts frames in, its writer takes them out
    a write's batch at a time, and a resume asks how much history may go in now."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._frames: deque[bytes] = deque()
        self.bytes = 0  # frames are shared between sessions, but a client that reads none holds them
        self.closed = False  # no frame goes in any more; those in it may still go out
        self.writer_waiting = False  # the writer waits for a frame: the first is as good as taken

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> str:
        """Queue `frame`; or, if it does not fit, say why the client is too slow ("" if it fit, or
        the outbox is closed). A frame larger than max_bytes fits only alone."""
        if self.closed:
            return ""
        if self.bytes and self.bytes + len(frame) > self.max_bytes:
            return f"over {self.max_bytes} bytes waiting unread"
        if len(self._frames) >= self.max_frames + (1 if self.writer_waiting else 0):
            return f"{self.max_frames} frames waiting unread"
        self._frames.append(frame)
        self.bytes += len(frame)
        return ""

    def take(self) -> list[bytes]:
        """The frames of the next write: all waiting, up to _WRITE_BATCH_FRAMES and about
        _WRITE_BATCH_BYTES (at least one)."""
        self.writer_waiting = False
        batch: list[bytes] = []
        size = 0
        while self._frames and len(batch) < _WRITE_BATCH_FRAMES and (not batch or size < _WRITE_BATCH_BYTES):
            frame = self._frames.popleft()
            batch.append(frame)
            size += len(frame)
        self.bytes -= size
        return batch

    def close(self, *, drop: bool = False) -> None:
        """Take no more frames; with `drop`, forget those waiting too."""
        self.closed = True
        if drop:
            self._frames.clear()
            self.bytes = 0

    def replay_room(self) -> tuple[int, int]:
        """How many frames of history a resume may queue now, and about how many bytes: at most
        half the outbox's frames, so pings and live frames of other buckets still fit, and at
        most a write's bytes or half of max_bytes, so a resume of large webhooks holds little
        and never trips the outbox's own bound."""
        return (max(self.max_frames // 2, 1) - len(self._frames),
                min(_WRITE_BATCH_BYTES, self.max_bytes // 2) - self.bytes)


class _Pinger:
    """Pings (its wire's) for every authenticated socket and smee stream, each `interval` seconds, from one task.

    A timing wheel: each tick (interval / _PING_SLOTS) pings one slot, and a socket that
    authenticates joins the slot the current round reaches last, a full interval away. Pings are
    spread evenly over the interval and no socket needs a timer of its own.
    """

    def __init__(self, interval: float) -> None:
        self._tick = interval / _PING_SLOTS
        self._slots: list[set[_Subscriber]] = [set() for _ in range(_PING_SLOTS)]
        self._due = 0  # the slot the next tick pings
        self._slot_of: dict[_Subscriber, int] = {}

    def add(self, session: _Subscriber) -> None:
        slot = (self._due - 1) % _PING_SLOTS  # pinged last in the round: a full interval from now
        self._slots[slot].add(session)
        self._slot_of[session] = slot

    def discard(self, session: _Subscriber) -> None:
        slot = self._slot_of.pop(session, None)
        if slot is not None:
            self._slots[slot].discard(session)

    async def run(self) -> None:
        next_tick = trio.current_time()
        while True:
            next_tick += self._tick
            await trio.sleep_until(next_tick)
            for session in self._slots[self._due]:
                session.deliver(session.wire.ping)
            self._due = (self._due + 1) % _PING_SLOTS


class _Sockets:
    """The relay's open sockets and smee channels' streams, for those that act on all of them:
    the sweep (an inspector's session that expired, a write that stalled), the pinger, a reload,
    a shutdown, metrics. Each says here when it authenticates (or starts), writes, and ends."""

    def __init__(self, server: ServerConfig, connections: "_Connections") -> None:
        self.open: set[_Session] = set()
        self.streams: set[_EventStream] = set()
        self._watching: set[_Session] = set()  # inspectors' sessions, which expire
        self._writing: set[_Outgoing] = set()  # with a write under way, which may not stall
        self.pinger = _Pinger(server.ping_interval)
        self._connections = connections

    def authenticated(self, session: "_Session") -> None:
        """`session` authenticated: it is a client, no longer pending, needs no deadline (but an
        inspector's session's end), may send larger frames, and is pinged."""
        if session.inspector:
            self._watching.add(session)
        self._client(session)
        session.allow_frames(MAX_CLIENT_FRAME)

    def started(self, stream: "_EventStream") -> None:
        """`stream` named its channel: a client, as an authenticated socket is."""
        self.streams.add(stream)
        self._client(stream)

    def _client(self, client: "_Outgoing") -> None:
        self._connections.busy(client.connection)
        client.connection.end_by(math.inf)
        self.pinger.add(client)

    def writing(self, client: "_Outgoing", under_way: bool) -> None:
        (self._writing.add if under_way else self._writing.discard)(client)

    def ended(self, client: "_Outgoing") -> None:
        """`client` is closing: no more pings, expiry or stalls."""
        self.pinger.discard(client)
        self._writing.discard(client)
        if isinstance(client, _Session):
            self._watching.discard(client)
        else:
            self.streams.discard(client)

    def streams_from(self, address: str) -> int:
        """How many streams `address` holds."""
        return sum(stream.connection.client == address for stream in self.streams)

    def everyone(self) -> list["_Outgoing"]:
        """Every socket session and stream open now."""
        return [*self.open, *self.streams]

    def sweep(self, now: float, send_timeout: float) -> None:
        """Close inspectors' sessions past their end; cut off sockets and streams whose write got
        no _WRITE_STEP out for `send_timeout` (`now` by trio.current_time())."""
        wall = _wall_time()
        for session in [session for session in self._watching if session.expires <= wall]:
            session.close(CLOSE_POLICY, "this inspector session expired: sign in again")
        for client in [client for client in self._writing if client.progress_at < now - send_timeout]:
            client.stalled(send_timeout)


def _history_gap(bucket: _Bucket, cursor: str, since: str) -> str:
    """What a resume from `cursor` (it began at `since`) must be told of what `bucket` no longer
    holds after it, naming the cause; "" if nothing. A client that resumes from before every
    webhook (NIL_LOG_ID: it has seen none) is told only of webhooks the relay dropped: the mark
    where a relay's log begins (its start, without storage; the bucket's adding) was told to a
    fresh agent of a fresh demo as a loss, and blamed on history_size."""
    config = bucket.config
    if bucket.dropped > cursor:
        return (f"bucket {config.name} no longer holds every webhook after {cursor}: those up to {bucket.dropped} are "
                f"gone (it keeps {config.history_size} webhooks for {config.history_ttl:g} s); sending those it still "
                "holds")
    if bucket.trimmed > cursor and since != NIL_LOG_ID:
        return (f"bucket {config.name}'s log begins at {bucket.trimmed}: the relay started then (without [storage], "
                f"what it held before is gone), or the bucket was added then; webhooks after {cursor} from before that "
                "may be missing; sending those it holds")
    return ""


@dataclasses.dataclass
class _Replay:
    """A resume in progress: the buckets it covers and the last id sent."""

    buckets: tuple[_Bucket, ...]
    since: str
    cursor: str  # the last id sent, since at first
    sent: int = 0
    gaps: dict[_Bucket, str] = dataclasses.field(default_factory=dict)  # history_gap notices given


class _Outgoing:
    """What the relay sends one client of a bucket's webhooks (a socket session, a smee
    channel's stream): its outbox, the one writer that empties it, a resume, and how it ends.

    Everything the client is sent, pings from the relay's _Pinger included, goes through the
    bounded outbox as bytes framed for its `wire`; a client that leaves `send_queue_size` frames,
    or `send_queue_bytes` of them, unread is cut off, and one whose write gets nothing out for
    `send_timeout` too (see _Sockets.sweep).
    """

    def __init__(self, services: _Services, sockets: _Sockets, connection: "_Connection", wire: _Wire) -> None:
        self._services = services
        self._sockets = sockets
        self._core = services.core
        self._connection = connection
        self.peer = connection.peer
        self.wire = wire
        self._outbox = _Outbox(services.config.server.send_queue_size, services.config.server.send_queue_bytes)
        self._more = trio.Event()  # set when a frame is queued, or the outbox closed: the writer waits on it
        self.buckets: set[_Bucket] = set()
        self.observer = False  # what it is sent is not "sent" for that (an inspector's watch)
        self.close_reason: tuple[int, str] | None = None
        self._writer = trio.CancelScope()
        self._writing = False  # a frame is on its way to the client
        self.progress_at = 0.0  # when the write under way began, or last got _WRITE_STEP bytes out
        self._replay: _Replay | None = None  # a resume in progress
        self.frames_sent = 0

    def deliver(self, frame: bytes) -> None:
        """Queue `frame` (framed for its wire) for the client, or cut it off if it has fallen too far behind."""
        too_slow = self._outbox.put(frame)
        if too_slow:
            self._cut_off("too_slow", too_slow)
        else:
            self._more.set()

    def _cut_off(self, kind: str, why: str) -> None:
        self._services.metrics.cutoffs[kind] += 1
        self.close(CLOSE_POLICY, f"too slow: {why}; reconnect and read faster", drain=False)

    @property
    def connection(self) -> "_Connection":
        return self._connection

    def stalled(self, timeout: float) -> None:
        """Its write got no _WRITE_STEP out for `timeout` seconds: cut it off now, mid-frame (no
        close frame can follow half a frame)."""
        self._cut_off("send_timeout", f"nothing read for {timeout:g} s")
        self._writer.cancel()

    def _progressed(self) -> None:
        self.progress_at = trio.current_time()

    def close(self, code: int, reason: str, *, drain: bool = True) -> None:
        """End it with `code` and `reason`; the first reason given wins.

        With `drain`, frames already queued (an error, "unauthorized") go out first; without, they
        are dropped. Either way the writer gets _CLOSE_TIMEOUT to finish, then is cancelled.
        """
        if self.close_reason is not None:
            return
        self.close_reason = (code, reason)
        self._outbox.close(drop=not drain)
        self._more.set()
        self._writer.deadline = min(self._writer.deadline, trio.current_time() + _CLOSE_TIMEOUT)
        if not drain and not self._writing:  # else let the frame on the wire finish: a close can follow it
            self._writer.cancel()

    async def _send(self, frames: list[bytes]) -> None:
        """Write `frames` to the client, calling _progressed after each _WRITE_STEP."""
        raise NotImplementedError

    async def _write_queued(self) -> None:
        """The writer: send queued frames, all that are waiting in one write, until the outbox is
        closed and empty (or the writer is cancelled)."""
        with self._writer:
            while self._outbox or not self._outbox.closed:
                if not self._outbox:
                    self._more = trio.Event()
                    self._outbox.writer_waiting = True
                    await self._more.wait()
                    continue
                batch = self._outbox.take()
                self._writing = True
                self.progress_at = trio.current_time()
                self._sockets.writing(self, True)  # see _Sockets.sweep: a write may not stall
                await self._send(batch)
                self._sockets.writing(self, False)
                self._writing = False
                self.frames_sent += len(batch)
                if self._replay is not None:
                    self._resume()

    def _resume(self) -> None:
        """Queue more of the history a resume asked for, or, once it is all sent, go live.

        Called when the resume begins and after each write while it runs. History frames take at most
        half the outbox, so pings and live frames of other buckets still fit, and at most one write's
        bytes (_WRITE_BATCH_BYTES) or half of send_queue_bytes, so a resume of large webhooks holds
        little and never trips the outbox's own bound (a frame larger than that goes alone). Once no entry is left
        after the cursor, the client joins its buckets' subscribers in the same step: the next
        webhook reaches it live, none is missed and none comes twice.
        """
        replay, core = self._replay, self._core
        assert replay is not None
        if self.close_reason is not None:
            return
        room, room_bytes = self._outbox.replay_room()
        if room <= 0 or room_bytes <= 0:
            return  # the outbox holds enough: the writer calls again after its next write
        for bucket in replay.buckets:
            if replay.gaps.get(bucket) != bucket.trimmed and (gap := _history_gap(bucket, replay.cursor, replay.since)):
                replay.gaps[bucket] = bucket.trimmed
                self._status("history_gap", gap)
        entries = core.after(replay.buckets, replay.cursor, int(room))
        for entry in entries:
            frame = core.frame(entry, self.wire)  # a socket's shared with other sessions resuming from here
            if not frame:  # not for this wire (see _streamed_output)
                replay.cursor = entry.id
                continue
            if len(frame) > room_bytes and len(self._outbox):
                return  # enough queued; this one goes after the next write
            room_bytes -= len(frame)
            self.deliver(frame)
            self._services.metrics.frames[entry.bucket.name] += 1
            if not self.observer:
                core.sent(entry)
            replay.cursor, replay.sent = entry.id, replay.sent + 1
        if len(entries) < room:  # caught up: live from here
            core.subscribe(self, replay.buckets)
            self._replay = None
            self._status("resumed", f"sent {replay.sent} webhook(s) after {replay.since}; now live")

    def unsubscribe(self, bucket: _Bucket, why: str) -> None:
        """Stop sending `bucket`'s webhooks (a reload removed it), and say so."""
        self._core.unsubscribe(self, [bucket])
        if self._replay is not None and bucket in self._replay.buckets:  # else it would join at the end
            self._replay.buckets = tuple(other for other in self._replay.buckets if other is not bucket)
        if bucket in self.buckets:
            self.buckets.discard(bucket)
            self._status("unsubscribed", why)

    def _status(self, status: str, message: str) -> None:
        if frame := self.wire.status(status, message):
            self.deliver(frame)


_AUTHENTICATED_FRAME = wire_frame(status_frame("authenticated", AUTHENTICATED_MESSAGE))


class _Session(_Outgoing):
    """One socket client: authentication, subscriptions, and how it ends.

    Its nursery holds the reader (auth under `auth_timeout`, then subscribe and pong) and, in the
    nursery's own body, the one writer.
    """

    def __init__(self, services: _Services, sockets: _Sockets, ws: trio_websocket.WebSocketConnection,
                 connection: "_Connection") -> None:
        super().__init__(services, sockets, connection, _SOCKET_WIRE)
        self._ws = ws
        self.token: TokenConfig | None = None
        self.inspector = False  # it signed in with an inspector's session: it only watches...
        self.expires = math.inf  # ...until the session expires (Unix seconds), unless renewed in a new auth frame

    def allow_frames(self, size: int) -> None:
        """Let the client send messages of up to `size` bytes (see _WebSocket)."""
        _set_max_message_size(self._ws, size)

    def closed(self) -> tuple[int, str | None] | None:
        """How the socket ended: the reason close() was given, else the client's close frame."""
        if self.close_reason:
            return self.close_reason
        return (int(self._ws.closed.code), self._ws.closed.reason) if self._ws.closed else None

    async def _send(self, frames: list[bytes]) -> None:
        await _write(self._ws, frames, self._progressed)

    async def run(self) -> None:
        """Serve the client until it leaves or close() is called; the nursery body is the writer."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_frames)
                await self._write_queued()
                nursery.cancel_scope.cancel()
        except* trio_websocket.ConnectionClosed:
            pass  # the client went away; nothing to tell it
        finally:
            self._sockets.ended(self)
            self._core.unsubscribe(self, self.buckets)
            with trio.CancelScope(shield=True):
                if self._writing:
                    pass  # a frame was cut in two: no clean close frame can follow
                elif self._connection.scope.cancel_called:  # ended from outside: trio-websocket's
                    with trio.move_on_after(_CLOSE_AT_ONCE):  # reader is gone, no answer will be read
                        await _close_at_once(self._ws, *(self.close_reason or self._connection.ended_by))
                else:
                    with trio.move_on_after(_CLOSE_TIMEOUT):
                        await self._ws.aclose(*(self.close_reason or (1000, "")))

    async def _receive_frames(self) -> None:
        server = self._services.config.server
        with trio.move_on_after(server.auth_timeout):
            self.token = await self._authenticate()
        if self.token is None:
            if self.close_reason is None:
                self._services.metrics.cutoffs["auth_timeout"] += 1
            self.close(CLOSE_POLICY, f"not authenticated within {server.auth_timeout:g} s")
            return
        self._sockets.authenticated(self)
        while True:
            await self._handle(await self._ws.get_message())

    async def _authenticate(self) -> TokenConfig | None:
        failures = 0
        for _ in range(MAX_FRAMES_BEFORE_AUTH):
            message = await self._ws.get_message()
            try:
                frame = parse_client_frame(message)
            except ProtocolError as error:
                self._status("error", str(error))
                continue
            if isinstance(frame, _Pong):
                continue
            if not isinstance(frame, _Auth):
                self._status("error", 'not authenticated: send {"action":"auth","key":...,"secret":...} first')
                continue
            try:
                grant = await self._services.credentials.check(self._connection.client, frame.key, frame.secret)
                token = self._services.current_token(grant.token if grant else None)
            except TooManyFailures as error:  # or HashingBusy
                self._status("unauthorized", str(error))
                if isinstance(error, HashingBusy):
                    self._services.metrics.cutoffs["busy"] += 1
                    self.close(error.close_code, "busy; try again later")
                else:
                    self._services.metrics.auth_failures["locked_out"] += 1
                    self._services.metrics.cutoffs["auth_failures"] += 1
                    self.close(error.close_code, "too many failed authentications from this address")
                return None
            if grant is not None and token is not None:
                self.inspector, self.expires = grant.inspector, grant.expires
                self.deliver(_AUTHENTICATED_FRAME)
                return token
            self._services.throttle.warning("auth", "failed authentication from %s (key %s)", self.peer,
                                          _shown(frame.key, 64))
            failures += 1
            self._services.metrics.auth_failures["socket"] += 1
            self._status("unauthorized", "invalid key or secret")
            if failures >= MAX_AUTH_ATTEMPTS:
                self._services.metrics.cutoffs["auth_failures"] += 1
                self.close(CLOSE_POLICY, f"{failures} failed authentication attempts")
                return None
        self._services.metrics.cutoffs["no_auth"] += 1
        self.close(CLOSE_POLICY, f"{MAX_FRAMES_BEFORE_AUTH} frames without authenticating")
        return None

    async def _handle(self, message: str | bytes) -> None:
        assert self.token is not None
        try:
            frame = parse_client_frame(message)
            if isinstance(frame, _Subscribe):
                self._subscribe(frame)
            elif isinstance(frame, _Auth):
                grant = await self._services.credentials.check(self._connection.client, frame.key, frame.secret)
                if grant is None or grant.token is not self.token:
                    raise ProtocolError("already authenticated with another key")
                if self.inspector:  # a renewed session (or the secret) keeps its watch going
                    self.expires = grant.expires
                self.deliver(_AUTHENTICATED_FRAME)
        except (ProtocolError, TooManyFailures) as error:
            self._status("error", str(error))

    def _subscribe(self, frame: _Subscribe) -> None:
        assert self.token is not None
        buckets = self._core.resolve(self.token, frame.buckets)
        self.observer = self.observer or frame.observe or self.inspector
        if frame.since is not None:
            if self._replay is not None:
                raise ProtocolError('a resume is already running: subscribe with "since" again once '
                                    'the "resumed" status has arrived')
            # Only these buckets: others' traffic is none of this token's business.
            if not self._core.known_point(frame.since, buckets):
                raise ProtocolError(f"unknown resume point {frame.since}: newer than any webhook of these buckets")
        new = [bucket for bucket in buckets if bucket not in self.buckets]  # the others are already served
        self.buckets.update(new)
        names = frame.buckets or [bucket.config.name for bucket in buckets]
        self._status("subscribed", "subscribed to buckets: " + ", ".join(names))
        logger.debug("socket %s subscribed to %s%s", self.peer, ", ".join(names),
                     f" since {frame.since}" if frame.since else "")
        if frame.since is None:
            self._core.subscribe(self, new)
        else:
            self._replay = _Replay(tuple(new), frame.since, frame.since)
            self._resume()


_EVENT_STREAM_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"),
                         ("X-Content-Type-Options", "nosniff"))


class _RawEvents:
    """A stream's answer written on the connection itself (its first request, read by the port):
    chunked for HTTP/1.1, to the connection's end for 1.0."""

    def __init__(self, stream: trio.abc.Stream, chunked: bool) -> None:
        self._stream, self._chunked = stream, chunked

    async def start(self, progressed: Callable[[], None]) -> None:
        head = "".join(f"{name}: {value}\r\n" for name, value in _EVENT_STREAM_HEADERS)
        end = "Transfer-Encoding: chunked" if self._chunked else "Connection: close"
        await _send(self._stream.send_all, f"HTTP/1.1 200 OK\r\n{head}{end}\r\n\r\n".encode(), progressed)

    async def write(self, frames: list[bytes], progressed: Callable[[], None]) -> None:
        size = sum(map(len, frames))
        if self._chunked:
            await self._stream.send_all(b"%x\r\n" % size)
        for frame in frames:  # each as it is: a frame is shared by every stream (no copy)
            await _send(self._stream.send_all, frame, progressed)
        if self._chunked:
            await self._stream.send_all(b"\r\n")

    async def left(self) -> str:
        """Read what the client sends after its request (usually nothing; dropped) until it leaves."""
        left = _LINGER_BYTES
        while left > 0 and (data := await self._stream.receive_some(_READ_SIZE)):
            left -= len(data)
        return "the client left" if left > 0 else "the client sent more than a request"

    async def end(self) -> None:
        if self._chunked:
            await self._stream.send_all(b"0\r\n\r\n")  # the answer's end: the client reconnects


class _AsgiEvents:
    """A stream's answer through Hypercorn: for a request that came after another on its
    connection (a client's pool, gosmee's version check; a reverse proxy's)."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]],
                 send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._receive, self._send = receive, send

    async def start(self, progressed: Callable[[], None]) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            (name.lower().encode(), value.encode()) for name, value in _EVENT_STREAM_HEADERS]})

    async def write(self, frames: list[bytes], progressed: Callable[[], None]) -> None:
        for frame in frames:
            await _send(self._body, frame, progressed)

    async def _body(self, data: bytes | memoryview) -> None:
        await self._send({"type": "http.response.body", "body": bytes(data), "more_body": True})

    async def left(self) -> str:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        return "the client left"

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class _EventStream(_Outgoing):
    """One client of a smee channel's stream (smee-client, gosmee's client): an answer of
    text/event-stream that lasts until either side ends it. The channel's name was its only
    credential. It is sent the bucket's webhooks as a socket subscribed to the bucket is, as
    events of its wire, after its Last-Event-ID first, if it sent one; and the wire's pings.

    Its nursery holds a reader, which only notices the client leaving, and, in its body, the
    writer, which writes the answer's head, then the outbox's frames. The answer is written on
    the connection (_RawEvents) or through Hypercorn (_AsgiEvents).
    """

    def __init__(self, services: _Services, sockets: _Sockets, answer: "_RawEvents | _AsgiEvents",
                 connection: "_Connection", bucket: _Bucket, channel: str, wire: _Wire) -> None:
        super().__init__(services, sockets, connection, wire)
        self._answer = answer
        self.bucket = bucket
        self.channel = channel  # its name: a reload that renames it ends the stream

    async def _send(self, frames: list[bytes]) -> None:
        await self._answer.write(frames, self._progressed)

    def stalled(self, timeout: float) -> None:
        super().stalled(timeout)
        self._connection.end(CLOSE_POLICY, "too slow")  # Hypercorn's writes are shielded: end the connection

    async def run(self, last_event_id: str) -> None:
        """Serve the client until it leaves or close() is called."""
        self.deliver(self.wire.opening)
        self._start(last_event_id)
        if self._services.stopping.is_set():  # too late for the shutdown's closing of every stream
            self.close(CLOSE_GOING_AWAY, "server shutting down")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._notice_leaving)
                self._writing = True
                await self._answer.start(self._progressed)
                self._writing = False
                await self._write_queued()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to tell it
        finally:
            self._sockets.ended(self)
            self._core.unsubscribe(self, self.buckets)
            if not self._writing and not self._connection.scope.cancel_called:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_AT_ONCE):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await self._answer.end()

    async def _notice_leaving(self) -> None:
        self.close(1000, await self._answer.left(), drain=False)

    def _start(self, last_event_id: str) -> None:
        """Subscribe to the bucket; from after `last_event_id` first, if it names a place in the log."""
        self.buckets.add(self.bucket)
        if not last_event_id:
            self._core.subscribe(self, [self.bucket])
            return
        place = _smee_place(last_event_id, self._core.backend.shared)
        if place is None or not self._core.known_point(place[0], [self.bucket]):
            self._status("history_gap", f"Last-Event-ID {_shown(last_event_id, 64)} is no place in this channel's log "
                                        "(not an id this relay gave, or newer than any): sending webhooks from now on")
            self._core.subscribe(self, [self.bucket])
            return
        self._replay = _Replay((self.bucket,), place[1], place[1])
        self._resume()



# ---- HTTP routes (Quart-Trio) ----------------------------------------------------------------


class _App(QuartTrio):
    """The Quart app: a handler's bug is answered 500 and logged in one rate-limited line (see
    _unexpected), not a traceback a stranger could repeat at will."""

    throttle = _Throttle()

    def log_exception(self, *args: Any) -> None:  # type: ignore[override]
        """Quart 0.22 passes the exception's info; 0.23 a context, then the info."""
        error = args[-1][1]
        if error is not None:
            _unexpected(self.throttle, "answering a request", error)


class _Routes:
    """The HTTP routes (see _make_app for their paths): each reads its request, calls the
    services, and answers."""

    def __init__(self, services: _Services, sockets: "_Sockets") -> None:
        self._services = services
        self._core = services.core
        self._sockets = sockets

    async def _grant(self, *, inspector: bool = False) -> _Grant:
        """Who the REST API request being served comes from (see _Services.authenticate)."""
        return await self._services.authenticate(_address_key(_request_client()), *_request_credentials(),
                                           inspector=inspector)

    async def _api_token(self, *, inspector: bool = False) -> TokenConfig:
        return (await self._grant(inspector=inspector)).token

    async def receive_webhook(self, _rest: str) -> Response:
        scope = typing.cast(dict[str, Any], request.scope)
        target = _text(scope["raw_path"])
        if not target.startswith("/"):  # an absolute-form target, http://host/v1/webhooks/... (RFC 9112, 3.2.2)
            target = urllib.parse.urlsplit(target).path
        # a held sender counts as pending: anyone may post to a holding input
        reply = await self._services.ingest.receive(target, request.method, scope["query_string"], scope["headers"],
                                              _request_body(), scope[_CLIENT], _request_host(),
                                              lambda: self._services.connections.idle(scope[_CONNECTION]))
        if reply.headers is None:
            return _plain(reply.status, typing.cast(str, reply.body))
        return _sender_answer(reply.body, reply.status, reply.headers)

    async def list_logs(self) -> Response:
        """Newest first, by pages (see _LogsQuery)."""
        token = await self._api_token(inspector=True)  # the inspector's reads
        query = _LogsQuery.parse(request.args.items(multi=True), _token_tag(token))
        buckets = self._core.resolve(token, (query.filters["bucket"],) if query.filters["bucket"] else ())
        return _json(200, query.page(self._core.newest(buckets)))

    async def one_log(self, log_id: str) -> Response:
        token = await self._api_token(inspector=request.method == "GET")  # no answers from it
        entry = self._core.entry(token, log_id)
        if request.method == "GET":
            return _json(200, entry.as_log())
        if entry.status == "rejected":  # whatever the body says: before it is read
            raise Conflict(f"log {entry.id} is a webhook its input refused: it takes no answer")
        try:
            data = json.loads(_request_body())
        except (ValueError, RecursionError):
            raise ProtocolError("the body must be JSON: "
                                '{"status_code": 200, "response_body": "<base64>", "response_headers": {...}}') from None
        answer, status = _parse_answer(data, _wall_time())
        await self._core.answer(entry, answer, status)
        return _json(200, entry.as_log())

    async def log_action(self, log_id: str) -> Response:
        """{"action": "resend"}: deliver a logged webhook again (to self._sockets, or by the relay to a
        public output) as a new entry naming the one it repeats; "output" (an id or name) sends
        it along another output of its bucket."""
        token = await self._api_token(inspector=True)  # the inspector's Resend
        entry = self._core.entry(token, log_id)
        try:
            data = json.loads(_request_body())
        except (ValueError, RecursionError):
            data = None
        if not (isinstance(data, dict) and data.get("action") == "resend" and isinstance(data.get("output", ""), str)):
            raise ProtocolError('the body must be {"action": "resend"}, with "output" (an id or name) to send it '
                                "along another output")
        resent = await self._core.resend(entry, data.get("output") or "")
        return _json(200, resent.as_log())

    async def poll_events(self) -> Response:
        """The pull queue (the SDK's webhooks.poll): a bucket's webhooks, or one output's, handed
        out in order, each once, to whichever poller asks first (see the README)."""
        token = await self._api_token()
        params = query_parameters(request.args.items(multi=True), EVENTS_PARAMETERS)
        scope, after = decode_cursor(params["cursor"], "events", 2) if "cursor" in params else (None, "")
        limit = _int_arg(params, "limit", _EVENTS_LIMIT, 1, _EVENTS_LIMIT)
        max_age = parse_go_duration(params.get("max_age", _EVENTS_MAX_AGE), "max_age")
        ref = params.get("bucket") or (scope[0] if scope else "")
        if not ref:
            raise ProtocolError("bucket is required: a pull queue is a bucket's (or one of its outputs')")
        [bucket] = self._core.resolve(token, (ref,))
        # "": every internal output's entries (or the bucket's, without outputs), as self._sockets get them
        output_ref = params.get("output") or (scope[1] if scope else "")
        output = self._core.output_named(bucket, output_ref) if output_ref else ""
        if scope is not None and scope != [bucket.config.id, output]:
            raise ProtocolError("cursor belongs to another query: another bucket or output")
        page, more, reached = await self._core.poll(bucket, output, after, limit, max_age)
        return _json(200, {"logs": [entry.as_log() for entry in page], "has_more": more,
                           "next_cursor": encode_cursor("events", [bucket.config.id, output], reached)})

    async def healthz(self) -> Response:
        """The process serves: for a supervisor's liveness check. Never a webhook."""
        return _plain(200, "ok")

    async def readyz(self) -> Response:
        """Ready for traffic: listening and not shutting down, and the webhook log writable when
        it is stored. For a balancer's readiness check. Never a webhook."""
        if self._services.stopping.is_set():
            return _plain(503, "shutting down")
        if self._core.failing:  # why is in the relay's log, not for strangers
            return _plain(503, "the webhook log cannot be written")
        return _plain(200, "ready")

    async def metrics(self) -> Response:
        if not self._services.config.metrics.enabled:  # said, not Werkzeug's "the requested URL was not found"
            raise NotFound("metrics are off: set [metrics] enabled = true, and a token beyond loopback, in the "
                           "relay's config (they need the Prometheus client too), then restart it")
        self._services.authenticate_metrics(_address_key(_request_client()), request.headers.get("Authorization", ""))
        text, content_type = _metrics_text(self._services, self._sockets)
        return Response(text, 200, _SANDBOXED, content_type=content_type)  # type: ignore[arg-type]

    def _inspector_here(self) -> None:
        """NotFound unless the inspector is served for this request: on, and this its host if it has one."""
        inspector = self._services.config.inspector
        if not inspector.enabled or (inspector.host and _request_host() != inspector.host):
            raise NotFound("no inspector here" + (" (see [inspector] host)" if inspector.enabled else ""))

    async def inspector(self) -> Response:
        self._inspector_here()
        return _inspector_file(_INSPECTOR_PAGE, "text/html; charset=utf-8")

    async def inspector_script(self) -> Response:
        self._inspector_here()
        return _inspector_file(_INSPECTOR_SCRIPT, "text/javascript; charset=utf-8")

    async def inspector_style(self) -> Response:
        self._inspector_here()
        return _inspector_file(_INSPECTOR_STYLE, "text/css; charset=utf-8")

    async def inspector_session(self) -> Response:
        """The inspector signs in: a key and secret (HTTP Basic) for a session of their token
        (see _Credentials), which stands in for the secret from then on; or its session, for a
        new one that lasts longer (until _SESSION_MOST after the sign-in)."""
        self._inspector_here()
        signed = await self._grant(inspector=True)
        session, expires = self._services.credentials.issue(signed.token, signed.signed_in if signed.inspector else None)
        response = _json(200, {"key": signed.token.key, "session": session, "expires_at": expires})
        response.headers["Cache-Control"] = "no-store"
        return response

    async def smee_version(self) -> Response:
        """What gosmee's client asks of its server before it connects: a version that is neither
        newer than its own, which would make it call itself too old, nor one to compare ("dev")."""
        return _json(200, {"version": "dev", "server": f"relay_lite {__version__}"})

    async def socket_without_upgrade(self) -> Response:
        return _plain(426, f"{SOCKET_PATH} is a WebSocket endpoint: connect with a WebSocket client")

    async def list_buckets(self) -> Response:
        token = await self._api_token(inspector=True)
        return _json_list([_bucket_json(bucket.config, self._services.loaded_at) for bucket in self._core.visible(token)])

    async def one_bucket(self, ref: str, part: str = "") -> Response:
        token = await self._api_token(inspector=True)
        try:
            [bucket] = self._core.resolve(token, (ref,))
        except NotFound:
            raise NotFound(f"no bucket {_shown(ref, 64)!r} for this token") from None
        document = _bucket_json(bucket.config, self._services.loaded_at)
        if part in ("inputs", "outputs"):
            return _json_list(document[part])
        if part:
            raise NotFound(f"relay_lite does not serve {_shown(request.path, 100)}")
        return _json(200, document)

    async def change_bucket(self, _rest: str = "") -> Response:
        return _error(405, "buckets, inputs and outputs come from the relay's config file: edit it, then reload "
                           "(SIGHUP)")

    async def relay_error(self, error: RelayError) -> Response:
        response = _error(error.status, str(error))
        response.headers.update(error.headers)
        return response

    async def http_error(self, error: HTTPException) -> Response:
        description = error.description
        if error.code == 413:
            description = _too_large(self._services.config.server)
        elif error.code == 404 and _is_api_path(request.path):  # the hosted API's clients read JSON errors
            description = f"relay_lite does not serve {_shown(request.path, 100)} (see its README)"
        return _error(error.code or 500, description or error.name)


def _make_app(services: _Services, sockets: "_Sockets") -> QuartTrio:
    """The Quart app: the relay's paths, each served by a method of _Routes."""
    routes = _Routes(services, sockets)
    app = _App("relay_lite")
    app.throttle = services.throttle
    app.config["MAX_CONTENT_LENGTH"] = services.config.server.max_body_size
    paths: list[tuple[str, Callable[..., Awaitable[Response]], list[str] | None]] = [
        (WEBHOOK_PREFIX + "<path:_rest>", routes.receive_webhook, list(WEBHOOK_METHODS)),
        (SMEE_PREFIX + "<path:_rest>", routes.receive_webhook, list(WEBHOOK_METHODS)),  # see _Ingest.receive
        *((path, routes.smee_version, ["GET"]) for path in SMEE_VERSION_PATHS),
        (LOGS_PATH, routes.list_logs, ["GET"]),
        (LOGS_PATH + "/<log_id>", routes.one_log, ["GET", "PUT"]),
        (LOGS_PATH + "/<log_id>/action", routes.log_action, ["POST"]),
        (EVENTS_PATH, routes.poll_events, ["GET"]),
        (HEALTH_PATH, routes.healthz, ["GET", "HEAD"]),
        (READY_PATH, routes.readyz, ["GET", "HEAD"]),
        (METRICS_PATH, routes.metrics, ["GET"]),
        ("/", routes.inspector, ["GET"]),
        (INSPECTOR_PATH + "app.js", routes.inspector_script, ["GET"]),
        (INSPECTOR_PATH + "app.css", routes.inspector_style, ["GET"]),
        (INSPECTOR_SESSION_PATH, routes.inspector_session, ["POST"]),
        (SOCKET_PATH, routes.socket_without_upgrade, None),
        (BUCKETS_PATH, routes.list_buckets, ["GET"]),
        (BUCKETS_PATH + "/<ref>", routes.one_bucket, ["GET"]),
        (BUCKETS_PATH + "/<ref>/<part>", routes.one_bucket, ["GET"]),
        (BUCKETS_PATH, routes.change_bucket, ["POST", "PUT", "PATCH", "DELETE"]),
        (BUCKETS_PATH + "/<path:_rest>", routes.change_bucket, ["POST", "PUT", "PATCH", "DELETE"]),
    ]
    for path, view, methods in paths:
        app.add_url_rule(path, view_func=view, methods=methods)
    app.register_error_handler(RelayError, routes.relay_error)
    app.register_error_handler(HTTPException, routes.http_error)
    return app


_REJECTIONS = ("signature", "replay", "too_large", "unknown_input", "unknown_channel", "bad_path", "storage",
               "no_room")

_CUTOFFS = ("too_slow", "send_timeout", "auth_timeout", "auth_failures", "busy", "no_auth")
_AUTH_FAILURES = ("socket", "api", "metrics", "smee", "locked_out")


def _metrics_text(services: "_Services", sockets: "_Sockets") -> tuple[bytes, str]:
    """The relay's metrics in the Prometheus text format, and its content type."""
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    metrics, buckets = services.metrics, services.core.buckets

    names = [bucket.config.name for bucket in buckets]

    def counter(name: str, text: str, label: str, keys: Iterable[str], counts: Counter[str]) -> Any:
        family = CounterMetricFamily(name, text, labels=[label])
        for key in keys:
            family.add_metric([key], counts[key])
        return family

    class Collector(prometheus_client.registry.Collector):
        def collect(self) -> Iterator[Any]:
            yield counter("relay_lite_webhooks_received", "Webhooks accepted", "bucket", names, metrics.received)
            yield counter("relay_lite_webhooks_rejected", "Webhooks refused", "reason", _REJECTIONS, metrics.rejected)
            yield counter("relay_lite_frames_sent", "Webhook frames queued to sockets", "bucket", names,
                          metrics.frames)
            yield counter("relay_lite_socket_cutoffs", "Sockets the relay closed", "reason", _CUTOFFS,
                          metrics.cutoffs)
            yield counter("relay_lite_auth_failures", "Failed authentications", "kind", _AUTH_FAILURES,
                          metrics.auth_failures)
            gauge = GaugeMetricFamily("relay_lite_sockets", "Open sockets", labels=["state"])
            authenticated = sum(session.token is not None for session in sockets.open)
            gauge.add_metric(["connecting"], len(sockets.open) - authenticated)
            gauge.add_metric(["authenticated"], authenticated)
            yield gauge
            streams = GaugeMetricFamily("relay_lite_smee_streams", "Open streams of smee channels",
                                        labels=["bucket", "client"])
            opened = Counter((stream.bucket.config.name, stream.wire.name) for stream in sockets.streams)
            for bucket in buckets:
                if bucket.config.smee_channel:
                    for wire in (_SMEE_WIRE, _GOSMEE_WIRE):
                        streams.add_metric([bucket.config.name, wire.name], opened[bucket.config.name, wire.name])
            yield streams
            entries = GaugeMetricFamily("relay_lite_history_entries", "Webhook log entries kept",
                                        labels=["bucket"])
            size = GaugeMetricFamily("relay_lite_history_bytes", "Webhook log bytes kept", labels=["bucket"])
            for bucket in buckets:
                entries.add_metric([bucket.config.name], len(bucket.history))
                size.add_metric([bucket.config.name], bucket.history_bytes)
            yield entries
            yield size
            deliveries = CounterMetricFamily("relay_lite_deliveries", "Deliveries to public outputs, ended",
                                             labels=["bucket", "output", "outcome"])
            for bucket in buckets:
                for output in bucket.config.outputs:
                    if not output.internal:
                        for outcome in ("sent", "failed"):
                            deliveries.add_metric([bucket.config.name, output.name, outcome],
                                                  metrics.deliveries[bucket.config.name, output.name, outcome])
            yield deliveries
            for name, text, histogram in (
                    ("relay_lite_delivery_duration_seconds", "A public output's delivery, retries included",
                     metrics.delivery_seconds),
                    ("relay_lite_ingest_duration_seconds", "A webhook's request, from its head to its acceptance",
                     metrics.ingest_seconds)):
                yield HistogramMetricFamily(name, text, buckets=histogram.buckets(), sum_value=histogram.sum)
            build = GaugeMetricFamily("relay_lite_build_info", "The relay_lite version", labels=["version"])
            build.add_metric([__version__], 1)
            yield build

    registry = prometheus_client.CollectorRegistry()
    registry.register(Collector())
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def _request_body() -> bytes:
    """The body of the request being served: read whole before the app was called (see
    _Port._receive_body), and handed over as it is (Quart's own body would be two copies more)."""
    return typing.cast(bytes, typing.cast(dict[str, Any], request.scope)[_BODY])


def _request_client() -> str:
    """The address the request being served came from (see trusted_proxies), as _Port.asgi found it."""
    return typing.cast(str, typing.cast(dict[str, Any], request.scope)[_CLIENT])


def _request_credentials() -> tuple[str, str]:
    """The key and secret of the request being served: HTTP Basic, or Bearer <secret> (the key
    "whr", as the new SDK sends it); empty when it has neither."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return API_KEY_USER, credentials.strip()
    if scheme.lower() == "basic":
        try:
            key, _, secret = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            return key, secret
        except ValueError:
            pass
    return "", ""


def _request_host() -> str:
    """The host name the request being served is for (see _host_name)."""
    return _host_name(request.headers.get("Host", ""))


class _Head(typing.NamedTuple):
    """What the relay reads of a request's head before the app sees it, in one pass over its headers."""

    refusal: tuple[int, str] | None  # why it will not be served at all (a status and a reason), or None
    length: int  # the body size it declares (h11 checked it is a number), 0 if none
    forwarded_for: list[str]  # its X-Forwarded-For values
    host: str  # its Host
    forwarded: bool  # it carries Forwarded (RFC 7239), which a proxy adds


def _request_head(scope: Mapping[str, Any], server: ServerConfig) -> _Head:
    """A request's head, as _Head says. Its refusal: the bounds on a request head, and RFC 9112's
    rule that a request with both Transfer-Encoding and Content-Length is an attempt at request
    smuggling when a proxy in front reads the other one (h11 lets Transfer-Encoding win)."""
    headers = scope["headers"]
    if len(headers) > server.max_headers:
        return _Head((431, f"a request may carry at most {server.max_headers} headers (max_headers)"), 0, [], "",
                     False)
    size, framings, length, forwarded_for = len(scope["raw_path"]) + len(scope["query_string"]), 0, 0, []
    host, forwarded = "", False
    for name, value in headers:  # h11 gives names in lower case
        size += len(name) + len(value)
        if name == b"transfer-encoding":
            framings |= 2
        elif name == b"content-length":
            framings |= 1
            length = int(value)
        elif name == b"x-forwarded-for":
            forwarded_for.append(value.decode("latin-1"))
        elif name == b"host":
            host = value.decode("latin-1")
        elif name == b"forwarded":
            forwarded = True
    refusal: tuple[int, str] | None = None
    if size > server.max_header_bytes:
        refusal = 431, f"a request head may take at most {server.max_header_bytes} bytes (max_header_bytes)"
    elif framings == 3:
        refusal = 400, "Transfer-Encoding and Content-Length together are refused (RFC 9112, section 6.1)"
    return _Head(refusal, length, forwarded_for, host, forwarded)


async def _refuse(receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]],
                  scope: Mapping[str, Any], status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
    """Answer a request whose body was not read (not all of it) with `status` (JSON on the REST
    API, as _error does), and close the connection. What Hypercorn hands on of the body meanwhile
    is dropped: the message saying the client left, which it hands on after the answer, would
    otherwise wait for room behind it (max_app_queue_size), and the answer's end with it."""
    if _is_api_path(scope["path"]):
        content_type, body = b"application/json", _encode({"error": message}).encode()
    else:
        content_type, body = b"text/plain; charset=utf-8", message.encode() + b"\n"

    async def drop_the_rest() -> None:
        while (await receive())["type"] == "http.request":
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_the_rest)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"connection", b"close"), *_OWN_ANSWER_HEADERS,
            *((name.encode(), value.encode()) for name, value in headers)]})
        await send({"type": "http.response.body", "body": body})
        nursery.cancel_scope.cancel()


async def _refuse_upgrade(send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Answer a WebSocket upgrade Hypercorn took (any path but SOCKET_PATH, which the relay
    routes itself) with a plain 404, as the ASGI WebSocket denial response."""
    await send({"type": "websocket.http.response.start", "status": 404, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), *_OWN_ANSWER_HEADERS]})
    await send({"type": "websocket.http.response.body",
                "body": f"no WebSocket here: the relay's socket is {SOCKET_PATH}\n".encode()})


def _too_large(server: ServerConfig) -> str:
    return f"request bodies are limited to {server.max_body_size} bytes (max_body_size)"


def _sender_answer(body: bytes | str, status: int, headers: list[tuple[str, str]]) -> Response:
    """An answer to a webhook's sender, with the headers it was given: no Content-Type unless
    they say one (Quart's default, text/html, would say what nobody meant); sandboxed, as every
    answer of the relay's is (see _SANDBOXED), whatever policy those headers bring of their own
    (a browser applies every one)."""
    response = Response(body, status, [*headers, *_SANDBOXED])  # type: ignore[arg-type]  # pairs are fine
    if not any(name.lower() == "content-type" for name, _ in headers):
        del response.headers["Content-Type"]
    return response


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status, _SANDBOXED, content_type="text/plain; charset=utf-8")  # type: ignore[arg-type]


def _json(status: int, document: Mapping[str, Any]) -> Response:
    return Response(_encode(document), status, _SANDBOXED, content_type="application/json")  # type: ignore[arg-type]


def _error(status: int, message: str) -> Response:
    """An error's answer: JSON on the REST API (`{"error": ...}`, as its clients read it), text
    elsewhere (a webhook's sender, a health check)."""
    return _json(status, {"error": message}) if _is_api_path(request.path) else _plain(status, message)


def _is_api_path(path: str) -> bool:
    return (path.startswith("/v1/") and not path.startswith((WEBHOOK_PREFIX, SOCKET_PATH))
            or path == INSPECTOR_SESSION_PATH)


def _json_list(items: list[Any]) -> Response:
    return Response(_encode(items), 200, _SANDBOXED, content_type="application/json")  # type: ignore[arg-type]


def _bucket_json(bucket: BucketConfig, at: float) -> dict[str, Any]:
    """A bucket as the hosted API shows one, with its inputs and outputs (read-only here: they
    come from the config; `created_at` and `updated_at` say when it was loaded)."""
    stamp = int(at)
    return {
        "id": bucket.id, "name": bucket.name, "description": "", "created_at": stamp, "updated_at": stamp,
        "stream": True, "ephemeral": False,
        "inputs": [{"id": input_.id, "name": input_.name, "bucket_id": bucket.id, "description": "",
                    "status_code": input_.status_code,
                    "headers": {name: [value] for name, value in input_.headers.items()},
                    "body": list(input_.body.encode()), "response_from_output": input_.response_from_output,
                    "created_at": stamp, "updated_at": stamp}
                   for input_ in bucket.inputs],
        "outputs": [{"id": _output_id(bucket.id, output.name), "name": output.name, "bucket_id": bucket.id,
                     "destination": output.destination, "internal": output.internal, "lock_path": output.lock_path,
                     "disabled": output.disabled, "headers": {name: [value] for name, value in output.headers.items()},
                     "description": "", "created_at": stamp, "updated_at": stamp}
                    for output in bucket.outputs],
    }


def _token_tag(token: TokenConfig) -> str:
    """What a cursor says of the token it was given to: not its key."""
    return hashlib.sha256(_utf8(token.key)).hexdigest()[:16]


_INSPECTOR_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _inspector_file(text: str, content_type: str) -> Response:
    return Response(text, 200, headers=_INSPECTOR_HEADERS, content_type=content_type)


# ---- deliveries ------------------------------------------------------------------------------
#
# One engine turns a logged webhook into an HTTP request to a destination, tries again what is
# worth another try, and gives back the outcome. The relay delivers its public outputs with it
# (_Forwarder); the agent, `relay_lite.py forward`, delivers internal ones to an app behind NAT.
# Building the request and judging an answer are pure functions; only _deliver does I/O.


@dataclasses.dataclass(frozen=True)
class _Request:
    """A delivery's HTTP request."""

    method: str
    url: str
    headers: list[tuple[str, str]]  # every value, in order
    body: bytes

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as sent: a value that is not ASCII goes as UTF-8, as most senders sent it
        (one that was not UTF-8 was logged as Latin-1, and goes as the UTF-8 of that)."""
        return [(name.encode("ascii"), value.encode("utf-8")) for name, value in self.headers]


@dataclasses.dataclass(frozen=True)
class _Delivery:
    """How to deliver: an output's timeouts and retries."""

    timeout: float = DEFAULT_DELIVERY_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    @classmethod
    def of(cls, output: OutputConfig) -> "_Delivery":
        return cls(output.timeout, output.connect_timeout, output.retries)


def _outbound(webhook: Webhook, destination: str, forwarded_for: str = "") -> _Request:
    """The request that delivers `webhook` to `destination` (a URL, the extra path appended as
    its route says): the sender's method; the raw query after the destination's own; every
    header with all its values, in order, but those that describe the sender's connection (the
    destination's Host and framing are its own); the body byte-exact, so signatures verify.
    `forwarded_for`, the sender's address, is added to X-Forwarded-For."""
    url = destination
    if webhook.query:
        url += ("&" if urllib.parse.urlsplit(destination).query else "?") + webhook.query
    connection_headers = {token.strip().lower() for values in (webhook.headers.get("Connection") or [])
                          for token in values.split(",")}
    headers = [(name, value) for name, values in webhook.headers.items()
               if not _is_connection_header(name, connection_headers) for value in values]
    if forwarded_for:
        prior = ", ".join(webhook.headers.get("X-Forwarded-For", []))
        if prior.rpartition(",")[2].strip() != forwarded_for:  # else a trusted proxy added the sender already
            prior = f"{prior}, {forwarded_for}" if prior else forwarded_for
        headers = [(name, value) for name, value in headers if name != "X-Forwarded-For"]
        headers.append(("X-Forwarded-For", prior))
    return _Request(webhook.method, _quoted_target(url), headers, webhook.body_bytes)


_URL_SAFE = "/?:@!$&'()*+,;=%"  # with the unreserved characters, which quote() never encodes


def _quoted_target(url: str) -> str:
    """`url` with what may not stand in a URL's path and query percent-encoded (a sender's raw
    `"`, `<`, `#`, space or control character), as httpx would encode it, and the rest, escapes
    included, left as the sender sent it; so the destination's target is the sender's wherever
    a URL can carry it."""
    scheme, separator, rest = url.partition("://")
    ends = [index for index in (rest.find("/"), rest.find("?")) if index >= 0]
    start = min(ends, default=len(rest))
    return scheme + separator + rest[:start] + urllib.parse.quote(rest[start:], safe=_URL_SAFE)


def _public_outputs(bucket: BucketConfig) -> list[OutputConfig]:
    """The outputs of `bucket` the relay delivers to itself: public and enabled."""
    return [output for output in bucket.outputs if not output.internal and not output.disabled]


def _worth_retrying(status_code: int) -> bool:
    """An answer another try may change: a timeout, too early, too many, a server's trouble."""
    return status_code in (408, 425, 429) or (status_code >= 500 and status_code != 501)


def _retry_delay(retry: int, retry_after: str | None, jitter: float) -> float:
    """Seconds before try `retry` (1 for the first retry): what the destination's Retry-After
    says (seconds, or an HTTP date), else 1 s doubling to _BACKOFF_MOST; `jitter` (0 to 1)
    spreads retries that would otherwise come at once."""
    if retry_after:
        try:
            delay = float(retry_after)
        except ValueError:
            try:
                delay = email.utils.parsedate_to_datetime(retry_after).timestamp() - _wall_time()
            except (TypeError, ValueError):
                delay = -1.0
        if delay >= 0:
            return min(delay, _RETRY_AFTER_MOST)
    return min(_BACKOFF_FIRST * 2.0 ** (retry - 1), _BACKOFF_MOST) * (0.5 + jitter / 2)


_UNSENDABLE = (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError)  # no retry will send it


async def _deliver(client: "httpx.AsyncClient", request: _Request, delivery: _Delivery,
                   on_retry: Callable[[_Answer, float], None] | None = None) -> _Answer:
    """Deliver `request` with `client`, trying again what is worth it; the last answer, with
    status_code 0 and the error as its body when none came. Its `retries` says how many more
    tries it took. `on_retry` hears of each answer tried again, and the seconds until then."""
    retry = 0
    timeouts = httpx.Timeout(None, connect=delivery.connect_timeout).as_dict()
    while True:
        retry_after = None
        try:
            deadline = trio.current_time() + delivery.timeout
            with trio.fail_at(deadline):
                response = await client.send(httpx.Request(request.method, request.url, headers=request.raw_headers,
                                                           content=request.body, extensions={"timeout": timeouts}),
                                             stream=True)
            body = bytearray()
            try:  # the status has come, and decides: an answer slow to end is kept as far as it came
                with trio.move_on_at(deadline):
                    async for chunk in response.aiter_raw():
                        body += chunk[:_DELIVERY_BODY_KEPT - len(body)]  # the rest is read, and dropped
            except httpx.HTTPError:
                pass  # the connection broke while the answer's body came: what came is the answer
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
            headers: dict[str, list[str]] = {}
            for name, value in response.headers.multi_items():
                headers.setdefault(_canonical_header(name), []).append(value)
            answer = _Answer(response.status_code, headers, bytes(body), _wall_time(), retry)
            if not _worth_retrying(response.status_code):
                return answer
            retry_after = response.headers.get("Retry-After")
        except (httpx.HTTPError, httpx.InvalidURL, trio.TooSlowError, OSError) as error:
            answer = _Answer(0, {}, _delivery_error(error).encode(), _wall_time(), retry)
            if isinstance(error, _UNSENDABLE) or _refused_certificate(error):
                return answer
        if retry >= delivery.retries:
            return answer
        retry += 1
        delay = _retry_delay(retry, retry_after, random.random())
        if on_retry is not None:
            on_retry(answer, delay)
        await trio.sleep(delay)


def _delivery_error(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return "no answer in time"
    cause = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {_shown(str(error) or str(cause or ''), 200)}"


def _refused_certificate(error: BaseException) -> bool:
    """A TLS certificate the destination's name did not verify against: no retry will fix it."""
    while error is not None:
        if isinstance(error, ssl.SSLCertVerificationError):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


def _http_client(*, verify: bool | str = True) -> "httpx.AsyncClient":
    """An HTTP client for deliveries: proxies (HTTP(S)_PROXY, NO_PROXY) and CA bundles
    (SSL_CERT_FILE) from the environment, no redirects followed, no cookies kept."""
    context = (_trusted_cas() if verify is True else verify if isinstance(verify, bool)
               else ssl.create_default_context(cafile=verify))
    return httpx.AsyncClient(verify=context, trust_env=True, follow_redirects=False,
                             timeout=httpx.Timeout(None), cookies=_NoCookies())


def _trusted_cas() -> ssl.SSLContext:
    """The TLS context httpx would make for verify=True (SSL_CERT_FILE or SSL_CERT_DIR, else
    certifi's CAs), made once for each of those: loading the CAs takes 36 ms, which every
    relay's start and every agent's paid."""
    return _trusted_cas_from(os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))


@functools.cache
def _trusted_cas_from(cafile: str, capath: str) -> ssl.SSLContext:
    return httpx.create_ssl_context(verify=True)  # reads the same variables, set as they are now


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: destinations' cookies are not the relay's to send back."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class _Forwarder:
    """The relay's deliveries to one public output: every log entry of its bucket for that output,
    in order (or `concurrency` at a time), each once its webhook is stored. The pending work is the
    log itself: entries still "received" are due, so a slow or dead destination costs nothing but
    the history it keeps, and with storage a restart, or a kill -9, delivers what was pending."""

    def __init__(self, services: _Services, bucket: _Bucket, output: OutputConfig) -> None:
        self._services = services
        self._bucket = bucket
        self._output = output
        self._delivery = _Delivery.of(output)
        self.scope = trio.CancelScope()  # cancelled when a reload removes or changes its output

    @property
    def output(self) -> OutputConfig:
        return self._output

    def _due(self, entry: _Entry) -> bool:
        return entry.output_name == self._output.name and not entry.internal

    async def run(self, client: httpx.AsyncClient) -> None:
        """Deliver while this relay leads the output's deliveries (always, but in a cluster)."""
        with self.scope:
            while True:
                async with self._services.core.leading(f"{self._bucket.config.id}:{self._output.name}") as lead:
                    with lead:
                        await self._run(client)

    async def _run(self, client: httpx.AsyncClient) -> None:
        cursor, gap_told = "", ""
        in_flight = trio.Semaphore(self._output.concurrency)
        async with trio.open_nursery() as nursery:
            while True:
                logged = self._bucket.logged()  # before looking: a webhook logged meanwhile sets it
                if self._bucket.dropped > cursor and cursor and self._bucket.dropped != gap_told:
                    gap_told = self._bucket.dropped
                    logger.warning("output %s of bucket %s: webhooks up to %s left the history before they "
                                   "could be delivered (see history_size)", self._output.name,
                                   self._bucket.config.name, gap_told)
                entries = self._services.core.after([self._bucket], cursor, _FORWARD_BATCH, keep=self._due)
                if not entries:
                    await logged.wait()
                    continue
                for entry in entries:
                    cursor = entry.id
                    if entry.status == "received":  # else delivered before a restart
                        await in_flight.acquire()
                        nursery.start_soon(self._deliver, client, entry, in_flight)

    async def _deliver(self, client: httpx.AsyncClient, entry: _Entry, in_flight: trio.Semaphore) -> None:
        started = trio.current_time()
        try:
            request = _outbound(entry.webhook, entry.destination, forwarded_for=entry.webhook.sender)
            answer = await _deliver(client, request, self._delivery)
            self._services.metrics.delivery_seconds.observe(trio.current_time() - started)
        except Exception as error:  # a bug, but not one that may stop the relay or this output
            _unexpected(self._services.throttle, "delivering a webhook to a public output", error)
            answer = _Answer(0, {}, _delivery_error(error).encode(), _wall_time())
        finally:
            in_flight.release()
        self._services.core.delivered(entry, answer)


# ==== 8. Transport: the one port, and the Relay ===============================================
#
# Sockets and TLS, and the libraries that serve them (through the glue above). Relay is where
# the parts are wired: it builds the services, the port and the forwarders, serves them in one
# nursery, stops them, and reloads.

# ---- one port for all ------------------------------------------------------------------------
#
# Every connection's request head is read first. A WebSocket upgrade for /v1/socket goes to
# trio-websocket; a smee channel's stream is served here (see _EventStream); anything else goes
# to Hypercorn's per-connection TCPServer, which serves the Quart app. Both libraries get the
# stream with the head replayed. Hypercorn's trio TCPServer, Lifespan and
# WorkerContext are not public API: pyproject pins the Hypercorn versions this was tested with.


def _is_socket_upgrade(head: bytes) -> bool:
    """True for `GET /v1/socket[?...] HTTP/1.1` with an `Upgrade: websocket` header."""
    request_line = head.partition(b"\r\n")[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    if parts[1].partition(b"?")[0].rstrip(b"/") != SOCKET_PATH.encode():
        return False
    return any("websocket" in value.lower() for value in _head_values(head, b"upgrade"))


def _event_stream_request(head: bytes) -> tuple[_Wire, str] | None:
    """For a request head asking for a smee channel's stream, its wire and the channel's name (see _event_stream_of)."""
    parts = head.partition(b"\r\n")[0].split(b" ")
    if len(parts) != 3:
        return None
    return _event_stream_of(parts[0].decode("latin-1"), parts[1].decode("latin-1"), _head_values(head, b"accept"))


def _event_stream_of(method: str, target: str, accepts: Iterable[str]) -> tuple[_Wire, str] | None:
    """For a request for a smee channel's stream, its wire and the channel's name: `GET
    /smee/<name>` that accepts text/event-stream (smee-client), or `GET /smee/events/<name>`
    (gosmee's client); else None."""
    if method != "GET" or not target.startswith(SMEE_PREFIX):
        return None
    path = target.partition("?")[0]
    wire: _Wire
    if path.startswith(SMEE_EVENTS_PREFIX):
        wire, name = _GOSMEE_WIRE, path[len(SMEE_EVENTS_PREFIX):]
    elif any("text/event-stream" in value.lower() for value in accepts):
        wire, name = _SMEE_WIRE, path[len(SMEE_PREFIX):]
    else:
        return None  # a webhook sent with GET
    return (wire, name) if name and "/" not in name else None


async def _read_request_head(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """Read enough of a request to route it: its whole head (up to `limit` bytes) only if it may
    be a socket upgrade, or a smee channel's stream."""
    head = b""
    while data := await stream.receive_some(limit):
        head += data
        if b"\r\n\r\n" in head or len(head) >= limit or not _may_be_read_here(head):
            break
    return head


_READ_HERE = (b"GET " + SOCKET_PATH.encode(), b"GET " + SMEE_PREFIX.encode())  # what the port serves itself


def _may_be_read_here(head: bytes) -> bool:
    return any(head.startswith(prefix) or prefix.startswith(head) for prefix in _READ_HERE)


class _ConnectionStream(trio.abc.Stream):
    """A connection's socket stream, as Hypercorn and trio-websocket use it.

    Its first bytes, read to route the connection, are received again. Once they have been,
    a socket's reads go straight to the socket stream's own method (an instance attribute
    shadows this class's), as writes always do: no extra coroutine frame per call, on a
    connection that may stay open for days. HTTP's take _READ_SIZE at most while the bodies in
    flight take an eighth of their room (see _Inflows): Hypercorn reads a request's body ahead of
    the app, a read a message, and holds up to three of them for a body that waits for room, or
    that was refused; at 64 KiB a read that was 200 KiB a connection, outside every bound, under
    a partial-body attack. Else 64 KiB: 16 KiB reads made 1 MiB webhooks 29 % slower.

    Closing it is a half-close, done at once even in a task being cancelled: the peer sees the
    end of what the relay sent, and the connection lingers (see _Connection.closing) so that a
    request the relay answered before reading it all does not reset the answer away. Hypercorn
    0.18 closes a connection from inside the app's send call after an early answer (a 404
    before the body); quart-trio cancels that task at that moment, trio's send_eof checkpoints
    before it shuts the socket down, so the close was cancelled and the connection stayed open
    for good, in CLOSE-WAIT once its peer left.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, connection: "_Connection",
                 raw: trio.SocketStream, inflows: "_Inflows | None" = None) -> None:
        self._stream = stream  # the socket stream, or the TLS stream over it
        self._head = head
        self._connection = connection
        self._inflows = inflows  # HTTP's: the bodies in flight
        self._then = self._receive_at_most if inflows is not None else stream.receive_some  # once the head is in
        self.socket = raw.socket  # Hypercorn reads the peer's address from it
        self.send_all = stream.send_all  # type: ignore[method-assign, assignment]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = len(self._head) if max_bytes is None else max_bytes
        data, self._head = self._head[:size], self._head[size:]
        if not self._head:
            self.receive_some = self._then  # type: ignore[method-assign, assignment]
        return data

    async def _receive_at_most(self, max_bytes: int | None = None) -> bytes | bytearray:
        assert self._inflows is not None
        data = await self._stream.receive_some(_READ_SIZE if self._inflows.crowded else _RECEIVE_SIZE)
        if self._connection.is_closing:  # lingering (see _Connection.closing): a little more, then an end
            self._connection.linger_left -= len(data)
            if self._connection.linger_left < 0:
                return b""
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:  # replaced in __init__
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._connection.closing()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._connection.closing()
        await trio.lowlevel.checkpoint()


class _TLSConnectionStream(_ConnectionStream):
    """A connection's TLS stream, its handshake done, as Hypercorn tells one: it then gives the
    app "https" as the scheme."""

    def __init__(self, stream: "trio.SSLStream[_ConnectionStream]", head: bytes, connection: "_Connection",
                 raw: trio.SocketStream, inflows: "_Inflows | None" = None) -> None:
        super().__init__(stream, head, connection, raw, inflows)
        self.transport_stream = raw

    async def do_handshake(self) -> None:
        await trio.lowlevel.checkpoint()  # done already

    def selected_alpn_protocol(self) -> str:
        return "http/1.1"


def _trusted_networks(server: ServerConfig) -> tuple["_IPNetwork", ...]:
    return tuple(network for network in map(_network, server.trusted_proxies) if network)


def _from_beyond(hosts: list[str], forwarded: bool) -> bool:
    """Whether a request shows it came from beyond loopback to a relay that takes weak secrets
    because it listens there only: a Host that is not loopback (a tunnel's, ngrok's or
    cloudflared's; a page's that rebinds DNS) or a proxy's forwarding headers. A raw TCP
    forward can hide both: strong secrets are the way to serve anything but this machine."""
    return forwarded or not hosts or not all(_is_loopback_host(host) for host in hosts)


def _raw_answer(status: int, phrase: str, text: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 answer, plain text, closing the connection: for a request no library serves."""
    body = (text + "\n").encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body




def _answer_time(config: Config) -> float:
    """What the relay may take to answer once a request's body is in: request_timeout, and the
    longest an input may hold its sender for a client's answer."""
    return config.server.request_timeout + max(
        (input_.response_timeout for bucket in config.buckets for input_ in bucket.inputs
         if input_.response_from_output), default=0.0)


_FROM_BEYOND = ("this relay takes weak secrets because it listens on loopback only, and so serves only requests "
                "to a loopback host (localhost, 127.0.0.1, [::1]) that no proxy forwarded: give its tokens strong "
                "secrets to serve others")

_TLS_HANDSHAKE_RECORD = 0x16  # a TLS connection's first byte: a handshake record, its ClientHello
_PLAIN_HTTP_ON_TLS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                      b"Content-Length: 45\r\n\r\nthis port speaks TLS: use https:// or wss://\n")


class _Port:
    """The relay's one port: each connection's deadlines, its TLS handshake, then, by its first
    request's head, a socket session or Hypercorn serving the HTTP app; and every request's
    body read here, whole and bounded, before the app sees it."""

    def __init__(self, services: _Services, sockets: _Sockets, tls: ssl.SSLContext | None) -> None:
        self._services = services
        self._sockets = sockets
        config = services.config
        self._inflows = services.inflows
        self._app = _make_app(services, sockets)
        self._told_proxy = False  # see _forwarded
        self.requests = 0  # HTTP requests in flight
        self.quiet = trio.lowlevel.ParkingLot()  # unparked when a request or a socket ends
        self.reload(config, tls)

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def reload(self, config: Config, tls: ssl.SSLContext | None) -> None:
        """Take the config in force, and its TLS context."""
        self._tls = tls
        self._trusted = _trusted_networks(config.server)
        self._loopback_only = bool(_weak_secrets(config))  # see _from_beyond
        self._answer_time = _answer_time(config)

    async def asgi(self, connection: _Connection | None, scope: Any, receive: Any, send: Any) -> None:
        """The Quart app, for one request of `connection`: counted, so a shutdown can wait for it,
        and timed: its head and body within request_timeout (408), its answer within its own time
        after that, and the next request's head within idle_timeout. Its body is read here, whole,
        before the app sees it (see _receive_body)."""
        if scope["type"] == "lifespan":
            return await self._app(scope, receive, send)
        assert connection is not None
        if scope["type"] != "http":  # a WebSocket upgrade of a path other than /v1/socket: Hypercorn's
            await _refuse_upgrade(send)  # (the app has no WebSocket routes, and failed on it with a traceback)
            return
        if scope["http_version"] not in ("1.0", "1.1"):
            # HTTP/2 (after an h2c upgrade, which Hypercorn grants by itself) multiplexes requests
            # that the deadlines here cannot follow, and Hypercorn takes its bodies in without
            # pushing back: 8 connections held 2.9 GB. Senders and clients speak HTTP/1.1.
            connection.scope.cancel()
            return
        server = self._services.config.server
        self.requests += 1
        connection.requests += 1
        scope[_CONNECTION] = connection
        deadline = connection.head_start + server.request_timeout  # for its head and body
        connection.end_by(deadline + self._answer_time + _GRACE)
        head = _request_head(scope, server)
        if head.forwarded_for and not self._trusted and not self._told_proxy:
            self._forwarded(connection)
        peer = (scope.get("client") or ("",))[0]
        scope[_CLIENT] = client_address(peer, head.forwarded_for, self._trusted) if self._trusted else peer
        inflow = _Inflow(_address_key(scope[_CLIENT]) if self._trusted else connection.address)
        try:
            if head.refusal is not None:
                await _refuse(receive, send, scope, *head.refusal)
                return
            if self._loopback_only and _from_beyond([head.host], bool(head.forwarded_for) or head.forwarded):
                await _refuse(receive, send, scope, 421, _FROM_BEYOND)
                return
            accepts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"accept"]
            if (events := _event_stream_of(scope["method"], _text(scope["raw_path"]), accepts)) is not None:
                bucket, (status, _, why, headers) = self._channel_for(connection, _host_name(head.host), events[1])
                if bucket is None:
                    await _refuse(receive, send, scope, status, why, headers)
                else:  # not its connection's first request, so Hypercorn's to answer
                    since = next((value.decode("latin-1") for name, value in reversed(scope["headers"])
                                  if name == b"last-event-id"), "")
                    await self._stream_events(_AsgiEvents(receive, send), connection, bucket, events[1], events[0], since)
                return
            body = await self._receive_body(connection, scope, receive, send, head.length, deadline, inflow)
            if body is None:
                return
            scope[_BODY] = body  # handed to the routes as it is (see _request_body); Quart's own stays empty
            first: Any = {"type": "http.request", "body": b"", "more_body": False}

            async def receive_read() -> Any:  # the body's end, at once; then whatever comes (the client leaving)
                nonlocal first
                if first is None:
                    return await receive()
                message, first = first, None
                return message

            await self._app(scope, receive_read, send)
        except* _ClientLeft:
            pass  # before its answer: nothing to tell it
        except* Exception as failure:  # a bug: Hypercorn answers 500 if nothing was sent
            _unexpected(self._services.throttle, "answering a request", failure)
        finally:
            self._inflows.release(inflow)
            self.requests -= 1
            self.quiet.unpark_all()
            connection.answered()
            if not connection.requests:  # else Hypercorn started the next one: its own times hold
                self._services.connections.idle(connection)
                connection.head_start = trio.current_time()
                connection.end_by(connection.head_start + server.idle_timeout + _GRACE)

    async def _receive_body(self, connection: _Connection, scope: Any, receive: Any, send: Any, declared: int,
                            deadline: float, inflow: _Inflow) -> bytes | None:
        """The request's whole body (it declared `declared` bytes); or None once the request is
        answered with why not (413 past max_body_size, 408 past its deadline, 503 when the bodies
        in flight leave it no room: see _Inflows), or its client left."""
        server = self._services.config.server
        refusal: tuple[int, str, tuple[tuple[str, str], ...]] | None = None
        if declared > server.max_body_size:  # refused before any of it is read
            refusal = 413, _too_large(server), ()
        else:
            chunks: list[bytes] = []
            size = 0
            with trio.move_on_at(deadline) as timer, inflow.scope:
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None  # the client left before all of it came: nobody to answer
                    if chunk := message.get("body", b""):
                        size += len(chunk)
                        if size > server.max_body_size:
                            refusal = 413, _too_large(server), ()
                            break
                        if not await self._inflows.take(inflow, len(chunk)):
                            break
                        chunks.append(chunk)
                    if not message.get("more_body"):
                        self._services.connections.busy(connection)  # all of it is in: being answered, not pending
                        self._inflows.release(inflow)  # no longer being received: the request's, or the log's
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if timer.cancelled_caught:
                refusal = 408, f"the request's head and body took over {server.request_timeout:g} s (request_timeout)", ()
            elif refusal is None:  # no room for it, or its room was given to an address holding less
                self._services.metrics.rejected["no_room"] += scope["path"].startswith((WEBHOOK_PREFIX, SMEE_PREFIX))
                refusal = 503, ("the relay is receiving too many request bodies at once (max_body_bytes_in_flight): "
                                "try again shortly"), (("retry-after", str(_BODY_RETRY_AFTER)),)
        if refusal[0] == 413:
            self._services.metrics.rejected["too_large"] += scope["path"].startswith((WEBHOOK_PREFIX, SMEE_PREFIX))
        self._inflows.release(inflow)  # before the answer, which may be slow to go: what it read is dropped
        await _refuse(receive, send, scope, *refusal)
        return None

    def _forwarded(self, connection: _Connection) -> None:
        """Say once that requests carry X-Forwarded-For while trusted_proxies names no proxy: a
        reverse proxy's clients then all count as its one address, and one stranger's wrong
        secrets lock every one of them out."""
        self._told_proxy = True
        logger.warning("requests from %s carry X-Forwarded-For, but [server] trusted_proxies names no proxy: every "
                       "client behind it counts as %s (max_pending_per_ip, and failed authentications: one "
                       "stranger's wrong secrets lock out all of them); if it is your reverse proxy, add it to "
                       "trusted_proxies", connection.address, connection.address)

    async def handle(
        self, stream: trio.SocketStream, *, config: _HypercornConfig, context: _WorkerContext
    ) -> None:
        connection = self._services.connections.open(stream)
        if connection is None:
            await stream.aclose()
            return
        try:
            if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: a peer that vanished (no FIN, no RST) while
                # data was on its way to it is given up after send_timeout, not after 15 minutes of retries
                # (a little after send_timeout, so that the relay's own cut-off, which says why, comes first)
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                  min(int((self._services.config.server.send_timeout + 5) * 1000), 2**31 - 1))  # a C int of ms
            with connection.scope:  # every phase has a deadline; see _Connection.end_by
                await self._route(stream, connection, config, context)
            if not connection.scope.cancelled_caught:
                _shut_down(stream)
                with trio.move_on_at(min(connection.scope.deadline, trio.current_time() + _LINGER)):
                    while connection.linger_left > 0 and (data := await stream.receive_some(_READ_SIZE)):
                        connection.linger_left -= len(data)  # what the peer still sends: dropped, while
                        # it reads the relay's last words
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # a peer that went away, also from inside a nursery of the libraries serving it
        except* Exception as failure:
            _unexpected(self._services.throttle, "serving a connection", failure)
        finally:
            self._services.connections.closed(connection)
            await stream.aclose()  # closes the socket before its checkpoint: a cancellation cannot skip it

    async def _route(self, stream: trio.SocketStream, connection: _Connection, config: _HypercornConfig,
                     context: _WorkerContext) -> None:
        """Serve a connection: its TLS handshake, if the relay has TLS; then, by its first
        request's head, a socket (trio-websocket), a smee channel's stream, or HTTP (Hypercorn)."""
        messages: trio.abc.Stream = stream
        if self._tls is not None:
            tls = await self._tls_handshake(stream, connection)
            if tls is None:
                return
            messages = tls
        head = await _read_request_head(messages, self._services.config.server.max_header_bytes)
        if not head or head.startswith(_HTTP2_PREFACE):
            return  # HTTP/1.1 only: see asgi
        events = _event_stream_request(head)
        connection.http = events is None and not _is_socket_upgrade(head)
        if not connection.http and self._loopback_only and _from_beyond(_head_values(head, b"host"), bool(
                _head_values(head, b"x-forwarded-for") or _head_values(head, b"forwarded"))):
            await messages.send_all(_raw_answer(421, "Misdirected Request", _FROM_BEYOND))  # HTTP's: in asgi
            return
        if not connection.http and not self._told_proxy and not self._trusted and _head_values(head, b"x-forwarded-for"):
            self._forwarded(connection)
        if not connection.http and self._trusted:
            peer = (stream.socket.getpeername() or ("",))[0]
            connection.client = _address_key(client_address(peer, _head_values(head, b"x-forwarded-for"),
                                                            self._trusted))
        if events is not None:
            await self._serve_events(messages, stream, connection, head, *events)
            return
        inflows = self._inflows if connection.http else None
        replay = (_TLSConnectionStream(messages, head, connection, stream, inflows)
                  if isinstance(messages, trio.SSLStream) else _ConnectionStream(messages, head, connection, stream, inflows))
        del head  # the replay holds it until it is received, no longer
        if connection.http:
            await _serve_http(functools.partial(self.asgi, connection), config, context, replay)
        else:
            await self._serve_socket(replay, connection)

    async def _tls_handshake(self, stream: trio.SocketStream, connection: _Connection) -> "trio.SSLStream[_ConnectionStream] | None":
        """`stream` once its TLS handshake is done; None if it ended first, or spoke plain HTTP
        (which gets a 400 saying to use https)."""
        assert self._tls is not None
        first = await stream.receive_some(_RECEIVE_SIZE)
        if not first:
            return None
        if first[0] != _TLS_HANDSHAKE_RECORD:
            if first[:1].isalpha():  # a request line: http:// on a TLS port
                await stream.send_all(_PLAIN_HTTP_ON_TLS)
            return None
        tls = trio.SSLStream(_ConnectionStream(stream, first, connection, stream), self._tls, server_side=True,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as error:  # not TLS after all, or a certificate the client refused
            logger.debug("TLS handshake with %s failed: %s", connection.peer, error.__cause__ or error)
            return None
        return tls

    def _channel_for(self, connection: _Connection, host: str, name: str) -> tuple[
            _Bucket | None, tuple[int, str, str, tuple[tuple[str, str], ...]]]:
        """The bucket whose smee channel a stream request names; else None and the refusal
        (status, phrase, why, headers): not on the inspector's host name, not a channel's name,
        and no more streams from one address than max_pending_per_ip."""
        services = self._services
        if services.config.inspector.host and host == services.config.inspector.host:
            return None, (404, "Not Found", "smee channels are not served on the inspector's host name", ())
        try:
            found = services.find_channel(connection.client, name)
        except TooManyFailures as error:
            return None, (429, "Too Many Requests", str(error), (("Retry-After", str(math.ceil(error.wait))),))
        if found is None:
            return None, (404, "Not Found", "no such smee channel", ())
        most = services.config.server.max_pending_per_ip
        if self._sockets.streams_from(connection.client) >= typing.cast(int, most):
            services.throttle.warning("streams", "refused a smee stream to %s: it holds %d (max_pending_per_ip)",
                                      connection.client, most)
            return None, (429, "Too Many Requests", f"this address holds {most} smee streams already",
                          (("Retry-After", str(_BODY_RETRY_AFTER)),))
        return found[0], (200, "OK", "", ())

    async def _serve_events(self, stream: trio.abc.Stream, raw: trio.SocketStream, connection: _Connection,
                            head: bytes, wire: _Wire, name: str) -> None:
        """Serve a smee channel's stream asked for by a connection's first request, on `stream`
        (`raw`, or TLS over it; the request's `head` read whole), if it may have it."""
        if b"\r\n\r\n" not in head:
            await stream.send_all(_raw_answer(431, "Request Header Fields Too Large", "the request's head is too large"))
            return
        bucket, (status, phrase, why, headers) = self._channel_for(
            connection, _host_name((_head_values(head, b"host") or [""])[0]), name)
        if bucket is None:
            await stream.send_all(_raw_answer(status, phrase, why, headers))
            return
        raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SEND_BUFFER)  # see _serve_socket
        answer = _RawEvents(stream, chunked=head.partition(b"\r\n")[0].endswith(b"HTTP/1.1"))
        await self._stream_events(answer, connection, bucket, name, wire, (_head_values(head, b"last-event-id") or [""])[-1])

    async def _stream_events(self, answer: "_RawEvents | _AsgiEvents", connection: _Connection, bucket: _Bucket,
                             name: str, wire: _Wire, since: str) -> None:
        client = _EventStream(self._services, self._sockets, answer, connection, bucket, name, wire)
        self._sockets.started(client)
        try:
            await client.run(since)
        finally:
            self.quiet.unpark_all()
            logger.info("smee channel stream of bucket %s to %s (%s) closed %s; %d frame(s) sent", bucket.config.name,
                        connection.peer, wire.name, _shown(str(client.close_reason)), client.frames_sent)

    async def _serve_socket(self, stream: _ConnectionStream, connection: _Connection) -> None:
        try:
            async with trio.open_nursery() as nursery:  # holds trio-websocket's reader task
                session = _Session(self._services, self._sockets, await _websocket_handshake(nursery, stream),
                                   connection)
                if self._services.stopping.is_set():  # too late
                    nursery.cancel_scope.cancel()
                    return
                # Linux grows a socket's send buffer up to 4 MB: a client that never reads would
                # hold that much kernel memory and take seconds of deliveries before its outbox
                # fills and it is cut off. 256 KiB still carries 100 Mbit/s at 20 ms round trips.
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SEND_BUFFER)
                # authenticated in time, or closed (see _Session): the deadline is a backstop
                connection.end_by(trio.current_time() + self._services.config.server.auth_timeout + _CLOSE_TIMEOUT + _GRACE)
                self._sockets.open.add(session)
                try:
                    await session.run()
                finally:
                    self._sockets.open.discard(session)
                    self.quiet.unpark_all()
                    nursery.cancel_scope.cancel()  # trio-websocket's reader: what comes now is lingering
                    # one line per client; one per stranger's attempt only when debugging
                    logger.log(logging.INFO if session.token else logging.DEBUG,
                               "socket %s (key %s) closed %s; %d frame(s) sent", connection.peer,
                               session.token.key if session.token else "-", _shown(str(session.closed())),
                               session.frames_sent)
        except* (LocalProtocolError, trio_websocket.ConnectionClosed):
            # a client gone during the handshake, or trio-websocket's reader answering a frame (an
            # oversized one, say) that arrived after this side began to close: either way it ends
            logger.debug("socket from %s ended during its handshake or close", connection.peer)


async def _accept_loop(listener: trio.SocketListener, handler: Callable[[trio.SocketStream], Awaitable[None]],
                       nursery: trio.Nursery, throttle: _Throttle) -> None:
    """Accept connections for `handler`, in `nursery`, until cancelled. Out of file descriptors
    or memory, wait a little and try again, with one rate-limited warning, no traceback (trio's
    serve_listeners logs a traceback at ERROR each time)."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in _ACCEPT_CAPACITY_ERRORS:
                raise
            throttle.warning("accept", "cannot accept connections: %s; is max_connections above what "
                             "`ulimit -n` allows?", error.strerror or error)
            await trio.sleep(_ACCEPT_RETRY)
        else:
            nursery.start_soon(handler, stream)


# ---- the relay -------------------------------------------------------------------------------


class Relay:
    """A relay: its config, and once serving, where it listens.

    Made and run by the functions below; `shutdown()` ends it gracefully. It wires the
    parts together (`services`, the port, the forwarders), starts and stops them, and reloads.
    """

    def __init__(self, source: "Config | Mapping[str, Any] | str | Path", *, overrides: Mapping[str, Any] | None = None,
                 announce: bool = True) -> None:
        """Load `source` (as load_config does) with `overrides` over its [server] keys; ConfigError if
        it is not good, or not for this machine."""
        self._overrides = dict(overrides or {})  # [server] keys serve_relay was given, over every config's
        config, tls = _prepare(source, **self._overrides)
        self.host = ""  # where it listens, once listening: a reachable address for 0.0.0.0 and ::
        self.port = 0
        self.url = ""  # http://HOST:PORT, or https://
        self.services = _Services(config)  # internal: what relay_lite's own parts and tests work through
        self.metrics = self.services.metrics
        self.sockets = _Sockets(config.server, self.services.connections)  # internal, as services is
        self._port = _Port(self.services, self.sockets, tls)
        self._forwarders = {bucket: [_Forwarder(self.services, bucket, output) for output in
                                     _public_outputs(bucket.config)] for bucket in self.services.core.buckets}
        self._forwarding: tuple[trio.Nursery, httpx.AsyncClient] | None = None  # where forwarders run, once serving
        self._announce = announce  # log "listening on" once it is (see serve_relay)

    @property
    def config(self) -> Config:
        """The config in force (the services', which a reload changes)."""
        return self.services.config

    @property
    def socket_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + SOCKET_PATH

    @property
    def public_url(self) -> str:
        return self.config.server.public_url.rstrip("/") or self.url

    def input_url(self, ref: str, *, public: bool = False) -> str:
        """The webhook URL of an input, by input id, or of a bucket's first input, by name or id."""
        core = self.services.core
        bucket = core.find_bucket(ref)
        input_id = bucket.inputs[0].id if bucket else ref
        if core.find_input(input_id) is None:
            raise KeyError(f"no input or bucket {ref!r}")
        return (self.public_url if public else self.url) + WEBHOOK_PREFIX + input_id

    def shutdown(self) -> None:
        """Start a graceful shutdown: sockets close with 1001, in-flight requests are answered."""
        self.services.stopping.set()

    def reload(self, source: "Config | Mapping[str, Any] | str | Path") -> None:
        """Apply a changed config (a file, as load_config takes), without dropping a connection
        or losing a webhook: new and changed buckets, inputs, outputs, tokens and TLS files take
        effect; sockets of a token that is gone or changed close with 1008 and a reason; a removed
        bucket's subscribers get a status "unsubscribed", and its log goes. Raise ConfigError,
        changing nothing, if the config is not good, or changes what only a restart can."""
        services = self.services
        new, tls = _prepare(source, **self._overrides)  # what serve_relay was given stays in force
        _reloadable(self.config, new)
        credentials = _Credentials(new, lambda: services.core.session_key, services.throttle)
        credentials.carry_failures(services.credentials)
        buckets, removed = services.core.reload(new)  # from here on nothing fails

        tokens = {token.key: token for token in new.tokens}
        for session in list(self.sockets.open):
            if session.token is None:
                continue
            token = tokens.get(session.token.key)
            if token is None:
                session.close(CLOSE_POLICY, "this token was removed from the relay's config")
            elif token != session.token:
                session.close(CLOSE_POLICY, "this token changed in the relay's config: connect again")
            else:
                session.token = token
        for bucket in removed:
            for session in [s for s in self.sockets.open if bucket in s.buckets or s in bucket.subscribers]:
                session.unsubscribe(bucket, f"bucket {bucket.config.name} was removed from the relay's config")
            for forwarder in self._forwarders.pop(bucket, ()):
                forwarder.scope.cancel()
        for stream in list(self.sockets.streams):  # a channel renamed: its old name no longer opens it
            if stream.bucket in removed or stream.bucket.config.smee_channel != stream.channel:
                stream.close(CLOSE_POLICY, "its smee channel was removed or renamed in the relay's config", drain=False)
        for bucket in buckets:
            wanted = {output.name: output for output in _public_outputs(bucket.config)}
            forwarders = []
            for forwarder in self._forwarders.get(bucket, ()):
                if wanted.get(forwarder.output.name) == forwarder.output:
                    forwarders.append(forwarder)
                    del wanted[forwarder.output.name]
                else:
                    forwarder.scope.cancel()  # a delivery under way is made again by its successor
            for output in wanted.values():
                forwarder = _Forwarder(services, bucket, output)
                forwarders.append(forwarder)
                if self._forwarding is not None:
                    self._forwarding[0].start_soon(forwarder.run, self._forwarding[1])
            self._forwarders[bucket] = forwarders

        services.reloaded(new, credentials)
        self._port.reload(new, tls)
        logger.info("reloaded the config: %d bucket(s), %d input(s), %d token(s)", len(new.buckets),
                    sum(len(bucket.inputs) for bucket in new.buckets), len(new.tokens))
        for problem in _advice(new):
            logger.warning("%s", problem)

    async def _sweep(self) -> None:
        """Once a second: drop log entries past their history_ttl, cut off sockets whose writes
        got no _WRITE_STEP out for send_timeout or whose inspector's session expired, and end
        connections still open past their deadline (one timer for all, not a cancel scope per
        write)."""
        services = self.services
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            services.core.expire(_wall_time())
            now = trio.current_time()
            self.sockets.sweep(now, self.config.server.send_timeout)
            services.connections.end_overdue(now)

    async def serve(self, *, task_status: trio.TaskStatus["Relay"] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shutdown() or cancellation (serve_relay is the way in: it reports errors
        as themselves)."""
        services, port = self.services, self._port
        server = self.config.server
        hypercorn_config, context, lifespan = _hypercorn(server, functools.partial(port.asgi, None))
        await services.core.load()
        async with trio.open_nursery() as lifespan_nursery:
            lifespan_nursery.start_soon(services.core.run)  # outlives the connections, to keep what they asked for
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            listeners = await _listen(server.host, server.port, reuse_port=server.reuse_port)
            host, self.port = listeners[0].socket.getsockname()[:2]
            self.host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            scheme = "https" if port.tls else "http"
            self.url = f"{scheme}://[{self.host}]:{self.port}" if ":" in self.host else f"{scheme}://{self.host}:{self.port}"
            if self._announce:
                logger.info("relay_lite %s listening on %s (webhooks and sockets)", __version__, self.url)
            for problem in _advice(self.config):
                logger.warning("%s", problem)

            handle = functools.partial(port.handle, config=hypercorn_config, context=context)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(_serve_listeners, listeners, handle, connections, accepting, services.throttle)
                connections.start_soon(self.sockets.pinger.run)
                connections.start_soon(self._sweep)
                self._forwarding = connections, _http_client()
                for forwarder in itertools.chain.from_iterable(self._forwarders.values()):
                    connections.start_soon(forwarder.run, self._forwarding[1])
                task_status.started(self)
                await services.stopping.wait()

                logger.info("shutting down: %d socket(s), %d smee stream(s), %d request(s) in flight",
                            len(self.sockets.open), len(self.sockets.streams), port.requests)
                accepting.cancel()
                await context.terminated.set()  # Hypercorn: no new request on kept-alive connections
                services.connections.end_idle()
                for subscriber in self.sockets.everyone():
                    subscriber.close(CLOSE_GOING_AWAY, "server shutting down")
                services.core.release_holds()
                with trio.move_on_after(server.shutdown_timeout):
                    while port.requests or self.sockets.everyone():
                        await port.quiet.park()
                services.connections.end_all()  # what is left is idle, or out of time
                connections.cancel_scope.cancel()  # deliveries under way too: with storage, made after a restart
            client, self._forwarding = self._forwarding[1], None  # a reload from now starts no forwarder
            with trio.CancelScope(shield=True):
                await client.aclose()
            await services.core.aclose()
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()


async def _listen(host: str, port: int, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    if reuse_port:
        return await _listen_shared(host, port)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    if port == 0:  # each address got its own port: keep the first, so one URL reaches everything
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    return listeners


async def _listen_shared(host: str, port: int) -> list[trio.SocketListener]:
    """trio.open_tcp_listeners, with SO_REUSEPORT on each socket before it binds; like it, an
    address family the machine lacks (IPv6 turned off) is passed over, unless it is the only one."""
    listeners: list[trio.SocketListener] = []
    lacking: list[OSError] = []
    try:
        for family, kind, proto, _, address in await trio.socket.getaddrinfo(
                host or None, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE):
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as error:
                if error.errno != errno.EAFNOSUPPORT:
                    raise
                lacking.append(error)
                continue
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
                if family == trio.socket.AF_INET6:
                    sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
        if not listeners and lacking:
            raise lacking[0]
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def _serve_listeners(listeners: list[trio.SocketListener], handler: Callable[[trio.SocketStream], Awaitable[None]],
                  nursery: trio.Nursery, scope: trio.CancelScope, throttle: _Throttle) -> None:
    try:
        with scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(_accept_loop, listener, handler, nursery, throttle)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


@asynccontextmanager
async def open_relay(
    config: "Config | Mapping[str, Any] | str | Path", *, host: str | None = None, port: int | None = None
) -> AsyncIterator[Relay]:
    """``async with open_relay(config, port=0) as relay:`` a listening relay, shut down on exit.
    A relay that cannot start raises as serve_relay does (ConfigError, StorageError, OSError),
    and an error in the block comes out as itself, not in a group."""
    started, raised = False, None
    try:
        async with trio.open_nursery() as nursery:
            relay: Relay = await nursery.start(lambda task_status: serve_relay(
                config, host=host, port=port, task_status=task_status))
            started = True
            try:
                yield relay
            except BaseException as error:
                raised = error
                raise
            finally:
                relay.shutdown()
    except BaseExceptionGroup as group:  # the nursery's wrapping of one error: the error, as itself
        sole = _sole(group)
        if isinstance(sole, BaseExceptionGroup) or (started and sole is not raised):
            raise
    else:
        return
    raise sole  # outside the handler, so its cause and context stay as they were


async def serve_relay(
    config: "Config | Mapping[str, Any] | str | Path",
    *,
    host: str | None = None,
    port: int | None = None,
    announce: bool = True,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a relay until `relay.shutdown()` (graceful) or cancellation.

    Use as ``relay = await nursery.start(serve_relay, config, port=0)``: start() returns the
    Relay once it is listening, with its real URL; it logs a line saying so unless `announce`
    is false (the command line prints its banner instead). A relay that cannot start raises
    its reason itself, not in a group: ConfigError for the config, StorageError for its
    `[storage]`, OSError for its port.
    """
    overrides: dict[str, Any] = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    relay = Relay(config, overrides=overrides, announce=announce)
    try:
        await relay.serve(task_status=task_status)
    except BaseExceptionGroup as group:
        sole = _sole(group)
        if relay.url or isinstance(sole, BaseExceptionGroup):  # it was serving: what ended it may be several
            raise
    else:
        return
    raise sole  # it never started, for one reason: raised as it was, its cause and context kept


# ==== 9. The agent ============================================================================
#
# `python relay_lite.py forward` brings webhooks to an app behind NAT. It is a socket client of
# the relay (this one, or the hosted service: it speaks only the protocol PROTOCOL.md describes)
# and delivers each webhook with the engine above, in order. A checkpoint file names the last
# webhook whose outcome is final, and every one before it; a reconnect or a restart subscribes
# with "since" it, so nothing is lost. Each outcome goes back with PUT /v1/logs/<id>, as the
# hosted agent reports it, so a sender held by response_from_output gets the app's answer.


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """What `relay_lite.py forward` was told."""

    relay: str  # the relay's base URL, http(s)://host:port; its socket is at /v1/socket
    key: str
    secret: str
    buckets: tuple[str, ...] = ()  # names or ids; none: every bucket the token may see
    to: str = ""  # the app's URL, each webhook's path appended; "": each one's output_destination
    allow: tuple[str, ...] = ()  # URL prefixes a delivery's URL must start with; none: any
    state: Path | None = None  # the checkpoint file; None: one per relay and bucket set, under ~/.local/state
    concurrency: int = 1  # deliveries in flight; above 1, order is not kept
    verify: bool | str = True  # the app's TLS certificate: checked, not (--insecure), or against a CA file
    delivery: _Delivery = _Delivery()
    ping_timeout: float = 2.5 * DEFAULT_PING_INTERVAL  # seconds without a frame that mean a dead connection
    lines: str = "text"  # a line per webhook on standard output: "text", "json" or "quiet"


def _relay_urls(relay: str) -> tuple[str, str]:
    """The relay's base URL (for the logs API) and socket URL, from either of them."""
    split = urllib.parse.urlsplit(relay)
    scheme = {"ws": "http", "wss": "https"}.get(split.scheme, split.scheme)
    if scheme not in ("http", "https") or not split.hostname:
        raise AgentError(f"--relay {_shown(relay)}: give the relay's URL, http(s)://host:port")
    path = split.path.rstrip("/")
    if path.endswith(SOCKET_PATH):
        path = path[:-len(SOCKET_PATH)]
    base = urllib.parse.urlunsplit((scheme, split.netloc, path, "", ""))
    return base, base.replace("http", "ws", 1) + SOCKET_PATH


def _agent_destination(output_destination: str, to: str) -> str | None:
    """Where the agent delivers a webhook: `to` followed by the path of its output_destination
    (for a bucket without outputs, that is the path the sender put after the input's URL); or,
    without `to`, the output_destination itself. None when that is no URL to deliver to."""
    split = urllib.parse.urlsplit(output_destination)
    is_url = split.scheme in ("http", "https") and bool(split.hostname)
    if not to:
        return output_destination if is_url else None
    path = urllib.parse.urlunsplit(("", "", split.path, split.query, "")) if is_url else output_destination
    if _has_dot_segment(path.partition("?")[0]):  # it would climb out of `to`
        return None
    if path in ("", "/"):
        return to
    return to.rstrip("/") + (path if path.startswith("/") else "/" + path)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether `url` is one of `prefixes` or below it: the same scheme, host and port (a default
    one written or not), no user or password unless the prefix has them, and a path at or below
    the prefix's, segment by segment, with no . or .. segment, plain or percent-encoded
    (http://app:3000/hooks allows /hooks and /hooks/x, not /hooksx, /hooks/../admin, nor
    http://app:30001)."""
    split = urllib.parse.urlsplit(url)
    segments = urllib.parse.unquote(split.path).replace("\\", "/").split("/")
    if "." in segments or ".." in segments:  # /hooks/../admin, %2e%2e, ..%5c: an app may climb out
        return False
    for prefix in map(urllib.parse.urlsplit, prefixes):
        try:
            same_place = (split.scheme.lower(), split.hostname, split.port or _DEFAULT_PORTS.get(split.scheme.lower()),
                          split.username, split.password) == (
                prefix.scheme.lower(), prefix.hostname, prefix.port or _DEFAULT_PORTS.get(prefix.scheme.lower()),
                prefix.username, prefix.password)
        except ValueError:  # a port that is no number, or out of range
            return False
        below = prefix.path.rstrip("/")
        if same_place and (split.path == below or split.path.startswith(below + "/") or not below):
            return True
    return False


def _default_state(relay: str, buckets: Iterable[str]) -> Path:
    """The checkpoint file of an agent of `relay` for `buckets`: one per relay and bucket set."""
    home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(json.dumps([relay, sorted(buckets)]).encode()).hexdigest()[:16]
    return home / "relay_lite" / f"forward-{digest}.json"


class _Checkpoint:
    """The last webhook whose outcome is final, with every one taken before it: a low-water mark,
    so with deliveries in parallel a restart goes back to the oldest one unfinished (at least
    once). Saved by replacing the file (a temporary one written, synced and renamed over it),
    so a crash leaves the old checkpoint or the new one, never half of one. A worker waits for
    the save that holds its webhook before it takes the next, so a crash repeats at most the
    webhook each worker had delivered, never a run of them."""

    def __init__(self, path: Path, relay: str, buckets: tuple[str, ...], last: str = "") -> None:
        self.path = path
        self.last = last  # every webhook up to this one, in the order they came, is done
        self._relay, self._buckets = relay, buckets
        self._taken: deque[str] = deque()  # the ids taken after `last`, in order...
        self._done: set[str] = set()  # ...and those of them done
        self._saved = last
        self._changed = trio.Event()
        self._version = self._saved_version = 0  # advances of `last`: made, and saved (or tried)
        self._flushed = trio.Event()  # set, and replaced, after each save
        self._saving = True  # keep_saved runs: a wait for a save can end
        self._throttle = _Throttle(60.0)

    @classmethod
    def load(cls, path: Path, relay: str, buckets: tuple[str, ...]) -> "_Checkpoint":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, relay, buckets)
        except OSError as error:
            raise AgentError(f"cannot read the state file {path}: {error.strerror or error}") from None
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("last", ""), str):
            raise AgentError(f"the state file {path} is not one relay_lite forward wrote; move it away")
        if data.get("relay") != relay:
            raise AgentError(f"the state file {path} belongs to the relay {_shown(str(data.get('relay')))}; "
                             "give this one its own --state")
        if not isinstance(data.get("buckets"), list) or sorted(map(str, data["buckets"])) != sorted(buckets):
            raise AgentError(f"the state file {path} belongs to the buckets {_shown(str(data.get('buckets')))}; "
                             "give these their own --state")
        return cls(path, relay, buckets, data.get("last", ""))

    def start_at(self, log_id: str) -> int:
        """Begin after `log_id`; return the version of the checkpoint that holds it."""
        self.last = log_id
        self._version += 1
        self._changed.set()
        return self._version

    def took(self, log_id: str) -> None:
        self._taken.append(log_id)

    def done(self, log_id: str) -> int:
        """Record an outcome; return the version of the checkpoint that holds it (0: none will
        until a webhook taken before it is done too, so a crash would repeat it anyway)."""
        self._done.add(log_id)
        advanced = False
        while self._taken and self._taken[0] in self._done:
            self.last = self._taken.popleft()
            self._done.discard(self.last)
            advanced = True
        if not advanced:
            return 0
        self._version += 1
        self._changed.set()
        return self._version

    async def saved(self, version: int) -> None:
        """Wait until the checkpoint of `version` has been saved (or its save failed, and said so),
        or nothing saves any more: the agent was stopped at once, and saves once, as it ends."""
        while self._saved_version < version and self._saving:
            await self._flushed.wait()

    async def keep_saved(self) -> None:
        """Save each new checkpoint, one write at a time (those that come meanwhile, together)."""
        try:
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                version = self._version
                self.failed(await trio.to_thread.run_sync(self.save))
                self._saved_version = version
                self._flushed.set()
                self._flushed = trio.Event()
        finally:  # cancelled: a worker waiting for a save (shielded, for its stop grace) waits no more
            self._saving = False
            self._flushed.set()

    def save(self) -> OSError | None:
        """Write the checkpoint (in a worker thread, or as the agent ends); the error that kept it
        from being written, if one, for the caller to say (see failed): the throttle runs on the
        event loop's clock."""
        last = self.last
        if last == self._saved:
            return None
        data = {"relay": self._relay, "buckets": list(self._buckets), "last": last,
                "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself
            finally:
                os.close(directory)
        except OSError as error:  # delivery goes on: a restart would deliver some webhooks again
            return error
        self._saved = last
        return None

    def failed(self, error: OSError | None) -> None:
        """Say why a save failed, if it did: once a minute at most."""
        if error is not None:
            self._throttle.warning("state", "cannot save the checkpoint in %s: %s", self.path, error.strerror or error)


_PONG = _encode({"action": "pong"})
_PAUSED, _STOPPED = "paused", "stopped"
_COLOURS = {"sent": "\033[32m", "retrying": "\033[33m", "failed": "\033[31m"}  # green, yellow, red


class _Agent:
    """The forward agent: one socket to the relay at a time, reconnecting for as long as it runs;
    `concurrency` workers delivering what it brings, in the order it came; the checkpoint, and a
    report of each outcome to the relay."""

    def __init__(self, config: AgentConfig, checkpoint: _Checkpoint, out: typing.TextIO = sys.stdout) -> None:
        self.config = config
        self._base, self._socket_url = _relay_urls(config.relay)
        self._checkpoint = checkpoint
        self._out = out
        self._taken, self._queue = trio.open_memory_channel[_WebhookFrame](math.inf)
        self._queued_bytes = 0
        self._room = trio.Event()  # set when the queue has room again after it was full
        self._taken_up_to = checkpoint.last  # the newest webhook taken: a reconnect resumes after it
        self._resumes = False  # the relay resumed with "since" (relay_lite does; the hosted service does not)
        self._reports, self._to_report = trio.open_memory_channel[tuple[str, _Answer]](_AGENT_REPORTS_QUEUED)
        self._delivering: set[trio.CancelScope] = set()
        self._socket_scope = trio.CancelScope()
        self._reading: trio.CancelScope | None = None  # the open socket's conversation, while there is one
        self._stopping = False
        self._subscribed = False  # the connection of the moment got as far as subscribing
        self._destinations_known = False  # without --to: every bucket's outputs name a URL (_check_destinations)
        self._throttle = _Throttle(60.0)
        self._colour = out.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org

    def stop(self) -> None:
        """Stop taking webhooks; those being delivered get _AGENT_STOP_GRACE to finish. A socket
        that is open closes with a close frame (1001), so the relay knows the agent left."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()
        else:
            self._socket_scope.cancel()
        for scope in self._delivering:
            scope.deadline = min(scope.deadline, trio.current_time() + _AGENT_STOP_GRACE)

    async def run(self) -> None:
        """Forward until stop(); raise AgentError if the relay refuses the key or a bucket."""
        try:
            async with _http_client(verify=self.config.verify) as app, \
                    httpx.AsyncClient(base_url=self._base, auth=(self.config.key, self.config.secret),
                                      verify=_trusted_cas(), timeout=_AGENT_REPORT_TIMEOUT, trust_env=True) as relay, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(self._checkpoint.keep_saved)
                async with trio.open_nursery() as reporting:
                    for _ in range(_AGENT_REPORTERS):
                        reporting.start_soon(self._report, relay)
                    async with trio.open_nursery() as workers:
                        for _ in range(self.config.concurrency):
                            workers.start_soon(self._work, app)
                        with self._socket_scope:
                            try:
                                await self._connect_forever(relay)
                            finally:  # however it ends, what is in flight gets its time, no more
                                self.stop()
                        workers.cancel_scope.cancel()  # those waiting for a webhook; the others are shielded
                    await self._reports.aclose()  # the reporters end once what is queued is sent...
                    reporting.cancel_scope.deadline = trio.current_time() + _AGENT_STOP_GRACE  # ...or in time
                nursery.cancel_scope.cancel()
        finally:
            self._checkpoint.failed(self._checkpoint.save())

    # ---------------------------------------------------------------- the socket

    async def _connect_forever(self, relay: httpx.AsyncClient) -> None:
        failures = 0
        while True:
            self._subscribed = False
            try:
                if not self.config.to and not self._destinations_known:
                    await self._check_destinations(relay)
                if not self._taken_up_to:
                    await self._start_after_newest(relay)
                logger.info("connecting to %s", self._socket_url)
                reason = await self._session()
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, _Refused, httpx.HTTPError,
                    trio.BrokenResourceError, trio.TooSlowError, _WSProtocolError, h11.ProtocolError) as error:
                reason = _connection_error(error)  # the logs API's, or the socket's: waited out alike
            if reason == _STOPPED or self._stopping:
                return
            if reason == _PAUSED:
                await self._room.wait()
                continue
            failures = 0 if self._subscribed else failures + 1
            delay = min(_RECONNECT_FIRST * 2 ** failures, _RECONNECT_MOST) * (0.5 + random.random() / 2)
            logger.warning("%s; retrying in %.0f s", reason, delay)
            await trio.sleep(delay)

    async def _session(self) -> str:
        """One connection, until it ends: why it did (or it raises)."""
        reason = ""
        with trio.CancelScope() as dropped:
            async with trio_websocket.open_websocket_url(self._socket_url, max_message_size=_AGENT_MAX_FRAME,
                                                         connect_timeout=_AGENT_CONNECT_TIMEOUT,
                                                         disconnect_timeout=_CLOSE_TIMEOUT) as ws:
                try:
                    with trio.CancelScope() as self._reading:
                        if self._stopping:  # stop() came while this socket opened
                            self._reading.cancel()
                        reason = await self._converse(ws, dropped)
                finally:
                    self._reading = None
                if self._stopping:  # a close frame, its answer awaited a while: the relay hears why
                    with trio.move_on_after(_CLOSE_TIMEOUT):
                        await ws.aclose(CLOSE_GOING_AWAY, "the agent is stopping")
                    return _STOPPED
                if reason == _PAUSED:
                    await ws.aclose(CLOSE_GOING_AWAY, "catching up")
                    logger.info("the app is %d webhooks behind; the relay keeps the rest until it catches up",
                                self._queue.statistics().current_buffer_used)
        return reason

    async def _converse(self, ws: trio_websocket.WebSocketConnection, dropped: trio.CancelScope) -> str:
        """Authenticate, subscribe, and take webhooks until the connection ends: why it did."""
        await ws.send_message(_encode({"action": "auth", "key": self.config.key, "secret": self.config.secret}))
        await self._expect(ws, "authenticated")
        since = self._taken_up_to
        await ws.send_message(self._subscribe_frame(since))
        reply = await self._expect(ws, "subscribed", since=since)
        self._subscribed = True
        logger.info("%s%s", reply.message, f", resuming after {since}" if since not in ("", NIL_LOG_ID) else "")
        reason = ""
        while not reason:
            while self._queued_bytes >= _AGENT_QUEUE_BYTES:  # and the relay cannot be asked to
                await self._room.wait()  # pause: it waits, or cuts this socket off and it resumes
            with trio.move_on_after(self.config.ping_timeout) as silent:
                reason = await self._receive(ws)
            if silent.cancelled_caught:
                reason = f"disconnected: no frame for {self.config.ping_timeout:g} s"
                dropped.cancel()  # no closing handshake on a dead connection: it is dropped
        return reason

    async def _receive(self, ws: trio_websocket.WebSocketConnection) -> str:
        """Take the next frame; _PAUSED if the socket should pause for the app to catch up."""
        frame = self._parse(await ws.get_message())
        if isinstance(frame, _WebhookFrame):
            return _PAUSED if self._take(frame) else ""
        if frame is not None:
            await self._on_status(ws, frame)
        return ""

    async def _check_destinations(self, relay: httpx.AsyncClient) -> None:
        """Without --to, each webhook goes to its output's destination: AgentError, at start, if
        a bucket's webhooks have none that is a URL (a bucket without outputs, as the demo's;
        an internal output without a destination). It started, then failed every webhook."""
        response = await relay.get(BUCKETS_PATH)
        if response.status_code in (429, 503):
            raise _Refused(f"refused for now: {_api_problem(response)}")
        if response.status_code == 401:  # as the socket says it
            raise AgentError(f"the relay refused the key {_shown(self.config.key)}: invalid key or secret")
        try:
            if response.status_code != 200:
                raise ValueError
            buckets = [bucket for bucket in response.json() if not self.config.buckets
                       or bucket["name"] in self.config.buckets or bucket["id"] in self.config.buckets]
            missing = [bucket["name"] for bucket in buckets if not bucket["outputs"] or any(
                output["internal"] and not output["disabled"] and _agent_destination(output["destination"], "") is None
                for output in bucket["outputs"])]
        except (ValueError, TypeError, KeyError):
            raise AgentError(f"{self._base}{BUCKETS_PATH} did not answer as a relay's buckets API: "
                             f"{_api_problem(response)}") from None
        if missing:
            raise AgentError(f"bucket {_shown(', '.join(missing))} names no URL to deliver its webhooks to (an output's "
                             "destination): pass --to with your app's URL, e.g. --to http://localhost:3000")
        self._destinations_known = True

    async def _start_after_newest(self, relay: httpx.AsyncClient) -> None:
        """Without a checkpoint, begin after the newest webhook the buckets hold now (the logs
        API says which), or before every one if they hold none: the first subscribe, and any
        after it, resume from there, and lose none sent meanwhile. Saved before it subscribes,
        so a crash before the first webhook loses nothing either.

        Only an answer with the logs is an answer: a refusal (a wrong secret, an unknown
        bucket) is final, a refusal for now (429, 503) is waited out, and neither is saved. A
        wrong secret was read as "the relay holds none of these buckets", and the next run, with
        the right one, delivered every webhook the relay held again."""
        newest = ""
        for bucket in self.config.buckets or ("",):
            response = await relay.get(LOGS_PATH, params={"limit": 1, **({"bucket": bucket} if bucket else {})})
            problem = _api_problem(response)
            if response.status_code in (429, 503):
                raise _Refused(f"refused for now: {problem}")
            if response.status_code == 401:  # as the socket says it
                raise AgentError(f"the relay refused the key {_shown(self.config.key)}: invalid key or secret")
            if response.status_code in (403, 404) and bucket:
                raise AgentError(f"the relay refused the subscription: {problem}")
            try:
                if response.status_code != 200:
                    raise ValueError(problem)
                logs = response.json()["data"]
                newest = max([newest, *(log["id"] for log in logs[:1] if isinstance(log["id"], str))])
            except (ValueError, TypeError, KeyError):
                raise AgentError(f"{self._base}{LOGS_PATH} did not answer as a relay's logs API: {problem}") from None
        self._taken_up_to = newest or NIL_LOG_ID
        await self._checkpoint.saved(self._checkpoint.start_at(self._taken_up_to))
        if newest:
            logger.info("forwarding the webhooks after %s, the newest the relay holds", newest)
        else:
            logger.info("forwarding every webhook from now on: the relay holds none of these buckets yet")

    def _subscribe_frame(self, since: str) -> str:
        frame: dict[str, Any] = {"action": "subscribe", "buckets": list(self.config.buckets)}
        if since:
            frame["since"] = since
        return _encode(frame)

    async def _expect(self, ws: trio_websocket.WebSocketConnection, status: str, since: str = "") -> _StatusFrame:
        """The next status frame, which must be `status` (pings answered on the way); raise
        AgentError if the relay refused what the agent asked."""
        with trio.fail_after(_AGENT_CONNECT_TIMEOUT):
            while True:
                frame = self._parse(await ws.get_message())
                if not isinstance(frame, _StatusFrame):
                    continue  # a webhook can only come once subscribed
                if frame.status == "ping":
                    await ws.send_message(_PONG)
                elif frame.status == status:
                    return frame
                elif frame.status == "unauthorized" and "try again" in frame.message:  # too many failures here
                    raise _Refused(f"refused for now: {_shown(frame.message, 200)}")
                elif frame.status == "unauthorized":
                    raise AgentError(f"the relay refused the key {_shown(self.config.key)}: {_shown(frame.message, 200)}")
                elif frame.status == "error" and since and frame.message.startswith("unknown resume point"):
                    if since != NIL_LOG_ID:
                        logger.warning("the relay does not know the last webhook delivered (%s): it lost its log; "
                                       "going on with every webhook it holds", since)
                    since = "" if since == NIL_LOG_ID else NIL_LOG_ID  # "" for a relay that knows no nil id
                    self._taken_up_to = since
                    await ws.send_message(self._subscribe_frame(since))
                elif frame.status == "error":
                    raise AgentError(f"the relay refused the subscription: {_shown(frame.message, 200)}")

    def _parse(self, message: str | bytes) -> _StatusFrame | _WebhookFrame | None:
        try:
            return parse_server_frame(message)
        except ProtocolError as error:
            self._throttle.warning("frame", "a frame from the relay was skipped: %s", error)
            return None

    async def _on_status(self, ws: trio_websocket.WebSocketConnection, frame: _StatusFrame) -> None:
        if frame.status == "ping":
            await ws.send_message(_PONG)
        elif frame.status == "resumed":
            self._resumes = True
            if self._taken_up_to != NIL_LOG_ID:  # a fresh agent's resume from the start of an empty log says nothing
                logger.info("resumed: %s", frame.message)
        elif frame.status in ("history_gap", "error"):
            logger.warning("the relay says: %s", _shown(frame.message, 300))

    def _take(self, frame: _WebhookFrame) -> bool:
        """Queue `frame` for the workers; True if the queue is full and the socket should pause."""
        if self._resumes and frame.id <= self._taken_up_to:
            return False  # taken before a reconnect: ids grow, and the resume repeated it
        self._taken_up_to = frame.id
        self._checkpoint.took(frame.id)
        self._queued_bytes += frame.size
        self._taken.send_nowait(frame)
        if self._queued_bytes < _AGENT_QUEUE_BYTES:
            return False
        self._room = trio.Event()
        if self._resumes:
            return True
        self._throttle.warning("behind", "the app is %d webhooks (%d MiB) behind; reading from the relay waits",
                               self._queue.statistics().current_buffer_used, self._queued_bytes // 2**20)
        return False

    # ---------------------------------------------------------------- deliveries

    async def _work(self, app: httpx.AsyncClient) -> None:
        async for frame in self._queue:
            self._queued_bytes -= frame.size
            if self._queued_bytes < _AGENT_QUEUE_BYTES // 2:
                self._room.set()
            if self._stopping:
                return  # not begun: it comes again after a restart
            with trio.CancelScope(shield=True) as delivering:  # a stop lets it finish, for a while
                self._delivering.add(delivering)
                try:
                    await self._deliver(app, frame)
                finally:
                    self._delivering.discard(delivering)
            if delivering.cancelled_caught:  # stopped: it comes again after a restart
                return

    async def _deliver(self, app: httpx.AsyncClient, frame: _WebhookFrame) -> None:
        destination = _agent_destination(frame.output_destination, self.config.to)
        started = _wall_time()
        if destination is None:
            answer = _Answer(0, {}, f"no URL to deliver to: output_destination is {frame.output_destination!r}; "
                                    "run the agent with --to URL".encode(), started)
        elif self.config.allow and not _allowed(destination, self.config.allow):
            self._throttle.warning("allow", "webhook %s names %s, which no --allow takes: not delivered", frame.id,
                                   _shown(destination, 200))
            answer = _Answer(0, {}, f"not delivered: {_shown(destination, 200)} is not under any --allow".encode(),
                             started)
        else:
            try:
                answer = await _deliver(app, _outbound(frame.webhook, destination), self.config.delivery,
                                        functools.partial(self._print, frame, destination, started=started))
            except Exception as error:  # a bug, but not one that may stop the agent, or repeat at each restart
                _unexpected(self._throttle, "delivering a webhook", error)
                answer = _Answer(0, {}, _delivery_error(error).encode(), _wall_time())
        version = self._checkpoint.done(frame.id)
        self._print(frame, destination, answer, started=started)
        await self._reports.send((frame.id, answer))
        await self._checkpoint.saved(version)  # before the next: a crash repeats this one at most

    def _print(self, frame: _WebhookFrame, destination: str | None, answer: _Answer, retry_in: float | None = None,
               *, started: float) -> None:
        """A webhook's line: its outcome, or an attempt's that will be tried again in `retry_in`
        seconds; a final failure says how to resend it. Coloured on a terminal, unless NO_COLOR."""
        if self.config.lines == "quiet":
            return
        attempts = answer.retries + 1
        resend = f"{self._base}{LOGS_PATH}/{frame.id}/action"
        error = "" if answer.status_code else answer.body.decode(errors="replace")
        status = "retrying" if retry_in is not None else _outcome(answer)
        if self.config.lines == "json":
            line = _encode({"time": _iso_time(answer.at), "id": frame.id, "bucket": frame.bucket,
                            "method": frame.webhook.method, "url": destination, "status_code": answer.status_code,
                            "status": status, "duration_ms": round((answer.at - started) * 1000),
                            "attempts": attempts, **({"error": error} if error else {}),
                            **({"retry_in_s": round(retry_in, 1)} if retry_in is not None else {}),
                            **({"resend": f"POST {resend}"} if status == "failed" else {})})
            self._write(line)
            return
        split = urllib.parse.urlsplit(destination or frame.output_destination)
        target = split.path + ("?" + split.query if split.query else "")
        outcome = self._coloured(str(answer.status_code) if answer.status_code else
                                 _shown(error, 200) if retry_in is not None else f"failed: {_shown(error, 200)}", status)
        if retry_in is not None:
            said = f"{outcome}; attempt {attempts} of {self.config.delivery.retries + 1}, again in {retry_in:.0f} s"
        else:
            said = (f"{outcome} {round((answer.at - started) * 1000)} ms"
                    + (f" ({attempts} attempts)" if attempts > 1 else ""))
        line = f"{_iso_time(answer.at)} {frame.webhook.method} {_shown(target or '/', 200)} {said}"
        if status == "failed":  # one write with the outcome's line: a reader sees both or neither
            line += (f"\n  resend {frame.id} once the cause is fixed: Resend in the relay's inspector, or "
                     f"curl -u {shlex.quote(self.config.key + ':')}\"$RELAY_SECRET\" -d '{{\"action\":\"resend\"}}' "
                     f"{resend}")
        self._write(line)

    def _write(self, lines: str) -> None:
        """`lines` and their newline in one write: a reader of the file never sees half of them."""
        self._out.write(lines + "\n")
        self._out.flush()

    def _coloured(self, text: str, status: str) -> str:
        if not self._colour:
            return text
        return f"{_COLOURS[status]}{text}\033[0m"

    async def _report(self, relay: httpx.AsyncClient) -> None:
        """Report outcomes with PUT /v1/logs/<id>, as the hosted agent does."""
        async for log_id, answer in self._to_report:
            body = {"status_code": answer.status_code, "status": _outcome(answer), "retries": answer.retries,
                    "response_body": base64.b64encode(answer.body).decode("ascii"),
                    "response_headers": answer.headers}
            try:
                response = await relay.put(f"{LOGS_PATH}/{log_id}", json=body)
            except httpx.HTTPError as error:
                self._throttle.warning("report", "cannot report the outcome of %s to the relay: %s", log_id,
                                       _delivery_error(error))
                continue
            if response.is_error:  # forgotten (404: past history_size), answered already (409), ...: said
                self._throttle.warning("report", "the relay did not record the outcome of %s (%s): %s %s", log_id,
                                       _outcome(answer), response.status_code, _shown(response.text, 200))


class _Refused(Exception):
    """The relay refused the agent for now (too many failed authentications from its address, or
    busy), or cannot be reached: waited out, as a lost connection is."""


def _api_problem(response: httpx.Response) -> str:
    """What a REST API answer says is wrong, in a few words: its error, else its status."""
    try:
        error = response.json().get("error", "")
    except (ValueError, AttributeError):
        error = ""
    return _shown(str(error), 200) if error else f"{response.status_code} {response.reason_phrase}"


def _outcome(answer: _Answer) -> str:
    """The log status a delivery's answer gives: a 2xx or 3xx is "sent"."""
    return "sent" if 200 <= answer.status_code < 400 else "failed"


def _iso_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")


def _connection_error(error: BaseException) -> str:
    """Why the agent's connection to the relay ended, or never began, in a few words."""
    if isinstance(error, trio_websocket.ConnectionClosed):
        reason = error.reason
        if reason is None or reason.code == 1006:
            return "disconnected: the connection was lost"
        if reason.code == 1009:  # the agent's own close: a relay sends it only to a client that sent too much
            return (f"disconnected: a frame from the relay was over the {_AGENT_MAX_FRAME // 2**20} MiB the agent "
                    "takes (is the relay's max_body_size above 64 MiB?)")
        return f"disconnected: closed by the relay ({reason.code}{': ' + _shown(reason.reason) if reason.reason else ''})"
    if isinstance(error, trio_websocket.ConnectionRejected):
        return f"cannot connect: the relay answered {error.status_code} to the WebSocket upgrade"
    if isinstance(error, trio.TooSlowError):
        return "cannot connect: no answer in time"
    if isinstance(error, _Refused):
        return f"cannot connect: {error}"
    if isinstance(error, (_WSProtocolError, h11.ProtocolError)):
        return f"cannot connect: not a WebSocket answer ({_shown(str(error), 100)})"
    while getattr(error, "strerror", None) is None:  # down to the OS's own words, if there are some
        inner = error.exceptions[0] if isinstance(error, BaseExceptionGroup) else error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return f"cannot connect: {getattr(error, 'strerror', None) or error or type(error).__name__}"


async def forward(config: AgentConfig, *, task_status: trio.TaskStatus["_Agent"] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the forward agent until it is stopped (`agent.stop()`, for the agent task_status gives);
    raise AgentError when it cannot go on."""
    base, _ = _relay_urls(config.relay)
    checkpoint = _Checkpoint.load(config.state or _default_state(base, config.buckets), base, config.buckets)
    agent = _Agent(config, checkpoint)
    task_status.started(agent)
    await agent.run()


# ==== 10. The pytest plugin and the command line ==============================================

# ---- pytest plugin ---------------------------------------------------------------------------
#
# Installing relay_lite gives a project's tests a `relay` fixture: a relay on a free port with a
# bucket, an input and a token, its URLs and credentials, `send` for a webhook and `client` for a
# socket that collects frames; and `relay_factory` for relays of other configs. pytest finds them
# through the pytest11 entry point `relay_lite:pytest_plugin`, built by the module's __getattr__
# on first use, so a relay that serves never imports pytest. In a Trio test (pytest-trio) the
# relay runs in the test's own loop and the helpers are awaited; in any other test it runs in a
# thread of its own, and they block.


def _fixture_config() -> Config:
    """The `relay` fixture's config: bucket "test", one input, one token, made up for each test."""
    return load_config(Config(
        server=ServerConfig(host="127.0.0.1", port=0),
        tokens=(TokenConfig(key=str(uuid.uuid4()), secret=secrets.token_urlsafe(24)),),
        buckets=(BucketConfig(name="test", id=str(uuid.uuid4()), inputs=(InputConfig(id=str(uuid.uuid4())),)),),
    ))


class _FixtureRelay:
    """What both kinds of fixture relay give a test: the relay, its URLs and credentials."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.config = relay.config
        token = self.config.tokens[0] if self.config.tokens else None
        self.key = token.key if token else ""  # the config's first token
        self.secret = token.secret if token else ""  # "" if it gives only a secret_hash
        self.bucket = self.config.buckets[0].name if self.config.buckets else ""  # the config's first bucket

    @property
    def url(self) -> str:
        return self.relay.url

    @property
    def socket_url(self) -> str:
        return self.relay.socket_url

    @property
    def input_url(self) -> str:
        """The webhook URL of the first bucket's first input; relay.input_url(ref) for others."""
        return self.relay.input_url(self.bucket)

    def reload(self, config: "Config | Mapping[str, Any] | str | Path") -> None:
        """Apply a changed config, as SIGHUP does (see Relay.reload), its host and port aside."""
        self._in_loop(self.relay.reload, _fixture_config_of(config))

    def _in_loop(self, call: Callable[..., Any], *args: Any) -> Any:
        return call(*args)

    def _request(self, body: bytes | str, path: str, bucket: str | None,
                 headers: Mapping[str, str] | None, method: str) -> httpx.Request:
        return httpx.Request(method, self.relay.input_url(bucket or self.bucket) + path, headers=headers,
                             content=body.encode() if isinstance(body, str) else body)


class _FrameClient:
    """A socket client of a fixture relay, authenticated and subscribed, in a Trio loop."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self.frames: list[dict[str, Any]] = []  # every frame received, pings included

    async def receive(self, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        """The next frame (a ping is answered, and returned too)."""
        with trio.fail_after(timeout):
            frame: dict[str, Any] = json.loads(await self._ws.get_message())
        self.frames.append(frame)
        if frame.get("type") == "status" and frame.get("status") == "ping":
            await self._ws.send_message(_encode({"action": "pong"}))
        return frame

    async def webhook(self, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        """The next webhook frame, past any status frames."""
        with trio.fail_after(timeout):
            while (frame := await self.receive(math.inf))["type"] != "webhook":
                pass
        return frame

    async def status(self, status: str, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        """The next status frame `status` (e.g. "resumed"), past any others; RuntimeError if
        the relay refuses something first ("unauthorized", "error")."""
        with trio.fail_after(timeout):
            while (frame := await self.receive(math.inf))["type"] != "status" or frame.get("status") != status:
                if frame["type"] == "status" and frame.get("status") in ("unauthorized", "error"):
                    raise RuntimeError(f"the relay answered {frame['status']}: {frame.get('message', '')}")
        return frame


@asynccontextmanager
async def _frame_client(fixture: _FixtureRelay, buckets: Sequence[str] | None,
                        since: str | None) -> AsyncIterator[_FrameClient]:
    async with trio_websocket.open_websocket_url(fixture.socket_url) as ws:
        client = _FrameClient(ws)
        await ws.send_message(_encode({"action": "auth", "key": fixture.key, "secret": fixture.secret}))
        await client.status("authenticated")
        subscribe: dict[str, Any] = {"action": "subscribe", "buckets": list(buckets or [fixture.bucket])}
        if since is not None:
            subscribe["since"] = since
        await ws.send_message(_encode(subscribe))
        await client.status("subscribed")
        yield client


class TrioRelayFixture(_FixtureRelay):
    """The `relay` fixture in a Trio test: the relay runs in the test's loop; await the helpers."""

    async def send(self, body: bytes | str = b"", path: str = "", *, bucket: str | None = None,
                   headers: Mapping[str, str] | None = None, method: str = "POST") -> httpx.Response:
        """Send a webhook to a bucket's first input (the fixture's bucket by default), `path`
        after its URL; return the relay's answer."""
        async with httpx.AsyncClient(timeout=_FIXTURE_TIMEOUT) as http:
            return await http.send(self._request(body, path, bucket, headers, method))

    def client(self, buckets: Sequence[str] | None = None, *,
               since: str | None = None) -> typing.AsyncContextManager[_FrameClient]:
        """``async with relay.client() as client: frame = await client.webhook()``: a socket
        authenticated with the fixture's token and subscribed to `buckets` (its bucket by default)."""
        return _frame_client(self, buckets, since)


class _ThreadClient:
    """A _FrameClient living in a relay thread's loop, for a test without one: it blocks."""

    def __init__(self, client: _FrameClient, token: trio.lowlevel.TrioToken) -> None:
        self._client, self._token = client, token
        self.frames = client.frames

    def receive(self, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        return trio.from_thread.run(self._client.receive, timeout, trio_token=self._token)

    def webhook(self, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        return trio.from_thread.run(self._client.webhook, timeout, trio_token=self._token)

    def status(self, status: str, timeout: float = _FIXTURE_TIMEOUT) -> dict[str, Any]:
        return trio.from_thread.run(self._client.status, status, timeout, trio_token=self._token)


class RelayFixture(_FixtureRelay):
    """The `relay` fixture in a test without a Trio loop: the relay runs in a thread of its own;
    the helpers block."""

    def __init__(self, relay: Relay, nursery: trio.Nursery, token: trio.lowlevel.TrioToken) -> None:
        super().__init__(relay)
        self._nursery, self._token = nursery, token
        self.clients_done: set[trio.Event] = set()  # set at the end: a client left open ends too

    def _in_loop(self, call: Callable[..., Any], *args: Any) -> Any:
        _not_in_trio()
        return trio.from_thread.run_sync(call, *args, trio_token=self._token)

    def send(self, body: bytes | str = b"", path: str = "", *, bucket: str | None = None,
             headers: Mapping[str, str] | None = None, method: str = "POST") -> httpx.Response:
        """Send a webhook to a bucket's first input (the fixture's bucket by default), `path`
        after its URL; return the relay's answer."""
        _not_in_trio()
        with httpx.Client(timeout=_FIXTURE_TIMEOUT) as http:
            return http.send(self._request(body, path, bucket, headers, method))

    @contextlib.contextmanager
    def client(self, buckets: Sequence[str] | None = None, *, since: str | None = None) -> Iterator[_ThreadClient]:
        """``with relay.client() as client: frame = client.webhook()``: a socket authenticated
        with the fixture's token and subscribed to `buckets` (its bucket by default)."""
        _not_in_trio()
        done = trio.Event()

        async def hold(task_status: trio.TaskStatus[_FrameClient]) -> None:
            self.clients_done.add(done)
            try:
                async with _frame_client(self, buckets, since) as client:
                    task_status.started(client)
                    await done.wait()
            finally:
                self.clients_done.discard(done)
        client = trio.from_thread.run(self._nursery.start, hold, trio_token=self._token)
        try:
            yield _ThreadClient(client, self._token)
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(done.set, trio_token=self._token)


def _not_in_trio() -> None:
    """Refuse a blocking helper inside a Trio loop, which it would block."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return
    raise RuntimeError("this relay runs in a thread and its helpers block, but this test runs in a Trio loop "
                       "that is not pytest-trio's (anyio's?): mark the test for pytest-trio, whose tests get a "
                       "relay in their own loop, or use relay_lite.open_relay")


class _RelayThread:
    """A relay serving in a thread with its own Trio loop, until stop()."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._started = threading.Event()
        self._fixture: RelayFixture | None = None
        self._failure: BaseException | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name="relay_lite fixture", daemon=True)

    def start(self) -> RelayFixture:
        self._thread.start()
        if not self._started.wait(_FIXTURE_TIMEOUT):
            raise RuntimeError(f"the relay did not start within {_FIXTURE_TIMEOUT:g} s")
        if self._failure is not None:
            failure, self._failure = self._failure, None  # the test's now: not again at teardown
            raise failure
        assert self._fixture is not None
        return self._fixture

    def stop(self) -> BaseException | None:
        """Stop it; what went wrong in it, if anything did."""
        if self._stop is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(_FIXTURE_TIMEOUT * 2)
        if self._thread.is_alive():
            return RuntimeError(f"the relay's thread did not stop within {_FIXTURE_TIMEOUT * 2:g} s")
        return self._failure

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # a start that failed, or a crash: the test's to see, as itself
            self._failure = _innermost(error) if isinstance(error, BaseExceptionGroup) and len(
                error.exceptions) == 1 else error
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._stop, self._token = trio.Event(), trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            relay: Relay = await nursery.start(serve_relay, self._config)
            self._fixture = RelayFixture(relay, nursery, self._token)
            self._started.set()
            await self._stop.wait()
            for done in list(self._fixture.clients_done):  # a client the test left open
                done.set()
            relay.shutdown()


def _fixture_config_of(config: "Config | Mapping[str, Any] | str | Path | None") -> Config:
    """A config for relay_factory: the `relay` fixture's, or `config` with its host and port
    giving way to a free loopback port (tests run side by side)."""
    if config is None:
        return _fixture_config()
    return _prepare(config, host="127.0.0.1", port=0)[0]  # a file's errors, the machine's too, name it


def _pytest_plugin() -> types.ModuleType:
    """The pytest plugin: the `relay` and `relay_factory` fixtures (see above)."""
    import pytest

    plugin = types.ModuleType("relay_lite.pytest_plugin", "relay_lite's fixtures: relay, relay_factory")

    def in_trio_test(request: Any) -> bool:
        return request.node.get_closest_marker("trio") is not None

    @pytest.fixture
    async def _relay_lite_trio_factory() -> AsyncIterator[Callable[..., Awaitable[TrioRelayFixture]]]:
        async with trio.open_nursery() as nursery:
            made: list[Relay] = []

            async def make(config: "Config | Mapping[str, Any] | str | Path | None" = None) -> TrioRelayFixture:
                relay: Relay = await nursery.start(serve_relay, _fixture_config_of(config))
                made.append(relay)
                return TrioRelayFixture(relay)
            yield make
            for relay in made:
                relay.shutdown()

    @pytest.fixture
    async def _relay_lite_trio_relay(_relay_lite_trio_factory: Callable[..., Awaitable[TrioRelayFixture]],
                                     ) -> TrioRelayFixture:
        return await _relay_lite_trio_factory()

    @pytest.fixture
    def relay_factory(request: Any) -> Iterator[Callable[..., Any]]:
        """Start a relay of a config (a dict shaped like the TOML, a Config, or a file; none: the
        `relay` fixture's): `relay_factory(config)` returns a RelayFixture, or in a Trio test
        `await relay_factory(config)` a TrioRelayFixture. Each is stopped after the test."""
        if in_trio_test(request):  # pytest-trio sets it up in the test's loop, as the test's argument
            yield request.getfixturevalue("_relay_lite_trio_factory")
            return
        threads: list[_RelayThread] = []

        def make(config: "Config | Mapping[str, Any] | str | Path | None" = None) -> RelayFixture:
            thread = _RelayThread(_fixture_config_of(config))
            threads.append(thread)
            return thread.start()
        yield make
        failures = [failure for thread in threads if (failure := thread.stop()) is not None]  # every one stopped
        if failures:
            raise failures[0]

    @pytest.fixture
    def relay(request: Any) -> Any:
        """A relay on a free loopback port with bucket "test", an input and a token (see
        RelayFixture, and TrioRelayFixture in a Trio test)."""
        if in_trio_test(request):  # not through relay_factory: that would make this a Trio fixture
            return request.getfixturevalue("_relay_lite_trio_relay")
        return request.getfixturevalue("relay_factory")()

    for fixture in (_relay_lite_trio_factory, _relay_lite_trio_relay, relay_factory, relay):
        setattr(plugin, fixture.__name__, fixture)
    return plugin


def __getattr__(name: str) -> Any:
    """`relay_lite.pytest_plugin`, built on first use (see above)."""
    if name == "pytest_plugin":
        plugin = globals()[name] = _pytest_plugin()
        return plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- command line ----------------------------------------------------------------------------
_MOST_WORKERS = 64


def _parser() -> argparse.ArgumentParser:
    """The command line's arguments and commands, as --help shows them."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options] [COMMAND ...]",  # argparse's own shows COMMAND as if it were required
        allow_abbrev=False,  # --worker 2 must not pass for --workers 2: see _without_workers
        description="A self-hosted webhook relay: webhooks in at /v1/webhooks/<input id>, "
                    "streamed live to WebSocket clients at /v1/socket, one port.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config; without it, a demo runs")
    parser.add_argument("--host", help="address to listen on (overrides the file)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 for any (overrides the file)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="run N relays on this machine, sharing the port and the log (needs [cluster])")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line: time, level, logger, message (and exception)")
    parser.add_argument("--version", action="version", version=f"relay_lite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands (none: serve)",
                                     prog=parser.prog)  # not the usage above: "relay-lite check [-h] ..."
    init = commands.add_parser(
        "init", help="write a config file with fresh random ids and a token",
        description="Write a config file to start from: a bucket \"github\" with one input, a token, fresh random "
                    "ids and secrets, and the common settings with their defaults. Readable by its owner "
                    "only (it holds the token's secret). Then: relay-lite --config FILE.")
    init.add_argument("path", nargs="?", default="relay.toml", help="where to write it (default: relay.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = commands.add_parser(
        "check", help="check a config file, as a start or a reload would: exit 0 if it is good, 2 with its error "
                      "if not",
        description="Check a config file as a start would, before a restart or a reload (SIGHUP) uses it: the "
                    "TOML, every key and value, the TLS files, and that the [storage] database can be opened and "
                    "written. Exit 0 with a summary (and any warning), or 2 with the one-line error naming the "
                    "key.")
    check.add_argument("--config", "-c", metavar="FILE", dest="check_config", help="the file (or give --config "
                                                                                    "before the command; default: "
                                                                                    "relay.toml)")
    commands.add_parser(
        "hash-secret", help="read a token's secret on standard input (none: make one), print the secret_hash "
                            "that may replace it in the config",
        description="Hash a token's secret for the config, so the file holds no secret: read it on standard input "
                    "(at a terminal, without echo; Enter alone makes a new one, printed once), and print the "
                    "line secret_hash = \"scrypt:...\" to put in its [[tokens]] table instead of secret.")
    _forward_arguments(commands.add_parser(
        "forward", help="deliver a relay's webhooks to an app, from behind NAT",
        description="Deliver the webhooks of a relay's buckets to an app: in order, each once its "
                    "predecessor's outcome is final, resuming after a reconnect or a restart where it stopped, "
                    "and reporting each outcome to the relay (a sender held by response_from_output gets "
                    "the app's answer). Key and secret come from RELAY_KEY and RELAY_SECRET, or --key and "
                    "--secret. HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE apply to the app's requests."))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python relay_lite.py [--config FILE] [--host H] [--port P]`, or `... init [FILE]`."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.log_level != "debug":  # a line per request: the relay and the agent say what matters themselves
        logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.command == "init":
        return _init(Path(args.path), force=args.force)
    if args.command == "hash-secret":
        return _hash_secret()
    if args.command == "check":
        return _check(args.check_config or args.config, args)
    if args.command == "forward":
        return _forward(args)
    try:
        config = _with_overrides(args.config or _demo_config(ServerConfig()), args)
        _preflight_file(config, args.config or "the demo")
    except ConfigError as error:
        _fail(str(error))
        return 2
    if args.workers != 1 and _WORKER not in os.environ:  # a worker runs one relay, whatever it was given
        if not 1 <= args.workers <= _MOST_WORKERS:
            _fail(f"--workers must be 1 to {_MOST_WORKERS}")
            return 2
        if not config.cluster.redis_url or not config.server.port:
            _fail("--workers needs [cluster] redis_url (the workers share their log through "
                  "Redis) and a port other than 0")
            return 2
        return _run_workers(args.workers, sys.argv[1:] if argv is None else argv)
    reload = (lambda: _with_overrides(args.config, args)) if args.config else None
    _tune_gc()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the relay listens for it: a reload too soon is no kill
    failures: list[BaseException] = []
    storage_failures: list[BaseException] = []
    try:
        trio.run(_serve_until_signalled, config, reload)
    except* StorageError as group:
        storage_failures.append(group)
    except* OSError as group:  # nested as deep as the nurseries it crossed
        failures.append(group)
    if storage_failures:  # found only at start (its database, say, half written): named as config errors are
        _fail(f"{args.config + ': ' if args.config else ''}{_innermost(storage_failures[0])}")
        return 2
    if failures:
        failure = _innermost(failures[0])
        _fail(f"cannot listen on {config.server.host}:{config.server.port}: "
              f"{getattr(failure, 'strerror', None) or failure}")
        return 1
    return 0


class _JsonLines(logging.Formatter):
    """A log record as one JSON object on one line, for a log collector: "time" (RFC 3339, UTC,
    milliseconds), "level" (lower case), "logger", "message", and "exception" when there is one;
    a record made with extra={"fields": {...}} adds those."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                    timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)

    @staticmethod
    def chosen() -> bool:
        """Whether the command line chose JSON lines (--log-format json)."""
        return any(isinstance(handler.formatter, _JsonLines) for handler in logging.getLogger().handlers)

    @classmethod
    def line(cls, level: int, message: str, **fields: Any) -> str:
        return cls().format(logging.makeLogRecord({"name": logger.name, "levelno": level, "created": _wall_time(),
                                                   "levelname": logging.getLevelName(level), "msg": message,
                                                   "fields": fields}))


def _fail(message: str) -> None:
    """A command's last word, on stderr: `relay_lite: error: <message>`, or with --log-format
    json, one JSON object (level "error"), as every other line is then."""
    print(_JsonLines.line(logging.ERROR, message) if _JsonLines.chosen() else f"relay_lite: error: {message}",
          file=sys.stderr)


def _check(path: str | None, args: argparse.Namespace) -> int:
    """`python relay_lite.py [--host H] [--port P] check [--config FILE]`: without one,
    relay.toml, as init writes it; checked with --host and --port as a start with them would."""
    if not path:
        if not Path("relay.toml").is_file():
            _fail("no relay.toml here: give the config file, check --config FILE "
                  "(`relay-lite init` writes one)")
            return 2
        path = "relay.toml"
    try:
        config = _with_overrides(path, args)
        _preflight_file(config, path)
    except ConfigError as error:
        _fail(str(error))
        return 2
    inputs = sum(len(bucket.inputs) for bucket in config.buckets)
    outputs = sum(len(bucket.outputs) for bucket in config.buckets)
    summary = (f"{path}: good: {len(config.buckets)} bucket(s), {inputs} input(s), {outputs} output(s), "
               f"{len(config.tokens)} token(s)")
    json_lines = _JsonLines.chosen()  # with --log-format json, each line one object, as everywhere
    print(_JsonLines.line(logging.INFO, summary) if json_lines else summary)
    for problem in _advice(config):
        print(_JsonLines.line(logging.WARNING, problem) if json_lines else f"warning: {problem}")
    return 0


def _preflight_file(config: Config, path: str) -> None:
    """Whether `config`'s log's database can be used (_check_storage: what the command line asks
    beyond _prepare, which _with_overrides ran), its error naming the config's file."""
    try:
        if config.storage.path:
            _check_storage(config.storage.path)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _tune_gc() -> None:
    """Garbage collection for a long-running relay (the CLI's; an embedding program owns its own).

    Every object a socket holds is tracked by the cyclic GC, about 150 per socket. With the
    default first threshold (700 allocations) young collections catch the short-lived objects
    of pings and deliveries alive and promote them, so full collections, which walk every
    socket's objects, keep running: 4.3 % of a core while 10,000 sockets sat idle. Measured
    (tests/bench) at 2,000 and 10,000: idle 1.8-1.9 % and 1.9 %; fan-out of one webhook to
    1,000 sockets, p99 146-161 ms and 75-78 ms (its in-flight deliveries get promoted at 2,000);
    p99 at 500 webhooks/s to 10 sockets, 3-4 ms and 3-9.5 ms (a longer young collection).
    Objects made at start-up are frozen out of collections too.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])


def _init(path: Path, *, force: bool) -> int:
    if path.exists() and not force:
        _fail(f"{path} exists; pass --force to overwrite it")
        return 2
    # it holds a token's secret: the owner's only (the default, 0644, let every user of a Pi read it)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file, overwritten with --force, keeps its mode otherwise
        file.write(_config_template())
    print(f"wrote {path}: a bucket \"github\", its input and a token, with fresh random ids.\n"
          f"Run: {_command()} --config {shlex.quote(str(path))}")
    return 0


def _hash_secret() -> int:
    """`python relay_lite.py hash-secret`: a secret from standard input, or a new one, hashed."""
    if sys.stdin.isatty():
        secret = getpass.getpass("secret (Enter alone makes a new one): ")
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    made = not secret
    if made:
        secret = secrets.token_urlsafe(24)
    try:
        _check_secret(secret, "the secret")
    except ConfigError as error:
        _fail(str(error))
        return 2
    if made:
        print(f"# the token's secret, for its clients (the config keeps only its hash): {secret}")
    print(f'secret_hash = "{_SecretHash.of(secret)}"')
    return 0


def _forward_arguments(forward: argparse.ArgumentParser) -> None:
    forward.add_argument("--relay", required=True, metavar="URL", help="the relay, http(s)://host:port")
    forward.add_argument("--bucket", "-b", action="append", default=[], metavar="NAME",
                         help="a bucket to forward, by name or id; repeat for more (none: every bucket the "
                              "token may see)")
    forward.add_argument("--to", metavar="URL", default="",
                         help="the app: each webhook goes to URL followed by the path the sender added "
                              "after the input's URL (without --to: to each webhook's output destination)")
    forward.add_argument("--allow", action="append", default=[], metavar="URL-PREFIX",
                         help="deliver only to URLs at or below this one (scheme, host, port, path); repeat for "
                              "more. Without --to the relay names each destination: --allow keeps a relay that "
                              "was misconfigured or taken over from reaching the rest of this machine's network")
    forward.add_argument("--key", default=os.environ.get("RELAY_KEY", ""), help="the token's key (env RELAY_KEY)")
    forward.add_argument("--secret", default=os.environ.get("RELAY_SECRET", ""),
                         help="the token's secret (env RELAY_SECRET, which other users cannot see)")
    forward.add_argument("--state", metavar="FILE", type=Path,
                         help="the checkpoint file (default: one per relay and bucket set, in "
                              "$XDG_STATE_HOME/relay_lite or ~/.local/state/relay_lite)")
    forward.add_argument("--concurrency", type=int, default=1, metavar="N",
                         help="deliveries in flight (default 1, which keeps order)")
    forward.add_argument("--timeout", type=float, default=DEFAULT_DELIVERY_TIMEOUT, metavar="SECONDS",
                         help=f"a delivery attempt's time, the answer read (default {DEFAULT_DELIVERY_TIMEOUT:g})")
    forward.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                         help=f"attempts after the first for a connection error, 408, 425, 429 or 5xx "
                              f"(default {DEFAULT_RETRIES})")
    forward.add_argument("--insecure", action="store_true", help="do not check the app's TLS certificate")
    forward.add_argument("--cacert", metavar="FILE", help="check the app's TLS certificate against this CA file")
    forward.add_argument("--ping-timeout", type=float, default=2.5 * DEFAULT_PING_INTERVAL, metavar="SECONDS",
                         help="seconds without a frame from the relay that mean the connection is dead "
                              f"(default {2.5 * DEFAULT_PING_INTERVAL:g})")
    lines = forward.add_mutually_exclusive_group()
    lines.add_argument("--quiet", "-q", action="store_true", help="no line per webhook")
    lines.add_argument("--json", action="store_true",
                       help="a JSON object per line: each webhook's outcome, and each attempt tried again")


_REFUSED = 3  # forward's exit status when the relay refused its key or a bucket: final, no restart helps


def _forward(args: argparse.Namespace) -> int:
    """`python relay_lite.py forward --relay URL ...`: exit 0 when stopped, 2 for what it was
    told, _REFUSED when the relay refused (1 stays Python's, for a crash, which a service
    manager should restart; a refusal it should not)."""
    try:
        _relay_urls(args.relay)
        if not args.key or not args.secret:
            raise AgentError("give the token's key and secret: RELAY_KEY and RELAY_SECRET, or --key and --secret")
        for option, url in [("--to", args.to)] * bool(args.to) + [("--allow", url) for url in args.allow]:
            split = urllib.parse.urlsplit(url)
            try:
                split.port  # a number, in range
            except ValueError:
                split = split._replace(netloc="")
            if split.scheme not in ("http", "https") or not split.hostname or (
                    option == "--allow" and (split.query or split.fragment)):
                raise AgentError(f"{option} {_shown(url)}: give the app's URL, http(s)://host:port/path")
        if args.to and args.allow and not _allowed(args.to, args.allow):
            raise AgentError(f"--to {_shown(args.to)} is not under any --allow")
        if not 1 <= args.concurrency <= _MOST_CONCURRENCY:
            raise AgentError(f"--concurrency must be 1 to {_MOST_CONCURRENCY}")
        if not (args.timeout > 0 and args.ping_timeout > 0 and 0 <= args.retries <= 100):
            raise AgentError("--timeout and --ping-timeout must be above 0, --retries 0 to 100")
        if args.cacert and not Path(args.cacert).is_file():
            raise AgentError(f"--cacert {args.cacert}: no such file")
    except AgentError as error:
        _fail(str(error))
        return 2
    config = AgentConfig(
        relay=args.relay, key=args.key, secret=args.secret, buckets=tuple(args.bucket), to=args.to,
        allow=tuple(args.allow),
        state=args.state, concurrency=args.concurrency, verify=False if args.insecure else args.cacert or True,
        delivery=_Delivery(args.timeout, min(args.timeout, DEFAULT_CONNECT_TIMEOUT), args.retries),
        ping_timeout=args.ping_timeout, lines="quiet" if args.quiet else "json" if args.json else "text")
    if not config.to and not config.allow:
        logger.warning("no --to: each webhook goes where its relay names, anywhere this machine reaches; "
                       "--allow URL-PREFIX limits that")
    refusals: list[BaseException] = []
    try:
        trio.run(_until_signalled, functools.partial(forward, config), _Agent.stop)
    except* AgentError as group:
        refusals.append(group)
    if refusals:
        _fail(f"{_innermost(refusals[0])}")
        return _REFUSED
    return 0


def _with_overrides(source: "Config | str", args: argparse.Namespace) -> Config:
    """The config `source` (a file, or the demo's) with the command line's --host and --port in
    place of its own (and, in a worker that --workers started, the port shared), checked so, and
    for this machine (_prepare: its errors name the file)."""
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    return _prepare(source, **overrides, **({"reuse_port": True} if _WORKER in os.environ else {}))[0]


_WORKER_RESTART, _WORKER_RESTART_MOST = 1.0, 60.0  # seconds before a worker that died is started again


def _run_workers(count: int, argv: list[str]) -> int:
    """Run `count` relays (this command line, less --workers) sharing the port, and keep them
    running: one that dies is started again. SIGINT and SIGTERM stop them all, gracefully;
    SIGHUP reloads them all. Each is in a session of its own, so a terminal's Ctrl-C reaches
    this process only, and each worker is told once."""
    command = [sys.executable, str(Path(__file__).resolve()), *_without_workers(argv)]
    workers: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    stopping = False

    supervisor = os.getpid()

    def start(number: int) -> None:
        """Start worker `number`, with signals held meanwhile: one that came mid-start tells it too."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

        def in_the_worker() -> None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # it must not inherit the mask: it would hear no signal
            _end_with_parent(supervisor)
        try:
            workers[number] = subprocess.Popen(command, env={**os.environ, _WORKER: str(number)},
                                               start_new_session=True, preexec_fn=in_the_worker)
            started[number] = time.monotonic()  # the supervisor runs no Trio loop: its own clock
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def tell(signum: int, frame: object) -> None:
        """Pass a signal on. Only os.wait() below learns that a worker ended (Popen.poll() here
        would take an exit from under it); a pid not yet waited for is this process's still."""
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, tell)
    for number in range(count):
        start(number)
    logger.info("%d workers started (pids %s)", count, ", ".join(str(worker.pid) for worker in workers.values()))
    status = 0
    restarts = {number: 0 for number in range(count)}  # in a row, for each: the wait doubles with each
    while workers:
        try:
            pid, code = os.wait()
        except ChildProcessError:  # none left (someone else waited for them)
            break
        ended = next((number for number, worker in workers.items() if worker.pid == pid), None)
        if ended is None:
            continue
        exit_code = os.waitstatus_to_exitcode(code)
        workers.pop(ended).returncode = exit_code
        if stopping:
            continue
        if exit_code == 2:  # the config, or the log's store: starting it again would not help
            status = 2
            tell(signal.SIGTERM, None)
            continue
        if time.monotonic() - started[ended] > _WORKER_RESTART_MOST:
            restarts[ended] = 0  # it ran a good while: a new failure, not the same one again
        wait = min(_WORKER_RESTART * 2 ** restarts[ended], _WORKER_RESTART_MOST)
        restarts[ended] += 1
        logger.warning("worker %d (pid %d) ended with %s; starting it again in %g s", ended, pid, exit_code, wait)
        until = time.monotonic() + wait
        while not stopping and (left := until - time.monotonic()) > 0:  # a signal cuts the wait short
            time.sleep(min(left, 0.1))
        if not stopping:
            start(ended)
    return status


def _end_with_parent(parent: int) -> None:
    """In a worker, before it runs: be sent SIGTERM when the supervisor dies (Linux's
    PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL leaves no relay holding the port."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


def _without_workers(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


async def _serve_until_signalled(config: Config, reload: Callable[[], Config] | None) -> None:
    """Serve until SIGINT or SIGTERM: the first stops gracefully, a second stops at once. SIGHUP
    reloads the config file (`reload` reads it; None in the demo, which has none)."""

    def hang_up(relay: Relay) -> None:
        if reload is None:
            logger.warning("SIGHUP: the demo has no config file to reload")
            return
        try:
            relay.reload(reload())
        except ConfigError as error:
            logger.error("reload refused, the config in force stays: %s", error)
        except Exception as error:  # a bug; the relay goes on with the config in force
            _unexpected(relay.services.throttle, "reloading the config (the config in force stays)", error)

    await _until_signalled(functools.partial(serve_relay, config, announce=False), Relay.shutdown,
                           lambda relay: print(_banner(relay, demo=reload is None, json_line=_JsonLines.chosen()),
                                               flush=True), hang_up)


async def _until_signalled(run: Callable[..., Awaitable[None]], stop: Callable[[Any], None],
                           started: Callable[[Any], None] = lambda _: None,
                           hang_up: Callable[[Any], None] | None = None) -> None:
    """Run `run` until it returns; it is started with nursery.start, and what it reports is given
    to `started`. The first SIGINT or SIGTERM asks it to stop (calls `stop` with that), a second
    stops it at once; SIGHUP calls `hang_up`, if given."""
    wanted = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hang_up is not None else ())
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:

            async def until_done(task_status: trio.TaskStatus[Any]) -> None:
                await run(task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop listening for signals

            running = await nursery.start(until_done)
            started(running)
            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if stopping:
                        logger.info("SIGHUP received while stopping: not reloading")
                    elif hang_up is not None:
                        logger.info("SIGHUP received: reloading the config")
                        hang_up(running)
                elif stopping:
                    logger.warning("%s again: stopping now, without waiting for what is in flight", name)
                    nursery.cancel_scope.cancel()
                else:
                    logger.info("%s received: stopping once what is in flight is done (send it again to stop "
                                "at once)", name)
                    stop(running)
                    stopping = True


def _banner(relay: Relay, *, demo: bool, json_line: bool = False) -> str:
    """What the command line prints once the relay listens: its URLs, the inputs' and, in the
    demo, the token and commands to try it; as text, or as one JSON line (--log-format json)."""
    config = relay.config
    listening = f"relay_lite {__version__} listening on {relay.url} (webhooks and sockets, one port)"
    inspector = ""
    if config.inspector.enabled:  # its own host name, if it has one, at the relay's port
        inspector = (urllib.parse.urlsplit(relay.url)._replace(netloc=f"{config.inspector.host}:{relay.port}").geturl()
                     if config.inspector.host else relay.public_url) + "/"
    inputs = [(bucket.name, input_.name, relay.input_url(input_.id, public=True))
              for bucket in config.buckets for input_ in bucket.inputs]
    channels = [(bucket.name, relay.public_url + SMEE_PREFIX + bucket.smee_channel)
                for bucket in config.buckets if bucket.smee_channel]
    demo_lines: dict[str, str] = {}
    if demo:
        token, bucket, command = config.tokens[0], config.buckets[0], _command()
        demo_lines = {
            "key": token.key, "secret": token.secret,
            "send": f"curl -X POST -H 'Content-Type: application/json' -d '{{\"hello\": \"relay\"}}' "
                    f"{relay.input_url(bucket.inputs[0].id)}",
            "auth": f'{{"action":"auth","key":"{token.key}","secret":"{token.secret}"}}',
            "subscribe": f'{{"action":"subscribe","buckets":["{bucket.name}"]}}',
            "forward": f"RELAY_KEY={token.key} RELAY_SECRET={token.secret} {command} forward "
                       f"--relay {relay.url} --bucket {bucket.name} --to http://localhost:3000",
            "init": f"{command} init relay.toml && {command} --config relay.toml"}
        if bucket.smee_channel:
            demo_lines["smee"] = f"npx smee-client --url {relay.url}{SMEE_PREFIX}{bucket.smee_channel} --target " \
                                 "http://localhost:3000"
    if json_line:
        return _JsonLines.line(logging.INFO, listening, url=relay.url, socket_url=relay.socket_url,
                               **({"inspector": inspector} if inspector else {}),
                               inputs=[{"bucket": bucket, "input": name, "url": url} for bucket, name, url in inputs],
                               **({"smee_channels": [{"bucket": bucket, "url": url} for bucket, url in channels]}
                                  if channels else {}),
                               **({"demo": demo_lines} if demo else {}))
    lines = [listening, f"  socket URL: {relay.socket_url}"]
    if inspector:
        lines.append(f"  inspector:  {inspector} (sign in with a token's key and secret)")
    lines += [f"  bucket {bucket!r}, input {name!r}: {url}" for bucket, name, url in inputs]
    lines += [f"  bucket {bucket!r}, smee channel (smee-client, gosmee): {url}" for bucket, url in channels]
    if demo:
        lines += [
            "",
            "Demo mode (no --config): this bucket, input and token exist for this run only.",
            f"  key:    {demo_lines['key']}",
            f"  secret: {demo_lines['secret']}",
            "",
            "Send a webhook:",
            f"  {demo_lines['send']}",
            "Receive it: connect to the socket URL, send",
            f"  {demo_lines['auth']}",
            f"  {demo_lines['subscribe']}",
            "Or forward each webhook to your app on localhost:3000 (in a second terminal):",
            f"  {demo_lines['forward']}",
            *(["Or with smee-client (it re-encodes JSON bodies: signatures no longer match them):",
               f"  {demo_lines['smee']}"] if "smee" in demo_lines else []),
            f"For lasting ids: {demo_lines['init']}",
        ]
    lines += ["", "Ctrl-C to stop."]
    return "\n".join(lines)


def _command() -> str:
    """How relay_lite was run, for the commands it prints: its console script, or a Python and
    the module's file; each by its name if that is what PATH finds, else by its path."""
    if Path(sys.argv[0]).name == "relay-lite":
        return shlex.quote(_by_name(sys.argv[0]))
    return f"{shlex.quote(_by_name(sys.executable))} {shlex.quote(_by_name(sys.argv[0], program=False))}"


def _by_name(path: str, program: bool = True) -> str:
    """`path` by its name if PATH finds it there; else relative to the working directory if
    it is under it; else whole."""
    if not path:
        return "python3"
    name, absolute = Path(path).name, os.path.abspath(path)
    if (found := shutil.which(name)) is not None and os.path.abspath(found) == absolute:
        return name
    relative = os.path.relpath(absolute)
    if relative.startswith(".."):
        return absolute
    if program and os.sep not in relative:
        return os.path.join(".", relative)  # a bare name would be looked up on PATH
    return relative


# ==== Appendix: the web inspector's page, script and style ====================================
#
# One page at / that shows a token's webhooks live, written into the module (no build step, no
# CDN: it works offline on a Pi). It signs in over the relay's own socket protocol, as any client
# does, and reads the REST API with the token; the key and secret stay in the tab's session
# storage. Its script and style are files of their own, so the page runs under a strict
# Content-Security-Policy: nothing inline, nothing from elsewhere, no frames. It builds every
# element from text (textContent), never from markup, so a webhook's content cannot script it.

_INSPECTOR_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relay_lite inspector</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="inspector/app.css">
<script src="inspector/app.js" defer></script>
</head>
<body>
<header>
  <h1>relay_lite</h1>
  <p id="state" role="status" aria-live="polite" data-kind="idle">signed out</p>
  <button type="button" id="sign-out" hidden>Sign out</button>
</header>
<main>
  <form id="sign-in" autocomplete="off">
    <h2>Sign in with a token</h2>
    <p>The secret goes to this relay once, for a session that only reads the log and resends; this tab
      keeps the session (its session storage), never the secret.</p>
    <label>Key <input id="key" name="key" required spellcheck="false" autocapitalize="off"></label>
    <label>Secret <input id="secret" name="secret" type="password" required></label>
    <button type="submit">Sign in</button>
    <p id="sign-in-error" class="error" role="alert" hidden></p>
  </form>
  <section id="inspector" hidden>
    <div id="filters">
      <label>Bucket <select id="bucket-filter"><option value="">every bucket</option></select></label>
      <label>Status <select id="status-filter"><option value="">every status</option></select></label>
    </div>
    <div id="panes">
      <div id="list">
        <table id="webhooks">
          <caption>Webhooks, newest first</caption>
          <thead><tr><th scope="col">Time</th><th scope="col">Bucket</th><th scope="col">Method</th>
            <th scope="col">Path</th><th scope="col">Size</th><th scope="col">Status</th></tr></thead>
          <tbody id="rows"></tbody>
        </table>
        <p id="empty">No webhooks yet: send one to an input URL.</p>
        <button type="button" id="older" hidden>Load older</button>
      </div>
      <article id="detail" hidden tabindex="-1" aria-labelledby="detail-title">
        <div class="bar">
          <h2 id="detail-title"></h2>
          <button type="button" id="copy-curl">Copy as curl</button>
          <button type="button" id="resend">Resend</button>
          <button type="button" id="close-detail" aria-label="Close">Close</button>
        </div>
        <p id="detail-message" role="status"></p>
        <dl id="detail-meta"></dl>
        <h3>Headers</h3><table class="pairs" id="detail-headers"></table>
        <h3>Query</h3><pre id="detail-query"></pre>
        <h3>Body <span id="detail-body-kind" class="kind"></span></h3><pre id="detail-body"></pre>
        <h3>Answer</h3><dl id="detail-answer"></dl>
        <table class="pairs" id="detail-answer-headers"></table><pre id="detail-answer-body"></pre>
        <h3>Delivery</h3><dl id="detail-delivery"></dl>
        <h3>As a curl command</h3><pre id="detail-curl"></pre>
      </article>
    </div>
  </section>
</main>
</body>
</html>
"""

_INSPECTOR_SCRIPT = r"""// relay_lite's inspector: signs in with a token over the relay's own socket protocol, shows the
// token's webhooks live (and older ones from GET /v1/logs), and one in full. No framework, no
// build step: everything here is served by relay_lite itself, so it works offline.
'use strict';
(() => {
  const STATUSES = ['preparing', 'sent', 'failed', 'stalled', 'received', 'rejected'];
  const PAGE = 50;
  const SHOWN_BYTES = 64 * 1024;  // of a body, shown at most
  const CURL_BYTES = 1024 * 1024;  // a body beyond this is not made into a command
  const REFRESH = 5000;  // ms between reads of the newest page: changes, and entries no socket gets
  const RETRY_FIRST = 1000, RETRY_MOST = 30000;
  const $ = (id) => document.getElementById(id);
  const RENEW = 5 * 60 * 1000;  // ms between renewals of the session, which lasts 15 minutes
  const KEPT = 'relay_lite.session';  // in session storage: the key and the session, never the secret
  const state = {key: '', session: '', socket: null, live: false, retry: RETRY_FIRST, timer: 0,
                 logs: new Map(), newest: '', cursor: '', selected: '', refreshing: null, soon: 0, every: 0,
                 renewing: 0, renewed: false};

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function show(id, visible) { $(id).hidden = !visible; }

  function setState(text, kind) {
    $('state').textContent = text;
    $('state').dataset.kind = kind;
  }

  // ------------------------------------------------------------------ the REST API

  function basic(key, secret) {
    const bytes = new TextEncoder().encode(key + ':' + secret);
    return 'Basic ' + btoa(String.fromCharCode(...bytes));
  }

  async function api(path, options = {}) {
    const headers = {Authorization: basic(state.key, state.session), Accept: 'application/json'};
    if (options.body) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {...options, headers, cache: 'no-store', credentials: 'omit'});
    const text = await response.text();
    let parsed = null;
    try { parsed = JSON.parse(text); } catch (error) { parsed = {error: text}; }
    if (!response.ok) throw new Error(`${response.status}: ${(parsed && parsed.error) || response.statusText}`);
    return parsed;
  }

  // ------------------------------------------------------------------ the socket

  function socketURL() {
    const url = new URL('v1/socket', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return url.href;
  }

  function connect() {
    clearTimeout(state.timer);
    const ws = new WebSocket(socketURL());
    state.socket = ws;
    ws.addEventListener('open', () => {
      ws.send(JSON.stringify({action: 'auth', key: state.key, secret: state.session}));
    });
    ws.addEventListener('message', (event) => {
      if (ws !== state.socket) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch (error) { return; }
      onFrame(ws, frame);
    });
    ws.addEventListener('close', (event) => {
      if (ws !== state.socket) return;
      state.socket = null;
      if (!state.key) return;  // signed out meanwhile
      const wait = state.retry;
      state.retry = Math.min(state.retry * 2, RETRY_MOST);
      setState(`${state.live ? 'reconnecting' : 'connecting'} in ${Math.round(wait / 1000)} s `
               + `(${event.reason || 'connection lost'})`, 'warn');
      state.timer = setTimeout(connect, wait * (0.8 + Math.random() * 0.4));
    });
  }

  function onFrame(ws, frame) {
    if (frame.type === 'webhook') {
      arrived(frame);
      return;
    }
    if (frame.type !== 'status') return;
    if (frame.status === 'authenticated' && state.renewed) {
      state.renewed = false;  // the socket took the renewed session: its watch goes on
    } else if (frame.status === 'authenticated') {
      // "observe": a watcher; what it is sent stays "received" for the logs (relay_lite's own field)
      const subscribe = {action: 'subscribe', buckets: [], observe: true};
      if (state.live && state.newest) subscribe.since = state.newest;  // a reconnect: what came meanwhile first
      ws.send(JSON.stringify(subscribe));
    } else if (frame.status === 'unauthorized' && /try again/.test(frame.message || '')) {
      setState(`connecting: ${frame.message}`, 'warn');  // busy, or too many failures here: the relay
      // closes the socket, and the page connects again after a while
    } else if (frame.status === 'unauthorized') {  // the session ended: the token changed, or it expired
      ws.close();
      signedOut('the relay no longer takes this session (its token changed or was removed, or it expired)');
    } else if (frame.status === 'subscribed') {
      state.retry = RETRY_FIRST;
      setState('connected: live', 'ok');
      if (!state.live) signedIn();
      else if (!state.newest) reload();  // it had none to resume from: the list again, from the log
    } else if (frame.status === 'ping') {
      ws.send(JSON.stringify({action: 'pong'}));
    } else if (frame.status === 'error' && /^unknown resume point/.test(frame.message || '')) {
      ws.send(JSON.stringify({action: 'subscribe', buckets: [], observe: true}));  // from now, and the list again
      reload();
    } else if (frame.status === 'history_gap') {
      reload();  // some it had are gone, or some it lacks: the list as the relay has it now
    } else if (frame.status === 'error') {
      setState(`connected: ${frame.message}`, 'warn');
    }
  }

  // ------------------------------------------------------------------ signing in and out

  // Signing in asks the relay for a session (POST inspector/session with the key and secret): the
  // secret is forgotten at once, and the session, which can only read the log and resend, is what
  // the page keeps and sends. A script on this origin could read it, never the secret.
  async function signIn(key, secret) {
    clearInterval(state.every);
    show('sign-in-error', false);
    setState('signing in…', 'busy');
    for (let wait = RETRY_FIRST; ; wait = Math.min(wait * 2, RETRY_MOST)) {
      let response;
      try {
        response = await fetch('inspector/session', {method: 'POST', cache: 'no-store', credentials: 'omit',
                                                     headers: {Authorization: basic(key, secret)}});
      } catch (error) {
        signInFailed(`the relay cannot be reached (${error.message})`);
        return;
      }
      const text = await response.text();
      let answer = {};
      try { answer = JSON.parse(text); } catch (error) { answer = {error: text}; }
      if (response.ok) {
        start(answer.key, answer.session);
        return;
      }
      const after = Number(response.headers.get('Retry-After')) || 0;
      if (response.status !== 503) {  // a wrong key or secret (401), or too many of them here (429)
        signInFailed(response.status === 429 ? `too many failed sign-ins from this address: try again in ${after} s`
                                             : answer.error || `${response.status} ${response.statusText}`);
        return;
      }
      const seconds = Math.max(after, Math.round(wait / 1000));  // busy checking secrets: not a wrong one
      setState(`the relay is busy checking secrets: trying again in ${seconds} s`, 'warn');
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    }
  }

  function start(key, session) {
    state.key = key;
    state.session = session;
    state.live = false;
    sessionStorage.setItem(KEPT, JSON.stringify({key, session}));
    $('secret').value = '';
    clearInterval(state.renewing);
    state.renewing = setInterval(renew, RENEW);
    connect();
  }

  async function renew() {
    try {
      const session = await api('inspector/session', {method: 'POST'});
      state.session = session.session;
      sessionStorage.setItem(KEPT, JSON.stringify({key: state.key, session: state.session}));
      if (state.live && state.socket && state.socket.readyState === WebSocket.OPEN) {  // else it connects with it
        state.renewed = true;  // the relay ends a socket whose session expired
        state.socket.send(JSON.stringify({action: 'auth', key: state.key, secret: state.session}));
      }
    } catch (error) {
      if (/^(401|403):/.test(error.message)) signedOut('the session ended: sign in again');
    }
  }

  function signInFailed(message) {
    forget();
    $('sign-in-error').textContent = `Sign-in failed: ${message}`;
    show('sign-in-error', true);
    $('key').focus();
  }

  function signedOut(message) {
    forget();
    $('sign-in-error').textContent = `Signed out: ${message}`;
    show('sign-in-error', true);
  }

  function forget() {
    clearInterval(state.every);
    clearInterval(state.renewing);
    clearTimeout(state.timer);
    const socket = state.socket;
    state.key = state.session = '';
    state.live = false;
    state.socket = null;
    if (socket) socket.close();
    sessionStorage.removeItem(KEPT);
    setState('signed out', 'idle');
    show('inspector', false);
    show('sign-out', false);
    show('sign-in', true);
  }

  async function signedIn() {
    state.live = true;
    show('sign-in', false);
    show('inspector', true);
    show('sign-out', true);
    try {
      const buckets = await api('v1/buckets');
      const select = $('bucket-filter');
      for (const bucket of buckets) {
        const option = el('option', bucket.name);
        option.value = bucket.id;
        select.append(option);
      }
    } catch (error) {
      setState(`connected: live; the bucket list failed: ${error.message}`, 'warn');
    }
    await reload();
    state.every = setInterval(refresh, REFRESH);
  }

  function signOut() {
    sessionStorage.removeItem(KEPT);
    location.reload();
  }

  // ------------------------------------------------------------------ the list

  function filters() {
    return {bucket: $('bucket-filter').value, status: $('status-filter').value};
  }

  function matches(log) {
    const {bucket, status} = filters();
    return (!bucket || log.bucket_id === bucket) && (status === '' || String(log.status) === status);
  }

  async function reload() {
    state.cursor = '';
    state.logs.clear();
    $('rows').replaceChildren();
    await older();
    if (state.live) setState('connected: live', 'ok');
  }

  function query(cursor) {
    const {bucket, status} = filters();
    const query = new URLSearchParams({limit: String(PAGE)});
    if (bucket) query.set('bucket', bucket);
    if (status) query.set('status', status);
    if (cursor) query.set('cursor', cursor);
    return `v1/logs?${query}`;
  }

  async function older() {
    try {
      const page = await api(query(state.cursor));
      for (const log of page.data) place(log);
      state.cursor = page.next_cursor || '';  // a page may stop short of PAGE (its bytes): go on from there
    } catch (error) {
      setState(`loading webhooks failed: ${error.message}`, 'warn');
    }
    show('older', Boolean(state.cursor));
    show('empty', $('rows').children.length === 0);
  }

  // The list follows the log: a frame says something came, and the newest pages are read again
  // (at most one read at a time, a burst of frames makes one); every REFRESH ms too, for what no
  // socket is sent (a public output's webhooks, refused ones) and for changes (a status, an answer).
  function arrived(frame) {
    const id = frame.meta && frame.meta.id;
    if (id && id > state.newest) state.newest = id;
    if (!state.soon) state.soon = setTimeout(() => { state.soon = 0; refresh(); }, 100);
  }

  async function refresh() {
    if (state.refreshing) return state.refreshing;
    state.refreshing = (async () => {
      try {
        let cursor = '';
        for (let pages = 0; pages < 10; pages++) {  // back to what it holds already
          const page = await api(query(cursor));
          const reached = page.data.some((log) => state.logs.has(log.id));  // what it held already
          for (const log of page.data) place(log);
          cursor = page.next_cursor || '';
          if (!cursor || reached) break;
        }
      } catch (error) {
        setState(`reading the log failed: ${error.message}`, 'warn');
      } finally {
        state.refreshing = null;
      }
    })();
    return state.refreshing;
  }

  const decoded = new WeakMap();  // a log's body as bytes, decoded once

  function bodyBytes(log) {
    if (!decoded.has(log)) {
      decoded.set(log, log.body_encoding === 'base64' ? Uint8Array.from(atob(log.body), (c) => c.charCodeAt(0))
                                                       : new TextEncoder().encode(log.body || ''));
    }
    return decoded.get(log);
  }

  function size(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  function statusName(log) { return STATUSES[log.status] || String(log.status); }

  function row(log) {
    const tr = el('tr');
    tr.dataset.id = log.id;
    tr.dataset.status = statusName(log);
    const when = new Date(log.received_at * 1000);
    const time = el('td');
    const open = el('button', when.toLocaleTimeString(), 'open');
    open.type = 'button';
    open.title = when.toISOString();
    open.setAttribute('aria-label', `open the ${log.method} webhook of ${when.toLocaleString()}`);
    time.append(open);
    tr.append(time, el('td', log.bucket_name, 'bucket'), el('td', log.method, 'method'),
              el('td', log.extra_path || '/', 'path'), el('td', size(bodyBytes(log).length), 'size'),
              el('td', statusName(log), `status status-${statusName(log)}`));
    return tr;
  }

  function place(log) {
    // One row per entry, newest first (ids sort in arrival order), however they came.
    if (log.id > state.newest) state.newest = log.id;
    const known = state.logs.has(log.id);
    state.logs.set(log.id, log);
    const old = known && $('rows').querySelector(`tr[data-id="${CSS.escape(log.id)}"]`);
    if (old) {  // changed in place, if at all: a row replaced would lose the keyboard's focus
      const status = statusName(log);
      if (old.dataset.status !== status) {
        old.dataset.status = status;
        const cell = old.querySelector('td.status');
        cell.textContent = status;
        cell.className = `status status-${status}`;
      }
      return;
    }
    if (!matches(log)) return;
    const after = Array.from($('rows').children).find((tr) => tr.dataset.id < log.id);
    $('rows').insertBefore(row(log), after || null);
    show('empty', false);
  }

  // ------------------------------------------------------------------ one webhook

  function hexDump(bytes) {
    const lines = [];
    for (let offset = 0; offset < bytes.length; offset += 16) {
      const chunk = Array.from(bytes.slice(offset, offset + 16));
      const hex = chunk.map((b) => b.toString(16).padStart(2, '0')).join(' ');
      const text = chunk.map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
      lines.push(`${offset.toString(16).padStart(8, '0')}  ${hex.padEnd(47)}  |${text}|`);
    }
    return lines.join('\n');
  }

  function bodyView(whole) {
    const bytes = whole.subarray(0, SHOWN_BYTES);
    const cut = whole.length > SHOWN_BYTES ? `\n… the first ${size(SHOWN_BYTES)} of ${size(whole.length)} shown` : '';
    const [kind, text] = bodyText(bytes, whole.length > SHOWN_BYTES);
    return [kind, text + cut];
  }

  function bodyText(bytes, partial) {
    let text;
    try {
      text = new TextDecoder('utf-8', {fatal: !partial}).decode(bytes);  // a cut may split a character
    } catch (error) {
      return ['binary, hex', hexDump(bytes)];
    }
    if (/[\u0000-\u0008\u000e-\u001f\u007f]/.test(text)) return ['binary, hex', hexDump(bytes)];
    if (text === '') return ['empty', ''];
    if (partial) return ['text', text];
    try {
      return ['JSON', JSON.stringify(JSON.parse(text), null, 2)];
    } catch (error) {
      return ['text', text];
    }
  }

  function pairs(table, headers) {
    table.replaceChildren();
    for (const [name, values] of Object.entries(headers || {})) {
      for (const value of [].concat(values)) {
        const tr = el('tr');
        tr.append(el('th', name), el('td', value));
        table.append(tr);
      }
    }
  }

  function terms(list, entries) {
    list.replaceChildren();
    for (const [term, value] of entries) {
      if (value === '' || value === undefined || value === null) continue;
      list.append(el('dt', term), el('dd', String(value)));
    }
  }

  function quoted(text) {  // for any POSIX shell: single quotes, and each ' as '\''
    return `'${text.replace(/'/g, "'\\''")}'`;
  }

  function curl(log) {
    // The webhook as the sender sent it: its own headers (an output may have replaced some),
    // the raw path and query (not through URL(), which would rewrite a "\\" or drop a "#"),
    // and the body on curl's standard input, from printf: an argument could not hold a NUL byte
    // or a large body, and one starting with "@" would make curl read a file of the user's.
    const bytes = bodyBytes(log);
    if (bytes.length > CURL_BYTES) return `(the body, ${size(bytes.length)}, is too large to copy as a command)`;
    const base = location.origin + location.pathname.replace(/[^/]*$/, '');
    const target = `${base}v1/webhooks/${log.input_id}${log.extra_path || ''}${log.raw_query ? `?${log.raw_query}` : ''}`;
    const parts = ['curl', '--globoff'];  // no [1-9] or {a,b} ranges in the URL
    parts.push(...(log.method === 'HEAD' ? ['--head'] : ['-X', quoted(log.method)]), quoted(target));
    const headers = log.request_headers || log.headers || {};
    const names = new Set(Object.keys(headers).map((name) => name.toLowerCase()));
    for (const [name, values] of Object.entries(headers)) {
      if (name.toLowerCase() === 'content-length') continue;
      for (const value of [].concat(values)) parts.push('-H', quoted(value === '' ? `${name};` : `${name}: ${value}`));
    }
    for (const name of ['User-Agent', 'Accept']) {  // curl's own, unless the sender sent them
      if (!names.has(name.toLowerCase())) parts.push('-H', quoted(`${name}:`));
    }
    if (!bytes.length) return parts.join(' ');
    if (!names.has('content-type')) parts.push('-H', quoted('Content-Type:'));  // not curl's form type
    const plain = (b) => b >= 0x20 && b < 0x7f && b !== 0x27 && b !== 0x5c && b !== 0x25;
    const octal = (b) => '\\' + b.toString(8).padStart(3, '0');
    const format = Array.from(bytes, (b) => (plain(b) ? String.fromCharCode(b) : octal(b)));
    return `printf '${format.join('')}' | ${parts.join(' ')} --data-binary @-`;
  }

  async function open(id) {
    let log = state.logs.get(id);
    try {
      log = await api(`v1/logs/${encodeURIComponent(id)}`);
      place(log);
    } catch (error) {
      if (!log) return;
    }
    state.selected = id;
    for (const tr of document.querySelectorAll('#rows tr')) tr.toggleAttribute('aria-current', tr.dataset.id === id);
    render(log, '');
    show('detail', true);
    $('detail').focus();
  }

  function render(log, message) {
    $('detail-title').textContent = `${log.method} ${log.extra_path || '/'}`;
    $('detail-message').textContent = message;
    const received = new Date(log.received_at * 1000).toISOString();
    terms($('detail-meta'), [['id', log.id], ['bucket', log.bucket_name], ['input', log.input_name],
                             ['output', log.output_name], ['received', received], ['from', log.ip_address],
                             ['status', statusName(log)], ['resent from', log.resent_from]]);
    pairs($('detail-headers'), log.headers);
    $('detail-query').textContent = log.raw_query || '(none)';
    const [kind, text] = bodyView(bodyBytes(log));
    $('detail-body-kind').textContent = `(${kind}, ${size(bodyBytes(log).length)})`;
    $('detail-body').textContent = text;
    const answered = log.status_code || (log.response_body && log.response_body.length);
    terms($('detail-answer'), answered ? [['status code', log.status_code], ['after', `${log.duration_ms} ms`]]
                                       : [['answer', 'none (yet)']]);
    pairs($('detail-answer-headers'), answered ? log.response_headers : {});
    $('detail-answer-body').textContent = answered ? bodyView(Uint8Array.from(log.response_body || []))[1] : '';
    terms($('detail-delivery'), [['to', log.output_destination || (log.internal ? 'its subscribers: sockets, smee streams' : '')],
                                 ['attempts', answered ? (log.retries || 0) + 1 : log.retries || ''],
                                 ['outcome', statusName(log)],
                                 ['last update', new Date(log.updated_at * 1000).toISOString()]]);
    $('detail-curl').textContent = curl(log);
    $('resend').disabled = log.status === STATUSES.indexOf('rejected');
  }

  function closeDetail() {
    show('detail', false);
    const button = document.querySelector(`tr[data-id="${CSS.escape(state.selected)}"] button`);
    state.selected = '';
    if (button) button.focus();
  }

  async function copyCurl() {
    const command = $('detail-curl').textContent;
    try {
      await navigator.clipboard.writeText(command);
      $('detail-message').textContent = 'curl command copied';
    } catch (error) {  // no clipboard outside a secure context: select it for Ctrl-C
      const range = document.createRange();
      range.selectNodeContents($('detail-curl'));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      $('detail-message').textContent = 'curl command selected: press Ctrl-C (or ⌘-C) to copy it';
    }
  }

  async function resend() {
    const id = state.selected;
    $('resend').disabled = true;
    try {
      const log = await api(`v1/logs/${encodeURIComponent(id)}/action`, {method: 'POST',
                                                                      body: JSON.stringify({action: 'resend'})});
      place(log);
      $('detail-message').textContent = `resent as ${log.id}`;
    } catch (error) {
      $('detail-message').textContent = `resend failed: ${error.message}`;
    } finally {
      const shown = state.logs.get(state.selected);  // another may be open by now
      $('resend').disabled = Boolean(shown && shown.status === STATUSES.indexOf('rejected'));
    }
  }

  // ------------------------------------------------------------------ wiring

  document.addEventListener('DOMContentLoaded', () => {
    const select = $('status-filter');
    STATUSES.forEach((name, number) => {
      const option = el('option', name);
      option.value = String(number);
      select.append(option);
    });
    $('sign-in').addEventListener('submit', (event) => {
      event.preventDefault();
      signIn($('key').value.trim(), $('secret').value);
    });
    $('sign-out').addEventListener('click', signOut);
    $('bucket-filter').addEventListener('change', reload);
    $('status-filter').addEventListener('change', reload);
    $('older').addEventListener('click', older);
    $('rows').addEventListener('click', (event) => {
      const tr = event.target.closest('tr[data-id]');
      if (tr) open(tr.dataset.id);
    });
    $('close-detail').addEventListener('click', closeDetail);
    $('copy-curl').addEventListener('click', copyCurl);
    $('resend').addEventListener('click', resend);
    document.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && !$('detail').hidden) closeDetail();
    });
    sessionStorage.removeItem('relay_lite.token');  // an older inspector kept the secret itself
    const kept = sessionStorage.getItem(KEPT);
    if (kept) {
      try {
        const {key, session} = JSON.parse(kept);
        start(key, session);
        renew();  // it may have been away a while
      } catch (error) {
        sessionStorage.removeItem(KEPT);
      }
    }
  });
})();
"""

_INSPECTOR_STYLE = r""":root { color-scheme: light dark; --line: #8884; --accent: #2563eb; --ok: #15803d; --warn: #b45309; --bad: #b91c1c;
        font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; }
header { display: flex; align-items: center; gap: 1rem; padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.1rem; margin: 0; }
#state { margin: 0 auto 0 0; font-size: .9rem; }
#state::before { content: "\25CF  "; }
#state[data-kind="ok"]::before { color: var(--ok); }
#state[data-kind="warn"]::before, #state[data-kind="busy"]::before { color: var(--warn); }
#state[data-kind="idle"]::before { color: gray; }
main { padding: 1rem; }
button, input, select { font: inherit; }
button { cursor: pointer; border: 1px solid var(--line); border-radius: 6px; padding: .3rem .7rem;
         background: transparent; color: inherit; }
button:hover { border-color: var(--accent); }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
#sign-in { max-width: 26rem; margin: 2rem auto; display: grid; gap: .8rem; }
#sign-in label { display: grid; gap: .2rem; }
#sign-in input { padding: .4rem; border: 1px solid var(--line); border-radius: 6px; background: transparent;
                 color: inherit; }
.error { color: var(--bad); }
#filters { display: flex; flex-wrap: wrap; gap: 1rem; margin-bottom: .8rem; }
#panes { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.2fr); gap: 1rem; align-items: start; }
#panes:has(#detail[hidden]) { grid-template-columns: minmax(0, 1fr); }
table { border-collapse: collapse; width: 100%; }
caption { text-align: left; font-weight: 600; padding-bottom: .4rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
#webhooks td.path { word-break: break-all; }
#webhooks tr[aria-current] { background: #2563eb22; }
#webhooks td.size { white-space: nowrap; }
#webhooks button.open { border: 0; padding: 0; text-decoration: underline; color: var(--accent); }
.status-failed, .status-rejected { color: var(--bad); }
.status-stalled { color: var(--warn); }
.status-sent { color: var(--ok); }
#detail { border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; position: sticky; top: 1rem;
          max-height: calc(100vh - 2rem); overflow: auto; }
#detail .bar { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; }
#detail .bar h2 { margin: 0 auto 0 0; font-size: 1.05rem; word-break: break-all; }
#detail h3 { font-size: .95rem; margin: 1rem 0 .3rem; }
.kind { font-weight: normal; color: gray; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .15rem .8rem; margin: 0; }
dt { color: gray; }
dd { margin: 0; word-break: break-all; }
pre { margin: 0; padding: .5rem; background: #8881; border-radius: 6px; overflow: auto; max-height: 24rem;
      white-space: pre-wrap; word-break: break-all; font: 13px/1.4 ui-monospace, "SF Mono", Menlo, Consolas, monospace; }
table.pairs th { font-weight: 600; white-space: nowrap; }
table.pairs td { word-break: break-all; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
#older { margin-top: .8rem; }
@media (max-width: 700px) {
  header { flex-wrap: wrap; }
  #panes { grid-template-columns: minmax(0, 1fr); }
  #webhooks th:nth-child(5), #webhooks td:nth-child(5), #webhooks th:nth-child(2), #webhooks td:nth-child(2) { display: none; }
  #detail { position: fixed; inset: 0; top: 0; max-height: none; border-radius: 0; background: Canvas; z-index: 1; }
}
"""

if __name__ == "__main__":
    sys.exit(main())
