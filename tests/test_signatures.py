"""Signature checks at the input (issue 11): each sender's scheme, signed here as the sender's own
documentation says, and checked by the relay: good, rotated secret, wrong secret, missing, stale,
and the body changed by one byte."""

import base64
import hashlib
import hmac
import time

import httpx
import pytest
from hypothesis import given, settings, strategies as st

import relay_lite
from relay_lite import VerifyConfig

from conftest import REJECTED, SENT, KEY, SECRET, post, relay_config, subscriber

BODY = b'{"action": "opened", "number": 42}'
WHSEC = "whsec_" + base64.b64encode(b"a standard webhooks key, 24+ bytes").decode()


def hex_hmac(key: bytes, message: bytes, algorithm=hashlib.sha256) -> str:
    return hmac.new(key, message, algorithm).hexdigest()


def b64_hmac(key: bytes, message: bytes, algorithm=hashlib.sha256) -> str:
    return base64.b64encode(hmac.new(key, message, algorithm).digest()).decode()


# Each scheme: its config (less secrets), two secrets of the right form, and how its sender signs.
SCHEMES = {
    "github": ({}, ("gh-secret-one", "gh-secret-two"),
               lambda secret, body, now: {"X-Hub-Signature-256": "sha256=" + hex_hmac(secret.encode(), body)}),
    "stripe": ({}, ("whsec_stripe_one", "whsec_stripe_two"),
               lambda secret, body, now: {"Stripe-Signature": f"t={int(now)},v1="
                                          + hex_hmac(secret.encode(), f"{int(now)}.".encode() + body)
                                          + ",v0=" + "0" * 64}),
    "slack": ({}, ("slack-signing-one", "slack-signing-two"),
              lambda secret, body, now: {"X-Slack-Request-Timestamp": str(int(now)),
                                         "X-Slack-Signature": "v0=" + hex_hmac(secret.encode(),
                                                                               f"v0:{int(now)}:".encode() + body)}),
    "shopify": ({}, ("shpss_one", "shpss_two"),
                lambda secret, body, now: {"X-Shopify-Hmac-Sha256": b64_hmac(secret.encode(), body)}),
    "standard-webhooks": ({}, ("whsec_" + base64.b64encode(b"old key bytes, 24 or more").decode(), WHSEC),
                          lambda secret, body, now: {
                              "webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                              "webhook-timestamp": str(int(now)),
                              "webhook-signature": "v1,bm90IHRoaXMgb25l v1," + b64_hmac(
                                  base64.b64decode(secret.removeprefix("whsec_")),
                                  f"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W.{int(now)}.".encode() + body)}),
    "hmac": ({"header": "X-Signature", "algorithm": "sha1", "encoding": "base64", "prefix": "sha1="},
             ("generic-one", "generic-two"),
             lambda secret, body, now: {"X-Signature": "sha1=" + b64_hmac(secret.encode(), body, hashlib.sha1)}),
    "basic": ({}, ("ci:first-password", "ci:second-password"),
              lambda secret, body, now: {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}),
    "bearer": ({}, ("bearer-token-one", "bearer-token-two"),
               lambda secret, body, now: {"Authorization": f"Bearer {secret}"}),
    "token": ({"header": "X-Gitlab-Token"}, ("gitlab-token-one", "gitlab-token-two"),  # GitLab's
              lambda secret, body, now: {"X-Gitlab-Token": secret}),
}
TIMED = {"stripe", "slack", "standard-webhooks"}


def verify_config(scheme, secrets=None):
    options, pair, _ = SCHEMES[scheme]
    return VerifyConfig(scheme=scheme, secrets=tuple(secrets or pair[:1]), **options)


def check(scheme, headers, body=BODY, now=None, secrets=None):
    listed = {name: [value] for name, value in headers.items()}
    return relay_lite.check_signature(verify_config(scheme, secrets), listed, body, now or time.time())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_webhook_its_sender_signed_passes(scheme):
    _, (secret, _), sign = SCHEMES[scheme]
    now = time.time()
    assert check(scheme, sign(secret, BODY, now), now=now) == ""


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_rotated_secret_passes_while_both_are_listed(scheme):
    _, (old, new), sign = SCHEMES[scheme]
    assert check(scheme, sign(new, BODY, time.time()), secrets=(old, new)) == ""
    assert check(scheme, sign(old, BODY, time.time()), secrets=(old, new)) == ""
    assert check(scheme, sign(old, BODY, time.time()), secrets=(new,)) != ""  # removed: refused


@pytest.mark.parametrize("scheme", SCHEMES)
def test_another_secrets_signature_fails(scheme):
    _, (secret, other), sign = SCHEMES[scheme]
    problem = check(scheme, sign(other, BODY, time.time()), secrets=(secret,))
    assert problem and ("does not match" in problem or "wrong" in problem)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_missing_signature_fails_and_says_what_is_missing(scheme):
    assert "missing" in check(scheme, {"Content-Type": "application/json"})


