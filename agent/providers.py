"""Execution providers: `runtime.provider` (cpu | cuda | tensorrt) for onnxruntime and sherpa-onnx.

`select()` turns the configured provider into what a model loader passes on: the providers
list for `onnxruntime.InferenceSession(..., providers=...)` and the `provider=` string of
sherpa-onnx. A provider that cannot work here gives one warning and the next one down
(tensorrt -> cuda -> cpu), or `ModelError("provider_unavailable")` with `strict`.

"Can work" is tested, not assumed: onnxruntime-gpu lists `CUDAExecutionProvider` even on a
machine without a GPU or without the CUDA libraries, so we build a one-node session on it and
see which providers the session really got. sherpa-onnx bundles its own onnxruntime; it can
run on CUDA only when it was built with it (its wheel then carries the CUDA provider library)
and a GPU works.

Loaders report what each session ended up on (`record_session`, `record`), and `in_use()` /
`summary()` give that to health and metrics.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.errors import ModelError

log = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda", "tensorrt"]
Engine = Literal["onnxruntime", "sherpa"]
PROVIDERS: tuple[Provider, ...] = ("cpu", "cuda", "tensorrt")
ORT_NAMES: dict[Provider, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
SHERPA_NAMES: dict[Provider, str] = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "trt"}
SHERPA_ALIASES: dict[str, Provider] = {"trt": "tensorrt"}
# What to try when a provider is unavailable: TensorRT runs on top of CUDA.
FALLBACK: dict[Provider, Provider | None] = {"tensorrt": "cuda", "cuda": "cpu", "cpu": None}
_GPU_LIBS: dict[Provider, str] = {"cuda": "libonnxruntime_providers_cuda.so",
                                  "tensorrt": "libonnxruntime_providers_tensorrt.so"}


@dataclass(frozen=True)
class Selection:
    """The provider a loader should use, and why it is not the one asked for."""

    requested: Provider
    provider: Provider
    engine: Engine
    reason: str | None = None  # set when `provider != requested`
    device_id: int = 0
    trt_cache_dir: Path | None = None

    @property
    def fallback(self) -> bool:
        """Whether we run on something other than what was asked for."""
        return self.provider != self.requested

    @property
    def sherpa(self) -> str:
        """The sherpa-onnx `provider=` string."""
        return SHERPA_NAMES[self.provider]

    def ort_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """The `providers=` list for onnxruntime, best first, CPU always last (onnxruntime
        runs the nodes a GPU provider cannot take on the next one)."""
        dev = {"device_id": str(self.device_id)}
        out: list[str | tuple[str, dict[str, str]]] = []
        if self.provider == "tensorrt":
            trt = dict(dev, trt_fp16_enable="True")
            if self.trt_cache_dir is not None:
                # Building TensorRT engines takes minutes; cache them across restarts.
                trt.update(trt_engine_cache_enable="True",
                           trt_engine_cache_path=str(self.trt_cache_dir))
            out.append((ORT_NAMES["tensorrt"], trt))
        if self.provider in ("tensorrt", "cuda"):
            out.append((ORT_NAMES["cuda"], dev))
        out.append(ORT_NAMES["cpu"])
        return out


# --- what works here ---------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: bytes | str | int) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes and strings."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


@functools.cache
def probe_model() -> bytes:
    """A serialized one-node ONNX model (Identity on a float[1] tensor), built by hand so
    the probe needs neither the `onnx` package nor a model file."""
    shape = _field(2, _field(1, _field(1, 1)))  # TensorShapeProto{dim{dim_value: 1}}
    tensor = _field(1, _field(1, 1) + shape)  # TypeProto{tensor_type{elem_type: FLOAT}}
    graph = (_field(1, _field(1, "x") + _field(2, "y") + _field(4, "Identity"))
             + _field(2, "probe")
             + _field(11, _field(1, "x") + _field(2, tensor))
             + _field(12, _field(1, "y") + _field(2, tensor)))
    opset = _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)  # ir_version 8, opset 13


def onnxruntime_listed() -> set[Provider]:
    """Providers this onnxruntime build has (not necessarily usable)."""
    import onnxruntime as ort

    names = set(ort.get_available_providers())
    return {p for p in PROVIDERS if ORT_NAMES[p] in names}


@functools.cache
def probe_onnxruntime(provider: Provider, device_id: int = 0) -> str | None:
    """None when an onnxruntime session really runs on `provider`, else why not."""
    if provider == "cpu":
        return None
    if provider not in onnxruntime_listed():
        return f"onnxruntime has no {ORT_NAMES[provider]} (the CPU-only build is installed)"
    import onnxruntime as ort

    sel = Selection(provider, provider, "onnxruntime", device_id=device_id)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the probe's failure is our warning, not onnxruntime's
    try:
        sess = ort.InferenceSession(probe_model(), sess_options=opts,
                                    providers=sel.ort_providers())
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeError types
        return f"{ORT_NAMES[provider]} failed to start: {e}"
    if ORT_NAMES[provider] not in sess.get_providers():
        return f"{ORT_NAMES[provider]} is installed but cannot run here (no GPU or CUDA libraries)"
    return None


def _sherpa_lib_dirs() -> list[Path]:
    """Where sherpa-onnx keeps the onnxruntime it loads."""
    spec = importlib.util.find_spec("sherpa_onnx")
    if spec is None or spec.origin is None:
        return []
    pkg = Path(spec.origin).parent
    return [pkg / "lib", pkg]


@functools.cache
def sherpa_built_with(provider: Provider) -> bool:
    """Whether the installed sherpa-onnx was built with `provider` (CPU always)."""
    if provider == "cpu":
        return True
    lib = _GPU_LIBS[provider]
    if any((d / lib).exists() for d in _sherpa_lib_dirs()):
        return True
    try:  # k2-fsa's CUDA wheels are versioned like 1.12.0+cuda
        version = importlib.metadata.version("sherpa-onnx")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "cuda" in version


def gpu_device_present() -> bool:
    """Whether an NVIDIA GPU device node exists (a PC's /dev/nvidia0, a Jetson's nvhost/nvgpu)."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-gpu",
                                          "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0"))


