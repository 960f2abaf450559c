"""transformers' own entry point: `AutoModelForCausalLM.from_pretrained(src, quantization_config=ReamConfig(...))`.

    import ream_hf  # imports this module, which registers "ream"
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=ReamConfig(target_experts=96,
                                                 method="reap", calibration=["code.jsonl"]))
    model.save_pretrained("out")   # reloads with plain transformers and vLLM, without ream-hf

`ReamHfQuantizer` plugs into transformers' loading lifecycle as GPTQ's quantizer does when it calibrates a
model that is not pre-quantized: before the weights are loaded (the model is on the meta device) it refuses
everything that can be refused from the configuration, the weight index and the calibration files; after they
are loaded it compresses the model in memory with `ReamCompressor` (the same pipeline, calibration and method as
`ream-hf compress`) and returns it.

Unlike a quantization, the result holds no special tensors or modules: it is the source architecture with
fewer experts. So the quantizer detaches itself once it is done (`HfQuantizer.remove_quantization_config`):
the model's `save_pretrained` then takes transformers' ordinary path and writes no `quantization_config` (which
would make transformers and vLLM look for this plug-in), `.to()`, `.half()` and training work as on any model,
and the settings are recorded under `ream_config` instead, with the expert count under the family's own key.

This is a module of its own because it is neither pipeline nor release: it is glue between transformers'
lifecycle and `ReamCompressor`. Importing it registers "ream" with transformers' public registry
(`register_quantization_config` / `register_quantizer` in `transformers.quantizers.auto`), as other quantization
libraries do; `import ream_hf` imports it.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer

from ..arch import set_expert_count
from ..config import CONFIG_KEY, ReamConfig

logger = logging.getLogger(__name__)

QUANT_METHOD = "ream"
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements, decided at load


class ReamHfQuantizer(HfQuantizer):
    """Compresses a model's experts per its `ReamConfig` while `from_pretrained` loads it (see the module doc)."""

    requires_calibration = False  # the source is an ordinary checkpoint; calibration happens here, at load
    quantization_config: ReamConfig

    def __init__(self, quantization_config: ReamConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized:  # config.json itself holds quantization_config {"quant_method": "ream"}
            raise ValueError(
                f"this checkpoint's config.json has a quantization_config with quant_method '{QUANT_METHOD}', which "
                f"ream-hf never writes (its settings go under '{CONFIG_KEY}'); delete that entry to load it as is")
        self.quantization_config.validate()
        self.compressor = None
        self.tokenizer = None
        self.mtp_layers: int | None = None  # set to 0 when the source's MTP layers are dropped

    # -- before the weights are loaded --------------------------------------------------------------
    def update_dtype(self, dtype):
        """`ReamConfig.dtype`, when set, is the dtype the model is loaded and compressed in."""
        import torch

        if self.quantization_config.dtype == "auto":
            return dtype
        return getattr(torch, self.quantization_config.dtype)

    def validate_environment(self, device_map=None, **kwargs: Any) -> None:
        """Refuse, before any weight is read, a `device_map` the compression cannot run on: the layers' statistics and
        merges need every weight of a layer on one device, so the model goes to one device whole. A map over several
        devices or with offload ("disk", or "cpu" beside a GPU) is refused, as is one whose device differs from an
        explicit `ReamConfig.device`; accelerate's placements ("auto", ...) are that one device where there is only one
        (no offload: a model that does not fit is ream-hf compress's job, which streams a layer at a time). The
        config's device follows the map's when none was given."""
        config = self.quantization_config
        device = _map_device(device_map)
        if device is None:
            return
        if config.device is not None and _same_device(config.device) != device:
            raise ValueError(f"device_map places the model on {device} but ReamConfig.device is {config.device!r}: "
                             f"the compression runs where the model is; give one of them, or the same device to both")
        if config.device is None:
            self.quantization_config = replace(config, device=device)

    def update_device_map(self, device_map):
        """The model on `ReamConfig.device`, whole (`validate_environment` has refused any other map); transformers'
        own loading on the CPU when neither names a device."""
        device = self.quantization_config.device
        if device is None or (device_map is None and device == "cpu"):
            return device_map
        return {"": device}

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any):
        """Everything `ream-hf compress` refuses before work, refused here before any weight is read: the family,
        the target, the routing groups, MTP layers this path cannot keep, the calibration files, the tokenizer."""
        from ..compressor import ReamCompressor
        from ..io.quantization import quantization_config
        from ..io.source import SourceCheckpoint
        from ..pipeline.calibration import check_sources
        from ..pipeline.mtp import mtp_prefixes

        config = self.quantization_config
        if checkpoint_files:
            source = SourceCheckpoint(Path(checkpoint_files[0]).parent)  # its index and shard headers only
            # one transformers has no quantizer for is not compared with ours first (`merge_quantization_configs`)
            _refuse_quantized(quantization_config(source.config), model.name_or_path)
        self.compressor = ReamCompressor(config)
        family, _, _ = self.compressor.check_model(model.config.to_dict(), model.config)
        if checkpoint_files:
            found = mtp_prefixes(family, source)
            if found and config.mtp != "drop":
                raise ValueError(
                    f"{model.name_or_path} has multi-token-prediction layers ({', '.join(p + '*' for p in found)}), "
                    f"which transformers drops on load, so from_pretrained cannot {config.mtp} them (mtp="
                    f"'{config.mtp}'); pass ReamConfig(mtp='drop', ...) for a checkpoint without them, or run "
                    "`ream-hf compress` / ReamCompressor(config).compress(folder), which compresses them too")
            if found:
                self.mtp_layers = 0
        check_sources(config.calibration)
        self.tokenizer = _load_tokenizer(model.name_or_path, _load_arguments())
        return model

    # -- after ----------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        """Compress in memory, then leave a plain transformers model that records how it was made."""
        compressor = self.compressor
        compressor.compress(model, tokenizer=self.tokenizer)
        result = compressor.result
        self.remove_quantization_config(model)
        for module in model.modules():  # set by transformers for quantized models (flash-attention dtype choice)
            config = getattr(module, "config", None)
            if config is not None and "_is_quantized" in vars(config):
                del config._is_quantized
        if self.mtp_layers is not None:
            set_expert_count(result.family, model.config, result.experts_after, self.mtp_layers)
        # what ran: in memory, whatever `streaming` said
        model.config.ream_config = replace(compressor.config, streaming=False).to_published_dict()
        model.ream_manifest = compressor.manifest()
        logger.info("compressed %s: %d -> %d experts in %d MoE layers", model.name_or_path, result.experts_before,
                    result.experts_after, len(result.layers))
        self.compressor = self.tokenizer = None
        return model

    # -- transformers asks these of every quantizer --------------------------------------------------------
    def is_serializable(self) -> bool:
        return True  # plain tensors; by the time save_pretrained runs the quantizer has detached itself

    @property
    def is_trainable(self) -> bool:
        return True  # a smaller model of the same architecture


