"""Replies through the daemon on a real speaker: a private PulseAudio null sink, recorded.

The daemon plays to PortAudio's ALSA device `pulse` (the private server's null sink `vsink`);
`parec` records the sink's monitor. The default source `vmic` is that same monitor: with the
daemon's microphone on `pulse`, everything the daemon says comes straight back into its own
microphone, a worst-case acoustic loopback. Half duplex must keep that out of the VAD; full
duplex (meant for an echo-cancelled source) hears it, which shows the loopback is real.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import numpy as np
import pytest

from agent.config import ReplyConfig
from tests.conftest import ASR_EN, need_shared
from tests.dashscope_fake import FakeDashscope, LlmScript, TtsScript, until
from tests.pulse import PulseServer
from tests.test_mic_pulse import align
from tests.test_playback_pulse import RATE, Recorder, loud_span
from tests.test_reply_app import need_piper, reply_daemon

MAX_BARGE_IN_S = 0.100
SPEAKER = {"playback__enabled": "true", "playback__device": "pulse",
           "playback__block_ms": "10", "playback__latency_s": "0.03"}
SENTENCE = "The kitchen lights are on, and the oven is warming up."


async def test_a_reply_plays_unchanged_on_the_speaker(pulse: PulseServer) -> None:
    need_piper()
    async with reply_daemon(None, settings=SPEAKER) as run, Recorder(pulse) as rec:
        res = await run.post("/api/say", {"text": SENTENCE, "local": True})
        await asyncio.sleep(0.3)
    ref = np.frombuffer(bytes(run.tap.pcm), "<i2")
    assert res["outcome"] == "done" and len(ref) > RATE
    lag, corr = align(rec.samples, ref)
    seg = rec.samples[round(lag):round(lag) + len(ref)].astype(np.float64)
    gain = float(np.sqrt(np.mean(seg ** 2) / np.mean(ref.astype(np.float64) ** 2)))
    print(f"reply {res['audio_s']} s: correlation {corr:.5f}, gain {gain:.3f}")
    assert corr >= 0.99, f"correlation {corr:.5f}"
    assert 0.9 < gain < 1.1


async def test_push_to_talk_silences_a_reply_within_100ms(pulse: PulseServer) -> None:
    async with FakeDashscope() as fake, reply_daemon(fake, settings=SPEAKER) as run:
        # No pauses in the text: the fake's tones run on, so silence can only be the flush.
        fake.llm_default = LlmScript(text="Mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm. " * 20,
                                     token_interval_s=0.01)
        fake.tts_default = TtsScript(frame_bytes=1600)
        async with Recorder(pulse) as rec:
            chat = asyncio.create_task(run.post("/api/chat", {"text": "talk to me"}))
            assert await until(lambda: run.of("tts.started"), 10)
            await asyncio.sleep(1.2)
            t_cmd = time.monotonic()
            await run.post("/api/ptt/start")
            res = await chat
            await asyncio.sleep(0.5)
        first, last = loud_span(rec.samples)
        tail_s = rec.time_of(last) - t_cmd
        print(f"barge-in over HTTP: last sound {tail_s * 1000:.1f} ms after the PTT command")
        assert res["outcome"] == "cancelled" and res["cancel_reason"] == "barge_in"
        ev = await run.wait("reply.cancelled", reply_id=res["reply_id"])
        assert ev.reason == "barge_in"
        assert (last - first) / RATE > 0.8  # it really was speaking
        assert tail_s <= MAX_BARGE_IN_S, f"still sounding {tail_s * 1000:.0f} ms after PTT"
        # The LLM stream was closed as well, long before it would have finished.
        assert fake.llm_log[-1].t_done is None


@pytest.mark.parametrize("duplex", ["half", "full"])
async def test_the_daemon_does_not_hear_itself_in_half_duplex(pulse: PulseServer,
                                                              duplex: str) -> None:
    need_piper()
    need_shared()
    env = {**SPEAKER, "gate__mode": "vad", "audio__source": "mic", "audio__device": "pulse",
           "reply__duplex": duplex}
    async with reply_daemon(None, config_source=True, settings=env) as run:
        assert await until(lambda: run.d.source.state == "ok", 15), run.d.source.reason
        await asyncio.sleep(1.0)  # the VAD settles on the sink's silence
        before = len(run.of("utterance.started"))
        t0 = time.monotonic()
        res = await run.post("/api/say", {"text": SENTENCE, "local": True})
        # an echo would have become an utterance by now
        await asyncio.sleep(ReplyConfig().echo_tail_ms / 1000 + 1.0)
        heard = [e for e in run.of("speech.started") if e.mono >= t0]
        echo = len(run.of("utterance.started")) - before
        print(f"{duplex} duplex: reply {res['audio_s']} s ({res['outcome']}), "
              f"{echo} utterance(s) from the loopback, muted "
              f"{run.d.gate.muted_samples / 16000:.2f} s")
        if duplex == "full":
            # No echo canceller on this loopback: the daemon hears itself and barges in on
            # its own voice. That is why full duplex needs module-echo-cancel.
            assert echo >= 1 and heard
            assert res["outcome"] == "cancelled" and res["cancel_reason"] == "barge_in"
            return
        assert res["outcome"] == "done" and res["audio_s"] > 1.0
        assert echo == 0 and heard == [], "the daemon's own voice became speech"
        assert run.d.gate.muted_samples / 16000 >= res["audio_s"]
        assert not run.d.gate.muted
        # Listening again: a person speaking after the reply is heard.
        play = await asyncio.create_subprocess_exec(
            *pulse.paplay_cmd(ASR_EN / "cards-005.wav"), env=pulse.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(play.communicate(), 30)
        assert play.returncode == 0, err
        assert await until(lambda: len(run.of("utterance.ended")) > before, 10)
