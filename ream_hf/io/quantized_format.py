"""The interface every quantized storage format implements (io/quantization.py: FP8 block-wise, MXFP4;
io/compressed_tensors.py): stored tensor names <-> real tensor names, dequantization, checks, re-quantization."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

import torch

from . import safetensors as st


class QuantizedFormat:
    """A supported quantized storage format: stored tensor names <-> real tensor names, and dequantization.

    A real tensor is what the dequantized twin of the checkpoint holds under that name; it is stored either as
    itself (plain) or as the format's stored tensors (`stored_layout`), the first of which holds the bulk data.
    """

    quant_method = ""
    writes_back = False  # whether outputs can be written in this format

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)

    def real_name(self, stored: str) -> str:
        """The real tensor a stored tensor belongs to (itself for plain tensors)."""
        raise NotImplementedError

    def stored_layout(self, real: str) -> tuple[str, ...]:
        """The stored tensors of `real` when it is quantized, bulk data first."""
        raise NotImplementedError

    def is_quantized(self, real: str, names: Container[str]) -> bool:
        return all(name in names for name in self.stored_layout(real))

    def dequantize(self, real: str, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The real values (float32) from the stored tensors of `real`."""
        raise NotImplementedError

    def real_shape(self, real: str, infos: Mapping[str, st.TensorInfo]) -> tuple[int, ...]:
        """The shape the dequantized tensor has, from the stored tensors' headers."""
        raise NotImplementedError

    def check(self, infos: Mapping[str, st.TensorInfo]) -> None:
        """Raise ValueError at the first stored tensor that does not fit the format (orphans, missing or
        mis-shaped scales)."""
        raise NotImplementedError

    def quantize(self, real: str, tensor: torch.Tensor, like: Mapping[str, st.TensorInfo]) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.quant_method} checkpoints cannot be written back in their format; "
                         "pass output_dtype (--output-dtype)")
