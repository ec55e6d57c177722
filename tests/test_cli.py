"""The command line, run as a user runs it: a subprocess of `python relay_lite.py`."""

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import relay_lite

from helpers import SCRIPT, run, start, stop


async def test_demo_mode_prints_what_to_use_and_relays():
    process, banner = await start("--port", "0")
    try:
        url = re.search(r"listening on (http://\S+)", banner).group(1)
        socket_url = re.search(r"socket URL: (ws://\S+)", banner).group(1)
        key = re.search(r"key:\s+(\S+)", banner).group(1)
        secret = re.search(r"secret:\s+(\S+)", banner).group(1)
        curl = re.search(r"curl .*", banner).group(0)
        input_url = curl.split()[-1]
        assert input_url.startswith(url + "/v1/webhooks/")
        assert socket_url == url.replace("http", "ws") + "/v1/socket"
        inspector = re.search(r"inspector:\s+(\S+)", banner).group(1)  # it was never named (issue 21, finding 14)
        async with httpx.AsyncClient() as http:
            assert inspector == url + "/" and "relay_lite inspector" in (await http.get(inspector)).text
        async with trio_websocket.open_websocket_url(socket_url) as ws:
            await ws.send_message(json.dumps({"action": "auth", "key": key, "secret": secret}))
            assert json.loads(await ws.get_message())["status"] == "authenticated"
            await ws.send_message(json.dumps({"action": "subscribe", "buckets": ["demo"]}))
            assert json.loads(await ws.get_message())["status"] == "subscribed"
            async with httpx.AsyncClient() as http:  # what the printed curl command sends
                response = await http.post(input_url, content='{"hello": "relay"}',
                                           headers={"Content-Type": "application/json"})
            assert response.status_code == 200
            frame = json.loads(await ws.get_message())
            assert frame["body"] == '{"hello": "relay"}' and frame["meta"]["bucket_name"] == "demo"
            channel = re.search(r"smee channel \(smee-client, gosmee\): (\S+)", banner).group(1)
            assert f"npx smee-client --url {channel} --target http://localhost:3000" in banner
            async with httpx.AsyncClient() as http, http.stream(  # the demo's channel streams what came
                    "GET", channel, headers={"Accept": "text/event-stream", "Last-Event-ID": "0-0"}) as stream:
                lines = stream.aiter_lines()
                with trio.fail_after(10):
                    while not (line := await anext(lines)).startswith("data: {\""):
                        pass
            assert json.loads(line.removeprefix("data: "))["body"] == {"hello": "relay"}
            assert await stop(process) == 0
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1001
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_config_file_with_port_override(tmp_path):
    assert run("init", str(tmp_path / "relay.toml")).returncode == 0
    process, banner = await start("--config", str(tmp_path / "relay.toml"), "--port", "0")
    try:
        assert "bucket 'github', input 'Default public endpoint': http://127.0.0.1:" in banner
        assert "Demo mode" not in banner
    finally:
        assert await stop(process) == 0