@pytest.mark.parametrize("scheme", [scheme for scheme in SCHEMES if scheme not in ("basic", "bearer", "token")])
def test_the_body_changed_by_one_byte_fails(scheme):
    _, (secret, _), sign = SCHEMES[scheme]
    headers = sign(secret, BODY, time.time())
    changed = BODY[:-2] + b"3" + BODY[-1:]  # 42 -> 43
    assert check(scheme, headers, body=changed) != ""


@pytest.mark.parametrize("scheme", sorted(TIMED))
def test_a_stale_signature_fails_a_fresh_one_within_the_tolerance_passes(scheme):
    _, (secret, _), sign = SCHEMES[scheme]
    now = time.time()
    assert "off (tolerance 300 s)" in check(scheme, sign(secret, BODY, now - 301), now=now)
    assert "off (tolerance 300 s)" in check(scheme, sign(secret, BODY, now + 301), now=now)  # from the future
    assert check(scheme, sign(secret, BODY, now - 290), now=now) == ""


def test_svix_header_names_are_standard_webhooks_too():
    _, (secret, _), sign = SCHEMES["standard-webhooks"]
    headers = {name.replace("webhook-", "svix-"): value for name, value in sign(secret, BODY, time.time()).items()}
    assert check("standard-webhooks", headers) == ""


def test_generic_hmac_in_hex_with_sha512():
    verify = VerifyConfig(scheme="hmac", secrets=("k",), header="X-Sig", algorithm="sha512", encoding="hex")
    good = {"X-Sig": [hex_hmac(b"k", BODY, hashlib.sha512)]}
    assert relay_lite.check_signature(verify, good, BODY, time.time()) == ""
    assert relay_lite.check_signature(verify, {"X-Sig": ["0" * 128]}, BODY, time.time()) == "X-Sig does not match"


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(sorted(SCHEMES)),
       headers=st.dictionaries(st.sampled_from(["X-Hub-Signature-256", "Stripe-Signature", "X-Slack-Signature",
                                                "X-Slack-Request-Timestamp", "X-Shopify-Hmac-Sha256", "webhook-id",
                                                "webhook-timestamp", "webhook-signature", "X-Signature",
                                                "Authorization", "X-Gitlab-Token"]),
                               st.lists(st.text(max_size=80), min_size=1, max_size=2)),
       body=st.binary(max_size=64))
def test_any_headers_are_checked_without_an_error(scheme, headers, body):
    problem = relay_lite.check_signature(verify_config(scheme), headers, body, time.time())
    assert isinstance(problem, str) and problem and "\n" not in problem


@pytest.mark.parametrize("verify, error", [
    ({"scheme": "gitlab", "secrets": ["x"]}, "scheme: must be one of github, stripe"),
    ({"scheme": "github"}, "secrets: must list one secret or more"),
    ({"scheme": "github", "secrets": [""]}, "secrets: must list one secret or more"),
    ({"scheme": "github", "secrets": ["x"], "header": "X-Sig"}, 'header: is for scheme "hmac" or "token" only'),
    ({"scheme": "token", "secrets": ["x"], "prefix": "v1="}, 'prefix: is for scheme "hmac" only'),
    ({"scheme": "token", "secrets": ["x"]}, "header: must name the header"),
    ({"scheme": "hmac", "secrets": ["x"]}, "header: must name the header"),
    ({"scheme": "hmac", "secrets": ["x"], "header": "X-Sig", "algorithm": "md5"}, "algorithm: must be sha1"),
    ({"scheme": "hmac", "secrets": ["x"], "header": "X-Sig", "encoding": "base32"}, "encoding: must be hex"),
    ({"scheme": "basic", "secrets": ["no colon"]}, 'secrets\\[0\\]: must be "user:password"'),
    ({"scheme": "standard-webhooks", "secrets": ["whsec_%%%"]}, "secrets\\[0\\]: must be base64"),
    ({"scheme": "stripe", "secrets": ["x"], "tolerance": 0}, "tolerance: must be above 0"),
])
def test_a_wrong_verify_table_is_refused_with_its_key(verify, error):
    config = relay_config()
    config["buckets"][0]["inputs"][0]["verify"] = verify
    with pytest.raises(relay_lite.ConfigError, match="buckets\\[0\\].inputs\\[0\\].verify." + error):
        relay_lite.load_config(config)


# ---------------------------------------------------------------------------- at the input, over HTTP


