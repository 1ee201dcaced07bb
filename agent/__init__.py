"""voice-agent: an always-on edge voice daemon."""

__version__ = "0.1.0"
