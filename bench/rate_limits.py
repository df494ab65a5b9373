"""The shared rate limits against a server that enforces them: 100 jobs on the local stack (two
consumers, every job in flight) with the OpenAI provider, talking to the local OpenAI-compatible
server enforcing 600 requests and 100,000 tokens a minute as OpenAI does. The stack's limit is set
at 95% of the server's. Reported: the calls the server refused (goal: under 1%), and the rate of
calls and tokens it admitted beside the rate it allows (goal: at least 90% of either)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rtqcc.settings import Settings
from rtqcc_emulator.openai_server import OpenAIServer

from .capacity import _create, _start, _wait_done, wait_for_consumers
from .stack import fresh_services, start_local_stack, stop_local_stack

JOBS = 100
SERVER_RPM, SERVER_TPM = 600, 100_000
CONFIGURED_SHARE = 0.95
API_KEY = "sk-bench-limits"


def run(settings: Settings, *, jobs: int = JOBS) -> dict:
    services = fresh_services(settings)
    server = OpenAIServer(api_key=API_KEY, requests_per_min=SERVER_RPM, tokens_per_min=SERVER_TPM).start()
    data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-limits-"))
    limits = f"*={SERVER_RPM * CONFIGURED_SHARE:g}/{SERVER_TPM * CONFIGURED_SHARE:g}"
    process, _ = start_local_stack(
        settings, data_dir, args=("--consumer-budget-s", "600"), RTQCC_PROVIDER="openai", OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=server.base_url, RTQCC_DEFAULT_MODEL="gpt-4o-mini", RTQCC_PROVIDER_LIMITS=limits)
    try:
        wait_for_consumers(services)
        server.reset()
        server.limits = type(server.limits)(SERVER_RPM, SERVER_TPM)
        ids = _create(services, jobs)
        went = _start(services, ids)
        ended = _wait_done(services, ids, timeout_s=900)
        records = server.requests
    finally:
        stop_local_stack(process)
        server.stop()
        services.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    elapsed_min = (ended - went) / 60
    admitted = [r for r in records if r.status == 200]
    refused = sum(1 for r in records if r.status == 429)
    counted_tokens = sum(server._estimate(r.model, r.messages, r.params) for r in admitted)
    return {
        "jobs": jobs, "server_limits": {"requests_per_min": SERVER_RPM, "tokens_per_min": SERVER_TPM},
        "configured": limits, "calls": len(records), "refused_429": refused,
        "refused_share": round(refused / max(1, len(records)), 4),
        "requests_per_min": round(len(admitted) / elapsed_min, 1),
        "tokens_per_min_as_counted": round(counted_tokens / elapsed_min),
        "share_of_allowed_rate": round(max(len(admitted) / elapsed_min / SERVER_RPM,
                                           counted_tokens / elapsed_min / SERVER_TPM), 3),
        "goals": {"refused_share_below": 0.01, "share_of_allowed_rate_at_least": 0.9},
    }
