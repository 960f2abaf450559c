"""Calibration data: load each source, take its share of rows, tokenise, and batch.

Rules follow the REAM paper (METHOD.md §7): rows per source are `int(N * ratio)` (the published
checkpoints depend on that rounding), document rows shorter than `min_sequence_fraction * L`
tokens are skipped, longer ones truncated to L. A `.txt` file is one text stream packed into
L-token pieces; `.jsonl` rows with `input_ids` are pre-tokenised and used as they are.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LOCAL_SUFFIXES, CalibrationSource, ReamConfig, looks_local

logger = logging.getLogger(__name__)

def check_sources(sources: list[CalibrationSource]) -> None:
    """Refuse missing or unreadable local files before any model is loaded."""
    for source in sources:
        if not looks_local(source.path):
            continue
        path = Path(source.path).expanduser()
        if path.is_dir():
            continue  # a local dataset folder, read by `datasets`
        if not path.is_file():
            raise ValueError(f"calibration file {source.path} does not exist; give a .txt/.jsonl file or a Hub dataset id")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"calibration file {source.path} must be .txt or .jsonl (rows with 'text' or 'input_ids')")
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            raise ValueError(f"calibration file {source.path} cannot be read: {error.strerror}") from None
        if path.stat().st_size == 0:
            raise ValueError(f"calibration file {source.path} is empty; give a file with text in it")


def rows_per_source(total: int, ratios: list[float] | None, num_sources: int) -> list[int]:
    if ratios is None:
        ratios = [1.0 / num_sources] * num_sources
    else:
        scale = sum(ratios)
        ratios = [r / scale for r in ratios]
    return [int(total * r) for r in ratios]


def _row_text(row: dict, text_field: str | list[str]) -> str:
    names = [text_field] if isinstance(text_field, str) else list(text_field)
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"calibration row has no field {missing[0]!r} (fields: {sorted(row)}); set text_field")
    return "\n\n".join(str(row[n]) for n in names)


def _passes_filter(row: dict, filters: dict[str, list[str]] | None) -> bool:
    return not filters or all(row.get(key) in allowed for key, allowed in filters.items())


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number} is not a JSON object (give rows like {{\"text\": ...}})")
                rows.append((number, row))
    return rows


def _hub_rows(source: CalibrationSource, seed: int) -> Iterable[dict]:
    """Stream a Hub (or local-folder) dataset so c4-sized sources are never downloaded whole."""
    import datasets

    dataset = datasets.load_dataset(source.path, source.name, split=source.split, streaming=True)
    return dataset.shuffle(seed=seed, buffer_size=10_000)


def _pretokenised(row: dict, where: str, vocab_size: int | None) -> list[int]:
    """A pre-tokenised row's ids, refused unless they are integers the model's embedding has rows for (an id beyond
    the vocabulary would otherwise end the run in an IndexError inside the embedding)."""
    ids = row["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{where}: input_ids must be a list of integer token ids")
    if ids and vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(t for t in ids if t < 0 or t >= vocab_size)
        raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); "
                         "pre-tokenised rows must come from this model's tokenizer")
    return ids


def _source_sequences(
    source: CalibrationSource, tokenizer, count: int, length: int, min_tokens: int, seed: int,
    vocab_size: int | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Up to `count` sequences of one source, and how many rows were skipped as shorter than `min_tokens`."""
    if count <= 0:
        return [], 0
    path = Path(source.path).expanduser()
    if looks_local(source.path) and path.suffix.lower() == ".txt":
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        pieces = [ids[i : i + length] for i in range(0, len(ids), length)]
        kept = [p for p in pieces if len(p) >= min_tokens]
        return [torch.tensor(p, dtype=torch.long) for p in kept[:count]], len(pieces) - len(kept)

    if looks_local(source.path) and path.is_file():
        rows: Iterable[tuple[str, dict]] = [(f"{source.path}:{line}", row) for line, row in _read_jsonl(path)]
        rows = list(rows)
        random.Random(seed).shuffle(rows)  # the same permutation as of the bare rows: it depends on the count only
    else:
        rows = ((f"{source.path} row {number}", row) for number, row in enumerate(_hub_rows(source, seed)))

    sequences: list[torch.Tensor] = []
    short = 0
    for where, row in rows:
        if len(sequences) >= count:
            break
        if not _passes_filter(row, source.filter):
            continue
        if "input_ids" in row and source.text_field == "text" and "text" not in row:
            ids = _pretokenised(row, where, vocab_size)  # used as is
            if ids:
                sequences.append(torch.tensor(ids, dtype=torch.long))
            continue
        ids = tokenizer(_row_text(row, source.text_field), add_special_tokens=False)["input_ids"][:length]
        if len(ids) >= min_tokens:
            sequences.append(torch.tensor(ids, dtype=torch.long))
        else:
            short += 1
    return sequences, short


def load_calibration(config: ReamConfig, tokenizer, vocab_size: int | None = None) -> list[torch.Tensor]:
    """Token sequences of the configured mix; raises if nothing usable comes out, or (given the model's
    `vocab_size`) if a token id has no embedding row."""
    check_sources(config.calibration)
    length = config.sequence_length
    min_tokens = max(1, int(length * config.min_sequence_fraction))
    counts = rows_per_source(config.num_calibration_sequences, config.calibration_ratios, len(config.calibration))
    sequences: list[torch.Tensor] = []
    for source, count in zip(config.calibration, counts):
        got, short = _source_sequences(source, tokenizer, count, length, min_tokens, config.seed, vocab_size)
        if count and len(got) < count:
            logger.warning(
                "calibration source %s gave %d of %d requested sequences (rows shorter than %d tokens are skipped; "
                "%d were)", source.path, len(got), count, min_tokens, short,
            )
        sequences.extend(got)
    if vocab_size is not None:  # tokenizer output too: a tokenizer with more tokens than the embedding has rows
        for sequence in sequences:
            if sequence.numel() and (int(sequence.min()) < 0 or int(sequence.max()) >= vocab_size):
                raise ValueError(f"the tokenizer produced token id {int(sequence.max())}, outside the model's "
                                 f"vocabulary (0..{vocab_size - 1}); the tokenizer does not match the model")
    if not sequences:
        raise ValueError(
            f"calibration data is empty: no sequence of at least {min_tokens} tokens in "
            f"{', '.join(s.path for s in config.calibration)}; give more text or lower sequence_length"
        )
    return sequences


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (B, S), right-padded
    attention_mask: torch.Tensor  # (B, S), 1 on real tokens

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.reshape(-1).bool()


def make_batches(sequences: list[torch.Tensor], batch_size: int, pad_token_id: int) -> list[CalibrationBatch]:
    """Group sequences of similar length so padding (excluded from statistics anyway) stays small."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        members = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in members)
        ids = torch.full((len(members), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, seq in enumerate(members):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        batches.append(CalibrationBatch(ids, mask))
    return batches


def iter_token_chunks(tensor: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    for start in range(0, tensor.shape[0], chunk):
        yield tensor[start : start + chunk]
