"""A tool, not a format: the dequantized twin of a quantized checkpoint folder, for the tests, the benchmarks and
loading an FP8 output where no FP8 kernel exists (CPU)."""

from __future__ import annotations

from pathlib import Path

from .quantization import dequantized_config, output_dtype
from .source import SourceCheckpoint
from .writer import PartWriter, copy_side_files, finalize_parts, write_json


def dequantize_checkpoint(source: str | Path, output: str | Path, dtype: str = "bfloat16") -> Path:
    """Write to `output` the twin of the quantized checkpoint folder `source`: every quantized tensor dequantized
    to `dtype`, the rest as it is, config.json without quantization_config."""
    src = SourceCheckpoint(source)
    fmt = src.quantization
    if fmt is None:
        raise ValueError(f"{source} is not quantized: nothing to dequantize")
    target = output_dtype(dtype)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=False)
    writer = PartWriter(output, 5 * 2**30)
    reals = src.real_tensors
    writer.write_group((name, tensor.to(target) if len(reals[name]) > 1 else tensor)
                       for name, tensor in src.iter_real_tensors(list(reals)))
    finalize_parts(output, writer.parts, output)
    write_json(output / "config.json", dequantized_config(src.config, dtype))
    copy_side_files(src.folder, output)
    return output
