"""A local stand-in for the Hugging Face Hub's HTTP API: enough for ``create_repo`` + ``upload_folder``.

The real ``huggingface_hub`` client talks to it over HTTP, so the test exercises the client's actual calls
(repo creation, README validation, pre-upload, the NDJSON commit) and checks what arrived, byte for byte.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id → create payload
        self.files: dict[str, dict[str, bytes]] = {}  # repo_id → path → content
        self.auth_headers: list[str] = []
        self.unknown: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.auth_headers.append(self.headers.get("Authorization", ""))
                status, reply = stub.handle(self.path.split("?")[0], body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            self.repos[repo_id] = payload
            self.files.setdefault(repo_id, {})
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
            repo_id = match.group(1)
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{'0' * 40}", "commitOid": "0" * 40, "success": True}
        self.unknown.append(path)
        return 404, {"error": f"stub: unknown endpoint {path}"}
