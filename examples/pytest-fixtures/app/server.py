"""The site as a Python app: its pages, and its version as JSON at /api/version.

Each request's path is appended to /tmp/requests.log (a test reads it with
Service.exec).
"""

import http.server
import json
import os

ROOT = "/www"


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=ROOT, **kwargs)

    def do_GET(self):
        with open("/tmp/requests.log", "a") as log:
            log.write(self.path + "\n")
        if self.path != "/api/version":
            return super().do_GET()
        with open(os.path.join(ROOT, "version.txt")) as f:
            body = json.dumps({"version": f.read().strip()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    http.server.ThreadingHTTPServer(("", port), Handler).serve_forever()
