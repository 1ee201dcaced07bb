"""Local HTTP + WebSocket API and the kiosk page (aiohttp), started by `voice-agent run`."""
