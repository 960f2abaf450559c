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

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer

from ..arch import set_expert_count
from ..config import CONFIG_KEY, ReamConfig

logger = logging.getLogger(__name__)

QUANT_METHOD = "ream"


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

    def update_device_map(self, device_map):
        """Load onto `ReamConfig.device` unless the call chose a device map."""
        if device_map is None and self.quantization_config.device != "cpu":
            return {"": self.quantization_config.device}
        return device_map

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any):
        """Everything `ream-hf compress` refuses before work, refused here before any weight is read: the family,
        the target, the routing groups, MTP layers this path cannot keep, the calibration files, the tokenizer."""
        from ..compressor import ReamCompressor
        from ..io.source import SourceCheckpoint
        from ..pipeline.calibration import check_sources
        from ..pipeline.mtp import mtp_prefixes

        config = self.quantization_config
        self.compressor = ReamCompressor(config)
        family, _, _ = self.compressor.check_model(model.config.to_dict(), model.config)
        if checkpoint_files:
            source = SourceCheckpoint(Path(checkpoint_files[0]).parent)  # its index and shard headers only
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
        self.tokenizer = _load_tokenizer(model.name_or_path)
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


def _load_tokenizer(name_or_path: str):
    """The tokenizer the calibration text is tokenised with: the checkpoint's own (folder or Hub id)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
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


register()
