"""GET /metrics (issue 11): off unless configured, a bearer token when given, and the values after
a known sequence of events, read back with the Prometheus client's own parser."""

import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

import relay_lite

from app_server import running_app
from conftest import KEY, eventually, post, relay_config, subscriber

METRICS_TOKEN = "metrics-token-0123456789abcdef"


def samples(text: str) -> dict[tuple, float]:
    """Each sample of a scrape by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_are_off_unless_configured_and_their_404_says_how_to_turn_them_on(relay, http):
    """It was Werkzeug's "The requested URL was not found on the server" (issue 21, finding 12)."""
    response = await http.get("/metrics")
    assert response.status_code == 404
    assert "metrics are off: set [metrics] enabled = true" in response.text and "restart" in response.text


async def test_a_metrics_token_is_asked_for_and_a_wrong_one_counted():
    config = relay_config()
    config["metrics"] = {"enabled": True, "token": METRICS_TOKEN}
    async with relay_lite.open_relay(config) as relay, httpx.AsyncClient(base_url=relay.url) as http:
        missing = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        right = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert right.headers["Content-Type"].startswith("text/plain; version=")  # the text format
    assert samples(right.text)[("relay_lite_auth_failures_total", (("kind", "metrics"),))] == 2


async def test_the_values_after_a_known_sequence_of_events():
    config = relay_config(max_body_size=1000, auth_timeout=0.3)
    config["metrics"] = {"enabled": True}
    config["buckets"][1]["inputs"][0]["verify"] = {"scheme": "bearer", "secrets": ["stripe-bearer-token"]}
    async with running_app() as app:
        config["buckets"].append({"name": "deliver", "inputs": [{"id": "in-deliver"}], "outputs": [
            {"name": "app", "destination": app.url, "internal": False}]})
        async with relay_lite.open_relay(config) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            async with subscriber(relay, ["github"]) as client:
                for n in range(3):
                    assert (await post(relay, content=f"good {n}")).status_code == 200
                    await client.webhook()
                assert (await post(relay, input_id="no-such-input", content="x")).status_code == 404
                assert (await post(relay, content="x" * 2000)).status_code == 413
                assert (await post(relay, input_id="in-stripe", content="forged")).status_code == 401
                assert (await post(relay, input_id="in-deliver", content="delivered")).status_code == 200
                await app.wait_for(1)
                async with trio_websocket.open_websocket_url(relay.socket_url) as wrong:
                    await wrong.send_message(json.dumps({"action": "auth", "key": KEY, "secret": "wrong"}))
                    assert json.loads(await wrong.get_message())["status"] == "unauthorized"
                async with trio_websocket.open_websocket_url(relay.socket_url) as silent:
                    with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(5):
                        while True:  # cut off when its auth_timeout is up
                            await silent.get_message()
                await eventually(lambda: relay.metrics.deliveries["deliver", "app", "sent"] == 1)
                text = (await http.get("/metrics")).text
    got = samples(text)
    expected = {
        ("relay_lite_webhooks_received_total", (("bucket", "github"),)): 3,
        ("relay_lite_webhooks_received_total", (("bucket", "deliver"),)): 1,
        ("relay_lite_webhooks_received_total", (("bucket", "stripe"),)): 0,
        ("relay_lite_webhooks_rejected_total", (("reason", "unknown_input"),)): 1,
        ("relay_lite_webhooks_rejected_total", (("reason", "too_large"),)): 1,
        ("relay_lite_webhooks_rejected_total", (("reason", "signature"),)): 1,
        ("relay_lite_webhooks_rejected_total", (("reason", "storage"),)): 0,
        ("relay_lite_frames_sent_total", (("bucket", "github"),)): 3,
        ("relay_lite_sockets", (("state", "authenticated"),)): 1,
        ("relay_lite_sockets", (("state", "connecting"),)): 0,
        ("relay_lite_socket_cutoffs_total", (("reason", "auth_timeout"),)): 1,
        ("relay_lite_socket_cutoffs_total", (("reason", "too_slow"),)): 0,
        ("relay_lite_auth_failures_total", (("kind", "socket"),)): 1,
        ("relay_lite_history_entries", (("bucket", "github"),)): 3,
        ("relay_lite_deliveries_total", (("bucket", "deliver"), ("outcome", "sent"), ("output", "app"))): 1,
        ("relay_lite_deliveries_total", (("bucket", "deliver"), ("outcome", "failed"), ("output", "app"))): 0,
        ("relay_lite_delivery_duration_seconds_count", ()): 1,
        ("relay_lite_ingest_duration_seconds_count", ()): 4,
        ("relay_lite_build_info", (("version", relay_lite.__version__),)): 1,
    }
    assert {key: got.get(key) for key in expected} == expected
    assert got[("relay_lite_history_bytes", (("bucket", "github"),))] > 0
    assert got[("relay_lite_ingest_duration_seconds_bucket", (("le", "+Inf"),))] == 4


@pytest.mark.parametrize("metrics, error", [
    ({"enabled": True, "token": "short"}, "metrics.token: too easy to guess"),
    ({"enabled": True, "token": "<your metrics token here>"}, "metrics.token: looks like a placeholder"),
])
def test_a_weak_metrics_token_is_refused(metrics, error):
    config = relay_config()
    config["metrics"] = metrics
    config["server"] = {**config.get("server", {}), "host": "0.0.0.0"}  # on loopback a weak one is only warned of
    with pytest.raises(relay_lite.ConfigError, match=error):
        relay_lite.load_config(config)


def test_metrics_without_the_prometheus_client_say_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "prometheus_client" else find_spec(name, *args))
    config = relay_config()
    config["metrics"] = {"enabled": True}
    with pytest.raises(relay_lite.ConfigError) as caught:
        relay_lite.load_config(config)
    command = str(caught.value).partition("needs the Prometheus client: ")[2]
    assert shlex.split(command)[:4] == [sys.executable, "-m", "pip", "install"]  # this Python's pip, wherever it is
    # and it installs what the extra does (issue 21, finding 12: `pip install 'relay-lite[metrics]'` worked only
    # in the checkout's venv)
    pyproject = tomllib.loads((Path(relay_lite.__file__).parent / "pyproject.toml").read_text())
    for extra, requirement in relay_lite._EXTRAS.items():
        assert pyproject["project"]["optional-dependencies"][extra] == [requirement]


@pytest.mark.parametrize("host, token, error", [
    ("0.0.0.0", "", "metrics.token: required when other machines can reach the relay"),
    ("", "", "metrics.token: required when other machines can reach the relay"),
    ("192.0.2.10", "", "metrics.token: required"),
    ("0.0.0.0", METRICS_TOKEN, None), ("127.0.0.1", "", None), ("127.0.0.2", "", None), ("::1", "", None),
    ("localhost", "", None),
])
def test_metrics_beyond_loopback_need_a_token(host, token, error):
    """/metrics without a token named every bucket to anyone who reached it (issue 20, 11)."""
    config = relay_config(host=host)
    config["metrics"] = {"enabled": True, **({"token": token} if token else {})}
    if error is None:
        relay_lite.load_config(config)
    else:
        with pytest.raises(relay_lite.ConfigError, match=re.escape(error)):
            relay_lite.load_config(config)
