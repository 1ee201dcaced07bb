"""Offline model conversion tools (conversion-time only; the daemon never imports these)."""
