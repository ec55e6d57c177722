"""The hosted REST API's read-only buckets, inputs and outputs (issue 12, part), and JSON errors
on every /v1 path, as the official SDK calls them."""

import base64

import httpx
import pytest

import relay_lite

from conftest import GITHUB_ID, GITHUB_INPUT, KEY, SCOPED_KEY, SCOPED_SECRET, SECRET, relay_config


@pytest.fixture
async def api(relay):
    async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as client:
        yield client


async def test_buckets_list_and_find_by_name_as_the_sdk_does(api):
    buckets = (await api.get("/v1/buckets")).json()
    by_name = {bucket["name"]: bucket for bucket in buckets}  # buckets.findByName filters the list
    github = by_name["github"]
    assert github["id"] == GITHUB_ID and github["stream"] is True and isinstance(github["created_at"], int)
    assert [(input_["id"], input_["bucket_id"]) for input_ in github["inputs"]] == [(GITHUB_INPUT, GITHUB_ID)]
    two = by_name["two-outputs"]
    assert [output["name"] for output in two["outputs"]] and all(
        set(output) >= {"id", "name", "bucket_id", "destination", "internal", "lock_path", "disabled", "headers"}
        for output in two["outputs"])


async def test_one_bucket_by_id_or_name_with_its_inputs_and_outputs(api):
    by_id = (await api.get(f"/v1/buckets/{GITHUB_ID}")).json()
    by_name = (await api.get("/v1/buckets/github")).json()
    inputs = (await api.get(f"/v1/buckets/{GITHUB_ID}/inputs")).json()
    outputs = (await api.get("/v1/buckets/two-outputs/outputs")).json()
    assert by_id == by_name and inputs == by_id["inputs"] and isinstance(outputs, list) and outputs


async def test_an_inputs_body_is_bytes_as_the_hosted_api_gives_it():
    config = relay_config()
    config["buckets"][0]["inputs"][0].update(body="ok\u2603", headers={"X-Answer": "1"})
    async with relay_lite.open_relay(config) as relay, \
            httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as api:
        [input_] = (await api.get("/v1/buckets/github/inputs")).json()
    assert bytes(input_["body"]) == "ok\u2603".encode() and input_["headers"] == {"X-Answer": ["1"]}


async def test_a_token_sees_only_its_buckets(relay):
    async with httpx.AsyncClient(base_url=relay.url, auth=(SCOPED_KEY, SCOPED_SECRET)) as scoped:
        assert [bucket["name"] for bucket in (await scoped.get("/v1/buckets")).json()] == ["github"]
        hidden = await scoped.get("/v1/buckets/stripe")
    assert hidden.status_code == 404 and hidden.json() == {"error": "no bucket 'stripe' for this token"}


@pytest.mark.parametrize("method, path", [("POST", "/v1/buckets"), ("PUT", f"/v1/buckets/{GITHUB_ID}"),
                                          ("DELETE", "/v1/buckets/github"), ("POST", "/v1/buckets/github/inputs")])
async def test_changing_a_bucket_is_405_saying_the_config_file_holds_them(api, method, path):
    answer = await api.request(method, path, json={"name": "x"})
    assert answer.status_code == 405 and "come from the relay's config file" in answer.json()["error"]


@pytest.mark.parametrize("path", ["/v1/tokens", "/v1/buckets/github/nothing", "/v1/logs/x/y/z"])
async def test_paths_the_hosted_api_has_and_relay_lite_does_not_are_json_404s(api, path):
    answer = await api.get(path)
    assert answer.status_code == 404 and answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["error"].startswith("relay_lite does not serve /v1/")


async def test_the_buckets_api_needs_a_token(relay):
    async with httpx.AsyncClient(base_url=relay.url) as anonymous:
        answer = await anonymous.get("/v1/buckets", headers={
            "Authorization": "Basic " + base64.b64encode(b"nobody:wrong").decode()})
    assert answer.status_code == 401 and "error" in answer.json()
