"""Per-layer statistics on disk: `--save-statistics DIR` writes them, `--statistics DIR` re-plans from them.

A folder holds one safetensors file per MoE layer (frequency, routing weight, every saliency variant, gated output
signatures, router-logit Gram, the token sample and the routed experts' output on it) and `statistics.json`, which
says what they are: the source (its config and tensor index), the calibration settings, whether they were
collected sequentially (on the outputs of already-compressed layers, so valid for that run only) and which
statistics were collected.
A non-sequential run with the same source and calibration can then plan at any target, with any method and
saliency the statistics support, without running the model. Every mismatch is refused before any weight or
calibration text is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..config import ReamConfig
from ..io import safetensors as st
from ..io.source import SourceCheckpoint
from ..method.stats import SALIENCY_VARIANTS, LayerStatistics, sub_sample
from .work_folder import fingerprint

FORMAT = "ream-hf statistics v1"
INDEX_NAME = "statistics.json"
DIGEST_BLOCK = 64 * 2**10
CALIBRATION_FIELDS = ("calibration", "calibration_ratios", "num_calibration_sequences", "sequence_length",
                      "min_sequence_fraction", "seed", "batch_size")


def source_identity(source: SourceCheckpoint) -> str:
    """The source's config and tensor index, and a digest of three 64 KiB blocks of every shard's bytes (start,
    middle, end; raw bytes, not parsed as tensors): two checkpoints of one architecture share config and index,
    a retrained or re-seeded one does not share these bytes, and a copy of the folder elsewhere still matches."""
    digest = hashlib.sha256(fingerprint(source, {}).encode())
    for shard in sorted(set(source.weight_map.values())):
        path = source.folder / shard
        size = path.stat().st_size
        digest.update(f"{shard}:{size}".encode())
        with open(path, "rb") as handle:
            for offset in (0, size // 2, max(0, size - DIGEST_BLOCK)):
                handle.seek(offset)
                digest.update(handle.read(DIGEST_BLOCK))
    return digest.hexdigest()[:24]


def _kind(config: ReamConfig) -> dict[str, Any]:
    """What a run's statistics hold: dense (gated output signatures), which signature, logits, a token sample."""
    return {
        "saliency": config.saliency != "frequency" or config.is_merging,
        "dense": config.is_merging,
        "gated_similarity": config.gated_similarity if config.is_merging else None,
        "router_logits": config.is_merging and config.use_router_logits,
        "sample_tokens": config.layer_sample_tokens,  # the token sample alignment and the refit draw from (0: none)
    }


def _calibration(config: ReamConfig) -> dict[str, Any]:
    settings = config.to_dict()
    return {name: settings[name] for name in CALIBRATION_FIELDS}


class StatisticsWriter:
    """Writes each layer's statistics as it is computed; `statistics.json` last, so a folder without it is
    an unfinished run that `StatisticsReader` refuses."""

    def __init__(self, folder: str | os.PathLike, source: SourceCheckpoint, config: ReamConfig) -> None:
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise ValueError(f"--save-statistics folder {folder} exists and is not empty; choose a new folder")
        self.source = source
        self.index: dict[str, Any] = {
            "format": FORMAT, "source": None, "source_name": str(source.folder),
            "calibration": _calibration(config), "sequential": config.sequential, **_kind(config),
            "saliency_variants": list(SALIENCY_VARIANTS), "layers": {},
        }

    def write(self, key: str, stats: LayerStatistics) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"frequency": stats.frequency.contiguous()}
        for name, value in (stats.saliency or {}).items():
            tensors[f"saliency.{name}"] = value.contiguous()
        for name in ("routing_weight", "output_signatures", "router_logit_gram", "sample_inputs", "sample_outputs"):
            value = getattr(stats, name)
            if value is not None:
                tensors[name] = value.contiguous()
        file = f"layer-{len(self.index['layers']):04d}.safetensors"
        save_file(tensors, str(self.folder / file), metadata={"layer": key})
        self.index["layers"][key] = {"file": file, "num_tokens": stats.num_tokens}

    def finish(self, calibration_sequences: int, calibration_tokens: int) -> None:
        self.index.update(source=source_identity(self.source), calibration_sequences=calibration_sequences,
                          calibration_tokens=calibration_tokens)
        temp = self.folder / (INDEX_NAME + ".tmp")
        temp.write_text(json.dumps(self.index, indent=1) + "\n", encoding="utf-8")
        os.replace(temp, self.folder / INDEX_NAME)