def test_init_writes_a_config_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "relay.toml"
    result = run("init", str(path))
    assert result.returncode == 0 and f"wrote {path}" in result.stdout
    assert path.stat().st_mode & 0o777 == 0o600  # its secret, the owner's only: it was 0644 (issue 21, 10)
    first = path.read_text()
    assert relay_lite.load_config(path).buckets[0].name == "github"
    result = run("init", str(path))
    assert result.returncode == 2 and "exists; pass --force" in result.stderr
    path.chmod(0o644)
    assert run("init", str(path), "--force").returncode == 0
    assert path.read_text() != first  # fresh ids each time
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("text, expected", [
    ("[server]\nport = 'x'", "server.port: expected an integer, got a string ('x')"),
    ("[[buckets]]\nname = 'a'\nfoo = 1", "buckets[0].foo: unknown key"),
    ("[server", "not valid TOML"),
])
def test_bad_config_exits_2_with_a_message_and_no_traceback(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"relay_lite: error: {path}: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_says_whether_a_config_is_good_as_a_start_would(tmp_path):
    config = tmp_path / "relay.toml"
    assert run("init", str(config)).returncode == 0
    for args in (("check", "--config", str(config)), ("--config", str(config), "check")):
        good = run(*args)
        assert (good.returncode, good.stdout) == (0, f"{config}: good: 1 bucket(s), 1 input(s), 0 output(s), "
                                                     "1 token(s)\n")
    config.write_text(config.read_text().replace('name = "github"', 'name = ""'))
    bad = run("check", "--config", str(config))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.strip().splitlines()[-1] == f"relay_lite: error: {config}: buckets[0].name: must not be empty"
    (tmp_path / "empty").mkdir()
    missing = subprocess.run([sys.executable, SCRIPT, "check"], capture_output=True, text=True, timeout=20,
                             cwd=tmp_path / "empty")
    assert missing.returncode == 2 and "no relay.toml here: give the config file, check --config FILE" in missing.stderr
    config.write_text(config.read_text().replace('name = ""', 'name = "github"'))
    here = subprocess.run([sys.executable, SCRIPT, "check"], capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert (here.returncode, here.stdout) == (0, "relay.toml: good: 1 bucket(s), 1 input(s), 0 output(s), 1 token(s)\n")


@pytest.mark.parametrize("storage, complaint", [
    ("/nonexistent/folder/log.db", "storage.path: cannot use '/nonexistent/folder/log.db' as the log's database: its "
                                   "folder '/nonexistent/folder' does not exist"),
    ("not-a-database.db", "as the log's database: file is not a database"),
])
async def test_check_and_start_refuse_a_log_database_that_cannot_be_used_naming_the_file(tmp_path, storage, complaint):
    """`check` passed a config whose [storage] path could not be opened, and the start then
    failed without the file's name (issue 21, finding 8)."""
    config = tmp_path / "relay.toml"
    assert run("init", str(config)).returncode == 0
    (tmp_path / "not-a-database.db").write_text("some text, not SQLite\n" * 100)
    config.write_text(config.read_text() + f'\n[storage]\npath = "{storage}"\n')
    for args in (("check", "--config", str(config)), ("--config", str(config), "--port", "0")):
        refused = run(*args)
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert refused.stderr.startswith(f"relay_lite: error: {config}: "), refused.stderr
        assert complaint in refused.stderr and "Traceback" not in refused.stderr


async def test_relative_paths_in_a_config_are_beside_it_not_where_the_relay_started(tmp_path):
    """systemd starts a relay in /: a relative [storage] path was a file in / (issue 21, finding 8)."""
    folder = tmp_path / "etc"
    folder.mkdir()
    assert run("init", str(folder / "relay.toml")).returncode == 0
    with open(folder / "relay.toml", "a") as file:
        file.write('\n[storage]\npath = "state/log.db"\n')
    (folder / "state").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checked = subprocess.run([sys.executable, SCRIPT, "check", "--config", str(folder / "relay.toml")],
                             capture_output=True, text=True, timeout=20, cwd=elsewhere)
    assert checked.returncode == 0, checked.stderr
    process, _ = await start("--config", str(folder / "relay.toml"), "--port", "0", cwd=elsewhere)
    assert await stop(process) == 0
    assert (folder / "state" / "log.db").is_file() and list(elsewhere.iterdir()) == []
    config = relay_lite.load_config(folder / "relay.toml")
    assert config.storage.path == str(folder / "state" / "log.db")
    assert relay_lite.load_config({"storage": {"path": "log.db"}}).storage.path == "log.db"  # a dict: as given
    (folder / "tls.toml").write_text('[server]\ncertfile = "tls/cert.pem"\nkeyfile = "/abs/key.pem"\n')
    with pytest.raises(relay_lite.ConfigError, match=f"cannot load {folder}/tls/cert.pem with /abs/key.pem"):
        relay_lite.load_config(folder / "tls.toml")


async def test_log_format_json_writes_one_object_per_line(tmp_path):
    """The banner was plain text on stdout in JSON mode (issue 21, finding 11): now every line
    the relay writes, on stdout or stderr, is one JSON object."""
    err = tmp_path / "stderr"
    with open(err, "wb") as file:
        process = await trio.lowlevel.open_process([sys.executable, "-u", SCRIPT, "--log-format", "json", "--port",
                                                    "0"], stdout=subprocess.PIPE, stderr=file)
    try:
        out = b""
        with trio.fail_after(20):
            while not out.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, f"server exited: {out!r}"
                out += chunk
        banner = json.loads(out)
        assert banner["level"] == "info" and banner["message"].startswith("relay_lite ")
        assert banner["socket_url"] == banner["url"].replace("http", "ws") + "/v1/socket"
        assert banner["inspector"] == banner["url"] + "/"
        assert [(line["bucket"], line["url"]) for line in banner["inputs"]] == [
            ("demo", banner["demo"]["send"].split()[-1])]
        assert set(banner["demo"]) == {"key", "secret", "send", "auth", "subscribe", "forward", "init", "smee"}
        assert banner["smee_channels"] == [{"bucket": "demo", "url": banner["demo"]["smee"].split()[3]}]
        async with httpx.AsyncClient() as http:
            assert (await http.post(banner["demo"]["send"].split()[-1], content="line\nbreak \u2603")).status_code == 200
    finally:
        assert await stop(process) == 0
    assert await process.stdout.receive_some() == b""  # nothing more on stdout
    lines = [json.loads(line) for line in err.read_text().splitlines()]
    assert lines and all(set(line) == {"time", "level", "logger", "message"} for line in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines)
    assert any(line["message"].startswith("webhook ") and line["level"] == "info" for line in lines)
    assert lines[-1]["message"].startswith("shutting down")


def test_missing_config_file_exits_2(tmp_path):
    result = run("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr
    as_json = run("--log-format", "json", "--config", str(tmp_path / "nope.toml"))
    (line,) = as_json.stderr.splitlines()
    assert as_json.returncode == 2 and json.loads(line)["level"] == "error" and "cannot read" in json.loads(line)["message"]


def test_port_in_use_exits_1_with_a_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr and "Traceback" not in result.stderr


def test_main_is_callable_for_tests(capsys):
    with pytest.raises(SystemExit) as exited:
        relay_lite.main(["--version"])
    assert exited.value.code == 0
    assert relay_lite.__version__ in capsys.readouterr().out


def test_readme_commands_are_the_ones_ci_runs():
    root = Path(relay_lite.__file__).parent
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    test_command = re.search(r"^(python3 -m venv .*pytest.*)$", readme, re.M).group(1)
    assert test_command in ci
    assert re.search(r"^python3 -m venv .*relay_lite\.py$", readme, re.M)
    assert os.access(root / ".ci" / "run", os.X_OK)


CONSOLE_SCRIPT = str(Path(sys.executable).with_name("relay-lite"))  # what pip install made


def printed(command: str, program: bool = True) -> str:
    """How relay_lite prints `command` (a console script, a Python, or the module's file) it was
    run as: by name if PATH finds it there, else by its path (relative if under the working
    directory, with ./ for a program there), shell-quoted."""
    if shutil.which(Path(command).name) == command:
        return shlex.quote(Path(command).name)
    relative = os.path.relpath(command)
    if relative.startswith(".."):
        return shlex.quote(command)
    return shlex.quote(f"./{relative}" if program and os.sep not in relative else relative)


def test_the_console_script_names_itself_in_help_and_in_the_commands_it_prints(tmp_path):
    help = subprocess.run([CONSOLE_SCRIPT, "--help"], capture_output=True, text=True, timeout=20).stdout
    assert help.startswith("usage: relay-lite [options] [COMMAND ...]\n")  # COMMAND is optional
    check_help = subprocess.run([CONSOLE_SCRIPT, "check", "--help"], capture_output=True, text=True, timeout=20)
    assert check_help.stdout.startswith("usage: relay-lite check [-h]")
    config = tmp_path / "my relay's.toml"  # a path the shell must have quoted
    init = subprocess.run([CONSOLE_SCRIPT, "init", str(config)], capture_output=True, text=True, timeout=20)
    run_it = re.search(r"^Run: (.*)$", init.stdout, re.M).group(1)
    assert run_it == f"{printed(CONSOLE_SCRIPT)} --config {shlex.quote(str(config))}"
    checked = subprocess.run(shlex.split(run_it.replace("--config", "check --config")), capture_output=True,
                             text=True, timeout=20)
    assert checked.returncode == 0 and "good" in checked.stdout  # the printed command runs


async def test_the_banner_says_listening_once_and_the_commands_it_prints_run(tmp_path):
    process, banner = await start("--port", "0", stderr=subprocess.PIPE)
    try:
        assert await stop(process) == 0
        log = b""
        while chunk := await process.stderr.receive_some():
            log += chunk
    finally:
        if process.returncode is None:
            process.kill()
    assert (banner + log.decode()).count("listening on") == 1
    lasting = re.search(r"^For lasting ids: (.*) init relay.toml && ", banner, re.M).group(1)
    assert lasting == f"{printed(sys.executable)} {printed(SCRIPT, program=False)}"
    assert f"RELAY_SECRET=" in banner and f" {lasting} forward --relay " in banner
    init = subprocess.run([*shlex.split(lasting), "init", str(tmp_path / "relay.toml")], capture_output=True,
                          text=True, timeout=20)
    assert init.returncode == 0 and (tmp_path / "relay.toml").exists()


def test_a_config_nobody_can_use_is_warned_of(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    checked = run("check", "--config", str(tmp_path / "empty.toml"))
    assert checked.returncode == 0
    assert "warning: the config has no buckets, so no webhook can come in" in checked.stdout
    assert "warning: the config has no tokens, so no client can connect" in checked.stdout


def test_the_readmes_every_key_block_passes_check_once_its_placeholders_are_filled(tmp_path):
    """Pasted as the README said, the block failed check (a weak secret, a weak metrics token);
    a placeholder verify secret passed, and then refused every webhook (issue 21, finding 9)."""
    readme = (Path(SCRIPT).parent / "README.md").read_text()
    block = readme.partition("makes one):\n\n```toml\n")[2].partition("```")[0]
    assert "[server]" in block and "[[buckets.outputs]]" in block and block.count('"<') >= 5
    config = tmp_path / "relay.toml"
    config.write_text(block)
    pasted = run("check", "--config", str(config))
    assert pasted.returncode == 2 and "looks like a placeholder" in pasted.stderr, pasted.stderr
    config.write_text(re.sub(r'"<[^">]*>"', lambda _: f'"{secrets.token_urlsafe(24)}"', block))
    filled = run("check", "--config", str(config))
    assert (filled.returncode, filled.stderr) == (0, ""), filled.stderr
    assert filled.stdout == f"{config}: good: 1 bucket(s), 1 input(s), 1 output(s), 1 token(s)\n"  # no warning
    verify = "<the secret GitHub signs with>"
    assert f'"{verify}"' in block  # the placeholder in verify.secrets alone is refused too
    config.write_text(re.sub(r'"<[^">]*>"', lambda found: found.group(0) if verify in found.group(0) else
                             f'"{secrets.token_urlsafe(24)}"', block))
    refused = run("check", "--config", str(config))
    assert refused.returncode == 2 and "buckets[0].inputs[0].verify.secrets[0]: looks like a placeholder" in \
        refused.stderr, refused.stderr


def test_inits_commented_lines_pass_check_once_uncommented_or_ask_for_their_value(tmp_path):
    config = tmp_path / "relay.toml"
    assert run("init", str(config)).returncode == 0
    text = config.read_text()
    assert '# token = "' in text and "[metrics]" in text  # init makes a metrics token too
    metrics = text.replace("# [metrics]", "[metrics]").replace("# enabled = true", "enabled = true").replace(
        "# token = ", "token = ")
    config.write_text(metrics)
    assert run("check", "--config", str(config)).returncode == 0
    config.write_text(text.replace("# verify = ", "verify = "))
    refused = run("check", "--config", str(config))
    assert refused.returncode == 2 and "verify.secrets[0]: looks like a placeholder" in refused.stderr


@pytest.mark.parametrize("command, says", [
    ("init", "Write a config file to start from"), ("check", "Check a config file as a start would"),
    ("hash-secret", "Hash a token's secret for the config"), ("forward", "Deliver the webhooks of a relay's buckets"),
])
def test_each_commands_help_says_what_it_does(command, says, capsys):
    """init, check and hash-secret --help showed only their usage (issue 21, finding 13)."""
    with pytest.raises(SystemExit):
        relay_lite.main([command, "--help"])
    assert says in " ".join(capsys.readouterr().out.split())


def test_without_node_the_interop_tests_are_skipped_with_the_reason(tmp_path):
    """Without node on the PATH the six interop tests failed with FileNotFoundError (issue 21, 16)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(Path(SCRIPT).parent / "tests" / "test_interop_node.py")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": str(tmp_path)},
                          cwd=Path(SCRIPT).parent)
    assert done.returncode in (0, 5) and "1 skipped" in done.stdout and "FileNotFoundError" not in done.stdout, \
        done.stdout  # 5: a run of this file alone has no test left
    assert "failed" not in done.stdout and "Node.js and npm are not installed" in done.stdout
