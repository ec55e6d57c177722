"""Configuration: TOML to checked, frozen dataclasses, and clear errors. No sockets."""

import argparse
import dataclasses
import json
import logging
import resource
import socket
import subprocess
import sys

import httpx
import pytest
import trio_websocket

import relay_lite
from relay_lite import ConfigError, load_config

MINIMAL = """
[[tokens]]
key = "k"
secret = "secret-s-0123456789"

[[buckets]]
name = "github"
"""


def write(tmp_path, text):
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    connections = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64, 20_000)
    assert config.server == relay_lite.ServerConfig(max_connections=connections,
                                                    max_pending_per_ip=min(connections // 8, 256),
                                                    max_body_bytes_in_flight=64 * 2**20)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.max_body_size == 10 * 2**20
    assert config.tokens[0].buckets is None
    (bucket,) = config.buckets
    (input_,) = bucket.inputs  # a bucket without inputs gets one
    assert input_.name == "Default public endpoint"
    with pytest.raises(dataclasses.FrozenInstanceError):
        bucket.name = "other"


def test_absent_ids_are_stable_across_loads(tmp_path):
    first = load_config(write(tmp_path, MINIMAL))
    second = load_config(write(tmp_path, MINIMAL))
    assert first.buckets[0].id and first.buckets[0].inputs[0].id
    assert first.buckets[0].id == second.buckets[0].id
    assert first.buckets[0].inputs[0].id == second.buckets[0].inputs[0].id
    assert first.buckets[0].id != first.buckets[0].inputs[0].id


def test_the_issue_example_loads(tmp_path):
    config = load_config(write(tmp_path, """
[server]
host = "127.0.0.1"
port = 8080
ping_interval = 30
auth_timeout = 10
max_body_size = 10485760
public_url = "https://relay.example.com"

[[tokens]]
key = "k"
secret = "secret-s-0123456789"
buckets = ["github"]

[[buckets]]
id = "1593fe5f-45f9-45cc-ba23-675fdc7c1638"
name = "github"
  [[buckets.inputs]]
  id = "b90f2fe9-621d-4290-9e74-edd5b61325dd"
  name = "Default public endpoint"
  [[buckets.outputs]]
  name = "local"
  destination = "http://localhost:8080"
  internal = true
"""))
    assert config.server.ping_interval == 30.0 and isinstance(config.server.ping_interval, float)
    assert config.tokens[0].buckets == ("github",)
    assert config.buckets[0].outputs[0] == relay_lite.OutputConfig("local", "http://localhost:8080", True)


def test_init_template_loads_with_fresh_ids():
    first, second = relay_lite._config_template(), relay_lite._config_template()
    assert first != second
    config = load_config(__import__("tomllib").loads(first))
    assert config.buckets[0].name == "github" and len(config.tokens) == 1


@pytest.mark.parametrize("text, message", [
    ("[server\nport = 1", "relay.toml: not valid TOML"),
    ("[server]\nprot = 1", "relay.toml: server.prot: unknown key"),
    ("[server]\nport = '8080'", "relay.toml: server.port: expected an integer, got a string ('8080')"),
    ("[server]\nport = true", "server.port: expected an integer, got a boolean"),
    ("[server]\nport = 70000", "server.port: must be 0 to 65535"),
    ("[server]\nping_interval = 0", "server.ping_interval: must be positive"),
    ("[server]\nping_interval = nan", "server.ping_interval: must be positive"),
    ("[server]\npublic_url = 'relay.example.com'", "server.public_url: must start with http"),
    ("server = 5", "server: expected a table, got an integer"),
    ("[[tokens]]\nkey = 'k'", "tokens[0].secret: missing"),
    ("[[tokens]]\nkey = 'k'\nsecret = 'secret-s-0123456789'\nbuckets = 'github'", "tokens[0].buckets: expected an array"),
    ("[[tokens]]\nkey = 'k'\nsecret = 'secret-s-0123456789'\nbuckets = ['nope']", "tokens[0].buckets[0]: no bucket is named"),
    ("[[tokens]]\nkey = 'k'\nsecret = 'secret-s-0123456789'\nbuckets = []", "tokens[0].buckets: is empty"),
    ("[[tokens]]\nkey = 'k'\nsecret = 'secret-s-0123456789'\n[[tokens]]\nkey = 'k'\nsecret = 'secret-t-0123456789'",
     "tokens[1].key: 'k' is already used by tokens[0].key"),
    ("[[buckets]]\nname = 'a'\n[[buckets]]\nname = 'a'", "buckets[1].name: 'a' is already used by buckets[0].name"),
    ("[[buckets]]\nname = 'a'\nid = 'x'\n[[buckets]]\nname = 'b'\nid = 'x'", "buckets[1].id: 'x' is already used"),
    ("[[buckets]]\nname = 'a'\n[[buckets]]\nname = 'b'\nid = 'a'", "buckets[1].id: 'a' is already used"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nid = 'i'\n[[buckets]]\nname = 'b'\n[[buckets.inputs]]\nid = 'i'",
     "buckets[1].inputs[0].id: 'i' is already used by buckets[0].inputs[0].id"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nid = 'a/b'", "buckets[0].inputs[0].id: must be a single URL path"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nnmae = 'x'", "buckets[0].inputs[0].nmae: unknown key"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'o'\ninternal = 'yes'",
     "buckets[0].outputs[0].internal: expected true or false, got a string ('yes')"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'o'\n[[buckets.outputs]]\nname = 'o'",
     "buckets[0].outputs[1].name: 'o' is already used in this bucket"),
    ("[[buckets]]\nid = 'x'", "buckets[0].name: missing"),
    ("[server]\nhistory_size = 0", "server.history_size: must be positive, got 0"),
    ("[server]\nsend_queue_bytes = 0", "server.send_queue_bytes: must be positive, got 0"),
    ("[[buckets]]\nname = 'a'\nhistory_ttl = -1", "buckets[0].history_ttl: must be positive, got -1"),
    ("[storage]\nfile = 'x.db'", "storage.file: unknown key (known keys: path)"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nstatus_code = 700", "buckets[0].inputs[0].status_code: must be 200"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nheaders = 'x'", "buckets[0].inputs[0].headers: expected a table"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nheaders = {X = 1}",
     "buckets[0].inputs[0].headers.X: expected a string, got an integer (1)"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nheaders = {'X Y' = 'v'}",
     "buckets[0].inputs[0].headers: 'X Y' is not a header name"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nheaders = {X = \"a\\nb\"}",
     "buckets[0].inputs[0].headers.X: must be printable text on one line"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nresponse_from_output = 'p'\n"
     "[[buckets.outputs]]\nname = 'p'\ndisabled = true",
     "buckets[0].inputs[0].response_from_output: 'p' is not an enabled output"),
    ("[[buckets]]\nname = 'a'\n[[buckets.inputs]]\nresponse_from_output = 'anyOutput'\n"
     "[[buckets.outputs]]\nname = 'p'\ndisabled = true",
     "buckets[0].inputs[0].response_from_output: the bucket has no enabled output, so none can answer"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'p'\ninternal = false\ndestination = 'localhost'",
     "buckets[0].outputs[0].destination: a public output is delivered to by the relay: give an http:// or https://"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'p'\nretries = 101", "outputs[0].retries: must be 0 to 100"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'p'\nconcurrency = 0", "outputs[0].concurrency: must be 1"),
    ("[[buckets]]\nname = 'a'\n[[buckets.outputs]]\nname = 'p'\nheaders = {'X Y' = 'v'}",
     "buckets[0].outputs[0].headers: 'X Y' is not a header name"),
])
def test_errors_name_the_file_the_key_and_the_fault(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "relay.toml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_dict_and_config_sources_agree(tmp_path):
    from_file = load_config(write(tmp_path, MINIMAL))
    from_dict = load_config({"tokens": [{"key": "k", "secret": "secret-s-0123456789"}], "buckets": [{"name": "github"}]})
    assert from_dict == from_file
    assert load_config(from_dict) == from_dict


def test_history_bounds_default_from_server_and_are_set_per_bucket(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + """
[[buckets]]
name = "busy"
history_size = 50000
history_ttl = 3600
"""))
    github, busy = config.buckets
    assert (github.history_size, github.history_ttl, github.history_bytes) == (1000, 86400.0, 64 * 2**20)
    assert (busy.history_size, busy.history_ttl, busy.history_bytes) == (50000, 3600.0, 64 * 2**20)
    assert config.storage.path == ""


def test_inputs_answer_options(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + """
[[buckets.inputs]]
name = "slack"
status_code = 202
body = "working on it"
headers = { "Content-Type" = "text/plain" }
response_from_output = "anyOutput"
response_timeout = 3
"""))
    input_ = config.buckets[0].inputs[0]
    assert (input_.status_code, input_.body, input_.headers) == (202, "working on it", {"Content-Type": "text/plain"})
    assert (input_.response_from_output, input_.response_timeout) == ("anyOutput", 3.0)
    assert relay_lite.InputConfig().headers == {} and relay_lite.InputConfig().status_code == 200


@pytest.mark.parametrize("secret, complaint", [
    ("...", "looks like a placeholder"),  # the README's placeholder
    ("s", "too easy to guess"),
    ("0123456789abcde", "too easy to guess"),  # 15 characters
    ("aaaaaaaaaaaaaaaaaaaaaaaa", "too easy to guess"),
    ("abababababababababab12", "too easy to guess"),
    ("please-change-me-0123456789", "looks like a placeholder"),
    ("<your-relay-token-secret>", "looks like a placeholder"),
    ("a-long-secret-and-then...", "looks like a placeholder"),
])
def test_weak_and_placeholder_secrets_are_refused_beyond_loopback(tmp_path, secret, complaint):
    """Issue 9, finding 7: a one-character secret, or the README's placeholder, was accepted."""
    with pytest.raises(ConfigError) as caught:
        load_config({"server": {"host": "0.0.0.0"}, "tokens": [{"key": "k", "secret": secret}]})
    assert str(caught.value).startswith("tokens[0].secret: ") and complaint in str(caught.value)
    assert "relay-lite init" in str(caught.value)
    if complaint == "looks like a placeholder":  # never what anyone meant, on any address
        with pytest.raises(ConfigError, match=complaint):
            load_config({"tokens": [{"key": "k", "secret": secret}]})


def can_listen_on(host: str) -> bool:
    try:
        with socket.create_server((host, 0)):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
async def test_on_loopback_a_weak_secret_is_accepted_with_one_warning(host, caplog):
    """A test fixture or an embedded relay on loopback refused secret = "s" with a traceback,
    and warned that inputs without ids are guessable; nobody but this machine can reach it
    (issue 21, finding 7)."""
    if not can_listen_on(host):
        pytest.skip(f"this machine cannot listen on {host}")
    config = {"server": {"host": host, "port": 0}, "tokens": [{"key": "k", "secret": "s"}, {"key": "j", "secret": "t"}],
              "metrics": {"enabled": True, "token": "m"}, "buckets": [{"name": "b", "inputs": [{}, {"name": "x"}]}]}
    with caplog.at_level(logging.WARNING, logger="relay_lite"):
        async with relay_lite.open_relay(config) as relay:
            async with httpx.AsyncClient() as http:
                assert (await http.get(relay.url + "/v1/buckets", auth=("k", "s"))).status_code == 200
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == [f"tokens[0].secret, tokens[1].secret, metrics.token: too easy to guess, accepted because the "
                        f"relay listens on loopback ({host}) only, and serves only requests to a loopback host; on any "
                        "other address, or behind a proxy (trusted_proxies, public_url), it is refused"]
    with pytest.raises(ConfigError, match=r"tokens\[0\].secret: too easy to guess"):
        load_config({**config, "server": {"host": "0.0.0.0"}})
    for proxied in ({"trusted_proxies": ["127.0.0.1"]}, {"public_url": "https://relay.example.com"}):  # and a name:
        with pytest.raises(ConfigError, match=r"tokens\[0\].secret: too easy to guess"):  # the world reaches it
            load_config({**config, "server": {"host": host, **proxied}})
    with pytest.raises(ConfigError, match=r"tokens\[0\].secret: too easy to guess"):
        load_config({**config, "inspector": {"host": "inspect.example.com"}})
    with pytest.raises(ConfigError, match=r"tokens\[0\].secret: too easy to guess"):  # the command line's --host
        relay_lite._with_overrides(load_config(config), argparse.Namespace(host="0.0.0.0", port=None))
    with pytest.raises(ConfigError, match=r"tokens\[0\].secret: too easy to guess"):  # serve_relay's host
        async with relay_lite.open_relay(config, host="0.0.0.0"):
            pass  # pragma: no cover
    beyond = {**config, "server": {"host": "0.0.0.0", "port": 0}}  # a file for elsewhere, served on loopback
    assert relay_lite.load_config({**beyond, "server": {"host": "127.0.0.1"}}).tokens[0].secret == "s"
    async with relay_lite.open_relay(beyond, host="127.0.0.1"):
        pass


def test_beyond_loopback_each_input_without_an_id_is_warned_of():
    config = load_config({"server": {"host": "0.0.0.0"}, "buckets": [{"name": "b", "inputs": [{}, {"name": "x"}]}]})
    assert relay_lite._advice(config) == [
        "input 'Default public endpoint' of bucket 'b' has no id: its URL is derived from names, stable but "
        "guessable; give it an id (`relay-lite init` writes random ones)",
        "input 'x' of bucket 'b' has no id: its URL is derived from names, stable but guessable; give it an id "
        "(`relay-lite init` writes random ones)",
        "the config has no tokens, so no client can connect: add a [[tokens]] table (`relay-lite init` writes a "
        "config with one)"]
    assert relay_lite._advice(dataclasses.replace(config, server=relay_lite.ServerConfig())) == [
        "the config has no tokens, so no client can connect: add a [[tokens]] table (`relay-lite init` writes a "
        "config with one)"]  # on loopback, nobody else can guess at its URLs


def test_two_tokens_may_not_share_a_secret():
    """Issue 9, finding 7: Bearer <secret> silently picked one of two tokens with the same secret."""
    with pytest.raises(ConfigError, match=r"tokens\[1\].secret: the same as tokens\[0\]'s; give each token its own"):
        load_config({"tokens": [{"key": "a", "secret": "shared-0123456789"}, {"key": "b", "secret": "shared-0123456789"}]})


def test_a_secret_hash_replaces_the_secret():
    hashed = str(relay_lite._SecretHash.of("hashed-secret-0123456789", n=2**10))
    config = load_config({"tokens": [{"key": "k", "secret_hash": hashed}]})
    assert config.tokens[0].secret == "" and config.tokens[0].secret_hash == hashed


@pytest.mark.parametrize("token, complaint", [
    ({"secret": "secret-s-0123456789", "secret_hash": "x"}, "tokens[0]: give secret or secret_hash, not both"),
    ({}, "tokens[0].secret: missing (give secret or secret_hash)"),
    ({"secret_hash": "pbkdf2:sha256:600000$salt$00"}, "tokens[0].secret_hash: must be scrypt:N:r:p$salt$hex"),
    ({"secret_hash": "argon2:1:1:1$salt$" + "00" * 32}, "only scrypt hashes are supported"),
    ({"secret_hash": "scrypt:1000:8:1$salt$" + "00" * 32}, "N must be a power of 2"),
    ({"secret_hash": "scrypt:1048576:32:1$salt$" + "00" * 32}, "at most 256 MiB"),
    ({"secret_hash": "scrypt:16384:8:1$$" + "00" * 32}, "needs a salt"),
])
def test_bad_secret_hashes_say_why(token, complaint):
    with pytest.raises(ConfigError) as caught:
        load_config({"tokens": [{"key": "k", **token}]})
    assert complaint in str(caught.value)


@pytest.mark.parametrize("files, bounds", [(1024, ["960", "120"]), (4096, ["4032", "256"]),
                                           (1_048_576, ["20000", "256"])])
def test_connection_bounds_default_from_the_open_file_limit(files, bounds):
    """A container's million open files must not make 131,000 pending connections an address's due."""
    code = (f"import resource; resource.getrlimit = lambda kind: ({files}, {files}); import relay_lite; "
            "server = relay_lite.load_config({}).server; print(server.max_connections, server.max_pending_per_ip)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == bounds, result.stderr


@pytest.mark.parametrize("server, complaint", [
    ({"max_connections": 0}, "server.max_connections: must be positive"),
    ({"max_connections": 10, "max_pending_per_ip": 11}, "server.max_pending_per_ip: must be 1 to max_connections (10)"),
    ({"max_pending_per_ip": 0}, "server.max_pending_per_ip: must be 1 to max_connections "  # the machine's
                                f"({min(resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64, 20_000)}), got 0"),
    ({"request_timeout": 0}, "server.request_timeout: must be positive"),
    ({"max_headers": -1}, "server.max_headers: must be positive"),
])
def test_bad_bounds_are_refused(server, complaint):
    with pytest.raises(ConfigError) as caught:
        load_config({"server": server})
    assert complaint in str(caught.value)


async def test_a_loopback_relay_with_weak_secrets_serves_only_requests_to_a_loopback_host():
    """A tunnel (ngrok, cloudflared) or a page rebinding DNS reaches a loopback relay: while it
    takes weak secrets, a request naming another host, or forwarded by a proxy, is refused."""
    config = {"server": {"port": 0}, "tokens": [{"key": "k", "secret": "s"}], "buckets": [{"name": "b"}]}
    async with relay_lite.open_relay(config) as relay:
        async with httpx.AsyncClient(base_url=relay.url, auth=("k", "s")) as http:
            assert (await http.get("/v1/buckets")).status_code == 200
            assert (await http.get("/v1/buckets", headers={"Host": f"localhost:{relay.port}"})).status_code == 200
            for headers in ({"Host": "abc.ngrok.io"}, {"Host": "attacker.example"},
                            {"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}):
                refused = await http.get("/v1/buckets", headers=headers)
                assert refused.status_code == 421 and "give its tokens strong secrets" in refused.text, headers
        with pytest.raises(trio_websocket.HandshakeError):  # a socket too
            async with trio_websocket.open_websocket_url(relay.socket_url, extra_headers=[("X-Forwarded-For", "1.2.3.4")]):
                pass  # pragma: no cover
        async with trio_websocket.open_websocket_url(relay.socket_url) as ws:
            await ws.send_message('{"action":"auth","key":"k","secret":"s"}')
            assert json.loads(await ws.get_message())["status"] == "authenticated"
    strong = {**config, "tokens": [{"key": "k", "secret": "a-strong-secret-0123456789"}]}
    async with relay_lite.open_relay(strong) as relay:  # strong secrets: any host name may reach it
        async with httpx.AsyncClient(base_url=relay.url, auth=("k", "a-strong-secret-0123456789")) as http:
            assert (await http.get("/v1/buckets", headers={"Host": "abc.ngrok.io"})).status_code == 200


def test_a_storage_path_this_user_cannot_reach_is_a_config_error_not_a_traceback(monkeypatch):
    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(relay_lite.Path, "exists", refused)
    with pytest.raises(ConfigError, match="storage.path: cannot use '/var/lib/x/log.db' as the log's database: "
                                          "Permission denied"):
        relay_lite._check_storage("/var/lib/x/log.db")
