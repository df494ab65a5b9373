"""The streaming SSE function's HTTP face on Lambda.

Python's managed Lambda runtime cannot stream a response by itself; the AWS Lambda Web Adapter
(a layer, started through AWS_LAMBDA_EXEC_WRAPPER) can: it turns each function URL request into
an HTTP request to a local server and, with AWS_LWA_INVOKE_MODE=response_stream, streams that
server's answer back as it is written. This is that server, on the standard library only: it maps
`GET /jobs/{external_id}/stream` to the unchanged handler of functions/stream/stream_function.py
(an API Gateway style event in, status/headers/body iterator out) and writes each frame as an
HTTP/1.1 chunk the moment the handler yields it.

    python stream_server.py            # listens on 127.0.0.1:$AWS_LWA_PORT (8080, the adapter's default)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

STREAM_PATH = re.compile(r"^/jobs/(?P<external_id>[^/]+)/stream/?$")
READINESS_PATH = "/healthz"  # AWS_LWA_READINESS_CHECK_PATH in the template

log = logging.getLogger("rtqcc.stream_server")


class _Context:
    """The little of a Lambda context the stream handler may look at."""

    aws_request_id = None

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 900_000


def make_server(handler: Callable[[dict, Any], Any], host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server answering the stream route with `handler` (port 0: any free port)."""

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rtqcc-stream"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
            url = urlsplit(self.path)
            if url.path == READINESS_PATH:
                self._send_whole(200, "application/json", b'{"status": "ok"}')
                return
            match = STREAM_PATH.match(url.path)
            if not match:
                self._send_whole(404, "application/json",
                                 b'{"error": {"code": "not_found", "message": "Only GET /jobs/{id}/stream is served here."}}')
                return
            event = {
                "resource": "/jobs/{external_id}/stream",
                "path": url.path,
                "httpMethod": "GET",
                "headers": {name: value for name, value in self.headers.items()},
                "queryStringParameters": dict(parse_qsl(url.query)) or None,
                "pathParameters": {"external_id": match["external_id"]},
                "body": None,
                "isBase64Encoded": False,
            }
            answer = handler(event, _Context())
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunks = answer.chunks
            try:
                for chunk in chunks:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client left; stop reading its job's events
            finally:
                close = getattr(chunks, "close", None)
                if close:
                    close()

        def _send_whole(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's signature)
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), RequestHandler)
    server.daemon_threads = True
    return server


def serve_in_thread(handler: Callable[[dict, Any], Any], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    server = make_server(handler, host, port)
    threading.Thread(target=server.serve_forever, name="stream-server", daemon=True).start()
    return server


def main() -> int:
    from stream_function import handler  # the function's own entry module, beside this file in the zip

    port = int(os.environ.get("AWS_LWA_PORT") or 8080)
    server = make_server(handler, "127.0.0.1", port)
    # The port bound, which is the one asked for unless that was 0 (tests: no port chosen in advance).
    print(f"rtqcc stream server on 127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