def probe_sherpa(provider: Provider, device_id: int = 0) -> str | None:
    """None when sherpa-onnx can run on `provider`, else why not."""
    if provider == "cpu":
        return None
    if not sherpa_built_with(provider):
        return f"sherpa-onnx was built without {provider} (the PyPI wheel is CPU-only)"
    # sherpa-onnx cannot tell us whether its GPU provider started (it only logs), and a CUDA
    # build fails to load a model without a usable GPU: ask onnxruntime, else the devices.
    why = probe_onnxruntime("cuda", device_id)
    if why is not None and not gpu_device_present():
        return f"sherpa-onnx has {provider}, but no GPU was found ({why})"
    return None


# --- selection ---------------------------------------------------------------------------

_warned: set[tuple[str, str, str]] = set()
_lock = threading.Lock()
_in_use: dict[str, Provider] = {}
_last: list[Provider] = []


def select(requested: str = "cpu", strict: bool = False, *, engine: Engine = "onnxruntime",
           device_id: int = 0, trt_cache_dir: Path | None = None) -> Selection:
    """The provider to use for `engine`; warns once and falls back, or raises when `strict`."""
    if requested not in PROVIDERS:
        raise ModelError("bad_provider",
                         f"runtime.provider must be one of {', '.join(PROVIDERS)}, "
                         f"got {requested!r}", status=400)
    want: Provider = requested
    probe = probe_onnxruntime if engine == "onnxruntime" else probe_sherpa
    reasons: list[str] = []
    candidate: Provider | None = want
    while candidate is not None:
        why = probe(candidate, device_id)
        if why is None:
            break
        reasons.append(why)
        if strict:
            raise ModelError("provider_unavailable",
                             f"runtime.provider {want} is unavailable for {engine}: {why} "
                             f"(runtime.strict is set; unset it to fall back to CPU)")
        candidate = FALLBACK[candidate]
    got: Provider = candidate or "cpu"
    reason = "; ".join(reasons) or None
    sel = Selection(want, got, engine, reason, device_id, trt_cache_dir)
    if sel.fallback:
        key = (want, got, engine)
        with _lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            log.warning("runtime.provider %s is unavailable for %s: %s; running on %s",
                        want, engine, reason, got)
    with _lock:
        _last[:] = [got]
    return sel


def provider_of_session(session: Any) -> Provider:
    """The provider an onnxruntime session runs on (its first, i.e. preferred, provider)."""
    names = list(session.get_providers())
    for p in ("tensorrt", "cuda"):
        if names and names[0] == ORT_NAMES[p]:
            return p
    return "cpu"


def record(component: str, provider: Provider | str) -> None:
    """Note that `component` (asr, vad, speaker, emotion) runs on `provider`."""
    name: Provider = next((p for p in PROVIDERS if p == provider),
                          SHERPA_ALIASES.get(provider, "cpu"))
    with _lock:
        _in_use[component] = name


def record_session(component: str, session: Any) -> Provider:
    """`record` what an onnxruntime session got; returns it."""
    p = provider_of_session(session)
    record(component, p)
    return p


def forget(components: Iterable[str] | None = None) -> None:
    """Drop records (a model unloaded, or all of them with None)."""
    with _lock:
        if components is None:
            _in_use.clear()
        else:
            for c in components:
                _in_use.pop(c, None)


def in_use() -> dict[str, Provider]:
    """Component -> provider it really runs on."""
    with _lock:
        return dict(sorted(_in_use.items()))


def summary() -> str:
    """One word for health: the provider every model runs on, `mixed`, or (nothing loaded
    yet) the last one selected, `cpu` by default."""
    used = set(in_use().values())
    if len(used) == 1:
        return used.pop()
    if used:
        return "mixed"
    with _lock:
        return _last[0] if _last else "cpu"


def prometheus_lines() -> list[str]:
    """`voice_agent_execution_provider{component,provider} 1` for /metrics."""
    lines = ["# HELP voice_agent_execution_provider Execution provider each model runs on.",
             "# TYPE voice_agent_execution_provider gauge"]
    lines += [f'voice_agent_execution_provider{{component="{c}",provider="{p}"}} 1'
              for c, p in in_use().items()]
    return lines
