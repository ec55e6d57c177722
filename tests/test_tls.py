"""TLS on the one port (issue 11): https for webhooks and the logs API, wss for sockets, with a
certificate made in the test (trustme); plain http on the TLS port gets a clear 400."""

import json
import logging
import ssl
import subprocess

import httpx
import pytest
import trio
import trio_websocket
import trustme

import relay_lite

from conftest import GITHUB_INPUT, KEY, SECRET, relay_config


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_config(ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return relay_config(certfile=str(certfile), keyfile=str(keyfile))


@pytest.fixture
def client_tls(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_webhooks_sockets_and_the_logs_api_over_tls(tls_config, client_tls):
    async with relay_lite.open_relay(tls_config) as relay:
        assert relay.url.startswith("https://127.0.0.1:") and relay.socket_url.startswith("wss://")
        async with trio_websocket.open_websocket_url(relay.socket_url, ssl_context=client_tls) as ws:
            await ws.send_message(json.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            assert json.loads(await ws.get_message())["status"] == "authenticated"
            await ws.send_message(json.dumps({"action": "subscribe", "buckets": ["github"]}))
            assert json.loads(await ws.get_message())["status"] == "subscribed"
            async with httpx.AsyncClient(base_url=relay.url, verify=client_tls, auth=(KEY, SECRET)) as http:
                sent = await http.post(f"/v1/webhooks/{GITHUB_INPUT}/x?y=1", content=b'{"over": "tls"}')
                frame = json.loads(await ws.get_message())
                logs = (await http.get("/v1/logs", params={"bucket": "github"})).json()
    assert sent.status_code == 200
    assert (frame["body"], frame["query"], frame["meta"]["output_destination"]) == ('{"over": "tls"}', "y=1", "/x")
    assert logs["total"] == 1


async def test_a_smee_channels_stream_over_tls_reads_as_any_http_client_reads_a_stream(tls_config, client_tls):
    tls_config["buckets"][0]["smee_channel"] = "tls-channel-0123456789abcdef"
    async with relay_lite.open_relay(tls_config) as relay:
        async with httpx.AsyncClient(base_url=relay.url, verify=client_tls, timeout=10) as http:
            async with http.stream("GET", "/smee/tls-channel-0123456789abcdef",
                                   headers={"Accept": "text/event-stream"}) as stream:
                lines = stream.aiter_lines()
                with trio.fail_after(10):
                    assert [await anext(lines) for _ in range(3)] == ["event: ready", "data: {}", ""]
                    await http.post("/smee/tls-channel-0123456789abcdef", content=b'{"over": "tls"}')
                    event_id, data = await anext(lines), await anext(lines)
    assert event_id.startswith("id: ") and json.loads(data.removeprefix("data: "))["body"] == {"over": "tls"}


async def test_plain_http_on_the_tls_port_gets_a_clear_400_not_a_hang(tls_config, client_tls):
    async with relay_lite.open_relay(tls_config) as relay:
        plain = relay.url.replace("https://", "http://")
        async with httpx.AsyncClient() as http:
            with trio.fail_after(5):
                response = await http.post(f"{plain}/v1/webhooks/{GITHUB_INPUT}", content=b"{}")
        assert (response.status_code, response.text) == (400, "this port speaks TLS: use https:// or wss://\n")
        with trio.fail_after(5):  # a WebSocket client too: refused at once
            with pytest.raises(trio_websocket.HandshakeError):
                async with trio_websocket.open_websocket_url(relay.socket_url.replace("wss://", "ws://")):
                    pass
        async with httpx.AsyncClient(verify=client_tls) as http:  # and the relay goes on
            assert (await http.post(f"{relay.url}/v1/webhooks/{GITHUB_INPUT}", content=b"{}")).status_code == 200


async def test_a_client_that_refuses_the_certificate_or_sends_garbage_costs_nothing(tls_config, client_tls, caplog):
    async with relay_lite.open_relay(tls_config) as relay:
        async with httpx.AsyncClient() as untrusting:  # the system's CAs: trustme's is not among them
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{relay.url}/healthz")
        for garbage in (b"\x16\x03\x01\x00\x05hello", b"\x00" * 100):
            stream = await trio.open_tcp_stream(relay.host, relay.port)
            await stream.send_all(garbage)
            with trio.fail_after(10):
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # a reset: as good as a close
            await stream.aclose()
        async with httpx.AsyncClient(verify=client_tls) as http:
            assert (await http.get(f"{relay.url}/healthz")).status_code == 200
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("server, error", [
    ({"certfile": "cert.pem"}, "server.keyfile: TLS needs both certfile and keyfile"),
    ({"keyfile": "key.pem"}, "server.certfile: TLS needs both certfile and keyfile"),
    ({"certfile": "/nonexistent/cert.pem", "keyfile": "/nonexistent/key.pem"},
     "server.certfile: cannot load /nonexistent/cert.pem with /nonexistent/key.pem: No such file"),
])
def test_tls_settings_that_cannot_work_are_refused_at_start(server, error):
    with pytest.raises(relay_lite.ConfigError, match=error):
        relay_lite.load_config(relay_config(**server))


def test_an_encrypted_key_is_refused_in_one_line_not_asked_for(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-passout", "pass:secret-passphrase"],
                   check=True, capture_output=True, timeout=60)
    with pytest.raises(relay_lite.ConfigError, match="the key is encrypted: give it unencrypted"):
        relay_lite.load_config(relay_config(certfile=str(cert), keyfile=str(key)))


async def test_a_reload_puts_new_certificates_in_force_for_new_connections(tls_config, client_tls, tmp_path):
    renewed_ca = trustme.CA()
    cert = renewed_ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "renewed-cert.pem", tmp_path / "renewed-key.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    renewed_tls = ssl.create_default_context()
    renewed_ca.configure_trust(renewed_tls)
    async with relay_lite.open_relay(tls_config) as relay:
        async with httpx.AsyncClient(verify=client_tls) as old:
            assert (await old.get(f"{relay.url}/healthz")).status_code == 200
        relay.reload({**tls_config, "server": {**tls_config["server"], "certfile": str(certfile),
                                               "keyfile": str(keyfile)}})
        async with httpx.AsyncClient(verify=renewed_tls) as renewed:
            assert (await renewed.get(f"{relay.url}/healthz")).status_code == 200
        async with httpx.AsyncClient(verify=client_tls) as old:
            with pytest.raises(httpx.ConnectError):  # the old certificate is no longer served
                await old.get(f"{relay.url}/healthz")


async def test_a_start_and_a_reload_each_load_the_certificate_once_and_checking_a_config_loads_none(
        tls_config, monkeypatch):
    """Checking a config loaded its TLS files, and a reload loaded them three times (issue 22):
    the checks are of the config alone, and what the machine must provide is asked once, by
    _preflight."""
    loaded = []
    tls_context = relay_lite._tls_context
    monkeypatch.setattr(relay_lite, "_tls_context", lambda server: loaded.append(server.certfile) or tls_context(server))
    checked = relay_lite._load(tls_config)
    assert loaded == [] and checked.server.max_connections is None  # the open-file limit is not asked either
    async with relay_lite.open_relay(tls_config) as relay:
        assert loaded == [tls_config["server"]["certfile"]]
        assert relay.config.server.max_connections  # from the machine, at the start
        relay.reload(tls_config)
        assert loaded == [tls_config["server"]["certfile"]] * 2


async def test_a_files_certificate_that_does_not_load_is_named_with_the_file_at_load_start_and_reload(
        tls_config, tmp_path, relay_factory):
    """Once TLS was loaded by _preflight, after the file's checks, its error no longer named the
    file (issue 22's review)."""
    path = tmp_path / "relay.toml"
    path.write_text('[server]\ncertfile = "/nonexistent/cert.pem"\nkeyfile = "/nonexistent/key.pem"\n')
    expected = f"{path}: server.certfile: cannot load /nonexistent/cert.pem with /nonexistent/key.pem"
    with pytest.raises(relay_lite.ConfigError) as loaded:
        relay_lite.load_config(path)
    with pytest.raises(relay_lite.ConfigError) as started:
        async with relay_lite.open_relay(path):
            pass  # pragma: no cover
    async with relay_lite.open_relay(tls_config) as relay:
        with pytest.raises(relay_lite.ConfigError) as reloaded:
            relay.reload(path)
    with pytest.raises(relay_lite.ConfigError) as fixture:  # the plugin's relay_factory, as a project uses it
        await relay_factory(path)
    assert [str(error.value).partition(": No such")[0] for error in (loaded, started, reloaded, fixture)] == [
        expected] * 4
