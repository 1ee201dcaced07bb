"""Speech recognition engines (sherpa-onnx) and the ASR utterance analyser."""
