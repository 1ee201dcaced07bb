"""The native DashScope LLM client (and the real SDK) against the loopback fake server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.errors import CloudError
from agent.reply.history import ConversationStore
from agent.reply.llm import DashscopeLlm, LlmDelta
from tests.dashscope_fake import FakeDashscope, LlmScript, fake_reply, until


@pytest.fixture
async def fake() -> AsyncIterator[FakeDashscope]:
    async with FakeDashscope() as f:
        yield f


def client(fake: FakeDashscope, **kw: object) -> DashscopeLlm:
    opts: dict[str, object] = {"api_key": fake.api_key, "base_url": fake.http_base,
                               "backoff_initial_s": 0.05}
    opts.update(kw)
    return DashscopeLlm(**opts)  # type: ignore[arg-type]


async def collect(llm: DashscopeLlm, prompt: str = "hello", history: list | None = None,
                  out: list[LlmDelta] | None = None) -> list[LlmDelta]:
    """Every delta (into `out`, so a test sees what came before an error); closes `llm`."""
    out = [] if out is None else out
    try:
        async for d in llm.stream(prompt, history or []):
            out.append(d)
    finally:
        await llm.aclose()
    return out


async def test_streams_incremental_text_with_system_prompt_and_history(
        fake: FakeDashscope) -> None:
    llm = client(fake, system_prompt="You are a kitchen assistant.", model="qwen-plus")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    deltas = await collect(llm, "what is the time", history)

    assert "".join(d.text for d in deltas) == fake_reply("what is the time")
    assert len([d for d in deltas if d.text]) == len(fake.llm_log[0].tokens) > 5
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])  # "null" is not a reason
    rec = fake.llm_log[0]
    assert rec.body["model"] == "qwen-plus"
    assert rec.body["parameters"]["incremental_output"] is True
    assert rec.body["parameters"]["result_format"] == "message"
    assert rec.body["input"]["messages"] == [
        {"role": "system", "content": "You are a kitchen assistant."}, *history,
        {"role": "user", "content": "what is the time"}]
    assert rec.headers["Accept"] == "text/event-stream"
    assert rec.headers["X-DashScope-SSE"] == "enable"
    assert rec.headers["Authorization"] == f"Bearer {fake.api_key}"


async def test_connection_is_kept_for_the_next_reply(fake: FakeDashscope) -> None:
    """A finished stream is read to its end, so the next request reuses the connection."""
    llm = client(fake)
    for prompt in ("one", "two", "three"):
        async for _ in llm.stream(prompt):
            pass
    await llm.aclose()
    assert len({r.peer for r in fake.llm_log}) == 1, [r.peer for r in fake.llm_log]


async def test_real_sdk_reads_the_fake_the_same_way(fake: FakeDashscope) -> None:
    """The fake speaks the SDK's protocol: dashscope.AioGeneration gets the same text."""
    import dashscope

    saved = dashscope.base_http_api_url, dashscope.api_key
    dashscope.base_http_api_url, dashscope.api_key = fake.http_base, fake.api_key
    try:
        responses: Any = await dashscope.AioGeneration.call(
            model="qwen-turbo", messages=[{"role": "user", "content": "ping"}],  # type: ignore[list-item]
            stream=True, incremental_output=True, result_format="message")
        parts = []
        async for r in responses:
            assert r.status_code == 200, r
            parts.append(r.output.choices[0].message.content)
    finally:
        dashscope.base_http_api_url, dashscope.api_key = saved
        await dashscope.close_shared_aio_session()  # type: ignore[func-returns-value,misc]
    assert "".join(parts) == fake_reply("ping")
    native = await collect(client(fake), "ping")
    assert "".join(d.text for d in native) == "".join(parts)


@pytest.mark.parametrize("fmt", ["sse", "json"])
async def test_unauthorized_is_not_retried(fake: FakeDashscope, fmt: str) -> None:
    fake.llm_default = LlmScript(status=401, error_format=fmt)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await collect(client(fake))
    assert ei.value.code == "unauthorized"
    assert "InvalidApiKey" in ei.value.message
    assert len(fake.llm_log) == 1
    assert time.monotonic() - t0 < 1.0


async def test_wrong_key_is_unauthorized(fake: FakeDashscope) -> None:
    with pytest.raises(CloudError) as ei:
        await collect(client(fake, api_key="sk-wrong"))
    assert ei.value.code == "unauthorized"


async def test_rate_limit_is_retried_with_backoff_then_succeeds(fake: FakeDashscope) -> None:
    fake.llm_plan.extend([LlmScript(status=429), LlmScript(status=503)])
    llm = client(fake, backoff_initial_s=0.1)
    deltas = await collect(llm)
    assert "".join(d.text for d in deltas) == fake_reply("hello")
    assert llm.requests == 3 == len(fake.llm_log)
    gaps = [b.t_received - a.t_received for a, b in zip(fake.llm_log, fake.llm_log[1:],
                                                         strict=False)]
    assert gaps[0] >= 0.05 - 0.01  # first delay drawn from [0.05, 0.1]
    assert gaps[1] >= 0.1 - 0.01  # then doubled: [0.1, 0.2]


