"""The embedding API: open_relay and serve_relay with every kind of config, and graceful shutdown."""

import ast
import dataclasses
from pathlib import Path

import pytest
import trio

import relay_lite
from conftest import GITHUB_INPUT, KEY, SECRET, post, relay_config, subscriber

TOML = """
[server]
port = 0
[[tokens]]
key = "key-1"
secret = "secret-one-0123456789"
[[buckets]]
name = "github"
  [[buckets.inputs]]
  id = "b90f2fe9-621d-4290-9e74-edd5b61325dd"
"""


@pytest.mark.parametrize("kind", ["path", "str", "dict", "config"])
async def test_open_relay_takes_a_path_a_dict_or_a_config(tmp_path, kind):
    path = tmp_path / "relay.toml"
    path.write_text(TOML)
    source = {"path": path, "str": str(path), "dict": relay_config(),
              "config": relay_lite.load_config(relay_config())}[kind]
    async with relay_lite.open_relay(source) as relay:
        assert relay.url.startswith("http://127.0.0.1:") and not relay.url.endswith(":0")
        assert relay.socket_url == relay.url.replace("http://", "ws://") + "/v1/socket"
        assert relay.input_url("github") == relay.input_url(GITHUB_INPUT) == f"{relay.url}/v1/webhooks/{GITHUB_INPUT}"
        async with subscriber(relay, ["github"]) as client:
            await post(relay, content=kind)
            assert (await client.webhook())["body"] == kind


async def test_serve_relay_in_a_nursery_with_overrides():
    config = dataclasses.replace(relay_lite.load_config(relay_config()),
                                 server=relay_lite.ServerConfig(port=9))  # overridden below
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(lambda task_status: relay_lite.serve_relay(
            config, host="127.0.0.1", port=0, task_status=task_status))
        assert isinstance(relay, relay_lite.Relay) and relay.config.server.port == 0
        async with subscriber(relay, ["github"]) as client:
            await post(relay, content="started")
            assert (await client.webhook())["body"] == "started"
        relay.shutdown()  # serve_relay returns, so the nursery exits


async def test_input_url_of_an_unknown_name_raises(relay):
    with pytest.raises(KeyError):
        relay.input_url("nope")
    assert relay.input_url("github", public=True) == relay.input_url("github")  # no public_url set


async def test_public_url_is_used_for_printed_urls():
    async with relay_lite.open_relay(relay_config(public_url="https://relay.example.com/")) as relay:
        assert relay.input_url("github", public=True) == f"https://relay.example.com/v1/webhooks/{GITHUB_INPUT}"


async def test_shutdown_closes_sockets_with_1001_and_answers_requests_in_flight():
    async with relay_lite.open_relay(relay_config()) as relay:
        async with subscriber(relay, ["github"]) as client:
            # a webhook whose body is still on its way when the shutdown starts
            stream = await trio.open_tcp_stream(relay.host, relay.port)
            await stream.send_all(f"POST /v1/webhooks/{GITHUB_INPUT} HTTP/1.1\r\nHost: x\r\n"
                                  "Content-Length: 10\r\n\r\nhello".encode())
            await trio.testing.wait_all_tasks_blocked()
            relay.shutdown()
            reason = await client.closed()
            assert (reason.code, reason.reason) == (1001, "server shutting down")
            await stream.send_all(b"world")
            with trio.fail_after(5):
                answer = await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            await stream.aclose()
        with pytest.raises(OSError):  # no longer listening
            await trio.open_tcp_stream(relay.host, relay.port)


async def test_idle_keepalive_connections_do_not_hold_up_shutdown():
    import httpx
    with trio.fail_after(3):  # well under the 5 s shutdown deadline
        async with relay_lite.open_relay(relay_config()) as relay:
            http = httpx.AsyncClient()
            assert (await http.post(relay.input_url("github"), content="x")).status_code == 200
            async with subscriber(relay, None, KEY, SECRET):
                pass
    await http.aclose()


@pytest.mark.parametrize("config, options, error, says", [
    ({"tokens": [{"key": "k", "secret": "s"}], "server": {"host": "0.0.0.0"}}, {}, relay_lite.ConfigError,
     "too easy to guess"),
    ({"storage": {"path": "/nonexistent/folder/log.db"}}, {}, relay_lite.StorageError, "/nonexistent/folder/log.db"),
    ({}, {"host": "192.0.2.1"}, OSError, "assign"),  # an address that is not this machine's
])
async def test_a_relay_that_cannot_start_raises_its_reason_not_a_group(config, options, error, says):
    """`except relay_lite.ConfigError` missed open_relay's ExceptionGroup (issue 21, finding 6)."""
    with pytest.raises(error, match=says):
        async with relay_lite.open_relay(config, **options):
            pass  # pragma: no cover
    async with trio.open_nursery() as nursery:
        with pytest.raises(error, match=says):
            await nursery.start(lambda task_status: relay_lite.serve_relay(config, task_status=task_status, **options))


async def test_an_error_in_open_relays_block_comes_out_as_itself():
    with pytest.raises(KeyError, match="mine"):
        async with relay_lite.open_relay(relay_config(), port=0):
            raise KeyError("mine")


async def test_an_error_in_open_relays_block_keeps_its_cause():
    with pytest.raises(ValueError) as caught:
        async with relay_lite.open_relay(relay_config(), port=0):
            raise ValueError("mine") from KeyError("why")
    assert isinstance(caught.value.__cause__, KeyError) and caught.value.__suppress_context__


def test_every_public_name_is_in_all_and_the_readme_names_each():
    """__all__ missed 24 public names, and the README named a few (issue 22)."""
    tree = ast.parse(Path(relay_lite.__file__).read_text())
    public = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              and not node.name.startswith("_")}
    assert public == set(relay_lite.__all__)
    readme = (Path(relay_lite.__file__).parent / "README.md").read_text()
    embedding = readme.partition("\n## Embedding\n")[2].partition("\n## ")[0]
    assert [name for name in relay_lite.__all__ if f"`{name}`" not in embedding] == []
