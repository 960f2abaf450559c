"""ream-hf: shrink Mixture-of-Experts LLMs by merging (REAM) or pruning (REAP) experts.

Importing the package registers `ReamConfig` as transformers' quantization method "ream" (through transformers'
public registry, `ream_hf.integrations.transformers`), so `from_pretrained(..., quantization_config=ReamConfig(...))`
works once `ream_hf` is imported.
"""

from .config import CalibrationSource, ReamConfig
from .integrations import transformers as _transformers_entry  # noqa: F401  (registers "ream" on import)
from .version import __version__

__all__ = ["CalibrationSource", "ReamCompressor", "ReamConfig", "__version__"]


def __getattr__(name: str):
    # ReamCompressor is imported on first use: the pipeline (optimum, the layer runner, ...) is not needed to read a
    # config or to load a checkpoint with transformers.
    if name == "ReamCompressor":
        from .compressor import ReamCompressor

        return ReamCompressor
    raise AttributeError(f"module 'ream_hf' has no attribute {name!r}")
