"""`ReamCompressor`: the pipeline from a source model to a compressed, verified checkpoint.

checkpoint in -> calibration -> per-layer statistics -> grouping -> merging/surgery -> checkpoint out.
Everything that can be refused (bad target, unsupported model, missing files) is refused before the
model or the calibration data is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer

from .version import __version__
from .arch import MoEFamily, check_text_architecture, decoder_layers, expert_count, expert_shapes, family_for_config, \
    parse_moe_name, set_expert_count, text_config_dict
from .config import TORCH_DTYPES, ReamConfig
from .io.folders import SpaceNeeded, atomic_output_dir, check_output_dir, check_paths, storage_errors
from .io.quantization import FP8_OUTPUT, Fp8BlockOutput, check_loaded_model, plan_output
from .io.source import SourceCheckpoint, open_source
from .io.verify import verify_checkpoint
from .io.names import MANIFEST_NAME, WEIGHTS_PREFIX, published_source
from .io.safetensors import INDEX_NAME
from .io.checkpoint_writer import CheckpointWriter, write_loaded_model
from .method.planning import check_plan
from .method.refit import sized_refit_config
from .method.surgery import check_grouped_routing
from .pipeline import distributed
from .pipeline.calibration import check_sources, load_calibration, make_batches
from .pipeline.device import Placement, resolve_device
from .pipeline.mtp import check_mtp_layers, mtp_prefixes
from .pipeline.job_plan import check_fits, plan_job
from .pipeline.sequential import CompressionResult, run_layers
from .pipeline.saved_statistics import StatisticsReader, StatisticsWriter
from .pipeline.loading import LayerLoader
from .pipeline.skeleton import build_skeleton
from .pipeline.work_folder import WorkFolder, default_work_root, fingerprint
from .release.report import write_layer_report

logger = logging.getLogger(__name__)


def sized_config(config: ReamConfig, family: MoEFamily, model_config: Any, target: int) -> ReamConfig:
    """`config` with its refit sample sized for this model's MoE layers (`sized_refit_config`), from its
    configuration (transformers' defaults filled in where config.json leaves a field out)."""
    text_config = model_config.get_text_config()  # its attribute names resolve each family's own keys (ERNIE moe_k)
    text = text_config.to_dict()
    inner = expert_shapes(family, text)[0][family.disk_proj_names["down"]][1]
    return sized_refit_config(config, top_k=int(text_config.num_experts_per_tok), kept=target, inner=inner,
                              hidden=int(text["hidden_size"]))



class ReamCompressor(OptimumQuantizer):
    """Compress an MoE model's experts per `ReamConfig`; save a checkpoint vLLM and transformers load as is."""

    def __init__(self, config: ReamConfig | None = None, **config_kwargs: Any) -> None:
        if config is not None and config_kwargs:
            raise ValueError("give either a ReamConfig or its fields as keyword arguments, not both")
        self.config = config if config is not None else ReamConfig(**config_kwargs)
        self.config.validate()
        self.model = None
        self.tokenizer = None
        self.result: CompressionResult | None = None
        self._pending_source: Any = None  # set by from_pretrained, compressed by quantize
        self._pending_tokenizer: Any = None
        self._saved: Path | None = None  # where save_pretrained last wrote this run
        self._space: SpaceNeeded | None = None  # what this run writes, for the message of a failed write

    # -- optimum's OptimumQuantizer interface ------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_or_path: Any, file_name: str | None = None, *, config: ReamConfig | None = None,
                        tokenizer: Any = None, **config_kwargs: Any) -> ReamCompressor:
        """optimum's entry point: a compressor for `model_or_path` (a checkpoint folder, a Hub id or a loaded model
        with `tokenizer=`), with `config` or its fields as keywords; `quantize(save_dir)` then runs it.

        `file_name` is optimum's choice of one model file inside the folder (ONNX quantizers); a ream-hf source is
        a whole checkpoint (config, safetensors index, tokenizer), so only None is accepted."""
        if isinstance(file_name, ReamConfig):
            raise TypeError("from_pretrained's second argument is optimum's file_name: pass the ReamConfig as config=...")
        if file_name is not None:
            raise ValueError(f"file_name={file_name!r}: ream-hf compresses a whole checkpoint folder (its config, "
                             "safetensors index and tokenizer), not one file of it; leave file_name out")
        compressor = cls(config, **config_kwargs)
        compressor._pending_source = model_or_path
        compressor._pending_tokenizer = tokenizer
        return compressor

    def quantize(self, save_dir: str | os.PathLike, file_prefix: str | None = None, *, overwrite: bool = False,
                 resume: bool = False, work_dir: str | os.PathLike | None = None, trust_remote_code: bool = False,
                 revision: str | None = None) -> Path:
        """optimum's `quantize`: compress the `from_pretrained` source and save it to `save_dir`; returns the folder.

        `file_prefix` may only be None or "model": transformers and vLLM find a checkpoint's weights by the names
        model.safetensors / model-0000i-of-0000n.safetensors and model.safetensors.index.json, so a folder written
        under another prefix would not load. Refused, like an existing `save_dir`, before any work starts. The other
        keywords are `compress`'s."""
        if file_prefix not in (None, WEIGHTS_PREFIX):
            raise ValueError(
                f"file_prefix={file_prefix!r}: transformers and vLLM load weights only from {WEIGHTS_PREFIX}.safetensors "
                f"/ {WEIGHTS_PREFIX}-0000i-of-0000n.safetensors with {INDEX_NAME}, so ream-hf writes them under the "
                f"prefix '{WEIGHTS_PREFIX}' only; leave file_prefix out")
        if self._pending_source is None:
            raise ValueError("quantize() needs a source: create the compressor with ReamCompressor.from_pretrained(...)")
        if isinstance(self._pending_source, (str, os.PathLike)):
            check_paths(self._pending_source, output=save_dir)
        check_output_dir(save_dir, overwrite)
        self.compress(self._pending_source, tokenizer=self._pending_tokenizer, resume=resume, work_dir=work_dir,
                      trust_remote_code=trust_remote_code, revision=revision)
        return self.save_pretrained(save_dir, overwrite=overwrite)

    # -- the pipeline ------------------------------------------------------------------------
    def compress(self, model_or_path: Any, *, tokenizer: Any = None, allow_full_width: bool = False,
                 resume: bool = False, work_dir: str | os.PathLike | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, save_statistics: str | os.PathLike | None = None,
                 statistics: str | os.PathLike | None = None):
        """Compress and return the model (a meta-device skeleton when streaming).

        A folder or Hub id is streamed layer by layer (`ReamConfig.streaming`, the default) through a work
        folder (`work_dir`, default under ~/.cache/ream-hf/work, keyed by source and settings) from which
        `resume=True` continues an interrupted run. `allow_full_width` permits target == current experts
        (a no-op that exercises the whole pipeline; used to prove it lossless). `trust_remote_code` lets a source's
        custom tokenizer code run (Kimi-K2's); the model itself always runs on transformers' own classes. `revision`
        picks the branch, tag or commit of a Hub repo id (recorded in the manifest, part of the work folder's key).
        `save_statistics` writes each layer's statistics to a new folder; `statistics` plans every layer from such a
        folder (a non-sequential run's, same source and calibration) without running the model.

        Under torchrun (WORLD_SIZE > 1) the processes share the work (pipeline/distributed.py); each must call
        this with the same arguments, and rank 0 writes the work folder and, in `save_pretrained`, the output."""
        config = self.config
        ranks = distributed.setup(config.run_device)
        device = resolve_device(config.run_device, ranks.local_rank)
        self._space = None
        if isinstance(model_or_path, (str, os.PathLike)):
            check_paths(model_or_path, work=work_dir)  # before a Hub download
            source = open_source(model_or_path, revision)
            config_dict, model, source_name = source.config, None, str(model_or_path)
            # a quantized source's format, first: unsupported ones are refused from config.json alone
            dequantize_to = plan_output(source.quantization, config.output_dtype, config.streaming, source_name)
        else:
            if revision is not None:
                raise ValueError(f"revision {revision!r} applies to a Hub repo id, not to a loaded model")
            model, source = model_or_path, None
            config_dict, source_name = model.config.to_dict(), getattr(model, "name_or_path", "") or "<in-memory model>"
            check_loaded_model(model.config)
            dequantize_to = plan_output(None, config.output_dtype, False, source_name)
        family_for_config(config_dict)  # an unsupported model is refused before transformers parses its config
        check_text_architecture(config_dict, streaming=source is not None and config.streaming)
        model_config = model.config if model is not None else source.transformers_config()
        family, num_experts, target = self.check_model(config_dict, model_config, allow_full_width=allow_full_width)
        config = sized_config(config, family, model_config, target)  # the refit's sample, from the layer shape
        fp8_output = None
        if config.output_dtype == FP8_OUTPUT and source is not None and source.quantization is None:  # FP8 stays as is
            fp8_output = Fp8BlockOutput(family, source.weight_map, source_name)
        text_config = model_config.get_text_config()
        trunk_prefix = self._trunk_prefix(family, source)  # reads the weight index: missing shards fail here
        drop: tuple[str, ...] = ()
        found = mtp_prefixes(family, source) if source is not None else ()
        if found:
            if config.mtp == "compress":  # compressed after the trunk (run_mtp); incomplete MTP layers fail here
                check_mtp_layers(family, source)
            if config.mtp == "drop":
                drop = found
        if save_statistics is not None and source is None:
            raise ValueError("save_statistics needs the source as a folder or Hub id, not a loaded model")
        reader = StatisticsReader(statistics, source, config) if statistics is not None else None
        # MTP layers with experts to compress (a family whose MTP layers are dense copies them as they are)
        compress_mtp = bool(found) and config.mtp == "compress" and family.mtp_moe
        if reader is not None and compress_mtp:
            raise ValueError("saved statistics cover the trunk only: with MTP layers use mtp='keep' or 'drop' "
                             "(--mtp keep|drop), or run without --statistics")
        writers: list[StatisticsWriter] = []  # rank 0 alone writes; a taken folder is refused on every rank
        if save_statistics is not None:
            distributed.on_main(ranks, lambda: writers.append(StatisticsWriter(save_statistics, source, config)))
        writer = writers[0] if writers else None
        if reader is None:
            check_sources(config.calibration)
        custom_tokenizer = source.remote_code_tokenizer() if source is not None and tokenizer is None else None
        if custom_tokenizer and not trust_remote_code:
            raise ValueError(f"the tokenizer of {source_name} is custom code ({custom_tokenizer}); pass "
                             "--trust-remote-code (Python: trust_remote_code=True) to run it, or tokenizer=...")
        streaming = source is not None and model is None and config.streaming
        if resume and not streaming:
            raise ValueError("resume needs streaming (the default) and a source folder or Hub id, not a loaded model")
        if source is not None and model is None:
            plan = plan_job(source, config, device=str(device))
            check_fits(plan)  # a layer the device cannot hold
            # what the run writes, for the message of a failed write: the output, and two generations of hidden
            # states beside it in the work folder
            self._space = SpaceNeeded(plan.output_bytes, 2 * plan.hidden_states_bytes if streaming else 0)
        work = None
        if streaming:  # opened (locked, identified) before any data is read: a second run is refused first
            dtype = self._source_dtype(source)
            # the user's settings (an unset refit_tokens stays unset: its size follows from the source)
            settings = {**self.config.output_settings(), "allow_full_width": allow_full_width,
                        "statistics": None if statistics is None else str(statistics)}
            job = fingerprint(source, settings)  # the run settings (budget, device) may change on resume
            folder = Path(work_dir) if work_dir else default_work_root() / job
            check_paths(model_or_path, work=folder)

            def open_work() -> WorkFolder:
                with storage_errors(lambda: self._space, folder):
                    return WorkFolder.open(folder, job, resume, settings, str(device))

            work = distributed.on_main(ranks, open_work)  # rank 0 locks and writes it; the others get a copy

        # everything refusable is refused above: from here on, the tokenizer, calibration data and weights are read
        try:
            with storage_errors(lambda: self._space, work.folder if work else Path.cwd(),
                                f"finished layers are kept in {work.folder}" if work else None):
                if source is not None:
                    source.fetch_weights()  # a Hub source's shards: a refused run downloads none
                if reader is not None:
                    reader.check_source(source)  # saved statistics of these very weights (the shards' bytes)
                if tokenizer is None:
                    tokenizer = self._load_tokenizer(source.folder if source else getattr(model, "name_or_path", None),
                                                     trust_remote_code, model_config if source else None)
                sequences = [] if reader is not None else \
                    load_calibration(config, tokenizer, getattr(text_config, "vocab_size", None))
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
                batches = make_batches(sequences, config.batch_size, pad_id)
                loader = None
                if streaming:
                    loader = LayerLoader(source, family, device, prefetch=Placement.of(device).prefetch_weights)
                    model = build_skeleton(source.transformers_config(), dtype, device, loader)
                elif model is None:
                    model = self._load_model(source, device)
                model.eval()

                result = CompressionResult(family, num_experts, target, source, source_name, trunk_prefix=trunk_prefix,
                                           calibration_sequences=len(sequences),
                                           calibration_tokens=int(sum(int(s.numel()) for s in sequences)),
                                           dropped_prefixes=drop, work=work)
                if source is not None:
                    result.checkpoint = CheckpointWriter(source, family, trunk_prefix, len(decoder_layers(model)),
                                                         config.max_shard_size, dropped_prefixes=drop,
                                                         dequantize_to=dequantize_to, fp8_output=fp8_output)
                if reader is not None:
                    result.calibration_sequences = reader.calibration_sequences
                    result.calibration_tokens = reader.calibration_tokens
                mtp_loader = LayerLoader(source, family, device) if compress_mtp else None
                run_layers(config, model, family, batches, target, device, result, loader, mtp_loader, reader, writer)
                if writer is not None:
                    writer.finish(result.calibration_sequences, result.calibration_tokens)
        except ValueError as error:
            if work is None or not ranks.is_main:  # the other ranks never write the work folder
                raise
            if work.finished_layers == 0:  # nothing worth keeping: leave no work folder behind a refusal
                work.remove()
                raise
            work.release()
            raise ValueError(f"{error} ({work.finished_layers} finished layers are kept in {work.folder}: once this "
                             "is fixed, run the same command with --resume)") from None
        except BaseException:
            if work is not None and ranks.is_main:
                work.release()  # the folder stays, resumable
            raise
        set_expert_count(family, model.config, target)
        self.model, self.tokenizer, self.result, self._saved = model, tokenizer, result, None
        return model

    def check_model(self, config_dict: dict[str, Any], model_config: Any, *,
                    allow_full_width: bool = False) -> tuple[MoEFamily, int, int]:
        """The family, the expert count and the target of a model, from its configuration alone (`config_dict` as
        config.json holds it, `model_config` the loaded `PretrainedConfig`). Refuses an unsupported model, a target
        its router cannot serve, unequal routing groups and REAM groups too small to hold every expert: callers run it
        before any weight is read."""
        family = family_for_config(config_dict)
        num_experts = expert_count(family, config_dict)
        text_config = model_config.get_text_config()
        top_k = int(text_config.num_experts_per_tok)
        target = self.config.resolve_target(num_experts, top_k)
        if target == num_experts and not allow_full_width:
            raise ValueError(
                f"target_experts={target} equals the model's {num_experts} experts; nothing to compress, choose fewer"
            )
        check_grouped_routing(family, text_config, target, top_k)
        check_plan(self.config, num_experts, target)
        return family, num_experts, target

    def _source_dtype(self, source: SourceCheckpoint) -> torch.dtype:
        """The dtype `from_pretrained(dtype="auto")` would pick: the one config.json records."""
        if self.config.dtype != "auto":
            return TORCH_DTYPES[self.config.dtype]
        text = text_config_dict(source.config)
        recorded = source.config.get("dtype") or source.config.get("torch_dtype") or text.get("dtype") \
            or text.get("torch_dtype") or "float32"
        if recorded not in TORCH_DTYPES:
            raise ValueError(f"unsupported dtype {recorded!r} in {source.folder}/config.json; pass --dtype")
        return TORCH_DTYPES[recorded]

    def _dtype(self):
        return "auto" if self.config.dtype == "auto" else TORCH_DTYPES[self.config.dtype]

    def _load_tokenizer(self, folder, trust_remote_code: bool = False, model_config=None):
        """The folder's tokenizer; `model_config` (ours, native) spares AutoTokenizer the checkpoint's config code."""
        from transformers import AutoTokenizer

        if folder is None or not Path(str(folder)).is_dir():
            raise ValueError("no tokenizer: pass tokenizer=... to compress() for an in-memory model")
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, config=model_config)
        except Exception as error:
            raise ValueError(f"cannot load the tokenizer from {folder}: {error}") from None

    def _load_model(self, source: SourceCheckpoint, device: torch.device):
        from transformers import AutoModelForCausalLM

        dtype = self._dtype()
        implementation = Placement.of(device).experts_implementation(self._source_dtype(source))
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), config=source.transformers_config(), dtype=dtype,
                                                     experts_implementation=implementation)
        return model.to(device)

    @staticmethod
    def _trunk_prefix(family: MoEFamily, source: SourceCheckpoint | None) -> str:
        if source is None:
            return "model.layers."
        for name in source.weight_map:
            parsed = parse_moe_name(family, name)
            if parsed and not parsed.prefix.startswith("mtp."):
                return parsed.prefix
        raise ValueError(f"no MoE expert tensors found in {source.folder}")

    def compress_and_push(self, source: Any, repo_id: str, **kwargs: Any) -> str:
        """Compress, optionally evaluate both models, render the model card and upload; returns the repo URL.
        Keyword arguments are those of `ream_hf.release.hub.compress_and_push` (private, token, evaluate, output_dir, ...)."""
        from .release.hub import compress_and_push

        return compress_and_push(self, source, repo_id, **kwargs)

    # -- output ------------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the checkpoint to a temporary folder, verify it, then move it into place.

        After a streaming run the trunk layers' shards are already written in the work folder: they are
        moved (not copied) into the output, and the work folder is removed once the output is in place. A second
        call copies the first output (the layers' tensors are no longer held), verified again. In a distributed
        run rank 0 writes; every rank returns once the output is in place.
        """
        if self.result is None:
            raise ValueError("nothing to save: call compress() first")
        ranks = distributed.current()
        saved = distributed.on_main(ranks, lambda: self._save_pretrained(output_dir, overwrite))
        if not ranks.is_main:
            self.result.work, self._saved = None, Path(output_dir).resolve()
        return saved

    def _save_pretrained(self, output_dir: str | os.PathLike, overwrite: bool) -> Path:
        result, config = self.result, self.config
        if result.source is not None:
            check_paths(result.source.folder, output=output_dir, work=result.work.folder if result.work else None)
        if self._saved is not None and not result.outputs_complete:
            return self._save_copy(output_dir, overwrite)
        hint = f"finished layers are kept in {result.work.folder}" if result.work else None
        with storage_errors(self._space_needed, Path(output_dir).absolute(), hint), \
                atomic_output_dir(output_dir, overwrite) as folder:
            if result.checkpoint is not None:
                result.checkpoint.finish(folder, result.outputs, result.experts_after, config.to_published_dict(),
                                         self.manifest())
            else:
                write_loaded_model(folder, self.model, self.tokenizer, result.family, result.experts_after,
                                   config.to_published_dict(), config.max_shard_size, self.manifest())
            write_layer_report(folder)
            self._write_card(folder)
            self._verify(folder)
            if result.work is not None:  # a kill after the move below is then seen as complete (cli --resume)
                digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
                result.work.mark_saved(Path(output_dir), digest)
        if result.work is not None:
            result.work.remove()
            result.work = None
        self._saved = Path(output_dir).resolve()
        logger.info("wrote %s", output_dir)
        return Path(output_dir)

    def _write_card(self, folder: Path) -> None:
        """The model card (README.md): method, sizes, calibration, the layer plot; no scores until `ream-hf eval`."""
        from .release.card import render_model_card  # deferred: the card pulls in huggingface_hub's card module

        source = self.result.source
        render_model_card(folder, source_dir=source.folder if source is not None else None)

    def _space_needed(self) -> SpaceNeeded:
        """What the output needs: the plan's figures for a source (set in compress), else the model's tensors."""
        if self._space is not None:
            return self._space
        return SpaceNeeded(sum(t.numel() * t.element_size() for t in self.model.state_dict().values()))

    def _save_copy(self, output_dir: str | os.PathLike, overwrite: bool) -> Path:
        """A streaming run's layers were written into the first output and are no longer held: copy that folder."""
        previous = self._saved
        if not (previous / MANIFEST_NAME).is_file():
            raise ValueError(f"the first save of this run ({previous}) is gone and its layers are no longer in "
                             "memory; call compress() again")
        if Path(output_dir).resolve() == previous:
            raise ValueError(f"{output_dir} is this run's saved output already")
        with storage_errors(self._space_needed, Path(output_dir).absolute()), \
                atomic_output_dir(output_dir, overwrite) as folder:
            for item in sorted(previous.iterdir()):
                if item.is_file():
                    shutil.copy2(item, folder / item.name)
            self._write_card(folder)
            self._verify(folder)
        logger.info("copied %s to %s", previous, output_dir)
        return Path(output_dir)

    def _verify(self, folder: Path) -> None:
        result = self.result
        verify_checkpoint(folder, result.family, result.source, full_width_layers=self._full_width_layers(),
                          dropped_prefixes=result.dropped_prefixes)

    def _full_width_layers(self) -> set[str]:
        result = self.result
        if result.source is None or self.config.mtp != "keep":
            return set()
        prefixes = mtp_prefixes(result.family, result.source)
        return {p.layer_key for n in result.source.real_names
                if n.startswith(prefixes) and (p := parse_moe_name(result.family, n))}

    def manifest(self) -> dict[str, Any]:
        result = self.result
        return {
            "format": "ream-hf manifest v1",
            "ream_hf_version": __version__,
            "source": result.source_name if result.source is not None and result.source.revision is not None
            else published_source(result.source_name),  # a Hub id as given; a local folder by name
            "source_revision": result.source.revision if result.source is not None else None,
            "family": result.family.name,
            "method": self.config.method,
            "experts_before": result.experts_before,
            "experts_after": result.experts_after,
            "calibration": {"sequences": result.calibration_sequences, "tokens": result.calibration_tokens},
            "mtp": {"mode": self.config.mtp, "dropped": list(result.dropped_prefixes)},
            "layers": result.layer_entries,
            # a run resumed on another device: its layers were computed on each of these, in this order
            **({"devices": devices} if len(devices := self._devices()) > 1 else {}),
        }

    def _devices(self) -> list[str]:
        work = self.result.work
        return list(work.state.get("devices") or []) if work is not None else []