def _map_device(device_map) -> str | None:
    """The one device a `device_map` (as `from_pretrained` hands it to quantizers: None, an accelerate placement or
    a dict of module -> device) puts the whole model on; None for no map; ValueError for several or offload."""
    if device_map is None:
        return None
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > 1:
            raise ValueError(f"device_map={device_map!r} spreads the model over this machine's {gpus} GPUs (or offloads "
                             "it), and the compression needs it on one device: pass device_map='cuda:0' (one GPU), or "
                             "run `ream-hf compress`, which streams one layer at a time")
        return "cuda:0" if gpus else "cpu"
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map={device_map!r} is not a device or a module -> device dict")
    devices = sorted({_same_device(d) for d in device_map.values()})
    if len(devices) > 1 or devices == ["disk"]:
        where = ", ".join(devices)
        raise ValueError(f"device_map places the model on {where}: the compression needs every weight on one device, "
                         "without offload; pass one device (device_map='cuda:0' or 'cpu'), or run `ream-hf compress`, "
                         "which streams one layer at a time")
    return devices[0] if devices else None


def _same_device(device) -> str:
    """A device map's value as one spelling: 0 and "cuda" are "cuda:0", "disk" stays "disk"."""
    import torch

    if device == "disk":
        return "disk"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return str(device)


