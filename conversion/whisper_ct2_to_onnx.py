#!/usr/bin/env python3
"""Convert a CTranslate2 (faster-whisper) Whisper model.bin into sherpa-onnx Whisper ONNX files.

Output layout (what ``sherpa_onnx.OfflineRecognizer.from_whisper`` loads)::

    <prefix>-encoder.onnx        mel (N, n_mels, T) -> n_layer_cross_k, n_layer_cross_v
    <prefix>-decoder.onnx        tokens, in_n_layer_self_{k,v}_cache, n_layer_cross_{k,v}, offset
                                 -> logits, out_n_layer_self_{k,v}_cache
    <prefix>-encoder.int8.onnx   dynamic int8 (MatMul)
    <prefix>-decoder.int8.onnx   dynamic int8 (MatMul + token-embedding Gather)
    <prefix>-tokens.txt          "<base64 of token bytes> <id>" per line

The CT2 file is parsed with numpy only; the network is rebuilt in PyTorch (imported lazily, so
importing this module does not need torch) and exported with the TorchScript-based ONNX exporter.

Example::

    python conversion/whisper_ct2_to_onnx.py --model-bin model.bin --config config.json \
        --vocab vocabulary.txt --out-dir models_onnx/whisper-tiny.en --prefix tiny.en \
        --check-dir ../shared/data/asr-en
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shutil
import string
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.asr.wer import edit_distance, normalize

OPSET = 17
SAMPLE_RATE = 16000
# sherpa-onnx appends this many zero frames after the (normalized) features; see
# offline-recognizer-whisper-impl.h. We mimic it in the parity check.
SHERPA_TAIL_PADDING_FRAMES = 1000
SHERPA_MAX_FRAMES = 3000

StepFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]
]


# --------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# --------------------------------------------------------------------------------------------

# Order of the DataType enum in CTranslate2 include/ctranslate2/types.h (binary version >= 4).
_CT2_DTYPES: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
# Binary versions < 4 stored an item size instead of a type id.
_CT2_ITEM_SIZE_DTYPES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}


@dataclass
class Ct2Model:
    """Variables of a CTranslate2 model.bin, dequantized to float32 where they were quantized."""

    spec: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)


class _Reader:
    """Little-endian cursor over a bytes buffer."""

    def __init__(self, data: bytes) -> None:
        """Wrap ``data`` with the cursor at offset 0."""
        self.data = memoryview(data)
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        """Read one struct-packed integer."""
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return int(value)

    def take(self, n: int) -> memoryview:
        """Return the next ``n`` bytes without copying."""
        if self.pos + n > len(self.data):
            raise ValueError(f"model.bin truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> str:
        """Read a CT2 string: uint16 length (including NUL), bytes, NUL."""
        n = self.unpack("H")
        raw = bytes(self.take(n))
        return raw[:-1].decode("utf-8")


def _decode_array(raw: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Turn raw variable bytes into a numpy array (bfloat16 widened to float32)."""
    if dtype == "bfloat16":
        u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        return (u16 << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _dequantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Undo CT2 weight quantization (``q = round(w * scale)``, scale per output row)."""
    scale = scale.astype(np.float32)
    if scale.size != 1:
        scale = np.expand_dims(scale, 1)  # one scale per output row (axis 0)
    out: np.ndarray = values.astype(np.float32) / scale.astype(np.float32)
    return out


def read_ct2_model(paths: Sequence[Path]) -> Ct2Model:
    """Parse a CT2 model.bin (optionally split into parts that are concatenated in order)."""
    if not paths:
        raise ValueError("no model.bin given")
    data = b"".join(Path(p).read_bytes() for p in paths)
    r = _Reader(data)
    version = r.unpack("I")
    if not 1 <= version <= 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (expected 1..6)")
    spec, revision = "", 1
    if version >= 2:
        spec = r.string()
        revision = r.unpack("I")
    raw: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = tuple(r.unpack("I") for _ in range(rank))
        if version >= 4:
            type_id = r.unpack("B")
            if type_id not in _CT2_DTYPES:
                raise ValueError(f"{name}: unknown CT2 dtype id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            nbytes = r.unpack("I")
        else:
            item_size = r.unpack("B")
            dtype = _CT2_ITEM_SIZE_DTYPES[item_size]
            nbytes = r.unpack("I") * item_size
        raw[name] = _decode_array(r.take(nbytes), dtype, shape)
    if version >= 3:
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            if target in raw:
                raw[alias] = raw[target]
                if target + "_scale" in raw:
                    raw[alias + "_scale"] = raw[target + "_scale"]
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} trailing bytes after the CT2 model (wrong parts?)")

    model = Ct2Model(spec=spec, spec_revision=revision, binary_version=version)
    for name, arr in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue
        scale = raw.get(name + "_scale")
        if scale is not None and arr.dtype in (np.int8, np.int16):
            model.variables[name] = _dequantize(arr, scale)
        elif arr.dtype in (np.float16, np.float32) and arr.ndim > 0:
            model.variables[name] = arr.astype(np.float32)
        else:
            model.variables[name] = arr
    return model


# --------------------------------------------------------------------------------------------
# Model dimensions, vocabulary, metadata
# --------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


@dataclass(frozen=True)
class WhisperDims:
    """The ``ModelDimensions`` of openai-whisper, derived from CT2 weight shapes."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray]) -> WhisperDims:
        """Infer the dimensions from a WhisperSpec variable dict."""
        layers: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
        for name in w:
            m = _LAYER_RE.match(name)  # note: "layer_norm/..." does not match layer_\d+/
            if m:
                layers[m.group(1)].add(int(m.group(2)))
        for side, idx in layers.items():
            if idx != set(range(len(idx))) or not idx:
                raise ValueError(f"{side}: non-contiguous or missing layers {sorted(idx)}")
        conv1 = w["encoder/conv1/weight"]
        return cls(
            n_mels=int(conv1.shape[1]),
            n_audio_ctx=int(w["encoder/position_encodings/encodings"].shape[0]),
            n_audio_state=int(conv1.shape[0]),
            n_audio_head=int(w["encoder/num_heads"]),
            n_audio_layer=len(layers["encoder"]),
            n_vocab=int(w["decoder/embeddings/weight"].shape[0]),
            n_text_ctx=int(w["decoder/position_encodings/encodings"].shape[0]),
            n_text_state=int(w["decoder/embeddings/weight"].shape[1]),
            n_text_head=int(w["decoder/num_heads"]),
            n_text_layer=len(layers["decoder"]),
        )

    @property
    def is_multilingual(self) -> bool:
        """Same rule as openai-whisper: multilingual vocabularies have >= 51865 entries."""
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        """Same rule as openai-whisper (99 for v1/v2 models, 100 for large-v3)."""
        return self.n_vocab - 51765 - int(self.is_multilingual)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (printable char -> byte)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def load_vocabulary(path: Path) -> list[str]:
    """Read CT2 ``vocabulary.txt`` (one token a line), ``vocabulary.json`` or ``tokenizer.json``."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        # split on "\n" only: str.splitlines() would also split on \x85, \u2028, ...
        tokens = text.split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return tokens
    obj = json.loads(text)
    if isinstance(obj, list):
        return [str(t) for t in obj]
    vocab: dict[str, int] = dict(obj["model"]["vocab"])
    for added in obj.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
    tokens_by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in tokens_by_id] != list(range(len(tokens_by_id))):
        raise ValueError(f"{path}: token ids are not contiguous")
    return [t for t, _ in tokens_by_id]


@dataclass(frozen=True)
class WhisperTokens:
    """Whisper special token ids, looked up by name in the CT2 vocabulary."""

    vocab: list[str]
    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    blank: int
    language_tokens: list[int]
    language_codes: list[str]

    @classmethod
    def from_vocab(cls, vocab: list[str], dims: WhisperDims) -> WhisperTokens:
        """Locate the special tokens (works for English-only and multilingual vocabularies)."""
        index = {t: i for i, t in enumerate(vocab)}

        def tid(*names: str) -> int:
            """Id of the first of ``names`` present in the vocabulary."""
            for n in names:
                if n in index:
                    return index[n]
            raise ValueError(f"vocabulary lacks {names}")

        sot = tid("<|startoftranscript|>")
        translate = tid("<|translate|>")
        langs = [(i, vocab[i][2:-2]) for i in range(sot + 1, translate)]
        if any(not (vocab[i].startswith("<|") and vocab[i].endswith("|>")) for i, _ in langs):
            raise ValueError("unexpected tokens between <|startoftranscript|> and <|translate|>")
        langs = langs[: dims.num_languages]
        return cls(
            vocab=vocab,
            eot=tid("<|endoftext|>"),
            sot=sot,
            translate=translate,
            transcribe=tid("<|transcribe|>"),
            sot_lm=tid("<|startoflm|>"),
            sot_prev=tid("<|startofprev|>"),
            no_speech=tid("<|nospeech|>", "<|nocaptions|>"),
            no_timestamps=tid("<|notimestamps|>"),
            blank=tid("Ġ"),  # tokenizer.encode(" ")[0] == 220
            language_tokens=[i for i, _ in langs],
            language_codes=[c for _, c in langs],
        )

    def sot_sequence(self, multilingual: bool) -> list[int]:
        """openai-whisper default: [sot, <|en|>, <|transcribe|>] or [sot] for .en models."""
        if not multilingual:
            return [self.sot]
        return [self.sot, self.language_tokens[self.language_codes.index("en")], self.transcribe]

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a byte-level BPE token."""
        dec = _byte_decoder()
        return bytes(dec[c] for c in self.vocab[token_id])


def write_tokens_txt(tokens: WhisperTokens, path: Path) -> None:
    """Write sherpa's whisper tokens.txt: base64(token bytes) and id, ordinary tokens only."""
    dec = _byte_decoder()
    with path.open("w", encoding="ascii", newline="\n") as f:
        # Like the tiktoken files sherpa exports from: ids [0, eot) only; specials are omitted
        # and therefore dropped from recognized text.
        for i in range(tokens.eot):
            raw = bytes(dec[c] for c in tokens.vocab[i])
            f.write(f"{base64.b64encode(raw).decode('ascii')} {i}\n")


def encoder_metadata(
    dims: WhisperDims, tokens: WhisperTokens, prefix: str, config: dict[str, Any]
) -> dict[str, str]:
    """The metadata_props sherpa-onnx reads from the encoder (plus the rest its exporter writes)."""
    multilingual = dims.is_multilingual
    sot_seq = tokens.sot_sequence(multilingual)
    suppress = [int(i) for i in config.get("suppress_ids", [])]
    non_speech = sorted({i for i in suppress if 0 <= i < tokens.eot})
    meta: dict[str, Any] = {
        "model_type": f"whisper-{prefix}",
        "version": "1",
        "maintainer": "voice-agent (converted from CTranslate2)",
        "n_mels": dims.n_mels,
        "n_audio_ctx": dims.n_audio_ctx,
        "n_audio_state": dims.n_audio_state,
        "n_audio_head": dims.n_audio_head,
        "n_audio_layer": dims.n_audio_layer,
        "n_vocab": dims.n_vocab,
        "n_text_ctx": dims.n_text_ctx,
        "n_text_state": dims.n_text_state,
        "n_text_head": dims.n_text_head,
        "n_text_layer": dims.n_text_layer,
        "sot_sequence": ",".join(map(str, sot_seq)),
        "all_language_tokens": ",".join(map(str, tokens.language_tokens)),
        "all_language_codes": ",".join(tokens.language_codes),
        "sot": tokens.sot,
        "sot_index": sot_seq.index(tokens.sot),
        "eot": tokens.eot,
        "blank_id": tokens.blank,
        "is_multilingual": int(multilingual),
        "no_speech": tokens.no_speech,
        "non_speech_tokens": ",".join(map(str, non_speech)),
        "transcribe": tokens.transcribe,
        "translate": tokens.translate,
        "sot_prev": tokens.sot_prev,
        "sot_lm": tokens.sot_lm,
        "no_timestamps": tokens.no_timestamps,
    }
    return {k: str(v) for k, v in meta.items()}


# --------------------------------------------------------------------------------------------
# PyTorch network (torch imported lazily)
# --------------------------------------------------------------------------------------------


def build_torch_model(w: dict[str, np.ndarray], dims: WhisperDims) -> tuple[Any, Any]:
    """Build (encoder, decoder) torch modules with sherpa-onnx's input/output layout."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    def param(name: str) -> nn.Parameter:
        """A frozen float32 parameter from CT2 variable ``name``."""
        arr = np.ascontiguousarray(w[name], dtype=np.float32)
        return nn.Parameter(torch.from_numpy(arr.copy()), requires_grad=False)

    def linear(scope: str) -> nn.Linear:
        """nn.Linear from CT2 ``scope/weight`` (out, in) and ``scope/bias``."""
        weight = w[f"{scope}/weight"]
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{scope}/bias" in w)
        lin.weight = param(f"{scope}/weight")
        if lin.bias is not None:
            lin.bias = param(f"{scope}/bias")
        return lin

    def layer_norm(scope: str) -> nn.LayerNorm:
        """nn.LayerNorm from CT2 ``scope/gamma`` and ``scope/beta``."""
        ln = nn.LayerNorm(w[f"{scope}/gamma"].shape[0])
        ln.weight, ln.bias = param(f"{scope}/gamma"), param(f"{scope}/beta")
        return ln

    def conv(scope: str, stride: int) -> nn.Conv1d:
        """nn.Conv1d (kernel 3, padding 1) from CT2 ``scope/weight`` and ``scope/bias``."""
        weight = w[f"{scope}/weight"]
        c = nn.Conv1d(weight.shape[1], weight.shape[0], weight.shape[2], stride, padding=1)
        c.weight, c.bias = param(f"{scope}/weight"), param(f"{scope}/bias")
        return c

    def attend(
        q: Tensor, k: Tensor, v: Tensor, n_head: int, width: int, mask: Tensor | None
    ) -> Tensor:
        """Multi-head scaled dot-product attention; ``width`` is the model width (python int)."""
        scale = float(width // n_head) ** -0.5
        q = q.reshape(q.shape[0], q.shape[1], n_head, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], n_head, -1).transpose(1, 2)
        v = v.reshape(v.shape[0], v.shape[1], n_head, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        out: Tensor = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        return out

    def mlp(scope: str) -> nn.Sequential:
        """Pre-norm feed-forward block: LayerNorm, Linear, GELU (erf), Linear."""
        return nn.Sequential(
            layer_norm(f"{scope}/ffn/layer_norm"),
            linear(f"{scope}/ffn/linear_0"),
            nn.GELU(),
            linear(f"{scope}/ffn/linear_1"),
        )

    class EncoderBlock(nn.Module):
        """Pre-norm self-attention + MLP; CT2 stores q,k,v stacked in linear_0."""

        def __init__(self, scope: str) -> None:
            """Load the block's weights from CT2 ``scope``."""
            super().__init__()
            self.ln = layer_norm(f"{scope}/self_attention/layer_norm")
            self.qkv = linear(f"{scope}/self_attention/linear_0")
            self.out = linear(f"{scope}/self_attention/linear_1")
            self.mlp = mlp(scope)

        def forward(self, x: Tensor) -> Tensor:
            """Run the module."""
            q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
            x = x + self.out(attend(q, k, v, dims.n_audio_head, dims.n_audio_state, None))
            out: Tensor = x + self.mlp(x)
            return out

    class Encoder(nn.Module):
        """mel (N, n_mels, T) -> per-decoder-layer cross-attention K and V (L, N, T/2, D)."""

        pos: Tensor

        def __init__(self) -> None:
            """Load the weights from the CT2 variables."""
            super().__init__()
            self.conv1 = conv("encoder/conv1", 1)
            self.conv2 = conv("encoder/conv2", 2)
            self.register_buffer("pos", param("encoder/position_encodings/encodings").data)
            self.blocks = nn.ModuleList(
                EncoderBlock(f"encoder/layer_{i}") for i in range(dims.n_audio_layer)
            )
            self.ln_post = layer_norm("encoder/layer_norm")
            # cross-attention linear_1 = [k; v] stacked
            self.cross_kv = nn.ModuleList(
                linear(f"decoder/layer_{i}/attention/linear_1") for i in range(dims.n_text_layer)
            )

        def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
            """Run the module."""
            x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).permute(0, 2, 1)
            x = x + self.pos[: x.shape[1]]  # sherpa sends speech + ~1000 frames, not 3000
            for block in self.blocks:
                x = block(x)
            x = self.ln_post(x)
            ks, vs = zip(*(kv(x).chunk(2, dim=-1) for kv in self.cross_kv), strict=True)
            return torch.stack(ks), torch.stack(vs)

    class DecoderBlock(nn.Module):
        """Self-attention with an explicit KV cache, cross-attention, MLP."""

        def __init__(self, scope: str) -> None:
            """Load the block's weights from CT2 ``scope``."""
            super().__init__()
            self.self_ln = layer_norm(f"{scope}/self_attention/layer_norm")
            self.self_qkv = linear(f"{scope}/self_attention/linear_0")
            self.self_out = linear(f"{scope}/self_attention/linear_1")
            self.cross_ln = layer_norm(f"{scope}/attention/layer_norm")
            self.cross_q = linear(f"{scope}/attention/linear_0")
            self.cross_out = linear(f"{scope}/attention/linear_2")
            self.mlp = mlp(scope)

        def forward(
            self,
            x: Tensor,
            k_cache: Tensor,
            v_cache: Tensor,
            cross_k: Tensor,
            cross_v: Tensor,
            offset: Tensor,
            mask: Tensor,
        ) -> tuple[Tensor, Tensor, Tensor]:
            """Run the module."""
            n = x.shape[1]
            q, k, v = self.self_qkv(self.self_ln(x)).chunk(3, dim=-1)
            k_all = torch.cat([k_cache[:, :offset], k], dim=1)
            v_all = torch.cat([v_cache[:, :offset], v], dim=1)
            x = x + self.self_out(
                attend(q, k_all, v_all, dims.n_text_head, dims.n_text_state, mask)
            )
            q_x = self.cross_q(self.cross_ln(x))
            x = x + self.cross_out(
                attend(q_x, cross_k, cross_v, dims.n_text_head, dims.n_text_state, None)
            )
            x = x + self.mlp(x)
            k_new = torch.cat([k_all, k_cache[:, offset + n :]], dim=1)
            v_new = torch.cat([v_all, v_cache[:, offset + n :]], dim=1)
            return x, k_new, v_new

    class Decoder(nn.Module):
        """One decoding step over ``tokens`` starting at position ``offset`` (sherpa layout)."""

        pos: Tensor
        mask: Tensor

        def __init__(self) -> None:
            """Load the weights from the CT2 variables."""
            super().__init__()
            # One (D, V) matrix serves both the embedding Gather (axis 1) and the output
            # projection MatMul, so the ONNX file (and its int8 version) holds it once.
            emb = np.ascontiguousarray(w["decoder/embeddings/weight"].T, dtype=np.float32)
            self.emb_t = nn.Parameter(torch.from_numpy(emb), requires_grad=False)
            self.register_buffer("pos", param("decoder/position_encodings/encodings").data)
            causal = torch.full((dims.n_text_ctx, dims.n_text_ctx), float("-inf")).triu(1)
            self.register_buffer("mask", causal)
            self.blocks = nn.ModuleList(
                DecoderBlock(f"decoder/layer_{i}") for i in range(dims.n_text_layer)
            )
            self.ln = layer_norm("decoder/layer_norm")

        def forward(
            self,
            tokens: Tensor,
            self_k: Tensor,
            self_v: Tensor,
            cross_k: Tensor,
            cross_v: Tensor,
            offset: Tensor,
        ) -> tuple[Tensor, Tensor, Tensor]:
            """Run the module."""
            start = offset[0]
            n = tokens.shape[1]
            emb = torch.index_select(self.emb_t, 1, tokens.reshape(-1))  # (D, N*n)
            x = emb.t().reshape(tokens.shape[0], n, -1) + self.pos[start : start + n]
            mask = self.mask[start : start + n, : start + n]
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                x, k, v = block(x, self_k[i], self_v[i], cross_k[i], cross_v[i], start, mask)
                ks.append(k)
                vs.append(v)
            logits = self.ln(x) @ self.emb_t
            return logits, torch.stack(ks), torch.stack(vs)

    encoder, decoder = Encoder().eval(), Decoder().eval()
    return encoder, decoder


