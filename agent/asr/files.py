"""Find a model's files by role and check them before sherpa-onnx sees them.

sherpa-onnx calls exit() on an ONNX file without the metadata it expects, which would take
the whole daemon down; onnxruntime reads the same metadata and merely raises.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.errors import ModelError

log = logging.getLogger(__name__)

# Which files each sherpa model type needs.
ROLES: dict[str, tuple[str, ...]] = {
    "whisper": ("encoder", "decoder", "tokens"),
    "sense_voice": ("model", "tokens"),
    "paraformer": ("model", "tokens"),
    "transducer": ("encoder", "decoder", "joiner", "tokens"),
    "paraformer_online": ("encoder", "decoder", "tokens"),
    "zipformer2_ctc": ("model", "tokens"),
}

# Metadata keys sherpa-onnx reads (and exits without) per model type and role.
REQUIRED_METADATA: dict[tuple[str, str], tuple[str, ...]] = {
    ("whisper", "encoder"): (
        "n_mels", "n_text_layer", "n_text_ctx", "n_text_state", "n_vocab", "sot_sequence",
        "sot", "eot", "blank_id", "no_timestamps", "no_speech", "is_multilingual",
        "all_language_tokens", "all_language_codes", "transcribe", "translate",
    ),
    ("sense_voice", "model"): ("vocab_size", "lfr_window_size", "lfr_window_shift"),
    ("transducer", "encoder"): (),
    ("zipformer2_ctc", "model"): (),
}


def _pick(model_dir: Path, role: str, quantized: bool) -> Path:
    if role == "tokens":
        found = sorted(model_dir.glob("*tokens.txt"))
    else:
        found = sorted(p for p in model_dir.glob(f"*{role}*.onnx"))
        if role == "model":
            found = [p for p in found
                     if not any(r in p.name for r in ("encoder", "decoder", "joiner"))]
        int8 = [p for p in found if ".int8." in p.name]
        fp = [p for p in found if ".int8." not in p.name]
        found = (int8 or fp) if quantized else (fp or int8)
    if not found:
        raise ModelError("missing_file", f"{model_dir}: no {role} file found")
    if len(found) > 1:
        log.debug("several %s files in %s, using %s", role, model_dir, found[0].name)
    return found[0]


def resolve_files(model_dir: Path, model_type: str, quantized: bool = True) -> dict[str, Path]:
    """Role -> file for a model directory (int8 preferred when `quantized`)."""
    if model_type not in ROLES:
        raise ModelError("bad_type", f"unknown model type {model_type!r}")
    if not model_dir.is_dir():
        raise ModelError("not_installed", f"model directory {model_dir} does not exist")
    return {role: _pick(model_dir, role, quantized) for role in ROLES[model_type]}


def check_files(files: dict[str, Path], model_type: str) -> None:
    """Readable files; ONNX files load in onnxruntime and carry sherpa's metadata keys."""
    import onnxruntime as ort

    for role, path in files.items():
        if not path.is_file() or path.stat().st_size == 0:
            raise ModelError("missing_file", f"{role} file {path} is missing or empty")
        if path.suffix != ".onnx":
            continue
        required = REQUIRED_METADATA.get((model_type, role), ())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError("invalid_onnx", f"{role} file {path} is not a valid ONNX model: "
                             f"{str(e).splitlines()[0][:300]}") from e
        meta = sess.get_modelmeta().custom_metadata_map
        missing = [k for k in required if k not in meta]
        if missing:
            raise ModelError("bad_metadata", f"{role} file {path} lacks metadata sherpa-onnx "
                             f"needs: {', '.join(missing)}")