async def test_retry_after_header_is_honoured(fake: FakeDashscope) -> None:
    fake.llm_plan.append(LlmScript(status=429, retry_after="0.4"))
    await collect(client(fake))
    assert fake.llm_log[1].t_received - fake.llm_log[0].t_received >= 0.39


async def test_server_error_gives_up_within_the_deadline(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(status=500)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await collect(client(fake, retries=5, first_text_timeout_s=1.0))
    assert ei.value.code == "server_error"
    assert time.monotonic() - t0 <= 1.0 + 0.5
    assert len(fake.llm_log) >= 2  # retried while time was left


@pytest.mark.parametrize("after", [0, 2])
async def test_malformed_sse_is_bad_response(fake: FakeDashscope, after: int) -> None:
    fake.llm_default = LlmScript(malformed_after=after)
    got: list[LlmDelta] = []
    with pytest.raises(CloudError) as ei:
        await collect(client(fake), out=got)
    assert ei.value.code == "bad_response"
    assert len(got) == after
    assert len(fake.llm_log) == 1  # not retried: a broken server stays broken


async def test_error_inside_the_stream_after_text_is_not_retried(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(stream_error_status=500)
    got: list[LlmDelta] = []
    llm = client(fake)
    with pytest.raises(CloudError) as ei:
        await collect(llm, out=got)
    assert ei.value.code == "server_error"
    assert [d.text for d in got] == [fake.llm_log[0].tokens[0]]
    assert llm.requests == 1  # text was already handed out: a retry would say it twice


async def test_connection_cut_mid_stream(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(drop_after=3)
    got: list[LlmDelta] = []
    with pytest.raises(CloudError) as ei:
        await collect(client(fake), out=got)
    assert ei.value.code in ("dropped", "truncated", "unreachable")
    assert len(got) == 3


async def test_slow_first_token_times_out_and_hangs_up(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(first_token_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await collect(client(fake, first_text_timeout_s=0.5))
    elapsed = time.monotonic() - t0
    assert ei.value.code == "timeout"
    assert 0.45 <= elapsed <= 0.5 + 0.5
    await asyncio.sleep(0.05)
    assert fake.llm_log[0].t_disconnected is not None


async def test_stall_between_chunks_times_out(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(token_interval_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await collect(client(fake, idle_timeout_s=0.3))
    assert ei.value.code == "timeout"
    assert time.monotonic() - t0 <= 0.3 + 0.5


async def test_no_api_key_sends_nothing(fake: FakeDashscope, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(CloudError) as ei:
        await collect(client(fake, api_key=None))
    assert ei.value.code == "no_api_key"
    assert fake.llm_log == []


async def test_env_key_is_used_when_config_has_none(fake: FakeDashscope,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", fake.api_key)
    deltas = await collect(client(fake, api_key=None))
    assert deltas[-1].finish_reason == "stop"


async def test_network_down_is_unreachable_quickly() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = DashscopeLlm(api_key="k", base_url=f"http://127.0.0.1:{port}/api/v1",
                       backoff_initial_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(CloudError) as ei:
        await collect(llm)
    assert ei.value.code == "unreachable"
    assert llm.requests == 3  # retried twice: a refused connect may be a blip
    assert time.monotonic() - t0 < 2.0


async def test_cancel_closes_the_connection_at_once(fake: FakeDashscope) -> None:
    fake.llm_default = LlmScript(token_interval_s=0.05, text="word " * 200)
    llm = client(fake)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream("talk"):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    t_cancel = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t_cancel < 0.1
    await until(lambda: fake.llm_log[0].t_disconnected is not None, 1.0)
    gone = fake.llm_log[0].t_disconnected
    assert gone is not None and gone - t_cancel < 0.1, "server still streaming after cancel"
    assert fake.llm_log[0].t_done is None
    await llm.aclose()


async def test_api_key_never_logged_nor_in_errors(fake: FakeDashscope,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.llm_plan.extend([LlmScript(status=429), LlmScript(status=401)])
    llm = client(fake)
    with pytest.raises(CloudError) as ei:
        await collect(llm)
    await collect(client(fake))
    assert fake.api_key not in caplog.text
    assert fake.api_key not in str(ei.value) and fake.api_key not in repr(llm)
    assert "retry 1" in caplog.text  # the retry was logged (without the key)


def test_history_is_bounded_per_conversation() -> None:
    store = ConversationStore(max_turns=2, idle_reset_s=60, max_conversations=2)
    conv = store.get("kitchen")
    for i in range(3):
        conv.add(f"q{i}", f"a{i}")
    assert [m["content"] for m in store.get("kitchen").messages()] == ["q1", "a1", "q2", "a2"]
    store.get("hall").add("x", "y")
    store.get("office")  # a third conversation evicts the least recently used (kitchen)
    assert len(store) == 2
    assert store.get("kitchen").messages() == []


def test_idle_conversation_starts_over() -> None:
    store = ConversationStore(max_turns=4, idle_reset_s=0.0)
    store.get("k").add("q", "a")
    time.sleep(0.01)
    assert store.get("k").messages() == []
