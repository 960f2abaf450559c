"""ream-hf: shrink Mixture-of-Experts LLMs by merging (REAM) or pruning (REAP) experts."""

__version__ = "0.1.0"

__all__ = ["CalibrationSource", "ReamCompressor", "ReamConfig", "__version__"]

from .integrations import register_with_transformers

# `from_pretrained(..., quantization_config=ReamConfig(...))` works once ream_hf is imported; the registration
# waits until transformers imports its quantizer registry, so `import ream_hf` stays cheap
register_with_transformers()


def __getattr__(name: str):
    # Lazy: `import ream_hf.config` (and the CLI's --help) should not import the whole pipeline.
    if name in ("ReamConfig", "CalibrationSource"):
        from . import config

        return getattr(config, name)
    if name == "ReamCompressor":
        from .compressor import ReamCompressor

        return ReamCompressor
    raise AttributeError(f"module 'ream_hf' has no attribute {name!r}")
