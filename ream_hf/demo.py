"""The embedded default job: a tiny Qwen3-MoE the package builds itself, compressed end to end.

Everything here runs offline in seconds, so a fresh install can prove the whole pipeline
(calibration -> statistics -> grouping -> surgery -> checkpoint -> reload) without the Hub.
"""

from __future__ import annotations

from pathlib import Path

from .fixtures import build_tiny_qwen3_moe, demo_corpus, folder_bytes, write_demo_calibration


def mean_loss(folder: Path, texts: list[str]) -> float:
    """Mean next-token loss of a saved checkpoint on `texts`: a before/after sanity number."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def run_demo(workdir: str | Path, method: str = "ream", target_experts: int = 8) -> list[tuple[str, str, str]]:
    """Build, compress, save, reload; rows of (quantity, before, after) for the CLI to print."""
    import time

    from .compressor import ReamCompressor
    from .config import ReamConfig

    workdir = Path(workdir)
    source = build_tiny_qwen3_moe(workdir / "source")
    calibration = write_demo_calibration(workdir / "calibration.txt")
    config = ReamConfig(
        target_experts=target_experts, method=method, calibration=[str(calibration)], calibration_ratios=None,
        num_calibration_sequences=64, sequence_length=128, batch_size=8, group_size=4, seed=42,
    )
    started = time.perf_counter()
    compressor = ReamCompressor(config)
    model = compressor.compress(str(source))
    output = compressor.save_pretrained(workdir / "compressed", overwrite=True)
    seconds = time.perf_counter() - started
    held_out = demo_corpus(60, seed=7)
    before_params = sum(p.numel() for p in _load(source).parameters())
    after_params = sum(p.numel() for p in model.parameters())
    return [
        ("experts per MoE layer", str(compressor.result.experts_before), str(compressor.result.experts_after)),
        ("parameters", f"{before_params:,}", f"{after_params:,}"),
        ("size on disk (MB)", f"{folder_bytes(source) / 1e6:.2f}", f"{folder_bytes(output) / 1e6:.2f}"),
        ("held-out loss (reloaded)", f"{mean_loss(source, held_out):.3f}", f"{mean_loss(output, held_out):.3f}"),
        ("seconds (compress + save)", "", f"{seconds:.1f}"),
        ("output folder", "", str(output)),
    ]


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))
