"""A fake OpenAI-style provider on 127.0.0.1 with a hidden tokens-per-second limit.

A real HTTP server (the standard library's, in a thread) that answers ``POST
/v1/chat/completions`` as OpenAI does, with ``usage``, and refuses with HTTP 429 and
``Retry-After`` once its own token bucket (``tokens_per_s``, holding ``burst_s`` seconds of it)
cannot pay for a request, as real providers do. Every answer carries
``x-ratelimit-remaining-tokens`` and ``x-ratelimit-reset-tokens``. For tests, the demo and the
feedback benchmark; it needs nothing beyond the standard library.

Example:
    >>> with FakeProvider(tokens_per_s=1000) as provider:
    ...     url = provider.base_url          # give it to openai.OpenAI(base_url=...)
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHARS_PER_TOKEN = 4  # the provider's (and the transport's) rough prompt tokenizer


@dataclass(frozen=True, slots=True)
class Answer:
    """One request the provider answered: when (its clock), whether it served it, and the
    tokens it charged."""

    at: float
    served: bool
    tokens: int


class FakeProvider:
    """An OpenAI-style chat completions server with a hidden limit; see the module's doc.

    Args:
        tokens_per_s: the hidden true limit.
        burst_s: its bucket holds this many seconds of the limit (OpenAI's hold a minute of a
            per-minute limit: one period).
        completion_fraction: the share of ``max_tokens`` each answer uses.
        latency_s: how long each answer takes.
    """

    def __init__(self, tokens_per_s: float, *, burst_s: float = 1.0,
                 completion_fraction: float = 0.5, latency_s: float = 0.0) -> None:
        self.tokens_per_s = float(tokens_per_s)
        self.capacity = self.tokens_per_s * burst_s
        self.completion_fraction = completion_fraction
        self.latency_s = latency_s
        self.answers: list[Answer] = []
        self._level = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- the server

    def start(self) -> FakeProvider:
        """Serve on a free port of 127.0.0.1, in a daemon thread."""
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = None
                status, headers, payload = provider.answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {**headers, "content-type": "application/json",
                                    "content-length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass  # quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-provider")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        assert self._server is not None, "start the provider first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------------ the answers

    def answer(self, path: str, body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Status, headers and JSON of the answer to ``body`` posted to ``path``."""
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {}, {"error": {"message": f"no route {path}", "type": "not_found"}}
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 400, {}, {"error": {"message": "messages must be a list",
                                       "type": "invalid_request_error"}}
        prompt = sum(math.ceil(len(str(m.get("content", ""))) / CHARS_PER_TOKEN)
                     for m in body["messages"] if isinstance(m, dict))
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        completion = max(1, int(int(max_tokens) * self.completion_fraction))
        cost = prompt + completion
        if self.latency_s:
            time.sleep(self.latency_s)
        with self._lock:
            now = time.monotonic()
            self._level = min(self.capacity,
                              self._level + (now - self._stamp) * self.tokens_per_s)
            self._stamp = now
            served = self._level >= cost
            if served:
                self._level -= cost
            wait = 0.0 if served else (cost - self._level) / self.tokens_per_s
            left = max(0, int(self._level))
            reset = (self.capacity - self._level) / self.tokens_per_s
            self.answers.append(Answer(now, served, cost if served else 0))
        headers = {"x-ratelimit-remaining-tokens": str(left),
                   "x-ratelimit-reset-tokens": f"{reset:.3f}s"}
        if not served:
            headers |= {"retry-after": str(math.ceil(wait)),
                        "retry-after-ms": str(math.ceil(wait * 1000))}
            return 429, headers, {"error": {"message": "Rate limit reached for tokens",
                                            "type": "tokens", "code": "rate_limit_exceeded"}}
        return 200, headers, {
            "id": f"chatcmpl-{len(self.answers)}", "object": "chat.completion",
            "created": int(time.time()), "model": str(body.get("model", "fake")),
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "ok " * completion}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": cost}}
