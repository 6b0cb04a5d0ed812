"""A tiny JSON API with nothing but the standard library.

Small on purpose: it exists to give dev-sync something real to keep in sync
and to restart, not to show off a web framework.
"""

from __future__ import annotations

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.time()
GREETING = os.environ.get("GREETING", "hello from the sample API")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"ok": True, "uptime_s": round(time.time() - STARTED, 1)})
        elif self.path == "/api/hello":
            self._send(200, {"message": GREETING})
        else:
            self._send(404, {"error": f"no route for {self.path}"})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    port = int(os.environ.get("API_PORT", "8000"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"api listening on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
