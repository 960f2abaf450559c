"""ream-hf: shrink Mixture-of-Experts LLMs by merging (REAM) or pruning (REAP) experts."""

__version__ = "0.1.0"

__all__ = ["CalibrationSource", "ReamCompressor", "ReamConfig", "__version__"]


def __getattr__(name: str):
    # Lazy: `import ream_hf.config` (and the CLI's --help) should not import the whole pipeline.
    if name in ("ReamConfig", "CalibrationSource"):
        from . import config

        return getattr(config, name)
    if name == "ReamCompressor":
        from .compressor import ReamCompressor

        return ReamCompressor
    raise AttributeError(f"module 'ream_hf' has no attribute {name!r}")