# --------------------------------------------------------------------------------------------
# Export + quantization
# --------------------------------------------------------------------------------------------


def _export_onnx(
    encoder: Any, decoder: Any, dims: WhisperDims, enc_path: Path, dec_path: Path
) -> None:
    """Export both modules with the TorchScript exporter (dynamic batch, frames and tokens)."""
    import torch

    n_frames = 1200  # any value: the frame axis is dynamic
    mel = torch.zeros(1, dims.n_mels, n_frames)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cross_k, cross_v = encoder(mel)
        torch.onnx.export(
            encoder,
            (mel,),
            str(enc_path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["mel"],
            output_names=["n_layer_cross_k", "n_layer_cross_v"],
            dynamic_axes={
                "mel": {0: "n_audio", 2: "n_frames"},
                "n_layer_cross_k": {1: "n_audio", 2: "n_audio_ctx"},
                "n_layer_cross_v": {1: "n_audio", 2: "n_audio_ctx"},
            },
        )
        cache = torch.zeros(dims.n_text_layer, 1, dims.n_text_ctx, dims.n_text_state)
        tokens = torch.tensor([[1, 2, 3]], dtype=torch.int64)
        offset = torch.tensor([2], dtype=torch.int64)
        torch.onnx.export(
            decoder,
            (tokens, cache, cache.clone(), cross_k, cross_v, offset),
            str(dec_path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[
                "tokens",
                "in_n_layer_self_k_cache",
                "in_n_layer_self_v_cache",
                "n_layer_cross_k",
                "n_layer_cross_v",
                "offset",
            ],
            output_names=["logits", "out_n_layer_self_k_cache", "out_n_layer_self_v_cache"],
            dynamic_axes={
                "tokens": {0: "n_audio", 1: "n_tokens"},
                "in_n_layer_self_k_cache": {1: "n_audio"},
                "in_n_layer_self_v_cache": {1: "n_audio"},
                "n_layer_cross_k": {1: "n_audio", 2: "n_audio_ctx"},
                "n_layer_cross_v": {1: "n_audio", 2: "n_audio_ctx"},
                "logits": {0: "n_audio", 1: "n_tokens"},
                "out_n_layer_self_k_cache": {1: "n_audio"},
                "out_n_layer_self_v_cache": {1: "n_audio"},
            },
        )


def _add_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the metadata_props of an ONNX file in place."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def _quantize(src: Path, dst: Path, op_types: list[str]) -> None:
    """Dynamic int8 quantization (QInt8 weights), as sherpa-onnx's export script does."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # silences "Please consider to run pre-processing ..."
    try:
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            op_types_to_quantize=op_types,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)


@dataclass
class LoadedWhisper:
    """A CT2 Whisper model with everything the exporter and the parity check need."""

    weights: dict[str, np.ndarray]
    dims: WhisperDims
    tokens: WhisperTokens
    config: dict[str, Any]


def load_whisper(
    model_bin_paths: Sequence[Path], vocab_path: Path, config_path: Path | None = None
) -> LoadedWhisper:
    """Read model.bin (+parts), the vocabulary and the optional CT2 config.json."""
    ct2 = read_ct2_model(model_bin_paths)
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"expected a CT2 WhisperSpec model, got {ct2.spec!r}")
    dims = WhisperDims.from_weights(ct2.variables)
    vocab = load_vocabulary(vocab_path)
    if len(vocab) < dims.n_vocab and vocab[-1] == "<|notimestamps|>":
        # HF tokenizer.json may omit the timestamp tokens; CT2's vocabulary.txt has them
        vocab += [f"<|{i * 0.02:.2f}|>" for i in range(dims.n_vocab - len(vocab))]
    if len(vocab) != dims.n_vocab:
        raise ValueError(f"vocabulary has {len(vocab)} tokens, model expects {dims.n_vocab}")
    config: dict[str, Any] = {}
    if config_path is not None:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    return LoadedWhisper(ct2.variables, dims, WhisperTokens.from_vocab(vocab, dims), config)


def output_names(prefix: str) -> dict[str, str]:
    """File names produced for ``prefix`` keyed by role."""
    return {
        "tokens": f"{prefix}-tokens.txt",
        "encoder": f"{prefix}-encoder.onnx",
        "decoder": f"{prefix}-decoder.onnx",
        "encoder_int8": f"{prefix}-encoder.int8.onnx",
        "decoder_int8": f"{prefix}-decoder.int8.onnx",
    }


def convert(
    model_bin_paths: Sequence[Path],
    vocab_path: Path,
    out_dir: Path,
    prefix: str,
    config_path: Path | None = None,
    keep_fp32: bool = True,
    progress: bool = True,
    quantize_embedding: bool = True,
) -> dict[str, Path]:
    """Convert a CT2 Whisper model into sherpa-onnx files in ``out_dir``; returns role -> path."""
    import torch
    from tqdm import tqdm

    if not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(prefix)
    steps = ["read model.bin", "build torch", "export onnx", "metadata", "quantize", "tokens"]
    bar = tqdm(total=len(steps), desc=f"whisper {prefix}", disable=not progress, unit="step")
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-tmp-", dir=out_dir))
    try:
        bar.set_postfix_str(steps[0])
        m = load_whisper(model_bin_paths, vocab_path, config_path)
        bar.update()
        bar.set_postfix_str(steps[1])
        with torch.no_grad():
            encoder, decoder = build_torch_model(m.weights, m.dims)
        bar.update()
        bar.set_postfix_str(steps[2])
        paths = {role: tmp / name for role, name in names.items()}
        _export_onnx(encoder, decoder, m.dims, paths["encoder"], paths["decoder"])
        del encoder, decoder
        bar.update()
        bar.set_postfix_str(steps[3])
        _add_metadata(paths["encoder"], encoder_metadata(m.dims, m.tokens, prefix, m.config))
        _add_metadata(paths["decoder"], {"model_type": f"whisper-{prefix}", "version": "1"})
        bar.update()
        bar.set_postfix_str(steps[4])
        _quantize(paths["encoder"], paths["encoder_int8"], ["MatMul"])
        dec_ops = ["MatMul", "Gather"] if quantize_embedding else ["MatMul"]
        _quantize(paths["decoder"], paths["decoder_int8"], dec_ops)
        bar.update()
        bar.set_postfix_str(steps[5])
        write_tokens_txt(m.tokens, paths["tokens"])
        bar.update()

        wanted = [r for r in names if keep_fp32 or r not in ("encoder", "decoder")]
        result: dict[str, Path] = {}
        for role in wanted:
            final = out_dir / names[role]
            os.replace(paths[role], final)
            result[role] = final
        return result
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Parity / accuracy check
# --------------------------------------------------------------------------------------------


def _mel_filters(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = 400) -> np.ndarray:
    """Slaney-style mel filterbank (librosa defaults, as used by openai-whisper)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        """Slaney mel scale."""
        mel = f / f_sp
        log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
        return np.where(f >= min_log_hz, log_part, mel)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        """Inverse of hz_to_mel."""
        hz = m * f_sp
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), hz)

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = np.array([0.0, sr / 2])
    mel_lo, mel_hi = hz_to_mel(edges)
    hz_pts = mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[:, None]
    return weights.astype(np.float32)


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper log-mel features (n_mels, frames) with sherpa's tail padding appended."""
    n_fft, hop = 400, 160
    window = np.hanning(n_fft + 1)[:-1]
    padded = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power[:-1] @ _mel_filters(n_mels).T
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    feats = ((log_spec + 4.0) / 4.0).astype(np.float32)
    n = min(feats.shape[0], SHERPA_MAX_FRAMES - 50)
    total = min(n + SHERPA_TAIL_PADDING_FRAMES, SHERPA_MAX_FRAMES)
    out = np.zeros((n_mels, total), dtype=np.float32)
    out[:, :n] = feats[:n].T
    return out