async def test_a_webhook_that_fails_its_check_gets_401_and_is_relayed_to_nobody(caplog):
    config = relay_config()
    config["buckets"][0]["inputs"][0]["verify"] = {"scheme": "github", "secrets": ["gh-secret-one"]}
    _, _, sign = SCHEMES["github"]
    async with relay_lite.open_relay(config) as relay, subscriber(relay, ["github"]) as client:
        forged = await post(relay, content=BODY, headers=sign("a guess", BODY, 0))
        missing = await post(relay, content=BODY)
        good = await post(relay, content=BODY, headers=sign("gh-secret-one", BODY, 0))
        frame = await client.webhook()
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "github"})).json()["data"]
            rejected = (await http.get("/v1/logs", params={"bucket": "github", "status": "rejected"})).json()["data"]
            answer = await http.put(f"/v1/logs/{rejected[0]['id']}", json={"status_code": 200})
            not_json = await http.put(f"/v1/logs/{rejected[0]['id']}", content=b"not json")
    assert (forged.status_code, forged.text) == (401, "signature check failed: X-Hub-Signature-256 does not match\n")
    assert (missing.status_code, missing.text) == (401, "signature check failed: X-Hub-Signature-256 is missing\n")
    assert good.status_code == 200
    assert frame["body"] == BODY.decode()  # the first frame is the signed one: the others went nowhere
    assert [log["status"] for log in logs] == [SENT, REJECTED, REJECTED]  # newest first
    assert [bytes(log["response_body"]) for log in rejected] == [
        b"signature check failed: X-Hub-Signature-256 is missing",
        b"signature check failed: X-Hub-Signature-256 does not match"]
    assert rejected[0]["status_code"] == 401 and rejected[1]["body"] == BODY.decode()
    assert answer.status_code == 409 and answer.json()["error"].endswith("it takes no answer")
    assert not_json.status_code == 409  # whatever the body: it is not read
    refusals = [record.getMessage() for record in caplog.records if "refused a webhook" in record.getMessage()]
    assert refusals and "X-Hub-Signature-256 does not match" in refusals[0]


async def test_forgeries_never_push_an_accepted_webhook_out_of_the_history():
    """They are kept in a short list of their own (the last 50 of a bucket, 16 KiB of each body)."""
    config = relay_config()
    config["buckets"][0]["history_size"] = 3
    config["buckets"][0]["inputs"][0]["verify"] = {"scheme": "bearer", "secrets": ["the-only-bearer-token"]}
    async with relay_lite.open_relay(config) as relay:
        good = await post(relay, content="signed", headers={"Authorization": "Bearer the-only-bearer-token"})
        for n in range(60):
            forged = await post(relay, content=b"x" * 100_000, headers={"Authorization": f"Bearer guess-{n}"})
            assert forged.status_code == 401
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            logs = (await http.get("/v1/logs", params={"bucket": "github", "limit": 100})).json()
    assert good.status_code == 200 and logs["total"] == 51
    assert [log["status"] for log in logs["data"]].count(REJECTED) == 50
    assert logs["data"][-1]["body"] == "signed"  # the oldest, and still there
    assert {len(log["body"]) for log in logs["data"][:-1]} == {16 * 1024}


@pytest.mark.parametrize("scheme, headers", [
    ("stripe", {"Stripe-Signature": "t=" + "9" * 400 + ",v1=00"}),
    ("slack", {"X-Slack-Request-Timestamp": "9" * 400, "X-Slack-Signature": "v0=00"}),
    ("standard-webhooks", {"webhook-id": "m", "webhook-timestamp": "9" * 400, "webhook-signature": "v1,AA=="}),
    ("slack", {"X-Slack-Request-Timestamp": "\u0661\u0662", "X-Slack-Signature": "v0=00"}),  # Arabic-Indic digits
])
def test_a_timestamp_that_is_no_unix_time_is_refused_not_a_crash(scheme, headers):
    assert "is not a Unix time" in check(scheme, headers)


async def test_a_replay_of_a_timestamped_webhook_is_answered_but_not_relayed_again():
    """Within the tolerance a captured webhook would pass its check: each input remembers the
    signatures (Standard Webhooks: the message ids) it accepted, until they are stale anyway."""
    config = relay_config()
    config["buckets"][1]["inputs"][0]["verify"] = {"scheme": "stripe", "secrets": ["whsec_stripe_one"]}
    config["buckets"][0]["inputs"][0]["verify"] = {"scheme": "standard-webhooks", "secrets": [WHSEC]}
    _, _, stripe = SCHEMES["stripe"]
    _, _, standard = SCHEMES["standard-webhooks"]
    now = time.time()
    async with relay_lite.open_relay(config) as relay:
        signed = stripe("whsec_stripe_one", BODY, now)
        answers = [(await post(relay, input_id="in-stripe", content=BODY, headers=signed)).status_code
                   for _ in range(3)]
        fresh = stripe("whsec_stripe_one", BODY, now + 1)  # the sender's own retry: signed afresh
        answers.append((await post(relay, input_id="in-stripe", content=BODY, headers=fresh)).status_code)
        first = standard(WHSEC, BODY, now)
        svix = {name.replace("webhook-", "svix-"): value for name, value in first.items()}
        again = [(await post(relay, content=BODY, headers=headers)).status_code for headers in (first, svix)]
        async with httpx.AsyncClient(base_url=relay.url, auth=(KEY, SECRET)) as http:
            stripe_logs = (await http.get("/v1/logs", params={"bucket": "stripe"})).json()["total"]
            standard_logs = (await http.get("/v1/logs", params={"bucket": "github"})).json()["total"]
        replays = relay.metrics.rejected["replay"]
    assert answers == [200, 200, 200, 200] and again == [200, 200]  # a replayer learns nothing
    assert (stripe_logs, standard_logs, replays) == (2, 1, 3)