def _refuse_quantized(found, name: str) -> None:
    """A quantized source (its `quantization_config`, a dict or a config object: FP8, MXFP4, compressed-tensors...)
    would be loaded as transformers' quantized modules, which ream-hf does not merge: refused in one line naming the
    path that handles it."""
    if found is None:
        return
    method = found.get("quant_method") if isinstance(found, dict) else getattr(found, "quant_method", None)
    method = getattr(method, "value", method)
    if method == QUANT_METHOD:
        return
    raise ValueError(f"{name} is a {method} checkpoint, which from_pretrained cannot compress (transformers loads it "
                     f"as {method} modules); run `ream-hf compress {name} ...` (Python: ReamCompressor(config)."
                     f"compress(...)), which reads {method} weights as stored and writes the output in the same format")


def _refuse_quantized_before_merge() -> None:
    """transformers compares a quantized checkpoint's config class with the one passed (`merge_quantization_configs`)
    before any quantizer exists, and raises a class-mismatch error: ours speaks first, with `_refuse_quantized`'s
    line. Installed once (a reload of this module keeps the wrapper, which looks `ReamConfig` up at call time)."""
    original = AutoHfQuantizer.merge_quantization_configs
    if getattr(original, "ream_hf_wrapper", False):
        return

    def merge(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, ReamConfig):
            _refuse_quantized(quantization_config, "this checkpoint")
        return original.__func__(cls, quantization_config, quantization_config_from_args)

    merge.ream_hf_wrapper = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge)


DOWNLOAD_ARGUMENTS = ("revision", "token", "subfolder", "cache_dir", "local_files_only", "proxies")


def _load_arguments() -> dict[str, Any]:
    """The arguments `from_pretrained` was called with that say where files come from (revision, resolved to its
    commit; token; subfolder; cache_dir...) and `trust_remote_code`, for the tokenizer to come from the same place.
    transformers hands a quantizer none of them, so they are read from the `from_pretrained` frame below this one
    (its `download_kwargs`); {} where it is not found (the tokenizer then comes from the model's name as is)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            found = frame.f_locals if frame.f_code.co_name == "from_pretrained" else {}
            if isinstance(found.get("download_kwargs"), dict):
                arguments = {k: v for k, v in found["download_kwargs"].items() if k in DOWNLOAD_ARGUMENTS and v}
                if found.get("trust_remote_code"):
                    arguments["trust_remote_code"] = True
                return arguments
            frame = frame.f_back
        return {}
    finally:
        del frame


def _load_tokenizer(name_or_path: str, arguments: dict[str, Any] | None = None):
    """The tokenizer the calibration text is tokenised with: the checkpoint's own (folder or Hub id), from the same
    revision and subfolder, with the same token and `trust_remote_code` as the model (`_load_arguments`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **(arguments or {}))
    except Exception as error:  # transformers raises several types for a missing or unreadable tokenizer
        raise ValueError(f"cannot load the tokenizer of {name_or_path} (the calibration text needs it): "
                         f"{error}") from None


def register() -> None:
    """Register `ReamConfig` and `ReamHfQuantizer` as transformers' "ream" method. Idempotent; replaces our own
    classes from an earlier import of these modules (importlib.reload), and lets transformers refuse anyone else's."""
    for mapping, cls, register_as in ((AUTO_QUANTIZATION_CONFIG_MAPPING, ReamConfig, register_quantization_config),
                                      (AUTO_QUANTIZER_MAPPING, ReamHfQuantizer, register_quantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is cls:
            continue
        if present is not None and (present.__module__, present.__qualname__) == (cls.__module__, cls.__qualname__):
            del mapping[QUANT_METHOD]
        register_as(QUANT_METHOD)(cls)
    _refuse_quantized_before_merge()


register()
