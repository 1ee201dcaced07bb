"""Bounded conversation history: the last turns of each conversation, forgotten when idle."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field


@dataclass
class Conversation:
    """The last `max_turns` (user, assistant) exchanges of one conversation."""

    max_turns: int
    turns: collections.deque[tuple[str, str]] = field(default_factory=collections.deque)
    last_used: float = field(default_factory=time.monotonic)

    def messages(self) -> list[dict[str, str]]:
        """The history as DashScope/OpenAI chat messages, oldest first."""
        out: list[dict[str, str]] = []
        for user, assistant in self.turns:
            out.append({"role": "user", "content": user})
            out.append({"role": "assistant", "content": assistant})
        return out

    def add(self, user: str, assistant: str) -> None:
        """Remember one exchange, dropping the oldest past `max_turns`."""
        if self.max_turns <= 0:
            return
        self.turns.append((user, assistant))
        while len(self.turns) > self.max_turns:
            self.turns.popleft()
        self.last_used = time.monotonic()


class ConversationStore:
    """Conversations by key (a device, a speaker, a kiosk session), bounded in number and age.

    The key is the caller's choice: a push-to-talk session changes with every hold, so keying
    on it would forget everything between two questions.
    """

    def __init__(self, max_turns: int = 6, idle_reset_s: float = 300.0,
                 max_conversations: int = 64) -> None:
        self.max_turns = max_turns
        self.idle_reset_s = idle_reset_s
        self.max_conversations = max_conversations
        self._items: collections.OrderedDict[str, Conversation] = collections.OrderedDict()

    def get(self, key: str) -> Conversation:
        """The conversation for `key`: a fresh one when it is new or was idle too long."""
        now = time.monotonic()
        conv = self._items.pop(key, None)
        if conv is None or now - conv.last_used > self.idle_reset_s:
            conv = Conversation(self.max_turns)
        conv.last_used = now
        self._items[key] = conv
        while len(self._items) > self.max_conversations:
            self._items.popitem(last=False)  # least recently used
        return conv

    def reset(self, key: str | None = None) -> None:
        """Forget one conversation, or all of them."""
        if key is None:
            self._items.clear()
        else:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)
