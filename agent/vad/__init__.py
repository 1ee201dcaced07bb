"""Voice activity detection backends and the utterance segmenter."""
