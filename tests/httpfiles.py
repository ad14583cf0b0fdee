"""A local HTTP server standing in for Meta's download host, with ways to misbehave."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FileHost:
    files: dict[str, bytes] = field(default_factory=dict)
    truncate_after: int | None = None  # send this many bytes, then drop the connection
    support_range: bool = True
    requests: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/ckpt"

    def __enter__(self) -> FileHost:
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                name = self.path.rsplit("/", 1)[-1]
                if name not in host.files:
                    self.send_error(404, "not found")
                    return
                body = host.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and host.support_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if host.truncate_after is not None:
                    payload = payload[: host.truncate_after]
                self.wfile.write(payload)
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
