"""The audio chain: gate, VAD, segmenter, and the hub that fans utterances out to analysers."""
