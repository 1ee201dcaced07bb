"""DashScope qwen text generation, streamed: a native aiohttp client of the HTTP + SSE protocol.

Why not `dashscope.AioGeneration`: the SDK reads the key and base URL from module globals (one
per process), logs every failed request with a traceback, keeps a hidden per-loop session,
turns a non-JSON error body into code "Unknown", and gives no deadline for the first token.
Here each await has its own deadline, a cancelled task closes its connection at once (the
response is closed in `finally`, not returned to the pool half-read), and every failure is a
`CloudError` with a stable code. The wire format is the SDK's (tests run the SDK against the
same fake server to prove the two agree).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from pydantic import SecretStr

from agent import jsonsafe
from agent.errors import CloudError
from agent.jsonsafe import BadJson
from agent.reply import cloud

log = logging.getLogger(__name__)

GENERATION_PATH = "/services/aigc/text-generation/generation"


@dataclass(frozen=True)
class LlmDelta:
    """One increment of the reply: new text (may be empty) and, at the end, why it stopped."""

    text: str
    finish_reason: str | None = None


class LlmClient(Protocol):
    """What the reply session needs from a language model."""

    model: str

    def stream(self, prompt: str, history: Sequence[dict[str, str]] = ()
               ) -> AsyncGenerator[LlmDelta, None]:
        """The reply to `prompt` after `history`, as it is generated."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class DashscopeLlm:
    """Streaming qwen chat over DashScope's native generation endpoint."""

    def __init__(
        self,
        *,
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        model: str = "qwen-turbo",
        system_prompt: str = "",
        first_text_timeout_s: float = 8.0,
        idle_timeout_s: float = 10.0,
        retries: int = 2,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 2.0,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = (base_url or cloud.DEFAULT_HTTP_BASE).rstrip("/")
        self.model = model
        self.system_prompt = system_prompt
        self.first_text_timeout_s = first_text_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.parameters = dict(parameters or {})
        self.requests = 0  # HTTP requests sent, retries included
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the key
        return f"DashscopeLlm(model={self.model!r}, base_url={self.base_url!r})"

    def messages(self, prompt: str, history: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """System prompt, history, then the user's prompt."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*out, *history, {"role": "user", "content": prompt}]

    async def stream(self, prompt: str, history: Sequence[dict[str, str]] = ()
                     ) -> AsyncGenerator[LlmDelta, None]:
        """Yield the reply as it arrives; CloudError on any failure or missed deadline.

        Failures before the first text are retried with backoff when a retry can help
        (unreachable, 429, 5xx) and time is left before `first_text_timeout_s`; once text
        has been yielded nothing is retried, since the caller has already used it.
        """
        key = cloud.api_key(self._api_key)
        body = {
            "model": self.model,
            "input": {"messages": self.messages(prompt, history)},
            "parameters": {**self.parameters, "result_format": "message",
                           "incremental_output": True},
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_text_timeout_s
        attempt = 0
        produced = False
        while True:
            try:
                async for delta in self._attempt(body, key, deadline):
                    produced = produced or bool(delta.text)
                    yield delta
                return
            except CloudError as e:
                if produced or e.code not in cloud.RETRYABLE or attempt >= self.retries:
                    raise
                delay = max(e.retry_after_s or 0.0,
                            cloud.backoff_delay(attempt, self.backoff_initial_s,
                                                self.backoff_max_s))
                if loop.time() + delay >= deadline:
                    raise
                log.info("LLM %s (%s); retry %d in %.2f s", e.code, e.message, attempt + 1,
                         delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _attempt(self, body: dict[str, Any], key: str, deadline: float
                       ) -> AsyncGenerator[LlmDelta, None]:
        """One HTTP request and its SSE stream."""
        loop = asyncio.get_running_loop()
        headers = {**cloud.auth_headers(key), "Accept": "text/event-stream",
                   "X-DashScope-SSE": "enable", "Content-Type": "application/json"}
        session = self._client()
        self.requests += 1
        try:
            async with asyncio.timeout_at(deadline):
                resp = await session.post(self.base_url + GENERATION_PATH,
                                          data=json.dumps(body, ensure_ascii=False),
                                          headers=headers)
        except TimeoutError:
            raise self._timeout("no answer") from None
        except aiohttp.ClientError as e:
            raise CloudError("unreachable", f"DashScope LLM unreachable: {e}") from None
        try:
            if resp.status != 200:
                text = await _read_body(resp, deadline)
                raise cloud.status_error(resp.status, text, "LLM",
                                         resp.headers.get("Retry-After"))
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                raise CloudError("bad_response", "DashScope LLM did not answer with an SSE "
                                 f"stream (Content-Type {resp.content_type!r})")
            first = True
            finished = False
            limit = _Deadline(deadline)
            async for event, status, data in _sse(resp.content, limit):
                if event == "error":
                    raise cloud.status_error(status or 500, data, "LLM")
                delta = _parse_delta(data)
                if delta.text and first:
                    first = False
                if not first:
                    limit.at = loop.time() + self.idle_timeout_s
                if delta.text or delta.finish_reason:
                    yield delta
                if delta.finish_reason:
                    finished = True
                    break
            if not finished:
                raise CloudError("truncated", "DashScope LLM stream ended before the reply "
                                 "was finished")
            # Read to the end of the stream so the connection (and its TLS session) is kept
            # for the next reply instead of being closed half-read.
            async with asyncio.timeout_at(loop.time() + self.idle_timeout_s):
                while await resp.content.readany():
                    pass
            resp.release()
        except TimeoutError:
            raise self._timeout("no text" if first else "the stream stalled") from None
        except aiohttp.ClientPayloadError as e:
            raise CloudError("dropped", f"DashScope LLM stream broke off: {e}") from None
        except aiohttp.ClientError as e:
            raise CloudError("unreachable", f"DashScope LLM connection lost: {e}") from None
        finally:
            if not resp.closed and not resp.content.is_eof():
                resp.close()  # a half-read response must not go back to the pool

    def _timeout(self, what: str) -> CloudError:
        return CloudError("timeout", f"DashScope LLM {self.model}: {what} within the deadline "
                          f"({self.first_text_timeout_s:g} s to the first text, "
                          f"{self.idle_timeout_s:g} s between chunks)", status=504)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Keep-alive: the TLS handshake to the cloud is paid once, not per reply.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_body(resp: aiohttp.ClientResponse, deadline: float) -> bytes:
    """An error response's body, capped, within the deadline."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout_at(deadline):
            return await resp.content.read(65536)
    return b""


async def _readline(content: aiohttp.StreamReader, deadline: float) -> bytes:
    async with asyncio.timeout_at(deadline):
        return await content.readline()


@dataclass
class _Deadline:
    """Loop time by which the next line must arrive (moved on as text comes in)."""

    at: float


async def _sse(content: aiohttp.StreamReader, deadline: _Deadline
               ) -> AsyncIterator[tuple[str, int | None, str]]:
    """(event, status, data) per SSE event; `deadline` bounds each line read."""
    event, status, data = "message", None, list[str]()
    while True:
        try:
            raw = await _readline(content, deadline.at)
        except ValueError as e:  # a line over aiohttp's limit
            raise CloudError("bad_response", f"DashScope SSE line too long: {e}") from None
        if not raw:
            if data:
                yield event, status, "\n".join(data)
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield event, status, "\n".join(data)
            event, status, data = "message", None, []
        elif line.startswith("data:"):
            data.append(line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith(":HTTP_STATUS/") or line.startswith("status:"):
            with contextlib.suppress(ValueError):
                status = int(line.split("/", 1)[-1].split(":", 1)[-1].strip())
        # `id:` lines and other comments carry nothing we need


def _parse_delta(data: str) -> LlmDelta:
    """The text increment and finish reason of one `result` event."""
    try:
        obj = jsonsafe.loads(data, max_bytes=len(data.encode()) + 1)
        choice = obj["output"]["choices"][0]
        content = choice.get("message", {}).get("content") or ""
        reason = choice.get("finish_reason")
    except (BadJson, KeyError, IndexError, TypeError, AttributeError):
        raise CloudError("bad_response",
                         f"malformed DashScope SSE data: {data[:120]!r}") from None
    if not isinstance(content, str):
        # Multimodal models answer [{"text": ...}]; keep the text parts.
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    # Incremental streams say "null" (a string) until the last event.
    return LlmDelta(content, None if reason in (None, "", "null") else str(reason))
