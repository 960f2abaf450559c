"""`CheckpointWriter`: every byte of one output checkpoint: the trunk layers' shard parts, the MTP layers and the
tensors copied as stored, the index, config.json, the side files and the manifest.

The pipeline hands it each compressed trunk layer as it finishes (`write_layer`, into the work folder's parts, while
streaming); `finish` writes what is left into an output folder: the remaining groups of tensors, the index over all
parts, the edited config.json, the side files and the manifest. A checkpoint compressed from a model transformers
loaded is written by `write_loaded_model`. The output's tensor groups (`output_groups`) are computed here, once.
The model card (README.md) and layer_report.png are drawn afterwards from the manifest, by release/card.py and
release/report.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..arch import MoEFamily
from .names import MANIFEST_NAME
from .quantization import Fp8BlockOutput, output_dtype
from .safetensors import shard_digests
from .source import SourceCheckpoint
from .writer import (LayerOutput, PartWriter, copy_side_files, edit_config_json, finalize_parts, output_groups,
                     output_tensors, write_json)

class CheckpointWriter:
    """The output of one run from a source checkpoint, in the source's names and shard order.

    `dropped_prefixes`: MTP layers left out (mtp="drop"); `dequantize_to`: a quantized source written dequantized to
    this dtype (None: its own format); `fp8_output`: a plain source written FP8 block-wise."""

    def __init__(self, source: SourceCheckpoint, family: MoEFamily, trunk_prefix: str, num_layers: int,
                 max_shard_bytes: int, *, dropped_prefixes: tuple[str, ...] = (), dequantize_to: str | None = None,
                 fp8_output: Fp8BlockOutput | None = None) -> None:
        self.source, self.family, self.max_shard_bytes = source, family, max_shard_bytes
        self.dropped_prefixes, self.dequantize_to, self.fp8_output = dropped_prefixes, dequantize_to, fp8_output
        # source tensor names per output group: each trunk layer in order, then everything else (MTP layers included)
        self.groups = output_groups(source, trunk_prefix, num_layers, dropped_prefixes)
        self._layer_parts: PartWriter | None = None  # set by `start_layer_parts`: trunk layers written as they finish

    def start_layer_parts(self, folder: Path, parts: list[str]) -> None:
        """Write trunk layers as they finish, into size-capped parts in `folder` (the work folder), numbered on from
        `parts` (those of the layers a resumed run finished before)."""
        self._layer_parts = PartWriter(folder, self.max_shard_bytes, parts=parts)

    @property
    def parts(self) -> list[str]:
        """The parts written so far by `write_layer` (the work folder's list, recorded by each commit)."""
        return self._layer_parts.parts

    def write_layer(self, index: int, outputs: dict[str, LayerOutput]) -> None:
        """Trunk layer `index`'s tensors (`outputs`: its compressed layer, none for a dense layer) into the next parts."""
        self._layer_parts.write_group(self._tensors(self.groups[index], outputs))

    def _tensors(self, names: list[str], outputs: dict[str, LayerOutput]):
        dequantize = None if self.dequantize_to is None else output_dtype(self.dequantize_to)
        return output_tensors(self.source, self.family, names, outputs, dequantize, self.fp8_output)

    def finish(self, folder: Path, outputs: dict[str, LayerOutput], experts_after: int, ream_config: dict[str, Any],
               manifest: dict[str, Any]) -> None:
        """Everything not yet written into `folder`: the groups left (all of them without `start_layer_parts`; else
        the tensors after the trunk) from `outputs` (the compressed layers still held), the parts linked in as shards
        with their index, config.json, the side files, then the manifest with the shards' digests."""
        if self._layer_parts is not None:  # trunk layers written while streaming; the rest now
            parts_folder = self._layer_parts.folder
            writer = PartWriter(parts_folder, self.max_shard_bytes, parts=self._layer_parts.parts)
            pending = [self.groups[-1]]
        else:
            parts_folder = folder
            writer = PartWriter(folder, self.max_shard_bytes)
            pending = self.groups
        for names in pending:
            writer.write_group(self._tensors(names, outputs))
        finalize_parts(parts_folder, writer.parts, folder)
        mtp_count = 0 if self.dropped_prefixes else None
        quantization = None
        if self.fp8_output is not None:
            kept = {n: info.shape for n, info in self.source.tensor_infos.items()
                    if not (self.dropped_prefixes and n.startswith(self.dropped_prefixes))}
            quantization = self.fp8_output.quantization_config(kept)
        write_json(folder / "config.json",
                   edit_config_json(self.source.config, self.family, experts_after, ream_config, mtp_count,
                                    self.dequantize_to, quantization))
        copy_side_files(self.source.folder, folder)
        write_manifest(folder, manifest)

def write_loaded_model(folder: Path, model: Any, tokenizer: Any, family: MoEFamily, experts_after: int,
                       ream_config: dict[str, Any], max_shard_bytes: int, manifest: dict[str, Any]) -> None:
    """The output of a run on a model transformers loaded: its own `save_pretrained`, config.json given the family's
    expert-count key and the settings, the tokenizer, then the manifest with the shards' digests."""
    model.save_pretrained(str(folder), max_shard_size=max_shard_bytes)
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers may re-serialise the count under another name (Qwen3-MoE: num_local_experts);
    # readers of the family's Hub checkpoints (vLLM included) look for the family's own key.
    write_json(config_path, edit_config_json(saved, family, experts_after, ream_config))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    write_manifest(folder, manifest)

def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest, with the shards' digests read back while they are in the page cache: it then identifies every
    byte of the output (the evaluation cache's key, release/evaluation/cache.py)."""
    write_json(folder / MANIFEST_NAME, {**manifest, "shards": shard_digests(folder)})
