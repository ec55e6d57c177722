"""The `relay` and `relay_factory` fixtures, as a project that installed relay_lite uses them:
each test here writes such a project's test files and runs pytest on them in a fresh process,
where the fixtures come only from relay_lite's pytest11 entry point."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SYNC_TESTS = '''
import threading

import httpx
import pytest


def test_a_webhook_sent_reaches_the_client(relay):
    with relay.client() as client:
        answer = relay.send('{"hello": "relay"}', "/github/push", headers={"Content-Type": "application/json"})
        frame = client.webhook()
    assert answer.status_code == 200
    assert (frame["body"], frame["method"], frame["meta"]["bucket_name"]) == ('{"hello": "relay"}', "POST", "test")
    assert frame["headers"]["Content-Type"] == ["application/json"]
    assert any(thread.name == "relay_lite fixture" for thread in threading.enumerate())  # its own thread


def test_the_urls_and_credentials_are_the_relays(relay):
    assert relay.input_url.startswith(relay.url + "/v1/webhooks/")
    assert relay.socket_url == "ws" + relay.url.removeprefix("http") + "/v1/socket"
    buckets = httpx.get(relay.url + "/v1/buckets", auth=(relay.key, relay.secret)).json()
    assert [bucket["name"] for bucket in buckets] == ["test"]


def test_a_client_resumes_with_since(relay):
    with relay.client() as client:
        relay.send("first")
        first = client.webhook()["meta"]["id"]
    relay.send("second")
    with relay.client(since=first) as client:
        assert client.webhook()["body"] == "second"
        client.status("resumed")


def test_a_client_the_relay_refuses_says_why(relay):
    with pytest.raises(RuntimeError, match="the relay answered error: .*no-such-bucket"):
        with relay.client(["no-such-bucket"]):
            pass


def test_a_relay_that_cannot_start_raises_its_own_error(relay_factory, tmp_path):
    import relay_lite
    with pytest.raises(relay_lite.StorageError):
        relay_factory({"storage": {"path": str(tmp_path / "no-such-dir" / "relay.db")}})


def test_a_client_left_open_ends_with_the_test(relay):
    global left_open  # held past the test: its teardown must end it, not hang
    left_open = relay.client()
    client = left_open.__enter__()
    relay.send("x")
    assert client.webhook()["body"] == "x"


def test_blocking_helpers_refuse_a_trio_loop_they_would_block(relay):
    import trio

    async def misuse():
        relay.send("x")
    with pytest.raises(RuntimeError, match="runs in a Trio loop"):
        trio.run(misuse)


def test_relay_factory_takes_a_config_of_its_own(relay_factory):
    config = {"tokens": [{"key": "k", "secret": "a-secret-of-the-test"}],
              "buckets": [{"name": "a"}, {"name": "b", "inputs": [{"id": "in-b"}]}],
              "server": {"port": 8080}}  # a test gets a free port whatever the config says
    first, second = relay_factory(config), relay_factory(config)
    assert first.url != second.url and not first.url.endswith(":8080")
    with second.client(["a", "b"]) as client:
        assert second.send("to b", bucket="b").status_code == 200
        assert client.webhook()["meta"]["bucket_name"] == "b"
'''

TRIO_TESTS = '''
import threading

import httpx
import pytest
import trio

pytestmark = pytest.mark.trio


async def test_a_webhook_sent_reaches_the_client(relay):
    async with relay.client() as client:
        answer = await relay.send(b"\\x00\\xff", headers={"Content-Type": "application/octet-stream"})
        frame = await client.webhook()
    assert answer.status_code == 200
    assert frame["meta"]["bucket_name"] == "test"
    assert not any(thread.name == "relay_lite fixture" for thread in threading.enumerate())  # the test's loop


async def test_relay_factory_is_awaited(relay_factory):
    other = await relay_factory({"tokens": [{"key": "k", "secret": "a-secret-of-the-test"}],
                                 "buckets": [{"name": "mine"}]})
    async with httpx.AsyncClient(base_url=other.url, auth=(other.key, other.secret)) as http:
        assert [bucket["name"] for bucket in (await http.get("/v1/buckets")).json()] == ["mine"]


async def test_held_sender_gets_the_clients_answer(relay_factory):
    other = await relay_factory({"tokens": [{"key": "k", "secret": "a-secret-of-the-test"}],
                                 "buckets": [{"name": "held", "inputs": [
                                     {"response_from_output": "anyOutput", "response_timeout": 10}]}]})
    async with other.client() as client, trio.open_nursery() as nursery:
        answers = []

        async def send():
            answers.append(await other.send("question"))
        nursery.start_soon(send)
        frame = await client.webhook()
        async with httpx.AsyncClient(base_url=other.url, auth=(other.key, other.secret)) as http:
            await http.put(f"/v1/logs/{frame['meta']['id']}", json={"status_code": 201, "response_body": "NDI="})
    assert (answers[0].status_code, answers[0].content) == (201, b"42")
'''


def run_user_tests(pytester, **files) -> pytest.RunResult:
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=120)


def test_a_projects_sync_tests_use_the_relay_fixture(pytester):
    result = run_user_tests(pytester, test_sync=SYNC_TESTS)
    result.assert_outcomes(passed=8)
    assert "Traceback" not in result.stdout.str() and not result.errlines


def test_a_projects_trio_tests_use_the_relay_fixture_in_their_own_loop(pytester):
    result = run_user_tests(pytester, test_trio=TRIO_TESTS)
    result.assert_outcomes(passed=3)


def test_trio_mode_projects_get_the_trio_fixture_too(pytester):
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    result = run_user_tests(pytester, test_trio=TRIO_TESTS.replace("pytestmark = pytest.mark.trio", ""))
    result.assert_outcomes(passed=3)


def test_serving_never_imports_pytest():
    code = "import sys, relay_lite; relay_lite.load_config({}); print('pytest' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_readmes_fixture_example_passes(pytester):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Testing with it"):readme.index("## Benchmarks")]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = run_user_tests(pytester, test_readme=example)
    result.assert_outcomes(passed=1)
