"""An httpx transport that reserves before each request to an LLM provider and tells the
executor what the provider said (DESIGN 8). httpx is the HTTP client under the OpenAI and
Anthropic SDKs, so handing them a client with this transport is all a caller does:

    >>> client = openai.OpenAI(base_url=url, http_client=httpx.Client(
    ...     transport=ray_quota.httpx.QuotaTransport()))     # doctest: +SKIP

Per request it reserves an estimate (the JSON body's ``max_tokens`` plus the prompt at four
characters a token), commits the usage the response reports (``usage.total_tokens``), reports a
429 with its ``Retry-After`` (the resource's effective limit drops for everyone), and reports
``x-ratelimit-remaining-tokens`` / ``x-ratelimit-reset-tokens`` now and then, so the limit backs
off before the provider refuses. The token is the one given, or the current one
(``ray_quota.current_token()``, set by ``@quota``) at each request.

Optional: ``pip install ray_quota[httpx]``; the rest of ray_quota never imports httpx.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable

import httpx

from ray_quota._context import current_token
from ray_quota._token import QuotaToken, Reservation

__all__ = ["AsyncQuotaTransport", "QuotaTransport", "estimate_tokens"]

CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = 256  # what a request that names no max_tokens is assumed to use
REPORT_EVERY_S = 0.25  # the most often one transport reports what the provider says remains
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?"
                       r"(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


def estimate_tokens(request: httpx.Request) -> int:
    """Tokens a chat or completion request may use: its ``max_tokens`` (or
    ``max_completion_tokens``; else :data:`DEFAULT_MAX_TOKENS`) plus its prompt at
    :data:`CHARS_PER_TOKEN` characters a token. A body that is not JSON counts as its size."""
    try:
        body = json.loads(request.content or b"{}")
    except ValueError:
        return max(1, len(request.content) // CHARS_PER_TOKEN)
    if not isinstance(body, dict):
        return 1
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    texts = [m.get("content", "") for m in body.get("messages", []) if isinstance(m, dict)]
    texts.append(body.get("prompt", ""))
    prompt = sum(math.ceil(len(t if isinstance(t, str) else json.dumps(t)) / CHARS_PER_TOKEN)
                 for t in texts)
    return max(1, int(limit) + prompt) if isinstance(limit, int) else max(1, prompt)


def parse_seconds(text: str | None) -> float | None:
    """Seconds from a header: ``"2"``, ``"0.5"``, ``"1m30s"``, ``"250ms"``, ``"6m0s"``; None
    if absent or unreadable (an HTTP date, say)."""
    if not text:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if match is None or not any(match.groups()):
            return None
        h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s + ms / 1000
    return seconds if math.isfinite(seconds) and 0 <= seconds <= 86400 else None


class _Meter:
    """What both transports decide, with no I/O: the estimate, the token, and what to tell
    the reservation about a response."""

    def __init__(self, token: QuotaToken | str | None,
                 estimate: Callable[[httpx.Request], int],
                 report_every_s: float) -> None:
        self._token = token
        self._estimate = estimate
        self._report_every_s = report_every_s
        self._reported_at = -math.inf
        self._lock = threading.Lock()

    def token(self) -> QuotaToken:
        if self._token is None or isinstance(self._token, str):
            return current_token(self._token)  # the task's, under @quota
        return self._token

    def amount(self, request: httpx.Request, token: QuotaToken) -> int:
        return max(1, min(self._estimate(request), token.spec.ceiling))

    def settle(self, reservation: Reservation, response: httpx.Response) -> None:
        """Tell ``reservation`` what ``response`` (read) says, and commit what it used."""
        headers = response.headers
        remaining = headers.get("x-ratelimit-remaining-tokens")
        left = int(remaining) if remaining is not None and remaining.isdigit() else None
        reset = parse_seconds(headers.get("x-ratelimit-reset-tokens"))
        if response.status_code == 429:
            ms = parse_seconds(headers.get("retry-after-ms"))
            retry = ms / 1000 if ms is not None else parse_seconds(headers.get("retry-after"))
            reservation.refused(retry, remaining=left, reset_s=reset)
            reservation.commit(0)
            return
        if left is not None and self._due():
            reservation.remaining(left, reset)
        reservation.commit(_used(response, reservation.amount))

    def _due(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._reported_at < self._report_every_s:
                return False
            self._reported_at = now
            return True


def _used(response: httpx.Response, reserved: int) -> int:
    """The usage the response reports (OpenAI's ``total_tokens``, Anthropic's input plus
    output), or what was reserved if it reports none; nothing for an error."""
    if response.status_code >= 400:
        return 0
    try:
        usage = response.json().get("usage") or {}
    except (ValueError, AttributeError):
        return reserved
    total = usage.get("total_tokens")
    if total is None and "input_tokens" in usage:
        total = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
    return total if isinstance(total, int) and total >= 0 else reserved


def _copy(response: httpx.Response, raw: bytes, request: httpx.Request) -> httpx.Response:
    """The response again, its body in memory (still encoded, as the client expects it)."""
    return httpx.Response(response.status_code, headers=response.headers, content=raw,
                          request=request, extensions=response.extensions)


class QuotaTransport(httpx.BaseTransport):
    """Reserves before each request and reports what the provider said; see the module's doc.

    Args:
        token: the token to reserve from; None (or a resource's name): the current token (of
            that resource) at each request, as ``ray_quota.current_token`` finds it.
        inner: the transport that sends (default ``httpx.HTTPTransport()``).
        estimate: units to reserve for a request (default :func:`estimate_tokens`).
        report_every_s: the most often what remains is reported (429s always are).
    """

    def __init__(self, token: QuotaToken | str | None = None, *,
                 inner: httpx.BaseTransport | None = None,
                 estimate: Callable[[httpx.Request], int] = estimate_tokens,
                 report_every_s: float = REPORT_EVERY_S) -> None:
        self._inner = inner or httpx.HTTPTransport()
        self._meter = _Meter(token, estimate, report_every_s)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        token = self._meter.token()
        reservation = token.reserve(self._meter.amount(request, token))
        with reservation:  # an exception commits nothing used
            response = self._inner.handle_request(request)
            try:
                raw = b"".join(response.iter_raw())
            finally:
                response.close()
            copy = _copy(response, raw, request)
            copy.read()
            self._meter.settle(reservation, copy)
        return copy

    def close(self) -> None:
        self._inner.close()


class AsyncQuotaTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`QuotaTransport` (for ``openai.AsyncOpenAI``)."""

    def __init__(self, token: QuotaToken | str | None = None, *,
                 inner: httpx.AsyncBaseTransport | None = None,
                 estimate: Callable[[httpx.Request], int] = estimate_tokens,
                 report_every_s: float = REPORT_EVERY_S) -> None:
        self._inner = inner or httpx.AsyncHTTPTransport()
        self._meter = _Meter(token, estimate, report_every_s)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        token = self._meter.token()
        reservation = await token.reserve_async(self._meter.amount(request, token))
        async with reservation:
            response = await self._inner.handle_async_request(request)
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            copy = _copy(response, raw, request)
            await copy.aread()
            self._meter.settle(reservation, copy)
        return copy

    async def aclose(self) -> None:
        await self._inner.aclose()

