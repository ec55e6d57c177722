"""relay_lite benchmarks: `python -m tests.bench [--quick] [--json FILE]`.

Each scenario runs relay_lite (`python relay_lite.py --config ...`, a fresh process each time) and
its load in separate processes (tests/bench/peers.py; wrk for the ingest load when it is
installed), and, where the figure depends on the machine, a ceiling measured in the same run on the
same machine under the same load: a bare ASGI app on Hypercorn's trio worker for HTTP, a bare
trio-websocket server sending one pre-encoded frame to every client for sockets, smee.io's own
server for a smee channel (--smee-io DIR: set up by hand, see Bench.smee). The ratio to the
ceiling is the result. It prints one table with every figure, its target and PASS or MISS.
"""

import argparse
import json
import os
import platform
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench.peers import BUCKET, INPUT_ID, KEY, SECRET, SEGMENT, webhook_body

SMEE_CHANNEL = "bench-smee-channel-0123456789AbCdEf"  # a smee channel's name: 16 or more varied characters
SMEE_FIGURES = {  # the smee scenario's figures of each run: label, digits shown
    "accepted": ("webhooks/s accepted (200), closed loop, 20 connections", 0),
    "delivered": ("webhooks/s delivered on the stream (load's start to last arrival)", 0),
    "p50": ("latency p50 (ms), sent to streamed, closed loop (mostly queueing)", 1),
    "p99": ("latency p99 (ms), sent to streamed, closed loop", 1),
    "fixed_p50": ("latency p50 (ms), sent to streamed, fixed 500/s, 8 connections", 2),
    "fixed_p99": ("latency p99 (ms), sent to streamed, fixed 500/s", 2),
    "cpu_ms": ("server CPU ms per webhook, closed loop", 3),
    "peers_cpu_ms": ("load generator + stream reader CPU ms per webhook, closed loop (the bench's own)", 3),
    "rss_mb": ("server peak RSS (MB, VmHWM)", 1),
}

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' own helpers, as pytest finds them
from helpers import RedisServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FRAME_BYTES = 1600  # a relay frame for a 1 KiB body, headers and meta: about 1.6 KB


def _more_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Process:
    """A child process that speaks JSON lines on stdout (peers) or prints a banner (the relay)."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      preexec_fn=_more_files)

    def line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.popen.stdout], [], [], remaining)[0]:
                raise TimeoutError(f"no line matching {pattern!r} within {timeout} s: {self.popen.args}")
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"process ended: {self.popen.args}")
            if match := re.search(pattern, line):
                return match

    def event(self, name: str, timeout: float = 120) -> dict:
        return json.loads(self.line(r'^\{"event": "%s".*' % name, timeout).group(0))

    def stop(self, timeout: float = 60) -> dict:
        self.popen.stdin.write("stop\n")
        self.popen.stdin.flush()
        return self.event("result", timeout)

    def stop_count(self, timeout: float = 60) -> int:
        """A subscribers process's webhook frames so far; it goes on receiving."""
        self.popen.stdin.write("count\n")
        self.popen.stdin.flush()
        return self.event("count", timeout)["frames"]

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Its resident memory now; with field "VmHWM", the most it has held since it started."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(re.search(field + r":\s+(\d+)", status).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def end(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Relay(Process):
    def __init__(self, workdir: Path, storage: bool = False, script: Path = ROOT / "relay_lite.py",
                 outputs: str = "", cluster: str = "", workers: int = 1, bucket: str = "", **server) -> None:
        """A relay serving the bench bucket; with `storage`, its log in a new SQLite file; `script`
        another relay_lite.py to run (see --baseline); `outputs` the bucket's [[buckets.outputs]];
        `bucket` more of the bucket's own settings (TOML lines); `cluster` a Redis URL, with
        `workers` relays on one port."""
        config = workdir / "relay.toml"
        server = {"port": 0, **server}
        settings = "\n".join(f"{key} = {json.dumps(value)}" for key, value in server.items())
        database = workdir / "relay.db"
        for stale in workdir.glob("relay.db*"):
            stale.unlink()
        config.write_text(f'[server]\n{settings}\n[[tokens]]\nkey = "{KEY}"\nsecret = "{SECRET}"\n'
                          f'[[buckets]]\nname = "{BUCKET}"\n{bucket}[[buckets.inputs]]\nid = "{INPUT_ID}"\n{outputs}'
                          + (f'[storage]\npath = "{database}"\n' if storage else "")
                          + (f'[cluster]\nredis_url = "{cluster}"\n' if cluster else ""))
        super().__init__(str(script), "--config", str(config), *(["--workers", str(workers)] if workers > 1 else []))
        for _ in range(workers):  # each worker's banner
            url = self.line(r"listening on http://([\d.]+):(\d+)", 30)
        self.host, self.port = url.group(1), int(url.group(2))


class SmeeIO(Process):
    """smee.io's own server (Node, fastify), `PORT=<port> node index.js` in its directory, without
    REDIS_URL: one instance, its channels in memory. It listens on 0.0.0.0 (lib/server.js says so;
    no setting changes it): the bench connects to it on 127.0.0.1 only. Its log (fastify's, a JSON
    line per request and per answer) goes to a file in `workdir`."""

    def __init__(self, directory: Path, workdir: Path) -> None:
        self.port, self.host = free_port(), "127.0.0.1"
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("REDIS_URL", "NODE_ENV", "SENTRY_DSN", "FORCE_HTTPS", "BLOCKED_CHANNELS")}
        log = workdir / "smee.io.log"
        with log.open("w") as output:
            self.popen = subprocess.Popen(["node", "index.js"], cwd=directory,
                                          env={**environment, "PORT": str(self.port)}, stdin=subprocess.DEVNULL,
                                          stdout=output, stderr=subprocess.STDOUT, preexec_fn=_more_files)
        deadline = time.monotonic() + 30
        while "Server listening at" not in log.read_text():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.end()
                raise RuntimeError(f"smee.io did not start: {log.read_text()[-1000:]}")
            time.sleep(0.05)


