"""Spoken replies: DashScope qwen (LLM) -> sentence chunks -> TTS (CosyVoice, or Piper locally).

`session.ReplySession` runs a reply with injected parts; `llm`, `cosyvoice` and `piper` are
the clients; `chunker` cuts streamed text into sentences. Nothing here imports torch.
"""
