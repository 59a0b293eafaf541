"""Post-training quantization of trained models with torchao, and 4-bit LLM loading.

:func:`quantize_model` converts the ``nn.Linear`` layers of a module in place with torchao's
``quantize_`` (PyTorch's own ``torch.ao.quantization.quantize_dynamic`` is deprecated):

=====================  =====================================================  ===========================
method                 what                                                   torchao config
=====================  =====================================================  ===========================
``int8-dynamic``       int8 weights, activations quantized per batch on the   ``Int8DynamicActivation``
                       fly; int8 matrix products                              ``Int8WeightConfig``
``int8-weight-only``   int8 weights dequantized in the matmul (memory bound)  ``Int8WeightOnlyConfig``
``int4-weight-only``   int4 weights in groups of ``group_size`` inputs        ``Int4WeightOnlyConfig``
                                                                              (CUDA), ``IntxWeightOnly``
                                                                              ``Config`` (CPU)
=====================  =====================================================  ===========================

torchao's int8 kernels are fast on CPU only under ``torch.compile`` (eager they are slower than
float here, see ``../shared/notes/machine.md`` and docs/efficiency.md): quantize for size, and
compile (``experiments.quantize --compile``) for speed. 4-bit NF4 loading of large language models
with bitsandbytes is :func:`load_causal_lm_nf4` (a hook for the multimodal-LLM task; Lightning's
``BitsandbytesPrecision`` refuses CPU).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
import torch.nn as nn

Method = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"]
METHODS: tuple[str, ...] = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
Backend = Literal["auto", "torchao"]


class QuantizationUnavailable(RuntimeError):
    """The requested method cannot run with the installed packages or on this device."""


def has_torchao() -> bool:
    return importlib.util.find_spec("torchao") is not None


def resolve_backend(method: str, backend: str = "auto", device: str = "cpu") -> str:
    """The backend that runs ``method``: torchao (the only one); raises :class:`QuantizationUnavailable`."""
    if method not in METHODS:
        hint = " (4-bit NF4 is for loading LLMs: mm_lightning.quantization.load_causal_lm_nf4)" if method == "nf4" else ""
        raise QuantizationUnavailable(f"--method {method!r}: choose one of {', '.join(METHODS)}{hint}")
    if backend not in ("auto", "torchao"):
        raise QuantizationUnavailable(
            f"--backend {backend!r}: only torchao quantizes here (PyTorch's torch.ao.quantization is deprecated); "
            "use --backend auto"
        )
    if not has_torchao():
        raise QuantizationUnavailable(f"--method {method} needs torchao: pip install 'mm-lightning[quant]'")
    return "torchao"


def quantize_model(module: nn.Module, method: str, backend: str = "auto", group_size: int = 32, device: str = "cpu") -> str:
    """Quantize the ``nn.Linear`` layers of ``module`` in place for inference; returns the backend used.

    ``int4-weight-only`` skips layers whose input width ``group_size`` does not divide (they stay float).
    Raises :class:`QuantizationUnavailable` naming the method when it cannot run here.
    """
    backend = resolve_backend(method, backend, device)
    module.eval()
    from torchao.quantization import quantize_

    def linear(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear)

    if method == "int8-dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        quantize_(module, Int8DynamicActivationInt8WeightConfig(), filter_fn=linear)
    elif method == "int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(module, Int8WeightOnlyConfig(), filter_fn=linear)
    else:

        def grouped(mod: nn.Module, fqn: str) -> bool:
            return isinstance(mod, nn.Linear) and mod.in_features % group_size == 0

        if device == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig

            quantize_(module, Int4WeightOnlyConfig(group_size=group_size), filter_fn=grouped)
        else:
            from torchao.quantization import IntxWeightOnlyConfig, PerGroup

            quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), filter_fn=grouped)
    return backend


# --------------------------------------------------------------------------- bitsandbytes hook
def nf4_config(compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True) -> Any:
    """A ``transformers.BitsAndBytesConfig`` for 4-bit NF4 weights (QLoRA's format).

    Raises :class:`QuantizationUnavailable` when bitsandbytes is not installed
    (``pip install 'mm-lightning[bitsandbytes]'``).
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable("4-bit NF4 loading needs bitsandbytes: pip install 'mm-lightning[bitsandbytes]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def load_causal_lm_nf4(path: str, compute_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> nn.Module:
    """Load a Hugging Face causal LM (hub id or local directory) with 4-bit NF4 weights (bitsandbytes).

    The hook for the multimodal-LLM task: the frozen language model takes ~1/4 of its bf16 memory,
    adapters (peft LoRA) train on top. Loaded by :func:`mm_lightning.models.lm.load_causal_lm`: downloaded
    only when online (the HF cache when ``HF_HUB_OFFLINE`` is set), safetensors only, never remote code.
    bitsandbytes' 4-bit matmuls want a CUDA GPU for speed.
    """
    from mm_lightning.models.lm import load_causal_lm

    return load_causal_lm(path, "model.lm", quantization_config=nf4_config(compute_dtype), **kwargs)
