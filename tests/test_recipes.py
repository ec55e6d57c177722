"""The README's recipes for running relay_lite for real (issue 11), tried as far as this machine
allows."""

import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from hypothesis import given, strategies as st

import relay_lite
from conftest import GITHUB_INPUT, KEY, SECRET, relay_config
from helpers import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in the README."""
    text = README.read_text()
    after = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", after, re.S).group(1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("heading, name, runs", [
    ("### As a systemd service", "relay-lite.service", "relay-lite --config /etc/relay_lite/relay.toml"),
    ("### The agent as a systemd service", "relay-lite-forward.service", "relay-lite forward --relay https://"),
])
def test_the_systemd_units_pass_systemd_analyze_verify_without_a_warning(tmp_path, heading, name, runs):
    """The relay's unit, and the agent's for a Pi behind NAT (issue 21, finding 15)."""
    unit = readme_block(heading, "ini")
    assert f"ExecStart=/opt/relay_lite/.venv/bin/{runs}" in unit
    # the one path that differs here: verify checks that ExecStart's program exists
    console_script = Path(sys.executable).parent / "relay-lite"
    path = tmp_path / name
    path.write_text(unit.replace("/opt/relay_lite/.venv/bin/relay-lite", str(console_script)))
    verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_the_agents_unit_runs_a_command_the_agent_takes(capsys, monkeypatch):
    monkeypatch.setenv("RELAY_KEY", "key")  # as forward.env gives them
    monkeypatch.setenv("RELAY_SECRET", "secret")
    unit = readme_block("### The agent as a systemd service", "ini")
    argv = shlex.split(re.search(r"^ExecStart=\S+ (.*)$", unit, re.M).group(1))
    # every option is taken: a bad --retries, added last, is the only complaint
    assert relay_lite.main([*argv, "--retries", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("relay_lite: error: --timeout and --ping-timeout must be above 0, "
                                               "--retries 0 to 100")
    assert "RestartPreventExitStatus=2 3" in unit and "EnvironmentFile=/etc/relay_lite/forward.env" in unit
    assert relay_lite._REFUSED == 3  # the status a refusal exits with, which the unit does not restart


# ---------------------------------------------------------------------------- behind a reverse proxy

LOOPBACK = [relay_lite._network("127.0.0.0/8")]


@pytest.mark.parametrize("peer, forwarded, trusted, client", [
    ("127.0.0.1", ["203.0.113.7"], LOOPBACK, "203.0.113.7"),  # one proxy
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], LOOPBACK, "203.0.113.7"),  # the client's own claim is not taken
    ("127.0.0.1", ["203.0.113.7", "10.0.0.2"], LOOPBACK + [relay_lite._network("10.0.0.0/8")], "203.0.113.7"),
    ("192.0.2.1", ["203.0.113.7"], LOOPBACK, "192.0.2.1"),  # not a trusted proxy: its header means nothing
    ("127.0.0.1", [], LOOPBACK, "127.0.0.1"),
    ("127.0.0.1", ["not-an-address"], LOOPBACK, "127.0.0.1"),  # a proxy that wrote garbage is as far as it goes
    ("127.0.0.1", ["[2001:db8::1]"], LOOPBACK, "2001:db8::1"),
    ("::ffff:127.0.0.1", ["203.0.113.7"], LOOPBACK, "203.0.113.7"),
    ("127.0.0.1", ["127.0.0.2"], LOOPBACK, "127.0.0.2"),  # every hop trusted: the farthest
])
def test_the_client_is_the_nearest_untrusted_address(peer, forwarded, trusted, client):
    assert relay_lite.client_address(peer, forwarded, trusted) == client


@given(forwarded=st.lists(st.text(max_size=40), max_size=4))
def test_any_forwarded_for_gives_the_peer_or_an_address(forwarded):
    client = relay_lite.client_address("127.0.0.1", forwarded, LOOPBACK)
    assert client == "127.0.0.1" or relay_lite._ip(client) is not None


def test_a_trusted_proxy_that_is_no_address_is_refused():
    with pytest.raises(relay_lite.ConfigError, match=r"server.trusted_proxies\[1\]: must be an IP address"):
        relay_lite.load_config(relay_config(trusted_proxies=["10.0.0.0/8", "proxy.example"]))


async def test_behind_a_trusted_proxy_the_sender_and_the_lockout_are_the_clients():
    async with relay_lite.open_relay(relay_config(trusted_proxies=["127.0.0.1"])) as relay:
        async with httpx.AsyncClient(base_url=relay.url) as http:
            sent = await http.post(f"/v1/webhooks/{GITHUB_INPUT}", content="hi",
                                   headers={"X-Forwarded-For": "203.0.113.7"})
            log = (await http.get("/v1/logs", auth=(KEY, SECRET), headers={"X-Forwarded-For": "203.0.113.8"})).json()
            guesses = [(await http.get("/v1/logs", auth=(KEY, "wrong"),
                                       headers={"X-Forwarded-For": "198.51.100.1"})).status_code for _ in range(12)]
            other = await http.get("/v1/logs", auth=(KEY, SECRET), headers={"X-Forwarded-For": "198.51.100.2"})
        headers = [(b"X-Forwarded-For", b"198.51.100.1")]
        async with trio_websocket.open_websocket_url(relay.socket_url, extra_headers=headers) as locked:
            await locked.send_message('{"action":"auth","key":"%s","secret":"%s"}' % (KEY, SECRET))
            locked_out = json.loads(await locked.get_message())
    assert sent.status_code == 200 and log["data"][0]["ip_address"] == "203.0.113.7"
    assert guesses[-1] == 429 and other.status_code == 200  # one client's guesses lock out that client only
    assert locked_out["status"] == "unauthorized" and "try again" in locked_out["message"]


async def test_without_trusted_proxies_forwarded_for_is_only_a_header():
    async with relay_lite.open_relay(relay_config()) as relay, httpx.AsyncClient(base_url=relay.url) as http:
        await http.post(f"/v1/webhooks/{GITHUB_INPUT}", content="hi", headers={"X-Forwarded-For": "203.0.113.7"})
        log = (await http.get("/v1/logs", auth=(KEY, SECRET))).json()["data"][0]
    assert log["ip_address"] == "127.0.0.1" and log["headers"]["X-Forwarded-For"] == ["203.0.113.7"]


async def webhook_through(proxied: str, via: str, tls: ssl.SSLContext | None = None) -> tuple[httpx.Response, dict]:
    """Once the proxy at `proxied` answers: a subscriber through it, a webhook sent through it
    (its body names `via`, its X-Forwarded-For claims 203.0.113.9); the answer, and the frame."""
    async with httpx.AsyncClient(verify=tls or True) as http:
        with trio.fail_after(20):
            while True:  # until the proxy listens, and reaches the relay
                try:
                    if (await http.get(f"{proxied}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
        async with trio_websocket.open_websocket_url(proxied.replace("http", "ws", 1) + "/v1/socket",
                                                     ssl_context=tls) as ws:
            await ws.send_message(json.dumps({"action": "auth", "key": KEY, "secret": SECRET}))
            assert json.loads(await ws.get_message())["status"] == "authenticated"
            await ws.send_message(json.dumps({"action": "subscribe", "buckets": ["github"]}))
            assert json.loads(await ws.get_message())["status"] == "subscribed"
            sent = await http.post(f"{proxied}/v1/webhooks/{GITHUB_INPUT}/path?q=1",
                                   content=json.dumps({"via": via}).encode(), headers={"X-Forwarded-For": "203.0.113.9"})
            with trio.fail_after(10):
                return sent, json.loads(await ws.get_message())


@pytest.fixture
def nginx_conf(tmp_path):
    """The README's nginx block, as written but for its ports and certificate, in a config that
    runs nginx in the foreground with everything under tmp_path; returns (write(relay_port), ca)."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's package)")
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    site = readme_block("### Behind nginx or Caddy", "nginx")

    def write(relay_port: int, port: int) -> Path:
        block = (site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
                 .replace("/etc/letsencrypt/live/relay.example.com/fullchain.pem", str(tmp_path / "cert.pem"))
                 .replace("/etc/letsencrypt/live/relay.example.com/privkey.pem", str(tmp_path / "key.pem"))
                 .replace("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{relay_port};"))
        assert block != site and f":{relay_port}" in block
        temp = "\n".join(f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
        conf = tmp_path / "nginx.conf"
        conf.write_text(f"daemon off;\nmaster_process off;\npid {tmp_path}/nginx.pid;\nerror_log stderr warn;\n"
                        f"events {{ worker_connections 64; }}\nhttp {{\naccess_log off;\n{temp}\n{block}\n}}\n")
        return conf

    return write, ca


async def test_the_nginx_recipe_carries_webhooks_and_sockets_and_the_clients_address(nginx_conf, tmp_path):
    write, ca = nginx_conf
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    async with relay_lite.open_relay(relay_config(trusted_proxies=["127.0.0.1"])) as relay:
        port = free_port()
        conf = write(relay.port, port)
        with open(tmp_path / "nginx.err", "wb") as err:
            nginx = await trio.lowlevel.open_process(["nginx", "-p", str(tmp_path), "-c", str(conf)], stderr=err)
        try:
            proxied = f"https://127.0.0.1:{port}"
            sent, frame = await webhook_through(proxied, "nginx", client_tls)
            async with httpx.AsyncClient(verify=client_tls) as http:
                log = (await http.get(f"{proxied}/v1/logs", auth=(KEY, SECRET))).json()["data"][0]
        finally:
            nginx.kill()
            await nginx.wait()
    assert sent.status_code == 200
    assert (frame["body"], frame["query"], frame["meta"]["output_destination"]) == ('{"via": "nginx"}', "q=1", "/path")
    assert log["ip_address"] == "203.0.113.9"  # nginx appended 127.0.0.1, which the relay trusts
    assert frame["headers"]["X-Forwarded-For"] == ["203.0.113.9, 127.0.0.1"]


async def test_the_caddy_recipe_carries_webhooks_and_sockets(tmp_path):
    if shutil.which("caddy") is None:
        pytest.skip("caddy is not installed (.ci/run installs Debian's package)")
    site = readme_block("Caddy (Debian's package)", "caddy")
    async with relay_lite.open_relay(relay_config(trusted_proxies=["127.0.0.1"])) as relay:
        port = free_port()
        block = site.replace("relay.example.com", f"http://127.0.0.1:{port}").replace(
            "reverse_proxy 127.0.0.1:8080", f"reverse_proxy 127.0.0.1:{relay.port}")
        assert block != site
        caddyfile = tmp_path / "Caddyfile"
        caddyfile.write_text("{\n    admin off\n}\n" + block)
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
               "HOME": str(tmp_path)}
        with open(tmp_path / "caddy.err", "wb") as err:
            caddy = await trio.lowlevel.open_process(["caddy", "run", "--config", str(caddyfile), "--adapter",
                                                      "caddyfile"], stdout=err, stderr=err, env=env)
        try:
            sent, frame = await webhook_through(f"http://127.0.0.1:{port}", "caddy")
        except BaseException as error:  # what Caddy said, to tell a slow start from a port taken meanwhile
            error.add_note("caddy said: " + (tmp_path / "caddy.err").read_text(errors="replace")[-2000:])
            raise
        finally:
            caddy.kill()
            await caddy.wait()
    assert sent.status_code == 200
    assert (frame["body"], frame["query"], frame["meta"]["output_destination"]) == ('{"via": "caddy"}', "q=1", "/path")
    assert frame["headers"]["X-Forwarded-For"] == ["127.0.0.1"]  # Caddy replaced what the client claimed
