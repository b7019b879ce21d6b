"""A stand-in for the Hugging Face hub's model API on loopback, and its local cache layout.

Workers find it through HF_ENDPOINT. Each repo answers only the tokens it lists (None: anonymous
callers too), as the hub answers a private repo; a repo may also answer slowly. The adapter files
themselves come from the local hub cache, so nothing is downloaded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "f" * 40


def hub_cache_from_folder(hub: Path, repo_id: str, folder: Path) -> None:
    """Lays out `folder` as huggingface_hub caches a repo: blobs, a snapshot of symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@dataclass
class FakeHub:
    url: str = ""
    readers: dict[str, set[str | None]] = field(default_factory=dict)  # repo → tokens it answers
    slow: dict[str, float] = field(default_factory=dict)  # repo → seconds before it answers
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (repo, token) per look-up


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0].removeprefix("/api/models/")
            repo = "/".join(path.split("/")[:2])
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth else None
            hub.seen.append((repo, token))
            time.sleep(hub.slow.get(repo, 0.0))
            if token not in hub.readers.get(repo, set()):
                self._answer(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            siblings = [
                {"rfilename": n, "size": 1000} for n in ("adapter_config.json", "adapter_model.safetensors")
            ]
            self._answer(
                200,
                {"id": repo, "sha": COMMIT, "private": None not in hub.readers[repo], "siblings": siblings},
            )

        def _answer(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
