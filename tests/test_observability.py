"""Metrics, logs and dashboards on a real GhostServe-protected SGLang server (TP=2, CPU), scraped by a
real Prometheus (Debian's ``prometheus`` package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ghostserve_sglang.testing.campaign import run_trial
from ghostserve_sglang.testing.local_server import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
PHASES = {"flush", "read", "exchange", "decode", "scatter"}


pytestmark = pytest.mark.shared_server("metrics2")


@pytest.fixture(scope="module")
def server(shared_servers):
    """The shared server with --enable-metrics and JSON logs (test_rank_crash_loop ends it later)."""
    return shared_servers.get("metrics2")


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus on 127.0.0.1 with the shipped scrape config, pointed at the test server."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "dashboards" / "prometheus.yaml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        ["prometheus", f"--config.file={workdir / 'prometheus.yaml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def workload(server):
    """Requests with shared prefixes, one injected fault and its recovery, a scrub; then idle."""
    trial = run_trial(server, seed=11, ranks=2)
    assert trial.ok and trial.recovery["outcome"] == "rebuilt"
    server.control("scrub")
    eventually(lambda: caught_up(scrape(server)))  # idle: the metrics refresh every second
    return trial


def caught_up(samples: dict) -> bool:
    for rank in ("0", "1"):
        assert value(samples, "ghostserve_checkpoint_lag_steps", tp_rank=rank) == 0
        assert value(samples, "ghostserve_parity_drained_bytes_total", tp_rank=rank) == value(
            samples, "ghostserve_parity_produced_bytes_total", tp_rank=rank)
    return True


def scrape(server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ghostserve_"):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted({"code": "xor", **labels}.items())))]


def query(prometheus: str, expr: str) -> dict:
    url = prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_every_dashboard_panel_query_returns_series(server, prometheus, workload):
    assert DASHBOARDS

    def every_panel_answers() -> bool:  # a rate needs a few scrapes after the workload
        failures = []
        for path in DASHBOARDS:
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$__rate_interval", "2m")
                    reply = query(prometheus, expr)
                    if reply["status"] != "success" or not reply["data"]["result"]:
                        failures.append(f"{path.name} / {panel['title']}: {expr} -> {reply}")
        assert not failures, "\n".join(failures)
        return True

    eventually(every_panel_answers, timeout_s=60, interval_s=1)


def test_metric_values_match_the_store_and_the_events(server, workload):
    status = {r["rank"]: r for r in server.control("status")["ranks"]}

    def matching_status() -> dict:  # the metrics refresh every second
        samples = scrape(server)
        caught_up(samples)  # idle
        for rank in ("0", "1"):
            mine, seen = status[int(rank)], lambda name: value(samples, name, tp_rank=rank)  # noqa: B023
            assert seen("ghostserve_host_store_used_bytes") == mine["parity_bytes_in_use"]
            assert seen("ghostserve_protected_tokens") == mine["protected_slots"]
            assert seen("ghostserve_host_store_capacity_bytes") == mine["host_bytes"]
        return samples

    before = eventually(matching_status)
    lost = workload.lost_ranks[0]
    assert value(before, "ghostserve_faults_injected_total", tp_rank=str(lost)) >= 1

    server.generate(list(range(3, 200)), 4)  # something live to lose
    server.control("inject-fault", ranks=[1])

    def counted_once() -> dict:
        after = scrape(server)
        for rank in ("0", "1"):
            rebuilt = "ghostserve_recoveries_total"
            assert value(after, rebuilt, tp_rank=rank, outcome="rebuilt") == value(
                before, rebuilt, tp_rank=rank, outcome="rebuilt") + 1
            assert value(after, "ghostserve_recovery_duration_seconds_count", tp_rank=rank) == value(
                before, "ghostserve_recovery_duration_seconds_count", tp_rank=rank) + 1
            assert value(after, "ghostserve_checkpoint_lag_steps", tp_rank=rank) == 0
        assert value(after, "ghostserve_faults_injected_total", tp_rank="1") == value(
            before, "ghostserve_faults_injected_total", tp_rank="1") + 1
        return after

    eventually(counted_once)


def test_exposition_passes_promtool_for_ghostserve_metrics(server, workload):
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read()
    assert b"ghostserve_" in text
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    complaints = [line for line in (done.stdout + done.stderr).decode().splitlines() if "ghostserve_" in line]
    assert not complaints, complaints


def test_shipped_prometheus_config_passes_promtool():
    done = subprocess.run(["promtool", "check", "config", str(ROOT / "dashboards" / "prometheus.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboards_follow_the_conventions():
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["uid"] == dashboard["uid"].strip()
        variables = dashboard["templating"]["list"]
        assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in variables)
        for panel in dashboard["panels"]:
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                expr = target["expr"]
                assert target["datasource"]["uid"] == "${datasource}"
                for fn in ("rate(", "increase("):
                    if fn in expr:
                        assert "[$__rate_interval]" in expr, expr


def test_recovery_is_logged_as_json_events_with_rank_and_step(server, workload):
    events = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    phases = [e for e in events if e.get("event") == "recovery phase"]
    assert {e["phase"] for e in phases} >= PHASES
    assert {e["rank"] for e in phases} == {0, 1}
    assert all(isinstance(e["step"], int) and e["seconds"] >= 0 for e in phases)
    summaries = [e for e in events if e.get("event") == "recovery"]
    assert summaries and all({"rank", "step", "slots_rebuilt", "outcome"} <= set(e) for e in summaries)
    assert any(e.get("event") == "config" and e.get("code") == "xor" for e in events)
    assert any(e.get("event") == "scrub" and "mismatching" in e for e in events)


def test_json_events_from_concurrent_processes_stay_one_per_line(tmp_path):
    """Several processes logging to one unbuffered stderr, as SGLang's ranks do: every line parses."""
    writer = ("import sys; from ghostserve_sglang import logs; import structlog; logs.configure('json'); "
              "log = structlog.get_logger(); "
              "[log.info('scrub', rank=int(sys.argv[1]), i=i) for i in range(3000)]")
    path = tmp_path / "shared.log"
    with open(path, "w") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        writers = [subprocess.Popen([sys.executable, "-c", writer, str(rank)], stderr=out, env=env)
                   for rank in range(3)]
        assert all(w.wait(timeout=120) == 0 for w in writers)
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 9000
    assert {(e["rank"], e["i"]) for e in events} == {(r, i) for r in range(3) for i in range(3000)}