def greedy_decode(
    step: StepFn, dims: WhisperDims, initial: list[int], eot: int, max_tokens: int | None = None
) -> list[int]:
    """Greedy search like sherpa-onnx: argmax, stop at eot or after ``max_tokens`` tokens."""
    limit = dims.n_text_ctx // 2 if max_tokens is None else min(max_tokens, dims.n_text_ctx // 2)
    k = np.zeros((dims.n_text_layer, 1, dims.n_text_ctx, dims.n_text_state), np.float32)
    v = np.zeros_like(k)
    logits, k, v = step(np.array([initial], np.int64), k, v, np.array([0], np.int64))
    offset = len(initial)
    token = int(logits[0, -1].argmax())
    out: list[int] = []
    for _ in range(limit):
        if token == eot:
            break
        out.append(token)
        logits, k, v = step(np.array([[token]], np.int64), k, v, np.array([offset], np.int64))
        offset += 1
        if offset >= dims.n_text_ctx - 1:
            break
        token = int(logits[0, -1].argmax())
    return out


def _ort_session(path: Path, threads: int) -> Any:
    """A CPU onnxruntime session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_decoder(encoder: Any, decoder: Any, mel: np.ndarray) -> StepFn:
    """Run the ONNX encoder on ``mel`` and return a decoder step closure."""
    cross_k, cross_v = encoder.run(None, {"mel": mel[None]})

    def step(
        tokens: np.ndarray, k: np.ndarray, v: np.ndarray, offset: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call."""
        feeds = {
            "tokens": tokens,
            "in_n_layer_self_k_cache": k,
            "in_n_layer_self_v_cache": v,
            "n_layer_cross_k": cross_k,
            "n_layer_cross_v": cross_v,
            "offset": offset,
        }
        logits, k2, v2 = decoder.run(None, feeds)
        return logits, k2, v2

    return step


