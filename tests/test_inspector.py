"""The web inspector at /, in a real browser: Debian's chromium and chromedriver (.ci/run installs
them), driven by Selenium. Each test saves a screenshot of every state it reaches under
.cache/screenshots/ (git-ignored) for a person to look at."""

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (.ci/run installs Debian's)", allow_module_level=True)

SCREENSHOTS = Path(__file__).resolve().parents[1] / ".cache" / "screenshots"
KEY, SECRET = "inspector-key", "a-secret-for-the-inspector-tests"


def config(**server):
    return {"server": server, "tokens": [{"key": KEY, "secret": SECRET}],
            "buckets": [{"name": "github", "inputs": [{"id": "in-github"}]},
                        {"name": "stripe", "inputs": [{"id": "in-stripe"}]}]}


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, request):
    """The browser, on a fresh tab's state, and a `shot(name)` that saves a screenshot."""
    browser.set_window_size(1280, 900)
    browser.get_log("browser")  # what an earlier test left: each test reads its own
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shot(name):
        browser.save_screenshot(str(SCREENSHOTS / f"{request.node.name}-{name}.png"))
    yield browser, shot
    browser.get("about:blank")
    browser.execute_script("try { sessionStorage.clear() } catch (e) {}")


def wait(driver, condition, timeout=10.0):
    """`condition()` once it holds; an element the page replaced meanwhile is looked up again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.02,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: condition())


def sign_in(driver, relay, secret=SECRET):
    driver.get(relay.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.find_element(By.ID, "key").send_keys(KEY)
    driver.find_element(By.ID, "secret").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()


def state_line(driver):
    return driver.find_element(By.ID, "state").text


def rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#rows tr")


def hex_dump(data: bytes) -> str:
    """The dump the page shows of a binary body: offset, 16 bytes in hex, and their printable text."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7f else "." for b in chunk)
        lines.append(f"{offset:08x}  {' '.join(f'{b:02x}' for b in chunk):<47}  |{text}|")
    return "\n".join(lines)


def test_a_wrong_secret_shows_an_error(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    sign_in(driver, relay, secret="not-the-secret-at-all-0123")
    error = wait(driver, lambda: driver.find_element(By.ID, "sign-in-error").is_displayed()
                 and driver.find_element(By.ID, "sign-in-error"))
    assert error.text.startswith("Sign-in failed:")
    assert state_line(driver) == "signed out" and not driver.find_element(By.ID, "inspector").is_displayed()
    assert driver.execute_script("return sessionStorage.length") == 0
    shot("wrong-secret")


def test_a_webhook_appears_live_and_its_details_are_right_byte_for_byte(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver) == "connected: live")
    assert driver.find_element(By.ID, "empty").is_displayed()
    shot("signed-in")

    body = bytes(range(40)) + b"\xff\xfe binary"
    sent = httpx.post(relay.relay.input_url("in-github") + "/hooks/push?b=%20x&a=1", content=body,
                      headers={"Content-Type": "application/octet-stream", "X-Delivery": "abc  def",
                               "X-Twice": "one"})
    assert sent.status_code == 200
    posted = time.monotonic()
    wait(driver, lambda: len(rows(driver)) == 1, timeout=1.0)  # within a second
    appeared = time.monotonic() - posted
    cells = [cell.text for cell in rows(driver)[0].find_elements(By.TAG_NAME, "td")]
    assert cells[1:] == ["github", "POST", "/hooks/push", f"{len(body)} B", "received"]  # watching is no delivery
    shot("live")

    rows(driver)[0].find_element(By.TAG_NAME, "button").click()
    wait(driver, lambda: driver.find_element(By.ID, "detail").is_displayed())
    detail = driver.find_element(By.ID, "detail")
    assert driver.find_element(By.ID, "detail-title").text == "POST /hooks/push"
    headers = {row.find_element(By.TAG_NAME, "th").get_attribute("textContent"):
               row.find_element(By.TAG_NAME, "td").get_attribute("textContent")
               for row in detail.find_elements(By.CSS_SELECTOR, "#detail-headers tr")}
    assert headers["X-Delivery"] == "abc  def" and headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(body))
    assert driver.find_element(By.ID, "detail-query").get_attribute("textContent") == "b=%20x&a=1"
    assert driver.find_element(By.ID, "detail-body-kind").text == f"(binary, hex, {len(body)} B)"
    assert driver.find_element(By.ID, "detail-body").get_attribute("textContent") == hex_dump(body)
    shot("detail")
    assert appeared < 1.0


