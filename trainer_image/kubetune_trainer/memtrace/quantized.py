"""bitsandbytes 4-bit (NF4/FP4, optional double quantization) on fake tensors.

bitsandbytes cannot quantize a fake tensor through its `Params4bit` parameter class (it re-wraps the data as
a tensor subclass), but its quantization *functions* are torch custom ops with shape-only fake kernels. So the
trace replaces the linear layers as transformers does (its own `Bnb4BitHfQuantizer`), quantizes a fake weight
of the real shape with `bitsandbytes.functional.quantize_4bit`, and stores the packed weight and its
`QuantState` on the layer the way `Params4bit` does. Its forward and backward then run bitsandbytes' own
code; only the fused `gemm_4bit` op is replaced by what CUDA runs for training-sized inputs: dequantize the
absmax (double quantization) and the weight into temporaries, then `F.linear` (`emulate_gemm_4bit`).

`quantized_storage(layer)` lists the storages of one quantized layer; the trainer tests compare it byte for
byte with a layer bitsandbytes quantizes for real on CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

QUANT_STATE_FIELDS = ("absmax", "code", "offset")


def is_4bit_config(quantization_config: Any) -> bool:
    """True for a transformers BitsAndBytesConfig asking for 4-bit weights."""
    return bool(getattr(quantization_config, "load_in_4bit", False))


@contextlib.contextmanager
def isolated_qmaps() -> Iterator[None]:
    """Give bitsandbytes a fresh module-level code-book cache, so fake code books never leak into real runs.

    Enter it before the fake mode: the 8-bit code book (shared by every layer) is computed for real here.
    """
    import bitsandbytes.functional as bnbf

    saved = bnbf.name2qmap
    bnbf.name2qmap = {"dynamic": bnbf.create_dynamic_map()}
    try:
        yield
    finally:
        bnbf.name2qmap = saved


def quantize_model_4bit(model, quantization_config, dtype: torch.dtype,
                        without_modes: Callable[[], contextlib.AbstractContextManager]) -> int:
    """Replace the model's linear layers by bitsandbytes Linear4bit layers holding fake quantized weights.

    The layers to convert are chosen by transformers' own quantizer (lm_head and `llm_int8_skip_modules`
    stay unquantized); `dtype` is the dtype the weights are loaded in before quantization. Returns how many
    layers were quantized. `without_modes` builds a context in which no dispatch mode is active (the new
    layers are created on the meta device first, as transformers does).
    """
    import bitsandbytes as bnb
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    with without_modes():
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                   use_kernels=False)
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _quantize_layer(module, dtype)
            count += 1
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return count


def _quantize_layer(layer, dtype: torch.dtype) -> None:
    """Quantize a fake `[out, in]` weight into `layer` as Params4bit would (packed data + QuantState)."""
    import bitsandbytes.functional as bnbf

    template = layer.weight
    weight = torch.empty((layer.out_features, layer.in_features), dtype=dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=template.blocksize,
                                       compress_statistics=template.compress_statistics,
                                       quant_type=template.quant_type, quant_storage=template.quant_storage)
    del weight
    param = torch.nn.Parameter(packed, requires_grad=False)
    for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(param, name, getattr(template, name))
    param.quant_state = state
    param.bnb_quantized = True
    param.module = layer
    layer.weight = param
    layer.quant_state = state
    layer.support_avx512bf16_for_cpu = False  # the CPU inference repacking is not what a GPU does
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(torch.empty(layer.out_features, dtype=dtype), requires_grad=False)


def quant_state_tensors(state) -> list[tuple[str, torch.Tensor]]:
    """The tensors a bitsandbytes QuantState holds, by name (nested state as `state2.<name>`)."""
    rows = [(name, getattr(state, name)) for name in QUANT_STATE_FIELDS
            if isinstance(getattr(state, name, None), torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        rows += [(f"state2.{name}", t) for name, t in quant_state_tensors(nested)]
    return rows


def quantized_storage(layer) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{tensor name: (dtype, shape, storage bytes)} for a 4-bit layer's packed weight and quantization state."""
    rows = {"weight": layer.weight}
    rows.update(quant_state_tensors(layer.weight.quant_state))
    return {name: (str(t.dtype).replace("torch.", ""), tuple(t.shape), t.untyped_storage().nbytes())
            for name, t in rows.items()}


def emulate_gemm_4bit(args: tuple, kwargs: dict, track: Callable[[torch.Tensor, str], Any]) -> torch.Tensor:
    """bitsandbytes' CUDA `gemm_4bit` for training-sized inputs: dequantize into temporaries, then F.linear.

    `track(tensor, op)` counts the temporaries (they are freed before this returns, so only the peak sees them).
    """
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
             "absmax_offset")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    a, shape_b = bound["A"], bound["shapeB"]
    temporaries = []
    if bound.get("absmax_8bit") is not None:
        absmax = torch.empty(bound["absmax_8bit"].shape, dtype=torch.float32, device=a.device)
        temporaries.append(absmax)
        track(absmax, "bitsandbytes dequantize_blockwise (absmax)")
        shifted = absmax + bound["absmax_offset"]
        temporaries.append(shifted)
        track(shifted, "bitsandbytes absmax + offset")
    weight = torch.empty(tuple(shape_b), dtype=a.dtype, device=a.device)
    temporaries.append(weight)
    track(weight, "bitsandbytes dequantize_4bit")
    out = torch.nn.functional.linear(a, weight, bound.get("bias"))
    track(out, "bitsandbytes gemm_4bit (dequantize + linear)")
    return out  # the temporaries are freed on return, after the output was counted


def gemm_4bit_op():
    """The `bitsandbytes::gemm_4bit` overload (None when bitsandbytes is not importable)."""
    try:
        import bitsandbytes  # noqa: F401 - registers the ops
    except ImportError:
        return None
    return torch.ops.bitsandbytes.gemm_4bit.default