def smee_io_missing(directory: Path) -> str:
    """Why smee.io's server cannot be run from `directory` ("" if it can)."""
    if not shutil.which("node"):
        return "node is not installed"
    for needed, why in (("lib/server.js", "no smee.io source"), ("node_modules/fastify", "npm install not run"),
                        ("public/main.min.js", "npm run build not run")):
        if not (directory / needed).exists():
            return f"{directory / needed} is missing ({why})"
    return ""


def peer(*args) -> Process:
    return Process("-m", "tests.bench.peers", *map(str, args))


def subscribers(host: str, port: int, clients: int, *extra: str) -> Process:
    process = peer("subscribers", host, port, "--clients", clients, *extra)
    process.event("ready", timeout=300)
    return process


class RSSPeak:
    """Samples a process's RSS every 50 ms in a thread, keeping the highest."""

    def __init__(self, process: Process) -> None:
        self.process, self.peak, self._stop = process, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.rss_kb())

    def __enter__(self) -> "RSSPeak":
        self.peak = self.process.rss_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load(host: str, port: int, duration: float, connections: int = 20) -> dict:
    """The ingest load: wrk when installed (one thread), else the built-in closed-loop generator."""
    wrk = shutil.which("wrk")
    if wrk:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            body = webhook_body(0, 0.0).decode()
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
        out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{duration}s", "-s", script.name,
                              f"http://{host}:{port}/v1/webhooks/{INPUT_ID}"],
                             capture_output=True, text=True, check=True).stdout
        os.unlink(script.name)
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
        errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))
        return {"tool": "wrk", "ok": total - errors, "errors": errors, "rate": (total - errors) / seconds}
    process = peer("load", host, port, "--connections", connections, "--duration", duration)
    result = process.event("result", timeout=duration + 60)
    return {"tool": "built-in", **result}