def test_copy_as_curl_sends_the_same_webhook_again(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver) == "connected: live")
    body = b"@/etc/hostname \x00quote ' backslash \\ dollar $(id) `id` %s \xe2\x82\xac end"  # "@": a file, to curl
    httpx.post(relay.relay.input_url("in-stripe") + "/x[1-2]?q='1'&m={a,b}", content=body,
               headers={"X-Odd": "it's $HOME", "X-Empty": ""})
    wait(driver, lambda: len(rows(driver)) == 1)
    rows(driver)[0].find_element(By.TAG_NAME, "button").click()
    wait(driver, lambda: driver.find_element(By.ID, "detail").is_displayed())
    driver.find_element(By.ID, "copy-curl").click()
    wait(driver, lambda: "curl command" in driver.find_element(By.ID, "detail-message").text)
    command = driver.find_element(By.ID, "detail-curl").get_attribute("textContent")
    shot("curl")
    with relay.client(["stripe"]) as client:
        subprocess.run(["sh", "-c", command + " --silent --show-error"], check=True, timeout=20)  # any POSIX shell
        frame = client.webhook()
        with pytest.raises(trio.TooSlowError):
            client.webhook(timeout=1)  # once: no [1-2] or {a,b} ranges
    got = base64.b64decode(frame["body"]) if frame.get("body_encoding") == "base64" else frame["body"].encode()
    assert got == body and frame["query"] == "q='1'&m={a,b}" and frame["meta"]["output_destination"] == "/x[1-2]"
    headers = {name.lower(): values for name, values in frame["headers"].items()}
    assert headers["x-odd"] == ["it's $HOME"] and headers["x-empty"] == [""]
    assert headers["user-agent"][0].startswith("python-httpx/") and "content-type" not in headers  # not curl's


def test_resend_makes_a_new_entry_and_filters_narrow_the_list(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    for n in range(3):
        httpx.post(relay.relay.input_url("in-github"), content=json.dumps({"n": n}),
                   headers={"Content-Type": "application/json"})
    httpx.post(relay.relay.input_url("in-stripe"), content="stripe one")
    sign_in(driver, relay)
    wait(driver, lambda: len(rows(driver)) == 4)  # older ones, from GET /v1/logs
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows(driver)] == ["stripe"] + ["github"] * 3
    rows(driver)[1].find_element(By.TAG_NAME, "button").click()
    wait(driver, lambda: driver.find_element(By.ID, "detail").is_displayed())
    assert driver.find_element(By.ID, "detail-body").get_attribute("textContent") == '{\n  "n": 2\n}'
    assert driver.find_element(By.ID, "detail-body-kind").text == "(JSON, 8 B)"
    driver.find_element(By.ID, "resend").click()
    wait(driver, lambda: driver.find_element(By.ID, "detail-message").text.startswith("resent as "))
    new_id = driver.find_element(By.ID, "detail-message").text.removeprefix("resent as ")
    wait(driver, lambda: len(rows(driver)) == 5 and rows(driver)[0].get_attribute("data-id") == new_id)
    logs = httpx.get(relay.url + f"/v1/logs/{new_id}", auth=(KEY, SECRET)).json()
    assert logs["body"] == '{"n": 2}' and logs["resent_from"] == rows(driver)[2].get_attribute("data-id")
    shot("resent")

    driver.find_element(By.ID, "bucket-filter").send_keys("stripe")
    wait(driver, lambda: [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows(driver)] == ["stripe"])
    httpx.post(relay.relay.input_url("in-github"), content="hidden by the filter")
    httpx.post(relay.relay.input_url("in-stripe"), content="stripe two")
    wait(driver, lambda: len(rows(driver)) == 2)
    assert all(row.find_elements(By.TAG_NAME, "td")[1].text == "stripe" for row in rows(driver))
    shot("filtered")


def test_it_works_from_the_keyboard_and_on_a_phone(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    httpx.post(relay.relay.input_url("in-github") + "/a/rather/long/path/of/a/webhook/sender", content="x")
    driver.set_window_size(390, 844)
    sign_in(driver, relay)
    wait(driver, lambda: len(rows(driver)) == 1)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shot("phone-list")
    opener = rows(driver)[0].find_element(By.TAG_NAME, "button")
    driver.execute_script("arguments[0].focus()", opener)
    opener.send_keys(Keys.ENTER)
    wait(driver, lambda: driver.find_element(By.ID, "detail").is_displayed())
    assert driver.switch_to.active_element.get_attribute("id") == "detail"
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shot("phone-detail")
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(driver, lambda: not driver.find_element(By.ID, "detail").is_displayed())
    assert driver.switch_to.active_element == rows(driver)[0].find_element(By.TAG_NAME, "button")


def test_the_page_runs_under_a_strict_content_security_policy_and_reconnects(page, relay_factory):
    driver, shot = page
    relay = relay_factory(config())
    answer = httpx.get(relay.url + "/")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "default-src 'none'" in policy
    assert not re.search(r"<script>|\son[a-z]+=|style=", answer.text)  # nothing inline for the policy to refuse
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver) == "connected: live")
    driver.refresh()  # the token is kept in the tab: signed in again, without the form
    wait(driver, lambda: state_line(driver) == "connected: live")
    assert not driver.find_element(By.ID, "sign-in").is_displayed()

    # A changed token's sockets are closed ("connect again"): the page says so, reconnects, and
    # gets what came while it was away (it subscribes with since).
    changed = config(host="127.0.0.1", port=0)
    changed["tokens"][0]["buckets"] = ["github"]
    relay.reload(changed)
    wait(driver, lambda: state_line(driver).startswith("reconnecting in 1 s (this token changed"))
    shot("reconnecting")
    httpx.post(relay.relay.input_url("in-github"), content="while away")
    wait(driver, lambda: state_line(driver) == "connected: live")
    wait(driver, lambda: len(rows(driver)) == 1)

    changed["tokens"][0]["secret"] = "a-new-secret-for-the-inspector"  # its session ends with it: signed out
    relay.reload(changed)
    wait(driver, lambda: driver.find_element(By.ID, "sign-in").is_displayed())
    assert driver.find_element(By.ID, "sign-in-error").text.startswith("Signed out: the relay no longer takes")
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []  # no CSP violation, no script error
    shot("signed-out")


