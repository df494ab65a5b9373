"""One attempt at a webhook: check where it goes, sign it, POST it to the checked address, and
say what came back. No redirect is followed (a 3xx is a failure), nothing but 2xx is success."""

from __future__ import annotations

from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, TimeoutError as Urllib3Timeout

from ..errors import ValidationFailed
from ..store.webhooks import DueDelivery
from .signing import signed_headers
from .targets import IpAddress, Resolver, Target, TargetPolicy, TargetRefused, checked_addresses, parse_target, resolve

MAX_ANSWER_CHARS = 500  # of a receiver's answer, kept in the delivery log
USER_AGENT = "rtqcc-webhooks/1"


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    status_code: int | None = None
    error: str | None = None
    answer: str | None = None  # the start of the receiver's body


def _pool(target: Target, address: IpAddress, timeout_s: float) -> urllib3.HTTPConnectionPool:
    """A connection to the checked `address` itself: no proxy (urllib3 reads none from the
    environment), no retry, and for https, SNI and the certificate check against the URL's host."""
    options = {"timeout": urllib3.Timeout(connect=timeout_s, read=timeout_s), "retries": False, "maxsize": 1}
    if target.scheme == "http":
        return urllib3.HTTPConnectionPool(str(address), target.port, **options)
    name = None if target.literal_address() is not None else target.host
    return urllib3.HTTPSConnectionPool(str(address), target.port, cert_reqs="CERT_REQUIRED", server_hostname=name,
                                       **options)


def post_delivery(delivery: DueDelivery, policy: TargetPolicy, timeout_s: float,
                  resolver: Resolver = resolve) -> AttemptResult:
    """One attempt: refused before any connection when the target's addresses are not allowed;
    each connect, send and read waits at most `timeout_s`."""
    try:
        target = parse_target(delivery.url)
        addresses = checked_addresses(target, policy, resolver)
    except (TargetRefused, ValidationFailed) as exc:  # ValidationFailed: stored before a stricter check
        return AttemptResult(False, error=f"refused before connecting: {exc}")
    headers = {**signed_headers(delivery.public_id, delivery.payload, delivery.secrets),
               "content-type": "application/json", "user-agent": USER_AGENT, "host": target.host_header}
    failures = []
    for address in addresses:
        try:
            with _pool(target, address, timeout_s) as pool:
                response = pool.urlopen("POST", target.path, body=delivery.payload.encode("utf-8"), headers=headers,
                                        redirect=False, retries=False, preload_content=False, assert_same_host=False)
                try:
                    answer = response.read(MAX_ANSWER_CHARS * 4, decode_content=False)
                finally:
                    response.release_conn()
        except NewConnectionError as exc:  # the next address, if the name has more
            failures.append(f"{address}: {exc}")
            continue
        except Urllib3Timeout:
            return AttemptResult(False, error=f"no answer within {timeout_s:g} s")
        except (HTTPError, OSError) as exc:
            return AttemptResult(False, error=f"{type(exc).__name__}: {exc}"[:MAX_ANSWER_CHARS])
        text = answer.decode("utf-8", "replace").replace("\x00", "")[:MAX_ANSWER_CHARS]
        status = response.status
        if 200 <= status < 300:
            return AttemptResult(True, status, answer=text)
        why = f"answered {status}" + ("; redirects are not followed" if 300 <= status < 400 else "")
        return AttemptResult(False, status, error=why, answer=text)
    return AttemptResult(False, error=("could not connect: " + "; ".join(failures))[:MAX_ANSWER_CHARS])
