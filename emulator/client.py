"""A small client for the RTQCC HTTP API (the emulator or a deployed stage), used by
`rtqcc jobs ...`, `rtqcc webhooks ...` and the demo. `events()` follows a job's SSE stream across reconnects."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from email.message import Message
from pathlib import PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
from httpx_sse import connect_sse

from rtqcc.delivery.formats import FORMATS


def attachment_name(disposition: str | None) -> str | None:
    """The bare file name of a Content-Disposition header (no folder, not hidden), if it has one."""
    if not disposition:
        return None
    header = Message()
    header["content-disposition"] = disposition
    name = PurePosixPath((header.get_filename() or "").replace("\\", "/")).name
    return name if name and not name.startswith(".") else None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class JobEvent:
    id: str
    type: str
    data: dict[str, Any]


class RtqccClient:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 35.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RtqccClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            self._raise(response)
        return response

    def create(self, *, title: str, brief: str, section_count: int | None = None,
               outline: list[dict] | None = None, **extra: Any) -> dict:
        body: dict[str, Any] = {"title": title, "brief": brief, **extra}
        if section_count is not None:
            body["section_count"] = section_count
        if outline is not None:
            body["outline"] = outline
        return self._call("POST", "/jobs", json=body).json()

    def control(self, external_id: str, verb: str) -> dict:
        return self._call("POST", f"/jobs/{external_id}/{verb}").json()

    def get(self, external_id: str) -> dict:
        return self._call("GET", f"/jobs/{external_id}").json()

    def delete(self, external_id: str) -> dict:
        """`{"externalId", "status"}`: `deleted`, or `deleting` while its consumer is still stopping."""
        return self._call("DELETE", f"/jobs/{external_id}").json()

    def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/jobs", params=params).json()

    def section(self, external_id: str, index: int) -> tuple[dict, str | None]:
        """One section and its ETag (None before its first version)."""
        response = self._call("GET", f"/jobs/{external_id}/sections/{index}")
        return response.json(), response.headers.get("etag")

    def replace_outline(self, external_id: str, outline: list[dict]) -> dict:
        return self._call("PUT", f"/jobs/{external_id}/outline", json={"outline": outline}).json()

    def regenerate(self, external_id: str, index: int, *, instructions: str | None = None,
                   brief: str | None = None, cascade: bool = False) -> dict:
        body: dict[str, Any] = {"cascade": cascade}
        if instructions:
            body["instructions"] = instructions
        if brief is not None:
            body["brief"] = brief
        return self._call("POST", f"/jobs/{external_id}/sections/{index}/regenerate", json=body).json()

    def edit(self, external_id: str, index: int, content: str, *, if_match: str) -> dict:
        return self._call("PUT", f"/jobs/{external_id}/sections/{index}", json={"content": content},
                          headers={"If-Match": if_match}).json()

    def set_lock(self, external_id: str, index: int, locked: bool) -> dict:
        return self._call("POST", f"/jobs/{external_id}/sections/{index}/{'lock' if locked else 'unlock'}").json()

    def versions(self, external_id: str, index: int) -> dict:
        return self._call("GET", f"/jobs/{external_id}/sections/{index}/versions").json()

    def version(self, external_id: str, index: int, version: int) -> dict:
        return self._call("GET", f"/jobs/{external_id}/sections/{index}/versions/{version}").json()

    def restore(self, external_id: str, index: int, version: int) -> dict:
        return self._call("POST", f"/jobs/{external_id}/sections/{index}/versions/{version}/restore").json()

    def fork(self, external_id: str, from_section: int, outline: list[dict] | None = None) -> dict:
        body: dict[str, Any] = {"from_section": from_section}
        if outline is not None:
            body["outline"] = outline
        return self._call("POST", f"/jobs/{external_id}/fork", json=body).json()

    def create_webhook(self, url: str, events: list[str], description: str = "") -> dict:
        """A webhook endpoint, with its signing secret (shown this once)."""
        body: dict[str, Any] = {"url": url, "events": events}
        if description:
            body["description"] = description
        return self._call("POST", "/webhooks", json=body).json()

    def webhooks(self) -> list[dict]:
        return self._call("GET", "/webhooks").json()["webhooks"]

    def delete_webhook(self, webhook_id: str) -> None:
        self._call("DELETE", f"/webhooks/{webhook_id}")

    def rotate_webhook_secret(self, webhook_id: str) -> dict:
        return self._call("POST", f"/webhooks/{webhook_id}/rotate-secret").json()

    def webhook_deliveries(self, webhook_id: str, *, limit: int = 20, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", f"/webhooks/{webhook_id}/deliveries", params=params).json()

    def redeliver(self, webhook_id: str, delivery_id: str) -> dict:
        return self._call("POST", f"/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver").json()

    def manuscript(self, external_id: str) -> str:
        return self._call("GET", f"/jobs/{external_id}/manuscript").text

    def export(self, external_id: str, fmt: str) -> tuple[bytes, str | None]:
        """The manuscript in `fmt` (markdown, html, docx, pdf) and the file name the API gives it.
        A large one comes as a redirect to a presigned S3 URL: that one URL is followed, without
        the API key, and no redirect past it."""
        # Naming the type gets a small DOCX or PDF inline; with */* it would come through S3.
        response = self.http.get(f"/jobs/{external_id}/manuscript", params={"format": fmt}, follow_redirects=False,
                                 headers={"Accept": FORMATS[fmt].media_type})
        if response.status_code >= 400:
            self._raise(response)
        name = attachment_name(response.headers.get("content-disposition"))
        if not response.is_redirect:
            return response.content, name
        location = response.headers.get("location", "")
        if urlsplit(location).scheme not in ("http", "https"):
            raise ApiError(response.status_code, "bad_redirect", f"the API redirected to {location[:100]!r}")
        with httpx.Client(timeout=self.http.timeout, follow_redirects=False) as storage:
            download = storage.get(location)
        if download.status_code != 200:
            raise ApiError(download.status_code, "download_failed",
                           f"the download from storage answered {download.status_code}")
        return download.content, name

    def events(self, external_id: str, *, last_event_id: str | None = None,
               max_reconnects: int = 1000) -> Iterator[JobEvent]:
        """Every event of the job until `done`, reconnecting with Last-Event-ID whenever the
        server ends an answer early (a buffering gateway), the connection drops or a part of the
        service is down (503, retried after its Retry-After)."""
        reconnects = 0
        retry_s = 1.0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(self.http, "GET", f"/jobs/{external_id}/stream", headers=headers,
                                 timeout=httpx.Timeout(self.http.timeout.connect, read=None)) as source:
                    if source.response.status_code == 204:
                        return
                    if source.response.status_code == 503:  # a part of the stack is down: wait, resume
                        retry_s = _retry_after_s(source.response, retry_s)
                        raise httpx.TransportError("service unavailable")
                    if source.response.status_code >= 400:
                        source.response.read()
                        self._raise(source.response)
                    for sse in source.iter_sse():
                        if sse.retry:
                            retry_s = sse.retry / 1000
                        if not sse.event or sse.event == "message":
                            continue
                        last_event_id = sse.id or last_event_id
                        event = JobEvent(id=sse.id, type=sse.event, data=json.loads(sse.data))
                        yield event
                        if event.type == "done":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                time.sleep(retry_s)  # the connection dropped: wait the server's retry hint, then resume
            reconnects += 1
            if reconnects > max_reconnects:
                raise ApiError(0, "too_many_reconnects", f"gave up following {external_id}")

    def _raise(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            raise ApiError(response.status_code, error["code"], error["message"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http_error", response.text[:300]) from None


def _retry_after_s(response: httpx.Response, default_s: float) -> float:
    try:
        return min(30.0, max(0.1, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return default_s
