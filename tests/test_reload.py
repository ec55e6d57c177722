"""Reload (issue 11): a changed config applied without dropping a connection or losing a webhook,
embedded (relay.reload) and by SIGHUP to the command line's relay; a bad file changes nothing."""

import copy
import dataclasses
import signal

import httpx
import pytest
import trio

import relay_lite

from app_server import running_app
from conftest import GITHUB_INPUT, KEY, SCOPED_KEY, SCOPED_SECRET, SECRET, eventually, post, relay_config, subscriber
from helpers import start, stop


def reloaded_config(app_url: str) -> dict:
    """relay_config() less the scoped token and the stripe bucket, plus a gitlab bucket, and a
    public output on github."""
    config = relay_config()
    config["tokens"] = [token for token in config["tokens"] if token["key"] != SCOPED_KEY]
    config["buckets"] = [bucket for bucket in config["buckets"] if bucket["name"] != "stripe"]
    config["buckets"].append({"name": "gitlab", "inputs": [{"id": "in-gitlab"}]})
    config["buckets"][0]["outputs"] = [{"name": "socket", "destination": "/"},
                                      {"name": "app", "destination": app_url, "internal": False}]
    return config


async def test_a_reload_applies_the_new_config_while_webhooks_flow_and_loses_none():
    async with running_app() as app, relay_lite.open_relay(relay_config()) as relay:
        async with subscriber(relay, ["github"]) as steady, \
                subscriber(relay, ["github"], key=SCOPED_KEY, secret=SCOPED_SECRET) as removed_token, \
                subscriber(relay, ["stripe"]) as removed_bucket:
            sent = []

            async def send_all():
                async with httpx.AsyncClient(timeout=10) as http:
                    for n in range(200):
                        answer = await http.post(f"{relay.url}/v1/webhooks/{GITHUB_INPUT}", content=str(n))
                        assert answer.status_code == 200
                        sent.append(n)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                await eventually(lambda: len(sent) >= 50, 20)
                relay.reload(reloaded_config(app.url))  # mid-stream
            received = [int((await steady.webhook(timeout=10))["body"]) for _ in range(200)]
            closed = await removed_token.closed()
            told = await removed_bucket.receive()
            assert (await post(relay, input_id="in-gitlab", content="new bucket")).status_code == 200
            assert (await post(relay, input_id="in-stripe", content="gone")).status_code == 404
            delivered = await app.wait_for(1, timeout=20)  # the new public output delivers what came after it
    assert received == list(range(200))  # the steady client: every webhook, in order, across the reload
    assert (closed.code, closed.reason) == (1008, "this token was removed from the relay's config")
    assert (told["status"], told["message"]) == ("unsubscribed",
                                                 "bucket stripe was removed from the relay's config")
    assert int(delivered[0].body) >= 50


async def test_a_bad_config_or_one_that_needs_a_restart_is_refused_and_changes_nothing():
    async with relay_lite.open_relay(relay_config()) as relay:
        bad = relay_config()
        bad["buckets"][0]["name"] = ""
        with pytest.raises(relay_lite.ConfigError, match="buckets\\[0\\].name: must not be empty"):
            relay.reload(bad)
        with pytest.raises(relay_lite.ConfigError, match="server.ping_interval: changing it needs a restart"):
            relay.reload(relay_config(ping_interval=5))
        async with subscriber(relay, ["stripe"]) as client:  # the old config, in force
            assert (await post(relay, input_id="in-stripe", content="still here")).status_code == 200
            assert (await client.webhook())["body"] == "still here"


async def test_a_changed_token_closes_its_sockets_and_a_new_one_authenticates():
    async with relay_lite.open_relay(relay_config()) as relay:
        config = relay_config()
        changed = copy.deepcopy(config)
        changed["tokens"][0]["secret"] = "a-new-secret-0123456789"
        changed["tokens"].append({"key": "new-key", "secret": "new-secret-0123456789abc"})
        async with subscriber(relay, ["github"]) as old_secret:
            relay.reload(changed)
            closed = await old_secret.closed()
        async with subscriber(relay, ["github"], key="new-key", secret="new-secret-0123456789abc") as fresh:
            await post(relay, content="for the new token")
            assert (await fresh.webhook())["body"] == "for the new token"
    assert (closed.code, closed.reason) == (1008, "this token changed in the relay's config: connect again")