def _torch_decoder(encoder: Any, decoder: Any, mel: np.ndarray) -> StepFn:
    """Run the torch encoder on ``mel`` and return a decoder step closure."""
    import torch

    with torch.no_grad():
        cross_k, cross_v = encoder(torch.from_numpy(mel[None]))

    def step(
        tokens: np.ndarray, k: np.ndarray, v: np.ndarray, offset: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call."""
        with torch.no_grad():
            out = decoder(
                torch.from_numpy(tokens),
                torch.from_numpy(k),
                torch.from_numpy(v),
                cross_k,
                cross_v,
                torch.from_numpy(offset),
            )
        logits, k2, v2 = (t.numpy() for t in out)
        return logits, k2, v2

    return step


def normalize_text(text: str, spell_numbers: bool = False) -> list[str]:
    """Lowercase, drop punctuation, split into words; optionally the daemon's normalizer."""
    if spell_numbers:
        return normalize(text)
    table = str.maketrans({c: " " for c in string.punctuation + "“”‘’—–…"})
    return text.lower().translate(table).split()


def _read_wav(path: Path) -> np.ndarray:
    """Mono float32 16 kHz samples."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz, got {sr}")
    return np.ascontiguousarray(audio.mean(axis=1))


def _read_references(wav_dir: Path) -> dict[str, str]:
    """``transcripts.tsv`` (header ``file<TAB>reference``) as file name -> reference."""
    tsv = wav_dir / "transcripts.tsv"
    if not tsv.exists():
        return {}
    refs: dict[str, str] = {}
    for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
        if "\t" in line:
            name, ref = line.split("\t", 1)
            refs[name.strip()] = ref.strip()
    return refs


def parity_check(
    m: LoadedWhisper, files: dict[str, Path], wavs: Sequence[Path], threads: int
) -> dict[str, int]:
    """Compare greedy tokens of the torch model with the fp32 and int8 ONNX models."""
    encoder_t, decoder_t = build_torch_model(m.weights, m.dims)
    initial = [*m.tokens.sot_sequence(m.dims.is_multilingual), m.tokens.no_timestamps]
    sessions = {
        kind: (
            _ort_session(files[f"encoder{sfx}"], threads),
            _ort_session(files[f"decoder{sfx}"], threads),
        )
        for kind, sfx in (("fp32", ""), ("int8", "_int8"))
        if f"encoder{sfx}" in files
    }
    same = dict.fromkeys(sessions, 0)
    for wav in wavs:
        audio = _read_wav(wav)
        mel = log_mel(audio, m.dims.n_mels)
        limit = int(len(audio) // 160 * 6 / 100)  # sherpa: at most 6 tokens per second
        ref = greedy_decode(
            _torch_decoder(encoder_t, decoder_t, mel), m.dims, initial, m.tokens.eot, limit
        )
        line = [f"  {wav.name}: torch {len(ref)} tokens"]
        for kind, (enc, dec) in sessions.items():
            hyp = greedy_decode(_ort_decoder(enc, dec, mel), m.dims, initial, m.tokens.eot, limit)
            same[kind] += hyp == ref
            line.append(f"{kind} {'==' if hyp == ref else '!='}")
            if hyp != ref:
                diff = b"".join(m.tokens.token_bytes(t) for t in hyp if t < m.tokens.eot)
                line.append(f"[{kind}: {diff.decode('utf-8', 'replace').strip()}]")
        text = b"".join(m.tokens.token_bytes(t) for t in ref if t < m.tokens.eot)
        print(", ".join(line), "|", text.decode("utf-8", "replace").strip())
    for kind, n in same.items():
        print(f"parity torch vs onnx {kind}: {n}/{len(wavs)} identical greedy token sequences")
    return same


def sherpa_eval(
    files: dict[str, Path],
    wavs: Sequence[Path],
    refs: dict[str, str],
    threads: int,
    language: str = "en",
) -> dict[str, dict[str, float]]:
    """Decode ``wavs`` with sherpa-onnx on int8 and fp32 files; print WER and RTF."""
    import sherpa_onnx

    results: dict[str, dict[str, float]] = {}
    for kind, sfx in (("int8", "_int8"), ("fp32", "")):
        if f"encoder{sfx}" not in files:
            continue
        t0 = time.perf_counter()
        rec = sherpa_onnx.OfflineRecognizer.from_whisper(
            encoder=str(files[f"encoder{sfx}"]),
            decoder=str(files[f"decoder{sfx}"]),
            tokens=str(files["tokens"]),
            language=language,
            task="transcribe",
            num_threads=threads,
        )
        load_s = time.perf_counter() - t0
        errors = words = errors_sp = words_sp = 0
        audio_s = decode_s = 0.0
        for wav in wavs:
            audio = _read_wav(wav)
            t0 = time.perf_counter()
            stream = rec.create_stream()
            stream.accept_waveform(SAMPLE_RATE, audio)
            rec.decode_stream(stream)
            decode_s += time.perf_counter() - t0
            audio_s += len(audio) / SAMPLE_RATE
            hyp = stream.result.text.strip()
            ref = refs.get(wav.name)
            msg = f"  [{kind}] {wav.name}: {hyp}"
            if ref is not None:
                e = edit_distance(normalize_text(ref), normalize_text(hyp))
                errors += e
                words += len(normalize_text(ref))
                ref_sp = normalize_text(ref, spell_numbers=True)
                e_sp = edit_distance(ref_sp, normalize_text(hyp, spell_numbers=True))
                errors_sp += e_sp
                words_sp += len(ref_sp)
                msg += f"  (errors {e}, {e_sp} with numbers spelled)"
            print(msg)
        wer = errors / words if words else float("nan")
        wer_sp = errors_sp / words_sp if words_sp else float("nan")
        rtf = decode_s / audio_s if audio_s else float("nan")
        print(
            f"sherpa {kind}: WER {wer:.2%} ({errors}/{words} words; {wer_sp:.2%} with numbers "
            f"spelled), RTF {rtf:.3f} ({decode_s:.2f}s for {audio_s:.1f}s audio, "
            f"{threads} threads), load {load_s:.2f}s"
        )
        results[kind] = {"wer": wer, "wer_numbers_spelled": wer_sp, "rtf": rtf}
    return results


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model-bin", type=Path, required=True, help="CT2 model.bin (or part 1)")
    p.add_argument(
        "--model-bin-part",
        type=Path,
        action="append",
        default=[],
        help="further parts of a split model.bin, concatenated in the given order",
    )
    p.add_argument("--config", type=Path, help="CT2 config.json (for non_speech_tokens)")
    p.add_argument("--vocab", type=Path, required=True, help="vocabulary.txt or tokenizer.json")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--prefix", required=True, help="file name prefix, e.g. tiny.en or base")
    p.add_argument("--no-fp32", action="store_true", help="keep only the int8 ONNX files")
    p.add_argument(
        "--no-quantize-embedding",
        action="store_true",
        help="leave the decoder token embedding fp32 (sherpa's default recipe; larger file)",
    )
    p.add_argument("--check-dir", type=Path, help="dir of 16 kHz wavs (+ transcripts.tsv)")
    p.add_argument(
        "--check-only", action="store_true", help="skip conversion; check existing files"
    )
    p.add_argument("--check-language", default="en", help="language passed to sherpa in checks")
    p.add_argument("--threads", type=int, default=2, help="threads for the checks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = _parse_args(argv)
    bins = [args.model_bin, *args.model_bin_part]
    if args.check_only:
        files = {
            role: args.out_dir / name
            for role, name in output_names(args.prefix).items()
            if (args.out_dir / name).exists()
        }
    else:
        t0 = time.perf_counter()
        files = convert(
            bins,
            args.vocab,
            args.out_dir,
            args.prefix,
            config_path=args.config,
            keep_fp32=not args.no_fp32,
            progress=not args.quiet,
            quantize_embedding=not args.no_quantize_embedding,
        )
        print(f"converted in {time.perf_counter() - t0:.1f}s")
    for role, path in files.items():
        print(f"  {role:13s} {path}  {path.stat().st_size / 1e6:.1f} MB")
    if args.check_dir:
        wavs = sorted(args.check_dir.glob("*.wav"))
        if not wavs:
            print(f"no wavs in {args.check_dir}", file=sys.stderr)
            return 1
        m = load_whisper(bins, args.vocab, args.config)
        parity_check(m, files, wavs, args.threads)
        sherpa_eval(
            files, wavs, _read_references(args.check_dir), args.threads, args.check_language
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
