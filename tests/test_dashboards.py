"""The Grafana dashboard, the Prometheus alert rules and the consumers' scaler's query: promtool checks
the rules and runs their unit tests and the query's, and every series these queries name is one a
real /metrics serves after a job has run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import METRICS_TOKEN
from prometheus_client.parser import text_string_to_metric_families

INFRA = Path(__file__).resolve().parent.parent / "infra"
RULES = INFRA / "prometheus" / "alerts.yml"
RULE_TESTS = INFRA / "prometheus" / "alerts.test.yml"
DASHBOARD = json.loads((INFRA / "grafana" / "rtqcc.json").read_text())
[SCALER_TRIGGER] = yaml.safe_load((INFRA / "k8s-autoscaled" / "consumer-scaler.yaml").read_text())["spec"]["triggers"]
SERIES = re.compile(r"\brtqcc_[a-zA-Z0-9_]+")
# What a family of each type is served as (prometheus_client's text format).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum")}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install -y prometheus (Debian's package; .ci/run installs it)")
    return found


def _dashboard_queries() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def _rule_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    promtool = _promtool()
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_consumer_scalers_query_counts_each_running_job_once_and_the_unread_ones(tmp_path):
    """Two API pods scraped serve the same deployment-wide series; consumer `a` runs 64 jobs, `b` 30,
    and 100 wait unread: 194 slots wanted. With none running, the unread alone. With nothing scraped,
    no answer (the scaler's fallback, not a scale-down to the minimum)."""
    query = SCALER_TRIGGER["metadata"]["query"]
    pods = ("api-1", "api-2")
    series = [(f'rtqcc_jobs_in_flight{{consumer="{consumer}",instance="{pod}"}}', f"{jobs}x5 stale")
              for pod in pods for consumer, jobs in (("a", 64), ("b", 30))]
    series += [(f'rtqcc_queue_lag{{group="orchestrators",instance="{pod}"}}', "100x5 7x5 stale") for pod in pods]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": query, "eval_time": "3m", "exp_samples": [{"labels": "{}", "value": 194}]},
            {"expr": query, "eval_time": "9m", "exp_samples": [{"labels": "{}", "value": 7}]},
            {"expr": query, "eval_time": "14m", "exp_samples": []},
        ],
    }]}
    (tmp_path / "scaler.test.yml").write_text(yaml.safe_dump(tests))
    tested = subprocess.run([_promtool(), "test", "rules", "scaler.test.yml"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _narrowed(expression: str, **matchers: str) -> str:
    """`expression` with `matchers` added to each of its selectors."""
    added = ",".join(f'{label}="{value}"' for label, value in matchers.items())

    def narrowed(found: re.Match) -> str:
        name, labels = found[1], found[2]
        return f"{name}{{{added},{labels[1:]}" if labels else f"{name}{{{added}}}"
    return re.sub(r"\b(rtqcc_[a-zA-Z0-9_]+)(\{[^}]*\})?", narrowed, expression)


def test_each_panel_counts_what_two_scraped_api_pods_serve_once(tmp_path):
    """Every API pod serves the same deployment-wide series (the gauges read Postgres and Redis, the
    counters and histograms are summed in Redis). Scraped pod by pod, as a ServiceMonitor does, a
    panel must show what the plain sums show over one pod's series, not twice as much. Each series
    has two values of each label its panel groups by (and a histogram's own labels), so a panel
    that collapses distinct series differs too."""
    from rtqcc.metrics import HISTOGRAMS

    queries = [query.replace("$__rate_interval", "5m") for query in _dashboard_queries()]  # Grafana's variable
    series, checks = [], []
    for n, query in enumerate(queries):
        grouped = {label.strip() for clause in re.findall(r"\bby \(([^)]*)\)", query) for label in clause.split(",")}
        grouped |= {label for name in SERIES.findall(query) for histogram, (_, labels) in HISTOGRAMS.items()
                    if name.startswith(f"rtqcc_{histogram}_") for label in labels}
        grouped = sorted(grouped - {"le"})
        label_sets = [[]]
        for label in grouped:
            label_sets = [[*labels, f'{label}="{label}-{value}"'] for labels in label_sets for value in (1, 2)]
        for name in sorted(set(SERIES.findall(query))):
            for pod in ("api-1", "api-2"):
                for labels in label_sets:
                    own = ",".join([f'query="{n}"', f'instance="{pod}"', *labels])
                    if name.endswith("_bucket"):
                        series += [(f'{name}{{{own},le="{le}"}}', f"0+{rise}x20")
                                   for le, rise in (("0.1", 3), ("+Inf", 10))]
                    else:
                        series.append((f"{name}{{{own}}}", "0+6x20" if name.endswith(("_total", "_count")) else "5x20"))
        both = _narrowed(query, query=str(n))
        reference = re.sub(r"\bmax\b", "sum", _narrowed(query, query=str(n), instance="api-1"))
        checks += [{"expr": f"absent({reference})", "eval_time": "15m", "exp_samples": []},
                   {"expr": f"({both}) != ({reference})", "eval_time": "15m", "exp_samples": []},
                   {"expr": f"count({both}) != count({reference})", "eval_time": "15m", "exp_samples": []}]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": checks}]}
    (tmp_path / "panels.test.yml").write_text(yaml.safe_dump(tests))
    tested = subprocess.run([_promtool(), "test", "rules", "panels.test.yml"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_refuses_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("max(rtqcc_queue_lag", "max(rtqcc_queue_lag{", 1))
    checked = subprocess.run([_promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0


def test_the_alerts_cover_what_an_operator_is_paged_for():
    names = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert names == {"RtqccQueueLagging", "RtqccQueueWaitHigh", "RtqccDeadLetters", "RtqccProviderErrors",
                     "RtqccApi5xx", "RtqccConsumersNotCheckpointing"}


def test_the_dashboard_is_well_formed():
    panels = DASHBOARD["panels"]
    assert DASHBOARD["uid"] == "rtqcc" and panels
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def _served(api) -> tuple[set[str], set[str]]:
    """The series names a scrape declares (every name its families are served as), and those with samples."""
    response = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    declared, sampled = set(), set()
    for family in text_string_to_metric_families(response.body.decode()):
        declared |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        sampled |= {sample.name for sample in family.samples}
    return declared, sampled


def test_every_series_the_dashboard_the_rules_and_the_scaler_name_is_served(api, run_consumer):
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 1
    declared, sampled = _served(api)
    queries = [*_dashboard_queries(), *_rule_queries(), SCALER_TRIGGER["metadata"]["query"]]
    named = {name for query in queries for name in SERIES.findall(query)}
    assert named, "no query names a series"
    assert not named - declared, f"queries name series /metrics does not serve: {sorted(named - declared)}"
    # After a job, the series of the queue, the consumers and the provider carry samples.
    assert {"rtqcc_jobs", "rtqcc_queue_lag", "rtqcc_queue_length", "rtqcc_tokens_total",
            "rtqcc_sections_completed_total", "rtqcc_provider_stream_seconds_count", "rtqcc_queue_wait_seconds_bucket",
            "rtqcc_dead_letters", "rtqcc_consumer_checkpoint_age_seconds"} <= sampled


def test_api_answers_are_counted_by_status_class(api, make_api):
    client, services = make_api()
    assert client.get("/jobs/RTQCC-nope").status_code in (400, 404)
    assert client.get("/jobs").status_code == 200
    services.metrics.flush()
    _, sampled = _served(api)
    assert "rtqcc_api_request_seconds_count" in sampled
    response = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).body.decode()
    assert re.search(r'rtqcc_api_request_seconds_count\{method="GET",status="4xx"\} [1-9]', response)
    assert re.search(r'rtqcc_api_request_seconds_count\{method="GET",status="2xx"\} [1-9]', response)


class _RefusingProvider:
    """A provider whose every call fails, as one does after its own retries."""

    name = "fake"

    def stream(self, request, abort, on_delta, on_wait=None):
        from rtqcc.errors import ProviderError

        raise ProviderError("the provider answered 500 three times")


def test_a_failed_provider_call_is_counted_as_an_error_not_a_stream(api, services):
    from rtqcc.metrics import MeasuredProvider
    from rtqcc.writing.abort import AbortSignal
    from rtqcc.writing.providers.base import GenerationRequest

    measured = MeasuredProvider(_RefusingProvider(), services.metrics)
    with pytest.raises(Exception, match="500 three times"):
        measured.stream(GenerationRequest(model="gpt-4o-mini", system="s", prompt="p"), AbortSignal(), lambda _: None)
    services.metrics.flush()
    scraped = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).body.decode()
    assert re.search(r'rtqcc_provider_error_seconds_count\{model="gpt-4o-mini",provider="fake"\} 1\.0', scraped)
    assert "rtqcc_provider_stream_seconds_count" not in scraped