class StatisticsReader:
    """Statistics saved by `StatisticsWriter`, checked against this run's source and settings on opening."""

    def __init__(self, folder: str | os.PathLike, source: SourceCheckpoint | None, config: ReamConfig) -> None:
        self.folder = Path(folder).expanduser()
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise ValueError(f"{folder} has no {INDEX_NAME}: not a finished --save-statistics folder")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"cannot read {index_path}: {error}") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a {FORMAT} file (format {index.get('format')!r})")
        if source is None:
            raise ValueError("statistics from a folder need the source as a folder or Hub id, not a loaded model")
        if config.sequential:
            raise ValueError("re-planning from saved statistics is the non-sequential mode: pass --no-sequential "
                             "(Python: sequential=False); sequential statistics depend on the compressed layers")
        if index["sequential"]:
            raise ValueError(f"the statistics in {folder} were collected sequentially (on the outputs of that run's "
                             "compressed layers): only a --no-sequential --save-statistics run can be re-planned")
        calibration = _calibration(config)
        changed = sorted(k for k in CALIBRATION_FIELDS if index["calibration"].get(k) != calibration[k])
        if changed:
            raise ValueError(f"the statistics in {folder} were collected with other calibration settings "
                             f"({', '.join(changed)} differ); use the same calibration or collect new statistics")
        need = _kind(config)
        for name, missing in (("saliency", "expert outputs (saliency)"), ("dense", "gated output signatures"),
                              ("router_logits", "router-logit Gram")):
            if need[name] and not index[name]:
                raise ValueError(f"the statistics in {folder} lack the {missing} method={config.method!r} needs; "
                                 "collect them with a run of this method")
        if need["dense"] and index["gated_similarity"] != need["gated_similarity"]:
            raise ValueError(f"the statistics in {folder} have gated_similarity={index['gated_similarity']}; this "
                             f"run asks for {need['gated_similarity']}")
        sample = need["sample_tokens"]
        if sample > index["sample_tokens"]:
            raise ValueError(f"this run's alignment (merge={config.merge!r}) and refit (refit={config.refit!r}) draw "
                             f"on a token sample of {sample} tokens (activation_sample_tokens, refit_tokens); the "
                             f"statistics in {folder} hold one of {index['sample_tokens']}: collect them with a sample "
                             "at least that large")
        self.layer_sample_tokens = sample
        self.dense = need["dense"]
        self.index = index

    def check_source(self, source: SourceCheckpoint) -> None:
        """Refuse statistics of other weights: called once the source's shards are on disk (a Hub source's are
        fetched after every other refusal), before any tensor or calibration text is read."""
        if self.index["source"] != source_identity(source):
            raise ValueError(f"the statistics in {self.folder} are of another model ({self.index.get('source_name')}): "
                             f"its config, tensor index or weights differ from {source.folder}'s")

    @property
    def calibration_sequences(self) -> int:
        return int(self.index["calibration_sequences"])

    @property
    def calibration_tokens(self) -> int:
        return int(self.index["calibration_tokens"])

    def check_layers(self, keys: list[str]) -> None:
        missing = [key for key in keys if key not in self.index["layers"]]
        if missing:
            raise ValueError(f"the statistics in {self.folder} have no layer {missing[0]}; they are of another "
                             "model or MTP setting")

    def read(self, key: str) -> LayerStatistics:
        """The layer's statistics, its token sample cut to this run's size (a subset of the saved one)."""
        entry = self.index["layers"][key]
        with st.open_shard(self.folder / entry["file"]) as handle:
            # copies in fresh memory: a tensor read from the file sits at its byte offset there, and a GEMM on a
            # token sample that is not 16-byte aligned takes another SIMD path, which rounds differently from the
            # run that collected it (seen: refit down projections differing by 3e-6)
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
        saliency = {name[len("saliency."):]: value for name, value in tensors.items() if name.startswith("saliency.")}
        total = int(entry["num_tokens"])
        sample, outputs = (self._cut(tensors.get(name), total) for name in ("sample_inputs", "sample_outputs"))
        return LayerStatistics(
            frequency=tensors["frequency"], saliency=saliency or None,
            output_signatures=tensors.get("output_signatures"), router_logit_gram=tensors.get("router_logit_gram"),
            sample_inputs=sample, num_tokens=total, routing_weight=tensors.get("routing_weight"),
            # the dense pass's outputs only where this run's pass is dense too: a routed-only run computes them in its
            # refit, and a re-plan must compute what a fresh run does
            sample_outputs=None if sample is None or not self.dense else outputs,
        )

    def _cut(self, rows, total: int):
        """The rows of this run's token sample, from the saved (larger or equal) one."""
        if rows is None:
            return None
        wanted = min(self.layer_sample_tokens, total)
        return None if wanted == 0 else rows if wanted == rows.shape[0] else \
            sub_sample(rows, total, wanted, int(self.index["calibration"]["seed"]))
