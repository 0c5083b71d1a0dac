"""Full transformers weights → one GGUF file (f16, q8_0 or q4_k_m) for llama.cpp and Ollama, written with the `gguf` library.

Tensor names come from `gguf`'s own mapping tables (`gguf.get_tensor_name_map`), the architecture keys and the
tokenizer from its writer (`GGUFWriter`, `SpecialVocab`); f16 is a cast, q8_0 the library's own quantizer,
q4_k_m llama.cpp's quantizer on the f16 file. Supported
families: llama and mistral (llama.cpp's `llama` architecture, whose q/k projections are stored in llama.cpp's
rotary layout) and qwen2. Another family raises `UnsupportedArchitecture` before anything is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("kubetune_trainer.export")

# transformers model_type -> gguf MODEL_ARCH member name
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
PERMUTED_QK = frozenset({"LLAMA"})  # llama.cpp's converter reverses HF's rotary permutation for these
OUTTYPES = ("f16", "q8_0", "q4_k_m")
# q8_0: blocks of 32 weights with one f16 scale, quantized by the gguf library (gguf.quants, the routine llama.cpp's
# own converter uses for --outtype q8_0). Matrices whose rows are not whole blocks stay f16, 1-D tensors f32.
Q8_0_BLOCK = 32
# q4_k_m: llama.cpp's own quantizer (llama_model_quantize, through the llama-cpp-python package) run on the f16
# file; k-quants have no implementation in the gguf library. Without llama-cpp-python the export says so.
LLAMA_CPP_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


class QuantizerUnavailable(RuntimeError):
    """The requested GGUF type needs llama.cpp's quantizer and the trainer image has no llama-cpp-python."""


def quantize_with_llama_cpp(src: Path, dst: Path, outtype: str) -> None:
    """`src` (an f16 GGUF) quantized to `outtype` at `dst` by llama.cpp's llama_model_quantize."""
    import ctypes
    import os

    try:
        import llama_cpp
    except ImportError as exc:
        raise QuantizerUnavailable(f"GGUF type {outtype} needs llama.cpp's quantizer (the llama-cpp-python package), "
                                   "which this trainer image does not have; use gguf: f16 or q8_0") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[outtype])
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {outtype} (llama_model_quantize returned {code})")


class UnsupportedArchitecture(ValueError):
    """The model family has no GGUF conversion here."""


@dataclass(frozen=True)
class GgufResult:
    """What was written."""

    path: Path
    architecture: str
    tensors: int
    outtype: str


def gguf_architecture(model_type: str) -> str:
    """The gguf MODEL_ARCH name of a transformers model_type (UnsupportedArchitecture otherwise)."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"GGUF export supports the model families {sorted(ARCHITECTURES)}, not {model_type!r}; the adapter and "
            "merged weights are exported as usual") from None


def permute_qk(weights, n_head: int, n_head_kv: int | None = None):
    """HF's rotary layout of a q/k projection → llama.cpp's (interleaved halves per head), as its converter does."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute_qk(weights, n_head: int, n_head_kv: int | None = None):
    """The inverse of `permute_qk`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weights.shape[0]
    return (weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def pre_tokenizer_name(tokenizer_json: dict[str, Any], arch: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if arch == "QWEN2":
        return "qwen2"
    if arch == "LLAMA" and pre.get("type") == "Sequence":
        return "llama-bpe"
    return "default"


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy array) for every tensor of the safetensors shards."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _add_vocab(writer, model_dir: Path, arch: str, n_vocab: int) -> None:
    """Tokens, types, merges, special ids and the chat template (byte-level BPE or SentencePiece-style), padded to
    the embedding's `n_vocab` rows as llama.cpp expects."""
    import gguf

    tok_json_path = model_dir / "tokenizer.json"
    tok_json = json.loads(tok_json_path.read_text()) if tok_json_path.is_file() else {}
    model = tok_json.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        by_id = {i: t for t, i in model["vocab"].items()}
        added = {a["id"]: a for a in tok_json.get("added_tokens") or []}
        top = max([*by_id, *added], default=-1)
        if top >= n_vocab:
            raise ValueError(f"the tokenizer has token id {top} but the model only {n_vocab} embedding rows")
        tokens, types = [], []
        for i in range(n_vocab):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok_json, arch))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    else:
        vocab = gguf.LlamaHfVocab(model_dir)  # SentencePiece-style tokenizer.json (byte fallback)
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, n_vocab=n_vocab)
    special.add_to_gguf(writer)


def write_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", name: str = "") -> GgufResult:
    """Convert the transformers model in `model_dir` (config.json, safetensors, tokenizer) to `out_path`."""
    import gguf
    import numpy as np

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF type {outtype!r} is not supported; use one of {OUTTYPES}")
    if outtype in LLAMA_CPP_FTYPES:
        f16_path = out_path.with_name(out_path.stem + ".f16-source.gguf")
        result = write_gguf(model_dir, f16_path, "f16", name)
        try:
            quantize_with_llama_cpp(f16_path, out_path, outtype)
        finally:
            f16_path.unlink(missing_ok=True)
        return GgufResult(path=out_path, architecture=result.architecture, tensors=result.tensors, outtype=outtype)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch_name = gguf_architecture(cfg.get("model_type", ""))
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    names = gguf.get_tensor_name_map(arch, n_layers)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or model_dir.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
                                    or 10000.0))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _add_vocab(writer, model_dir, arch_name, int(cfg["vocab_size"]))

    count = 0
    seen = set()
    for hf_name, data in _hf_tensors(model_dir):
        if hf_name.endswith(("rotary_emb.inv_freq",)):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UnsupportedArchitecture(f"tensor {hf_name!r} has no GGUF name for {arch_name.lower()}")
        if arch_name in PERMUTED_QK and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif arch_name in PERMUTED_QK and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        # 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them; matrices become f16 or q8_0.
        if outtype == "q8_0" and data.ndim == 2 and data.shape[-1] % Q8_0_BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, data.astype(np.float32 if data.ndim == 1 else np.float16))
        seen.add(target)
        count += 1
    if cfg.get("tie_word_embeddings") and "output.weight" not in seen:
        log.info("tied embeddings: llama.cpp reuses token_embd.weight as the output matrix")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufResult(path=out_path, architecture=gguf.MODEL_ARCH_NAMES[arch], tensors=count, outtype=outtype)
