"""A tiny stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, enough for huggingface_hub's
create_repo, upload_folder (regular, non-LFS uploads) and snapshot_download. Model repos only;
every commit is a full snapshot of the repo's files. Used as a context manager: the server
thread starts on entry and stops on exit."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class MockHub:
    def __init__(self, fail_commits: bool = False):
        self.repos: dict[str, dict] = {}  # repo id -> {"refs": {name: sha}, "commits": {sha: {path: bytes}}}
        self.fail_commits = fail_commits
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self)

            def do_POST(self):
                hub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # -- responses -----------------------------------------------------------------------
    @staticmethod
    def reply(req, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              error: str | None = None):
        req.send_response(status)
        if error:
            req.send_header("X-Error-Code", error)
            req.send_header("X-Error-Message", error)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def json(self, req, status, data, head=False, error=None):
        self.reply(req, status, json.dumps(data).encode(), {"Content-Type": "application/json"}, head, error)

    def resolve(self, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        sha = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        return repo, sha

    def handle(self, req, head: bool = False):
        url = urlparse(req.path)
        path = unquote(url.path)
        self.requests.append(f"{req.command} {path}")
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        parts = path.strip("/").split("/")
        if req.command == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo_id not in self.repos:
                sha = hashlib.sha1(repo_id.encode()).hexdigest()
                self.repos[repo_id] = {"refs": {"main": sha}, "commits": {sha: {}}}
            return self.json(req, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if req.command == "POST" and path == "/api/validate-yaml":  # the model card's metadata
            return self.json(req, 200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit", "revision", "tree"):
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo, sha = self.resolve(repo_id, revision)
            if repo is None:
                return self.json(req, 404, {"error": "Repository not found"}, head, "RepoNotFound")
            if sha is None:
                return self.json(req, 404, {"error": f"Invalid rev id: {revision}"}, head, "RevisionNotFound")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self.json(req, 200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
            if action == "commit":
                if self.fail_commits:
                    return self.json(req, 500, {"error": "commit refused by the test server"})
                files = dict(repo["commits"][sha])
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                new = hashlib.sha1(sha.encode() + body).hexdigest()
                repo["commits"][new] = files
                repo["refs"][revision] = new
                return self.json(req, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{new}", "commitOid": new,
                                            "pullRequestUrl": None})
            if action == "tree":
                return self.json(req, 200, [{"type": "file", "path": p, "size": len(b),
                                             "oid": hashlib.sha1(b).hexdigest()}
                                            for p, b in sorted(repo["commits"][sha].items())])
            siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(repo["commits"][sha].items())]
            return self.json(req, 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings,
                                        "private": False}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            repo, sha = self.resolve(repo_id, revision)
            if repo is None:
                return self.json(req, 404, {"error": "Repository not found"}, head, "RepoNotFound")
            if sha is None:
                return self.json(req, 404, {"error": "Invalid rev id"}, head, "RevisionNotFound")
            data = repo["commits"][sha].get(filename)
            if data is None:
                return self.json(req, 404, {"error": "Entry not found"}, head, "EntryNotFound")
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self.reply(req, 200, data, {"X-Repo-Commit": sha, "ETag": etag,
                                               "Content-Type": "application/octet-stream"}, head)
        return self.json(req, 404, {"error": f"not served here: {req.command} {path}"}, head)