async def test_sighup_reloads_the_file_and_a_bad_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "relay.toml"
    first = 'server = {port = 0}\n[[tokens]]\nkey = "k"\nsecret = "a-secret-0123456789"\n[[buckets]]\nname = "one"\n' \
            '[[buckets.inputs]]\nid = "in-one"\n'
    path.write_text(first)
    err = tmp_path / "stderr"
    with open(err, "wb") as file:
        process, banner = await start("--config", str(path), "--port", "0", stderr=file)
    try:
        url = banner.split("listening on ")[1].split()[0]
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.post("/v1/webhooks/in-two", content="x")).status_code == 404
            path.write_text(first + '[[buckets]]\nname = "two"\n[[buckets.inputs]]\nid = "in-two"\n')
            process.send_signal(signal.SIGHUP)
            await eventually(lambda: "reloaded the config" in err.read_text(), 10)
            assert (await http.post("/v1/webhooks/in-two", content="x")).status_code == 200
            path.write_text("[[buckets]\n")  # broken
            process.send_signal(signal.SIGHUP)
            await eventually(lambda: "reload refused" in err.read_text(), 10)
            assert (await http.post("/v1/webhooks/in-two", content="x")).status_code == 200  # still in force
            # what the machine refuses (a certificate that does not load) names the file too (issue 22)
            path.write_text('server = {port = 0, certfile = "/nonexistent/c.pem", keyfile = "/nonexistent/k.pem"}\n'
                            + first.partition("\n")[2])
            process.send_signal(signal.SIGHUP)
            await eventually(lambda: err.read_text().count("reload refused") == 2, 10)
    finally:
        assert await stop(process) == 0
    broken, uncertified = [line for line in err.read_text().splitlines() if "reload refused" in line]
    assert "not valid TOML" in broken and "Traceback" not in err.read_text()
    assert f"{path}: server.certfile: cannot load /nonexistent/c.pem" in uncertified


async def test_a_sender_held_by_an_input_a_reload_removes_gets_its_answer_not_a_500():
    config = relay_config()
    config["buckets"][1]["inputs"][0].update(response_from_output="anyOutput", response_timeout=1,
                                             status_code=202, body="taken")
    async with relay_lite.open_relay(config) as relay, httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        async with trio.open_nursery() as nursery:
            answers = []

            async def held():
                answers.append(await http.post("/v1/webhooks/in-stripe", content="held"))

            nursery.start_soon(held)
            await eventually(lambda: relay.services.core.held, 5)
            without_stripe = relay_config()
            without_stripe["buckets"] = [bucket for bucket in without_stripe["buckets"] if bucket["name"] != "stripe"]
            relay.reload(without_stripe)
        logs = await http.get("/v1/logs", auth=(KEY, SECRET))
    assert (answers[0].status_code, answers[0].text) == (202, "taken")  # the input's own answer, as it was
    assert logs.status_code == 200 and all(log["bucket_name"] != "stripe" for log in logs.json()["data"])


def test_turning_tls_on_or_off_needs_a_restart():
    plain = relay_lite.load_config(relay_config())
    with_tls = dataclasses.replace(plain, server=dataclasses.replace(plain.server, certfile="c.pem", keyfile="k.pem"))
    with pytest.raises(relay_lite.ConfigError, match="server.certfile: turning TLS on or off needs a restart"):
        relay_lite._reloadable(plain, with_tls)


async def test_an_embedded_relay_given_a_port_reloads_its_config_with_that_port_still():
    async with relay_lite.open_relay(relay_config(port=18080), port=0) as relay:
        changed = relay_config(port=18080)
        changed["buckets"].append({"name": "gitlab", "inputs": [{"id": "in-gitlab"}]})
        relay.reload(changed)  # the file says 18080, as it did: the override (0) stays in force
        assert (await post(relay, input_id="in-gitlab", content="x")).status_code == 200