@pytest.mark.parametrize("inspector, status", [(True, 200), (False, 404)])
def test_the_inspector_can_be_turned_off(relay_factory, inspector, status):
    relay = relay_factory(config(inspector=inspector))
    assert httpx.get(relay.url + "/").status_code == status
    assert httpx.get(relay.url + "/inspector/app.js").status_code == status


def test_a_script_in_a_webhooks_answer_cannot_read_the_inspectors_session(page, relay_factory):
    """An answer of text/html, on the inspector's origin, ran its script in a signed-in user's
    tab and read the token's key and secret from session storage (issue 20, finding 1)."""
    driver, shot = page
    relay = relay_factory({**config(), "buckets": [{"name": "github", "inputs": [
        {"id": "in-github"},
        {"id": "in-html", "name": "html", "headers": {"Content-Type": "text/html"},
         "body": "<title>answer</title><script>document.title = 'ran: ' + JSON.stringify(sessionStorage)</script>"}]}]})
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver) == "connected: live")
    kept = driver.execute_script("return JSON.stringify(sessionStorage)")
    assert "relay_lite-session." in kept and SECRET not in kept  # the session, never the secret
    driver.get(relay.relay.input_url("in-html"))  # the same tab, the same origin
    wait(driver, lambda: driver.execute_script("return document.readyState") == "complete")
    shot("answer")
    assert driver.title == "answer"  # the page is there, sandboxed: its script never ran
    assert not driver.execute_script("try { return sessionStorage.length } catch (e) { return 0 }")  # no origin


def test_a_sign_in_the_relay_is_too_busy_to_check_says_so_and_is_retried(page, relay_factory):
    """Under a flood of guesses at a hashed secret the inspector said "wrong secret" to the
    right one (issue 20, finding 10): busy is not wrong."""
    import relay_lite
    driver, shot = page
    relay = relay_factory({**config(), "tokens": [{"key": KEY, "secret_hash": str(relay_lite._SecretHash.of(SECRET))}]})
    hashing = relay.relay.services.credentials._hashing
    checked, busy = hashing.run, [2]

    async def busy_at_first(clean, check, secret):
        if busy[0]:
            busy[0] -= 1
            raise relay_lite.HashingBusy("too many authentications are waiting to be checked: try again", 1.0)
        return await checked(clean, check, secret)
    hashing.run = busy_at_first
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver).startswith("the relay is busy checking secrets: trying again in"))
    shot("busy")
    assert not driver.find_element(By.ID, "sign-in-error").is_displayed()
    wait(driver, lambda: state_line(driver) == "connected: live", timeout=15)


def test_the_page_renews_its_session_and_its_socket_goes_on_with_it(page, relay_factory, monkeypatch):
    """A socket signed in with a session is closed when the session expires: the page renews
    it, and gives its socket the new one, so its watch goes on without a reconnect."""
    import relay_lite
    monkeypatch.setattr(relay_lite, "_SESSION_SECONDS", 2)
    monkeypatch.setattr(relay_lite, "_INSPECTOR_SCRIPT",
                        relay_lite._INSPECTOR_SCRIPT.replace("const RENEW = 5 * 60 * 1000;", "const RENEW = 500;"))
    driver, shot = page
    relay = relay_factory(config())
    sign_in(driver, relay)
    wait(driver, lambda: state_line(driver) == "connected: live")
    (socket,) = relay.relay.sockets.open
    first = driver.execute_script("return sessionStorage.getItem('relay_lite.session')")
    time.sleep(3.5)  # the first session expired 1.5 s ago, and the relay looks each second
    assert relay.relay.sockets.open == {socket} and socket.close_reason is None  # the same socket, open
    assert driver.execute_script("return sessionStorage.getItem('relay_lite.session')") != first
    httpx.post(relay.relay.input_url("in-github"), content="after the first session")
    wait(driver, lambda: len(rows(driver)) == 1)
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
