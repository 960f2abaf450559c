"""Glue to other libraries' entry points: `transformers.py` is transformers' quantization method "ream"
(`ReamHfQuantizer`), registered through transformers' public registry when `ream_hf` is imported."""
