"""The embedded default job: a tiny Qwen3-MoE the package builds and trains itself, compressed end to end.

Everything here runs offline in under a minute, so a fresh install can prove the whole pipeline
(calibration -> statistics -> grouping -> surgery -> checkpoint -> reload) without the Hub. The model is trained
for a few seconds on the package's own demo text first: compressing a random model would show nothing (its loss
is ln(vocab) before and after), while a model that has learned the text shows what compression costs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from .fixtures import DEMO_DOMAINS, build_tiny_qwen3_moe, demo_corpus, folder_bytes, train_on_demo_corpus, \
    write_demo_calibration

HELDOUT_LINES = 600  # demo_corpus(HELDOUT_LINES, HELDOUT_SEED): lines neither trained on nor calibrated with
HELDOUT_SEED = 7
SEQUENCE_LENGTH = 128


@dataclass(frozen=True)
class HeldOutScores:
    """Next-token scores of a checkpoint on held-out demo text, over all domains and per domain."""

    loss: float  # mean cross-entropy, nats per token
    accuracy: float  # share of tokens whose most likely prediction is the actual next token
    by_domain: dict[str, tuple[float, float]]  # domain -> (loss, accuracy)


@dataclass(frozen=True)
class DemoRow:
    quantity: str
    before: str
    after: str
    kept: str = ""  # after / before, where that is what a user asks ("how much of the accuracy is left")


@dataclass(frozen=True)
class DemoResult:
    rows: list[DemoRow]
    before: HeldOutScores
    after: HeldOutScores
    vocab_size: int
    output: Path

    @property
    def accuracy_kept(self) -> float:
        return self.after.accuracy / self.before.accuracy


def heldout_text() -> tuple[str, list[tuple[int, str]]]:
    """Held-out demo text (lines neither trained on nor calibrated with) and where each line starts: (character
    offset, domain), in order."""
    lines = demo_corpus(HELDOUT_LINES, seed=HELDOUT_SEED)
    starts, offset = [], 0
    for i, line in enumerate(lines):
        starts.append((offset, DEMO_DOMAINS[i % len(DEMO_DOMAINS)]))
        offset += len(line) + 1
    return "\n".join(lines), starts


def heldout_scores(folder: str | Path, text: str, line_starts: list[tuple[int, str]],
                   sequence_length: int = SEQUENCE_LENGTH) -> HeldOutScores:
    """Loss and top-1 accuracy of the saved checkpoint in `folder` (reloaded with transformers, float32) on `text`,
    cut into `sequence_length`-token sequences; each predicted token counts for the domain of the line it starts in
    (`line_starts`, as `heldout_text` gives them)."""
    import bisect

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    count = encoded["input_ids"].shape[1] // sequence_length
    batch = encoded["input_ids"][0, : count * sequence_length].view(count, sequence_length)
    offsets = [start for start, _ in line_starts]
    domain_of = torch.tensor([DEMO_DOMAINS.index(line_starts[bisect.bisect_right(offsets, int(first)) - 1][1])
                              for first, _ in encoded["offset_mapping"][0, : count * sequence_length].tolist()])
    domain_of = domain_of.view(count, sequence_length)[:, 1:].reshape(-1)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1].reshape(-1, model.config.vocab_size).float()
    targets = batch[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits, targets, reduction="none").double()
    correct = (logits.argmax(-1) == targets).double()
    by_domain = {domain: (float(losses[domain_of == d].mean()), float(correct[domain_of == d].mean()))
                 for d, domain in enumerate(DEMO_DOMAINS)}
    return HeldOutScores(float(losses.mean()), float(correct.mean()), by_domain)


def run_demo(workdir: str | Path, method: str = "ream", target_experts: int = 8, train_steps: int = 60) -> DemoResult:
    """Build and train the tiny model, compress it, save, reload both and score them on held-out text."""
    from .compressor import ReamCompressor
    from .config import ReamConfig

    workdir = Path(workdir)
    started = time.perf_counter()
    source = build_tiny_qwen3_moe(workdir / "source")
    train_on_demo_corpus(source, steps=train_steps)
    train_seconds = time.perf_counter() - started
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
    text, line_starts = heldout_text()
    before, after = heldout_scores(source, text, line_starts), heldout_scores(output, text, line_starts)
    before_params = sum(p.numel() for p in _load(source).parameters())
    after_params = sum(p.numel() for p in model.parameters())
    vocab_size = model.config.vocab_size

    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    rows = [
        DemoRow("experts per MoE layer", str(compressor.result.experts_before), str(compressor.result.experts_after)),
        DemoRow("parameters", f"{before_params:,}", f"{after_params:,}", percent(after_params / before_params)),
        DemoRow("size on disk (MB)", f"{folder_bytes(source) / 1e6:.2f}", f"{folder_bytes(output) / 1e6:.2f}",
                percent(folder_bytes(output) / folder_bytes(source))),
        DemoRow(f"held-out loss (random: {math.log(vocab_size):.2f})", f"{before.loss:.3f}", f"{after.loss:.3f}"),
        DemoRow("next-token accuracy", percent(before.accuracy), percent(after.accuracy),
                percent(after.accuracy / before.accuracy)),
        *[DemoRow(f"  on {domain}", percent(before.by_domain[domain][1]), percent(after.by_domain[domain][1]),
                  percent(after.by_domain[domain][1] / before.by_domain[domain][1])) for domain in DEMO_DOMAINS],
        DemoRow("seconds (build + train; compress + save)", f"{train_seconds:.1f}", f"{seconds:.1f}"),
    ]
    return DemoResult(rows, before, after, vocab_size, Path(output))


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))