class Bench:
    def __init__(self, quick: bool, workdir: Path, against: Path | None = None, smee_io: Path | None = None) -> None:
        self.quick, self.workdir, self.rows, self.against = quick, workdir, [], against
        self.smee_io = smee_io  # smee.io's server, set up by hand (see smee)

    def row(self, scenario: str, figure: str, value, target: str, passed: bool | None, ceiling=None, ratio=None,
            machine: bool = False):
        """A figure, its target and whether it was met. A `machine` target (a rate, a latency, a
        size) is one a busy machine moves: --quick, a smoke run too short to measure it, shows
        the figure without judging it; the full run judges it. Targets that something is lost or
        refused are judged in either."""
        if machine and self.quick and passed is not None:
            target, passed = f"{target} (full run only)", None
        self.rows.append({"scenario": scenario, "figure": figure, "value": value, "ceiling": ceiling,
                          "ratio": ratio, "target": target,
                          "result": "-" if passed is None else ("PASS" if passed else "MISS")})
        print(f"  {scenario}: {figure} = {_show(value)}" + (f" (ceiling {_show(ceiling)}, ratio {_show(ratio)})"
              if ceiling is not None else "") + f"  [{self.rows[-1]['result']}]", file=sys.stderr, flush=True)

    def warm_up(self, host: str, port: int) -> None:
        """A second of load before one that is measured: a fresh process's first second is
        slower. A quick run measures nothing that needs it."""
        if not self.quick:
            load(host, port, 1)

    def order(self, names) -> list:
        """Runs in the order A B C C B A, so a drift of the machine weighs on each alike; in a
        quick run, A B C once, which only shows that each runs."""
        names = list(names)
        return names if self.quick else [*names, *reversed(names)]

    # ------------------------------------------------------------------ scenarios

    def startup(self) -> None:
        relay = Relay(self.workdir)
        try:
            time.sleep(1.0)
            rss = relay.rss_kb() / 1024
        finally:
            relay.end()
        self.row("start-up", "RSS before traffic (MB)", round(rss, 1), "<= 60 MB", rss <= 60, machine=True)

    def ingest(self) -> None:
        """Rounds of: the ceiling, then one relay process under the same load four times, without
        and with a never-reading subscriber (ABBA, see _ingest_runs). Ratios are taken within a
        round and the median is reported, so a slow patch of the machine weighs on both sides of
        a ratio alike."""
        rounds, duration = (1, 1) if self.quick else (5, 3)
        bare, plain, slow = [], [], []
        for _ in range(rounds):
            ceiling = peer("http-ceiling")
            try:
                port = ceiling.event("ready")["port"]
                self.warm_up("127.0.0.1", port)  # as for the relay
                bare.append(load("127.0.0.1", port, duration))
            finally:
                ceiling.stop()
                ceiling.end()
            without, with_stuck = self._ingest_runs(duration)
            plain.append(without)
            slow.append(with_stuck)

        ratio = statistics.median(p["rate"] / b["rate"] for p, b in zip(plain, bare))
        scenario = f"ingest, 1 subscriber, 1 KiB bodies ({rounds} rounds of {duration} s, median)"
        self.row(scenario, f"webhooks/s accepted ({plain[0]['tool']}, 20 connections)",
                 round(statistics.median(p["rate"] for p in plain)), ">= 0.8 of ceiling", ratio >= 0.8,
                 round(statistics.median(b["rate"] for b in bare)), round(ratio, 2), machine=True)
        accepted, delivered = sum(p["ok"] for p in plain), sum(p["delivered"] for p in plain)
        self.row(scenario, "delivered / accepted", f"{delivered} / {accepted}", "every webhook delivered",
                 all(p["delivered"] >= p["ok"] for p in plain))
        errors = sum(p["errors"] for p in plain + slow)
        self.row(scenario, "errors (non-2xx, socket)", errors, "0", errors == 0)

        scenario = f"slow subscriber present (never reads) ({rounds} rounds, median)"
        slow_ratio = statistics.median(s["rate"] / p["rate"] for s, p in zip(slow, plain))
        self.row(scenario, "webhooks/s", round(statistics.median(s["rate"] for s in slow)),
                 ">= 0.95 of the run without", slow_ratio >= 0.95,
                 round(statistics.median(p["rate"] for p in plain)), round(slow_ratio, 2), machine=True)
        queue_mb = 1000 * FRAME_BYTES / 2**20
        growth = max(s["peak_rss_kb"] for s in slow) / 1024 - max(p["peak_rss_kb"] for p in plain) / 1024
        self.row(scenario, "peak server RSS (MB), without -> with",
                 f"{max(p['peak_rss_kb'] for p in plain) / 1024:.1f} -> {max(s['peak_rss_kb'] for s in slow) / 1024:.1f}",
                 f"growth <= queue ({queue_mb:.1f} MB) + 1 MB", growth <= queue_mb + 1, machine=True)
        reasons = sorted({reason for run in slow for reason in run["close_reasons"]})
        self.row(scenario, "slow subscribers cut off", "; ".join(reasons) or "no",
                 "too slow (1008) or disconnected", all(len(run["close_reasons"]) == self.order((False, True)).count(True)
                                                         for run in slow), machine=True)  # a short run may not fill it
        accepted, delivered = sum(s["ok"] for s in slow), sum(s["delivered"] for s in slow)
        self.row(scenario, "delivered / accepted to the good subscriber", f"{delivered} / {accepted}",
                 "every webhook delivered", all(s["delivered"] >= s["ok"] for s in slow))

    def _ingest_runs(self, duration: float) -> tuple[dict, dict]:
        """One relay, one good subscriber, the load four times: without, with a never-reading
        subscriber, with another, without (ABBA, so a drift of the machine cancels out; two plain
        runs in one process differ by up to 15 % here). Returns the sums without and with."""
        relay = Relay(self.workdir)
        try:
            subs = subscribers(relay.host, relay.port, 1)
            self.warm_up(relay.host, relay.port)
            runs = {False: [], True: []}
            for stuck in self.order((False, True)):
                stuck_subs = subscribers(relay.host, relay.port, 1, "--stuck") if stuck else None
                frames_before = subs.stop_count()
                with RSSPeak(relay) as rss:
                    result = load(relay.host, relay.port, duration)
                time.sleep(0.5)
                result["delivered"] = subs.stop_count() - frames_before
                result["peak_rss_kb"] = rss.peak
                result["close_reasons"] = stuck_subs.stop()["close_reasons"] if stuck_subs else []
                runs[stuck].append(result)
            subs.stop()
        finally:
            relay.end()
        return tuple(_combined(runs[stuck]) for stuck in (False, True))

    def latency(self) -> None:
        """Fixed rates, open loop; at the target's rate, three runs and the median of their p99s."""
        rates = (500,) if self.quick else (100, 500, 1000)
        duration = 1 if self.quick else 5
        for rate in rates:
            runs = [self._latency_run(rate, duration) for _ in range(3 if rate == 500 and not self.quick else 1)]
            run = sorted(runs, key=lambda run: run["ms"]["p99"])[len(runs) // 2]
            ms = run["ms"]
            scenario = f"latency at {rate}/s, 10 subscribers" + (f" (median p99 of {len(runs)} runs)" if len(runs) > 1 else "")
            self.row(scenario, "p50 / p99 / max (ms), request sent to frame received",
                     f"{ms['p50']} / {ms['p99']} / {ms['max']}",
                     "p99 <= 10 ms" if rate == 500 else "-", ms["p99"] <= 10 if rate == 500 else None, machine=True)
            self.row(scenario, "frames received / expected",
                     " ".join(f"{r['frames']} / {r['expected']}" for r in runs), "all",
                     all(r["frames"] == r["expected"] and not r["errors"] for r in runs))

    def _latency_run(self, rate: int, duration: float, **relay_options) -> dict:
        relay = Relay(self.workdir, **relay_options)
        try:
            subs = subscribers(relay.host, relay.port, 10)
            sent = peer("load", relay.host, relay.port, "--rate", rate, "--count", int(rate * duration),
                        "--connections", 8).event("result", timeout=duration + 60)
            time.sleep(0.5)
            got = subs.stop()
        finally:
            relay.end()
        ms = {key: round(got["latency"][key] * 1000, 2) for key in ("p50", "p99", "max")}
        return {"ms": ms, "frames": got["frames"], "expected": sent["ok"] * 10, "errors": sent["errors"]}

    def fanout(self) -> None:
        """Webhooks one at a time to N subscribers, timed until the last has each, against the
        socket ceiling. Over 50 webhooks a p99 is the slowest one, so at 1,000 subscribers three
        runs are made and the one with the median p99 is reported."""
        for clients in ((100,) if self.quick else (100, 1000)):
            count = 10 if self.quick else 50
            rate = 10 if clients <= 100 else 4
            runs = [self._fanout_run(clients, count, rate) for _ in range(3 if clients == 1000 else 1)]
            got, bare = sorted(runs, key=lambda run: run[0]["fanout"]["p99"])[len(runs) // 2]
            p50, p99 = (round(got["fanout"][key] * 1000, 1) for key in ("p50", "p99"))
            bare50, bare99 = (round(bare["fanout"][key] * 1000, 1) for key in ("p50", "p99"))
            ratio = round(got["fanout"]["p50"] / bare["fanout"]["p50"], 2)
            limit = 100 if clients == 1000 else None
            scenario = f"fan-out to {clients} subscribers ({count} webhooks" + (
                f", median p99 of {len(runs)} runs)" if len(runs) > 1 else ")")
            self.row(scenario, "ms until the last has it, p50 / p99", f"{p50} / {p99}",
                     (f"p99 <= {limit} ms, " if limit else "") + "p50 <= 1.5x ceiling",
                     ratio <= 1.5 and (limit is None or p99 <= limit), f"{bare50} / {bare99}", ratio, machine=True)
            missing = sum(run[0]["incomplete"] + count - run[0]["webhooks"] for run in runs)
            self.row(scenario, "webhooks not reaching everyone", missing, "0", missing == 0)

    def _fanout_run(self, clients: int, count: int, rate: float) -> tuple[dict, dict]:
        relay = Relay(self.workdir)
        try:
            subs = subscribers(relay.host, relay.port, clients)
            peer("load", relay.host, relay.port, "--rate", rate, "--count", count).event("result")
            time.sleep(1)
            got = subs.stop()
        finally:
            relay.end()
        ceiling = peer("socket-ceiling")
        try:
            ports = ceiling.event("ready")
            subs = subscribers("127.0.0.1", ports["port"], clients, "--ceiling")
            peer("load", "127.0.0.1", ports["trigger_port"], "/", "--rate", rate, "--count", count).event("result")
            time.sleep(1)
            bare = subs.stop()
        finally:
            ceiling.stop()
            ceiling.end()
        return got, bare

    def cluster(self) -> None:
        """Relays sharing one Redis (a real redis-server, appendfsync always): ingest with 1, 2 and
        3 relays on one port (--workers, the kernel spreading wrk's connections among them), one
        subscriber on one of them getting every webhook through Redis, each against one relay
        without [cluster] in the same round (A B B A); and the latency Redis adds at 100/s and 500/s (A B B A)."""
        redis_server = RedisServer(self.workdir)
        redis_server.start()
        try:
            duration, rounds = (1, 1) if self.quick else (3, 2)
            for workers in ((2,) if self.quick else (1, 2, 3)):
                ratios, alone, together = [], [], []
                for _ in range(rounds):
                    runs = [(clustered, self._cluster_ingest(redis_server, clustered, workers, duration))
                            for clustered in self.order((False, True))]
                    alone += [run for clustered, run in runs if not clustered]
                    together += [run for clustered, run in runs if clustered]
                    ratios.append(sum(run["rate"] for clustered, run in runs if clustered)
                                  / sum(run["rate"] for clustered, run in runs if not clustered))
                scenario = (f"cluster of {workers} relay(s) on one Redis (--workers {workers}), 1 subscriber "
                            f"({rounds} rounds of {' '.join(self.order('AB'))}, {duration} s)")
                self.row(scenario, "webhooks/s accepted (ceiling: one relay without Redis; ratio: median, range)",
                         round(statistics.median(run["rate"] for run in together)),
                         "-", None, round(statistics.median(run["rate"] for run in alone)),
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
                accepted, delivered = sum(run["ok"] for run in together), sum(run["delivered"] for run in together)
                self.row(scenario, "delivered / accepted", f"{delivered} / {accepted}", "every webhook delivered",
                         delivered >= accepted and not sum(run["errors"] for run in together))
            clients, count = (20, 10) if self.quick else (100, 50)
            for workers in ((2,) if self.quick else (1, 2, 3)):
                alone = self._cluster_fanout(redis_server, False, 1, clients, count)
                together = self._cluster_fanout(redis_server, True, workers, clients, count)
                ratio = round(together["fanout"]["p50"] / alone["fanout"]["p50"], 2)
                scenario = (f"fan-out to {clients} subscribers, {workers} relay(s) on one Redis (--workers {workers}; "
                            f"{count} webhooks)")
                self.row(scenario, "ms until the last has it, p50 / p99 (ceiling: one relay without Redis)",
                         " / ".join(f"{together['fanout'][key] * 1000:.1f}" for key in ("p50", "p99")), "-", None,
                         " / ".join(f"{alone['fanout'][key] * 1000:.1f}" for key in ("p50", "p99")), ratio)
                missing = together["incomplete"] + count - together["webhooks"]
                self.row(scenario, "webhooks not reaching everyone", missing, "0", missing == 0)
            for rate in ((100,) if self.quick else (100, 500)):  # well within one relay's rate on Redis, and near it
                for clustered in self.order((False, True)):
                    redis_server.flush()
                    run = self._latency_run(rate, 1 if self.quick else 5,
                                            **({"cluster": redis_server.url} if clustered else {}))
                    ms = run["ms"]
                    self.row(f"latency at {rate}/s, 10 subscribers, "
                             f"{'one relay on Redis' if clustered else 'one relay'}",
                             "p50 / p99 / max (ms), request sent to frame received", f"{ms['p50']} / {ms['p99']} / "
                             f"{ms['max']}", "-", None)
        finally:
            redis_server.stop()

    def _cluster_fanout(self, redis_server: "RedisServer", clustered: bool, workers: int, clients: int,
                        count: int) -> dict:
        """Webhooks one at a time to `clients` subscribers (spread over the workers by the kernel)."""
        redis_server.flush()
        options = {"cluster": redis_server.url, "workers": workers, "port": free_port(),
                   "host": "127.0.0.1"} if clustered else {}
        relay = Relay(self.workdir, **options)
        try:
            subs = subscribers(relay.host, relay.port, clients)
            peer("load", relay.host, relay.port, "--rate", 10, "--count", count).event("result")
            time.sleep(1)
            return subs.stop()
        finally:
            relay.end()

    def _cluster_ingest(self, redis_server: "RedisServer", clustered: bool, workers: int, duration: float) -> dict:
        redis_server.flush()
        options = {"cluster": redis_server.url, "workers": workers, "port": free_port(),
                   "host": "127.0.0.1"} if clustered else {}
        relay = Relay(self.workdir, **options)
        try:
            subs = subscribers(relay.host, relay.port, 1)
            self.warm_up(relay.host, relay.port)
            before = subs.stop_count()
            result = load(relay.host, relay.port, duration)
            time.sleep(1.0)
            result["delivered"] = subs.stop_count() - before
            subs.stop()
        finally:
            relay.end()
        return result

    def history(self) -> None:
        """What the webhook log costs. Ingest with the smallest history (one entry), the default
        in-memory one, and SQLite storage, in rounds run A B C C B A, each against the first in
        its round; latency at 100/s with and without storage; the memory a full history holds; and
        how fast a resume replays it."""
        rounds, duration = (1, 1) if self.quick else (3, 3)
        configs = {"history_size = 1": {"history_size": 1}, "in memory (default)": {},
                   "SQLite storage": {"storage": True}}
        rates: dict[str, list[float]] = {name: [] for name in configs}
        lost = 0
        for _ in range(rounds):
            runs: dict[str, list[float]] = {name: [] for name in configs}
            for name in self.order(configs):
                result = self._history_ingest(duration, **configs[name])
                runs[name].append(result["rate"])
                lost += max(result["ok"] - result["delivered"], 0)  # wrk leaves out responses it did not wait for
            for name in configs:
                rates[name].append(statistics.fmean(runs[name]))
        scenario = (f"history and storage: ingest, 1 subscriber ({rounds} rounds of "
                    f"{' '.join(self.order('ABC'))}, {duration} s)")
        base = rates["history_size = 1"]
        for name in configs:
            ratio = statistics.median(rate / first for rate, first in zip(rates[name], base))
            self.row(scenario, f"webhooks/s, {name}", round(statistics.median(rates[name])),
                     "-", None, round(statistics.median(base)), round(ratio, 2))
        self.row(scenario, "accepted but not delivered", lost, "0", lost == 0)

        count = 100 if self.quick else 1000
        for name, options in (("in memory", {}), ("SQLite storage", {"storage": True}))[self.quick:]:
            run = self._latency_run(100, count / 100, **options)
            ms = run["ms"]
            self.row(f"history and storage: latency at 100/s, 10 subscribers, {name}",
                     "p50 / p99 / max (ms), request sent to frame received", f"{ms['p50']} / {ms['p99']} / {ms['max']}",
                     "all frames", run["frames"] == run["expected"] and not run["errors"])

        size = 500 if self.quick else 10000
        relay = Relay(self.workdir, history_size=size)
        try:
            time.sleep(0.5)
            before = relay.rss_kb()
            accepted = 0
            while accepted < size * 1.1:
                accepted += load(relay.host, relay.port, 2)["ok"]
            held = relay.rss_kb() - before
            resumer = subscribers(relay.host, relay.port, 1, "--since", "00000000-0000-0000-0000-000000000000")
            deadline = time.monotonic() + 120
            while resumer.stop_count() < size and time.monotonic() < deadline:
                time.sleep(0.2)
            got = resumer.stop()
        finally:
            relay.end()
        scenario = f"history and storage: a full in-memory history of {size} webhooks (1 KiB bodies)"
        self.row(scenario, "server RSS per logged webhook (KB)", round(held * 1024 / size / 1000, 2),
                 "-", None)
        seconds = got["resumed_after"]
        self.row(scenario, "resume from before it: webhooks replayed, seconds until live",
                 f"{got['frames']} in {seconds:.2f} s ({got['frames'] / seconds:.0f}/s)" if seconds else "not resumed",
                 f"all {size}", got["frames"] == size and bool(seconds))

    def baseline(self) -> None:
        """This code against another relay_lite.py (--baseline FILE, e.g. one from before a change:
        `git show COMMIT:relay_lite.py > before.py`): ingest with one subscriber, in rounds run
        A B B A, a fresh process each run, each round's ratio taken within it."""
        if self.against is None:
            print("  baseline: skipped (no --baseline FILE)", file=sys.stderr)
            return
        rounds, duration = (1, 1) if self.quick else (4, 3)
        rates: dict[str, list[float]] = {"this code": [], "baseline": []}
        lost = 0
        for _ in range(rounds):
            runs: dict[str, list[float]] = {name: [] for name in rates}
            for name in self.order(("this code", "baseline")):
                script = ROOT / "relay_lite.py" if name == "this code" else self.against
                result = self._history_ingest(duration, script=script)
                runs[name].append(result["rate"])
                lost += max(result["ok"] - result["delivered"], 0) if name == "this code" else 0
            for name in rates:
                rates[name].append(statistics.fmean(runs[name]))
        ratios = [this / base for this, base in zip(rates["this code"], rates["baseline"])]
        scenario = (f"against {self.against.name}: ingest, 1 subscriber ({rounds} rounds of "
                    f"{' '.join(self.order('AB'))}, {duration} s)")
        self.row(scenario, "webhooks/s, this code (ratio: median of the rounds' ratios; range)",
                 round(statistics.median(rates["this code"])), "-", None,
                 round(statistics.median(rates["baseline"])),
                 f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        self.row(scenario, "accepted but not delivered (this code)", lost, "0", lost == 0)

    def smee(self) -> None:
        """A smee channel's stream, end to end, against smee.io's own server: one subscriber reads
        the channel's text/event-stream (peers.py stream-reader, as smee-client asks for it) while
        20 connections POST 1 KiB JSON webhooks to the channel in a closed loop (peers.py load:
        wrk cannot stamp each body with its number and send time), then 8 at a fixed 500/s, whose
        latency is the server's own (the closed loop's is mostly its queue: 20 connections / rate).
        Rounds of relay_lite, smee.io, smee.io, relay_lite (A B B A), a fresh server each run; each
        round's ratios are taken within it. Lost: answered 200, never streamed; relay_lite may
        lose none, smee.io may.

        smee.io is set up by hand, outside this repository (nothing of it is committed):
            mkdir -p /opt/smee.io
            git --git-dir=<a clone of probot/smee.io>/.git archive HEAD | tar -x -C /opt/smee.io
            cd /opt/smee.io && npm ci && npm run build    # node >= 18; build: the public/ files it reads at start
        and named with --smee-io DIR (default /opt/smee.io). Without it, relay_lite runs alone."""
        rounds, duration = (1, 1) if self.quick else (3, 4)
        why = smee_io_missing(self.smee_io) if self.smee_io else "no --smee-io DIR"
        if why:
            print(f"  smee: smee.io skipped: {why}. To set it up by hand, outside the repo: mkdir -p {self.smee_io} "
                  f"&& git --git-dir=<a clone of probot/smee.io>/.git archive HEAD | tar -x -C {self.smee_io} "
                  f"&& cd {self.smee_io} && npm ci && npm run build; then --smee-io {self.smee_io}. "
                  "Measuring relay_lite alone.", file=sys.stderr, flush=True)
        systems = ("relay_lite",) if why else ("relay_lite", "smee.io")
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        ratios: dict[str, list[float]] = {}
        for _ in range(rounds):
            this_round: dict[str, list[dict]] = {name: [] for name in systems}
            for name in self.order(systems):
                run = self._smee_run(name, duration)
                this_round[name].append(run)
                runs[name].append(run)
            if len(systems) == 2:
                for figure in SMEE_FIGURES:
                    ratios.setdefault(figure, []).append(
                        statistics.fmean(r[figure] for r in this_round["relay_lite"])
                        / max(statistics.fmean(r[figure] for r in this_round["smee.io"]), 1e-9))
        order = " ".join(self.order("AB"[:len(systems)]))
        scenario = (f"smee channel, 1 stream subscriber, 1 KiB JSON ({rounds} round(s) of {order}, {duration} s; "
                    + ("smee.io skipped" if why else "ceiling: smee.io's server") + "; median (range) of runs"
                    + ("" if why else "; ratio: of rounds' means") + ")")

        def spread(values: list[float], digits: int) -> str:
            show = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{round(v)}")
            return show(statistics.median(values)) + (f" ({show(min(values))}-{show(max(values))})"
                                                        if len(values) > 1 else "")

        for figure, (label, digits) in SMEE_FIGURES.items():
            self.row(scenario, label, spread([run[figure] for run in runs["relay_lite"]], digits), "-", None,
                     spread([run[figure] for run in runs["smee.io"]], digits) if "smee.io" in runs else None,
                     spread(ratios[figure], 2) if figure in ratios else None)

        def losses(name: str) -> str | None:
            if name not in runs:
                return None
            lost, accepted = (sum(run[key] for run in runs[name]) for key in ("lost", "ok"))
            twice = sum(run["duplicates"] for run in runs[name])
            ended = sorted({run["ended"] for run in runs[name] if run["ended"]})
            return (f"{lost} of {accepted}" + (f", {twice} streamed twice" if twice else "")
                    + (f", stream ended: {'; '.join(ended)}" if ended else ""))

        mine = runs["relay_lite"]
        self.row(scenario, "lost (answered 200, never streamed), all runs", losses("relay_lite"),
                 "relay_lite: 0, none twice, stream open",
                 not any(run["lost"] or run["duplicates"] or run["ended"] for run in mine), losses("smee.io"))
        self.row(scenario, "errors (not 200), all runs", sum(run["errors"] for run in mine), "relay_lite: 0",
                 not any(run["errors"] for run in mine),
                 sum(run["errors"] for run in runs["smee.io"]) if "smee.io" in runs else None)

    def _smee_run(self, name: str, duration: float) -> dict:
        """One run of `smee`: a fresh server (relay_lite with a smee channel, its log in memory, or
        smee.io's), the stream's reader, a warm-up (full run), the closed loop, the fixed rate."""
        if name == "relay_lite":
            server = Relay(self.workdir, bucket=f'smee_channel = "{SMEE_CHANNEL}"\n')
            path = f"/smee/{SMEE_CHANNEL}"
        else:
            server = SmeeIO(self.smee_io, self.workdir)
            path = f"/{SMEE_CHANNEL}"
        reader = None
        try:
            reader = peer("stream-reader", server.host, server.port, path, "--first", SEGMENT)
            reader.event("ready", timeout=60)

            def streamed() -> int:
                reader.popen.stdin.write("count\n")
                reader.popen.stdin.flush()
                return reader.event("count")["messages"]

            def drained(expected: int) -> None:
                """Wait until `expected` messages were streamed in all, or none came for 2 s."""
                last, since = streamed(), time.monotonic()
                while last < expected and time.monotonic() - since < 2:
                    time.sleep(0.05)
                    if (count := streamed()) != last:
                        last, since = count, time.monotonic()

            def send(*load: object) -> dict:
                before = streamed()
                result = peer("load", server.host, server.port, path, *load).event("result", timeout=duration + 60)
                drained(before + result["ok"])
                return result

            if not self.quick:  # a fresh process's first second is slower (and Node's JIT warms up)
                send("--connections", 20, "--duration", 1)
            cpu, reader_cpu = server.cpu_seconds(), reader.cpu_seconds()
            closed = send("--connections", 20, "--duration", duration, "--first", SEGMENT)
            cpu, reader_cpu = server.cpu_seconds() - cpu, reader.cpu_seconds() - reader_cpu
            rate, count = 500, 250 if self.quick else 1500
            fixed = send("--connections", 8, "--rate", rate, "--count", count, "--first", 2 * SEGMENT)
            peak = server.rss_kb("VmHWM")
            got = reader.stop()
        finally:
            if reader is not None:
                reader.end()
            server.end()
        lost = duplicates = 0
        for load, segment in ((closed, "1"), (fixed, "2")):
            figures = got["segments"].get(segment, {"received": [], "duplicates": 0})
            received = set()
            for low, high in figures["received"]:
                received.update(range(low, high + 1))
            failed = set(load["failed"])
            numbers = range(load["first"], load["first"] + load["sent"])
            lost += sum(n not in received and n not in failed for n in numbers)
            duplicates += figures["duplicates"]
        measured, steady = got["segments"].get("1"), got["segments"].get("2")
        ok = max(closed["ok"], 1)

        def ms(figures: dict | None, key: str) -> float:
            return figures["latency"][key] * 1000 if figures else float("nan")

        return {"ok": closed["ok"] + fixed["ok"], "errors": closed["errors"] + fixed["errors"], "lost": lost,
                "duplicates": duplicates, "ended": got["ended"], "accepted": closed["rate"],
                "delivered": (measured["webhooks"] / (measured["last_received"] - closed["started"])
                              if measured else 0.0),
                "p50": ms(measured, "p50"), "p99": ms(measured, "p99"),
                "fixed_p50": ms(steady, "p50"), "fixed_p99": ms(steady, "p99"),
                "cpu_ms": cpu * 1000 / ok, "peers_cpu_ms": (closed["cpu_seconds"] + reader_cpu) * 1000 / ok,
                "rss_mb": peak / 1024}

    def _history_ingest(self, duration: float, **relay_options) -> dict:
        relay = Relay(self.workdir, **relay_options)
        try:
            subs = subscribers(relay.host, relay.port, 1)
            self.warm_up(relay.host, relay.port)
            frames_before, cpu_before = subs.stop_count(), relay.cpu_seconds()
            result = load(relay.host, relay.port, duration)
            result["cpu_ms"] = (relay.cpu_seconds() - cpu_before) * 1000 / max(result["ok"], 1)
            time.sleep(0.5)
            result["delivered"] = subs.stop_count() - frames_before
            subs.stop()
        finally:
            relay.end()
        return result

    def forward(self) -> None:
        """Webhooks/s from senders to an app behind the relay: through a socket subscriber (the
        relay alone: what the agent could at best keep up with), through `relay_lite.py forward`
        one request at a time (the default, in order), and with --concurrency 8. Each run: a fresh
        relay, app and consumer; the load for a while; the rate is the webhooks accepted over the
        time until the last of them reached the consumer. Rounds run A B C C B A; each round's
        ratios are taken within it."""
        rounds, duration = (1, 1) if self.quick else (2, 3)
        consumers = {"socket subscriber": None, "agent": 1, "agent --concurrency 8": 8}
        if self.quick:
            del consumers["agent --concurrency 8"]
        rates: dict[str, list[float]] = {name: [] for name in consumers}
        cpu: dict[str, list[str]] = {name: [] for name in consumers}
        missing = 0
        for _ in range(rounds):
            runs: dict[str, list[float]] = {name: [] for name in consumers}
            for name in self.order(consumers):
                result = self._forward_run(duration, consumers[name])
                runs[name].append(result["rate"])
                cpu[name].append(f"{result['relay_ms']:.2f}" + (f" + {result['agent_ms']:.2f}" if result["agent_ms"] else ""))
                missing += result["missing"]
            for name in consumers:
                rates[name].append(statistics.fmean(runs[name]))
        scenario = (f"forward to an app, 1 KiB bodies ({rounds} rounds of "
                    f"{' '.join(self.order('ABC'[:len(consumers)]))}, {duration} s of load)")
        base = rates["socket subscriber"]
        for name in consumers:
            ratios = [rate / first for rate, first in zip(rates[name], base)]
            self.row(scenario, f"webhooks/s delivered, {name}", round(statistics.median(rates[name])), "-", None,
                     round(statistics.median(base)),
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        for name in consumers:
            self.row(scenario, f"CPU ms per webhook, relay (+ agent), each run, {name}", "; ".join(cpu[name]), "-", None)
        # (Duplicates are counted by tests/test_forward.py's fault tests: wrk sends one body, and
        # does not count the answers it did not wait for at the end.)
        self.row(scenario, "accepted but not delivered", missing, "0", missing == 0)

    def _forward_run(self, duration: float, concurrency: int | None) -> dict:
        """One run of `forward`: concurrency None for a socket subscriber, else the agent's."""
        app = peer("app")
        consumer = None
        try:
            app_url = f"http://127.0.0.1:{app.event('ready')['port']}/hooks"
            relay = Relay(self.workdir, outputs=_output("app", app_url))
            try:
                if concurrency is None:
                    consumer = subscribers(relay.host, relay.port, 1)
                    count = consumer.stop_count
                else:
                    state = self.workdir / "forward.json"
                    state.unlink(missing_ok=True)
                    consumer = Process(str(ROOT / "relay_lite.py"), "forward", "--relay",
                                       f"http://{relay.host}:{relay.port}", "--bucket", BUCKET, "--key", KEY,
                                       "--secret", SECRET, "--state", str(state), "--concurrency",
                                       str(concurrency), "--quiet")

                    def count() -> int:
                        app.popen.stdin.write("count\n")
                        app.popen.stdin.flush()
                        return app.event("count")["requests"]

                    # The agent starts after the newest webhook it finds logged: send one until
                    # one arrives, so it is subscribed before the load starts.
                    while count() == 0:
                        peer("load", relay.host, relay.port, "--rate", 1, "--count", 1).event("result")
                        time.sleep(0.2)
                warm = load(relay.host, relay.port, 1)  # a fresh process's first second is slower
                _until(lambda: count() >= warm["ok"], 120)
                before, relay_cpu = count(), relay.cpu_seconds()
                agent_cpu = consumer.cpu_seconds() if concurrency else 0.0
                started = time.monotonic()
                result = load(relay.host, relay.port, duration)
                arrived = _until(lambda: count() - before >= result["ok"], 300)
                finished = time.monotonic()
                delivered = count() - before
                relay_cpu = relay.cpu_seconds() - relay_cpu
                agent_cpu = consumer.cpu_seconds() - agent_cpu if concurrency else None
            finally:
                if consumer is not None:
                    consumer.end()
                relay.end()
        finally:
            app.end()
        ok = max(result["ok"], 1)
        return {"rate": result["ok"] / (finished - started), "missing": 0 if arrived else result["ok"] - delivered,
                "relay_ms": relay_cpu * 1000 / ok, "agent_ms": agent_cpu * 1000 / ok if agent_cpu is not None else None}

    def dead_output(self) -> None:
        """What a public output whose destination is dead costs ingest: the relay alone, with one
        to a port that refuses connections, with one to a port that never accepts them (each
        attempt waits out its connect timeout); rounds A B C C B A, one subscriber each run. The
        relay's CPU time per webhook is steadier than its rate on a shared machine."""
        rounds, duration = (1, 1) if self.quick else (4, 3)
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)  # the backlog fills; later connections are never accepted
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        try:
            internal = _output("app", "http://localhost:3000/")  # so that the subscriber gets frames
            dead = "http://127.0.0.1:{}/"
            configs = {"no public output": internal,
                       "a public output refusing connections":
                           internal + _output("dead", dead.format(refused.getsockname()[1]), public=True),
                       "a public output never accepting them":
                           internal + _output("dead", dead.format(silent.getsockname()[1]), public=True)}
            if self.quick:
                del configs["a public output refusing connections"]
            figures: dict[str, dict[str, list[float]]] = {"rate": {name: [] for name in configs},
                                                          "cpu_ms": {name: [] for name in configs}}
            lost = 0
            for _ in range(rounds):
                runs: dict[str, list[dict]] = {name: [] for name in configs}
                for name in self.order(configs):
                    result = self._history_ingest(duration, outputs=configs[name])
                    runs[name].append(result)
                    lost += max(result["ok"] - result["delivered"], 0)
                for figure, by_name in figures.items():
                    for name in configs:
                        by_name[name].append(statistics.fmean(run[figure] for run in runs[name]))
        finally:
            silent.close()
            refused.close()
        scenario = (f"a dead public destination: ingest, 1 subscriber ({rounds} rounds of "
                    f"{' '.join(self.order('ABC'[:len(configs)]))}, {duration} s)")
        for figure, label, digits in (("rate", "webhooks/s", 0), ("cpu_ms", "relay CPU ms per webhook", 3)):
            base = figures[figure]["no public output"]
            for name in configs:
                ratios = [value / first for value, first in zip(figures[figure][name], base)]
                self.row(scenario, f"{label}, {name}", round(statistics.median(figures[figure][name]), digits or None),
                         "-", None, round(statistics.median(base), digits or None),
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        self.row(scenario, "accepted but not delivered to the subscriber", lost, "0", lost == 0)

    def idle(self) -> None:
        window = 2 if self.quick else 35  # the full window holds at least one round of 30 s pings
        for clients in ((200,) if self.quick else (1000, 10000)):
            relay = Relay(self.workdir)
            try:
                time.sleep(0.5)
                before = relay.rss_kb()
                subs = subscribers(relay.host, relay.port, clients)
                time.sleep(2)
                after = relay.rss_kb()
                cpu = relay.cpu_seconds()
                time.sleep(window)
                busy = (relay.cpu_seconds() - cpu) / window * 100
                got = subs.stop()
            finally:
                relay.end()
            per_connection = (after - before) * 1024 / clients / 1000
            self.row(f"idle, {clients} authenticated subscribers", "server RSS growth per connection (KB)",
                     round(per_connection, 1), "<= 30 KB", per_connection <= 30, machine=True)
            self.row(f"idle, {clients} authenticated subscribers", f"server CPU while idle, {window} s (% of a core)",
                     round(busy, 2), "<= 2 %" if clients == 10000 else "-", busy <= 2 if clients == 10000 else None,
                     machine=True)
            self.row(f"idle, {clients} authenticated subscribers", "connections dropped", got["closed"], "0",
                     got["closed"] == 0)


def _output(name: str, destination: str, public: bool = False) -> str:
    return (f'[[buckets.outputs]]\nname = "{name}"\ndestination = "{destination}"\n'
            + ('internal = false\nconnect_timeout = 2\n' if public else ''))


def _until(condition, timeout: float) -> bool:
    """Polls `condition` every 50 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _combined(runs: list[dict]) -> dict:
    """Load runs of equal length as one: counts added, rates averaged, peaks and reasons kept."""
    return {"tool": runs[0]["tool"], "ok": sum(r["ok"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "rate": statistics.fmean(r["rate"] for r in runs), "delivered": sum(r["delivered"] for r in runs),
            "peak_rss_kb": max(r["peak_rss_kb"] for r in runs),
            "close_reasons": [reason for r in runs for reason in r["close_reasons"]]}


def _cpu_steal() -> int:
    """Ticks this virtual machine's CPUs waited for their host: other tenants' load."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


def _show(value) -> str:
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> str:
    columns = ["scenario", "figure", "value", "ceiling", "ratio", "target", "result"]
    cells = [[_show(row[column]) for column in columns] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


SCENARIOS = ["startup", "ingest", "latency", "fanout", "idle", "history", "forward", "dead_output", "baseline",
             "smee", "cluster"]
NOT_QUICK = ["cluster"]  # --quick runs it only if --only names it: it starts a redis-server and relays on it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run, about a minute: every scenario once at its smallest; figures shown, "
                             "only losses and errors judged")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS)
    parser.add_argument("--baseline", metavar="FILE", type=Path,
                        help="another relay_lite.py to compare ingest against (the baseline scenario)")
    parser.add_argument("--smee-io", metavar="DIR", type=Path, default=Path("/opt/smee.io"),
                        help="smee.io's server, set up by hand (npm ci && npm run build), for the smee scenario "
                             "to compare against (default: %(default)s); without it, relay_lite alone")
    args = parser.parse_args(argv)
    started, steal = time.monotonic(), _cpu_steal()
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "load_tool": "wrk" if shutil.which("wrk") else "built-in", "quick": args.quick}
    print(f"relay_lite benchmarks on {machine['cores']} cores, Python {machine['python']}, "
          f"ingest load by {machine['load_tool']}{' (quick)' if args.quick else ''}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as workdir:
        bench = Bench(args.quick, Path(workdir), args.baseline and args.baseline.resolve(),
                      args.smee_io and args.smee_io.resolve())
        for scenario in args.only or [name for name in SCENARIOS if not (args.quick and name in NOT_QUICK)]:
            began = time.monotonic()
            getattr(bench, scenario)()
            print(f"  ({scenario}: {time.monotonic() - began:.1f} s)", file=sys.stderr, flush=True)
    seconds = time.monotonic() - started
    machine["seconds"] = round(seconds, 1)
    machine["cpu_steal_percent"] = round((_cpu_steal() - steal) / CLOCK_TICKS / seconds
                                         / machine["cores"] * 100, 1)
    print(f"\nrelay_lite benchmarks: {machine['cores']} cores, Python {machine['python']}, "
          f"{machine['seconds']} s, CPU stolen by the host: {machine['cpu_steal_percent']} %\n")
    print(table(bench.rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": bench.rows}, indent=2))
    return 0 if all(row["result"] != "MISS" for row in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
