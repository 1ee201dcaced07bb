"""voice-agent: an always-on edge voice daemon."""

import os as _os

# Before numpy loads: OpenBLAS's thread pool takes ~8 ms to wake after a pause, which a
# per-utterance matrix product pays every time; model runtimes have their own threads.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
