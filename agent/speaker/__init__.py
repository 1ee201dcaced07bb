"""Speaker recognition below the application layer: embedders, scoring, voiceprint store,
diarization. Everything here is synchronous and meant to run in worker threads."""
