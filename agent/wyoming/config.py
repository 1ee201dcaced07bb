"""The `wyoming` config section (kept in agent/config.py with every other section)."""

from __future__ import annotations

from typing import Any

from agent.config import WyomingConfig

__all__ = ["WyomingConfig", "wyoming_config"]


def wyoming_config(cfg: Any) -> WyomingConfig:
    """The daemon config's `wyoming` section."""
    section: WyomingConfig = cfg.wyoming
    return section
