"""Audio: sources (mic, file, stdin) yielding 16 kHz mono int16 chunks, upload decoding."""
