"""Voiceprint-gated actions: may the speaker of a live utterance trigger a command or a reply?

With `speaker.gate_actions` on, only enrolled speakers (or, when `speaker.allowed` lists names
or ids, only those) may. The reply trigger (and any other action a live utterance starts)
asks `speaker_allowed(app, utt)` before acting: it waits for the utterance's speaker result
(`utt.result_event("speaker")`, set by the speaker analyser for every utterance), and a
refusal is published as an `access.denied` event. It fails closed: no speaker analyser, no
result in time, or an utterance too short to tell, is a refusal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.analysis import Utterance
from agent.config import SpeakerConfig
from agent.events import AccessDenied, SpeakerIdentified

if TYPE_CHECKING:
    from agent.app.core import App

log = logging.getLogger(__name__)

#: How long an action waits for its utterance's speaker before it is refused.
WAIT_S = 10.0


def decide(cfg: SpeakerConfig, event: SpeakerIdentified | None) -> tuple[bool, str]:
    """(allowed, why) for an utterance's speaker result under `cfg` (pure)."""
    if not cfg.gate_actions:
        return True, "speaker.gate_actions is off"
    if event is None:
        return False, "the speaker of this utterance could not be identified"
    if not event.is_match:
        if not event.candidates:
            return False, ("unknown speaker: too little speech to tell, or nobody is enrolled "
                           f"for {event.model}")
        return False, (f"unknown speaker: the closest voiceprint ({event.candidates[0]['name']}"
                       f", {event.score:.2f}) is under the threshold")
    if cfg.allowed:
        allowed = {a.casefold() for a in cfg.allowed}
        if event.name.casefold() not in allowed and (event.speaker_id or "") not in allowed:
            return False, f"{event.name} is not in speaker.allowed"
    return True, f"{event.name} is enrolled" + (" and allowed" if cfg.allowed else "")


async def speaker_allowed(app: App, utt: Utterance, action: str = "reply", *,
                          timeout_s: float = WAIT_S) -> bool | AccessDenied:
    """True when the utterance's speaker may trigger `action`; else the published refusal."""
    cfg = app.cfg.speaker
    if not cfg.gate_actions:
        return True
    event: SpeakerIdentified | None = None
    if "speaker" not in app.analysers:
        ok, why = False, "speaker recognition is not running (speaker.gate_actions needs it)"
    else:
        try:
            await asyncio.wait_for(utt.result_event("speaker").wait(), timeout_s)
        except TimeoutError:
            ok, why = False, f"the speaker was not identified within {timeout_s:g} s"
        else:
            result = utt.results.get("speaker")
            event = result if isinstance(result, SpeakerIdentified) else None
            ok, why = decide(cfg, event)
    if ok:
        return True
    log.info("%s refused for utterance %s: %s", action, utt.id, why)
    return app.pub.emit(AccessDenied, session_id=utt.session_id, utterance_id=utt.id,
                        action=action, speaker_id=event.speaker_id if event else None,
                        name=event.name if event else "unknown", reason=why)
