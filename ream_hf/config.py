"""`ReamConfig`: every setting of a compression run, validated up front and stored in the output.

It follows transformers' quantization configs (`QuantizationConfigMixin`): explicit fields,
`to_dict` / `from_dict` / `to_json_string` / `to_json_file`. The saved checkpoint records it under
`ream_config` in config.json, never as `quantization_config` (which would make transformers and
vLLM expect a quantizer plug-in and refuse the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

PRUNING_METHODS = ("reap", "frequency")
MERGING_METHODS = ("ream", "hc_smoe", "m_smoe")
METHODS = MERGING_METHODS + PRUNING_METHODS
MERGE_MODES = ("activations+weights", "weights", "activations", "avg", "neurons", "none")
# earlier names of the merge modes, still accepted: "logits" meant the experts' hidden activations
MERGE_MODE_ALIASES = {"logits+weights": "activations+weights", "logits": "activations"}
MTP_MODES = ("compress", "keep", "drop")
# saliency: the factor times ||f_i(x)|| on routed tokens (ream_hf/method/stats.py), or routed-token counts
SALIENCY = ("weight", "probability", "probability_squared", "frequency")
SALIENCY_MEANS = ("tokens", "batches")
# defaults chosen by measurement (README "Quality"): method -> (saliency, saliency_mean)
DEFAULT_SALIENCY = {
    "ream": ("probability_squared", "tokens"), "hc_smoe": ("probability_squared", "tokens"),
    "m_smoe": ("probability_squared", "tokens"), "reap": ("probability_squared", "tokens"),
    "frequency": ("frequency", "tokens"),
}
WEIGHT_FEATURES = ("scaled", "plain")
REFIT_MODES = ("none", "down", "router", "router+down")  # closed-form corrections after merging/pruning
# on by default only where it won at 25 % and 50 % on the bench and on the redundant-expert control (README
# "Quality"); methods not measured on both keep "none"
DEFAULT_REFIT = {"ream": "down", "reap": "down", "hc_smoe": "none", "m_smoe": "none", "frequency": "none"}
REFIT_TARGETS = ("residual", "group")
GROUP_SIZE_DIVISOR = 8  # default REAM group size C = E / 8: the paper's 16 for 128 experts, 32 for 256
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ("auto", *TORCH_DTYPES)
# a quantized source written dequantized, or ("fp8") any source written FP8 block-wise (io/quantization.py)
OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "fp8")
CONFIG_KEY = "ream_config"
# how a run goes, not what it writes: these may change when a run is resumed (a device change only moves float
# rounding, and is announced and recorded in the manifest)
RUN_SETTINGS = ("hidden_states_budget_gb", "device")
# settings that never change a byte of the output (tested: spilled, streamed and in-memory runs write the same
# files), so an output does not record them: a run resumed with another budget writes what the first run would have
UNRECORDED_SETTINGS = ("hidden_states_budget_gb", "streaming")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def looks_local(path: str) -> bool:
    """A calibration source is a local file if it exists or carries a file suffix; otherwise a Hub dataset id."""
    return Path(path).exists() or Path(path).suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~"))


@dataclass
class CalibrationSource:
    """One calibration source: a local .txt/.jsonl file or a Hub dataset id.

    `text_field` may name several fields, joined with a blank line (NuminaMath: problem + solution).
    `filter` keeps rows whose field value is in the given list (NuminaMath's `source`).
    """

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str | list[str] = "text"
    filter: dict[str, list[str]] | None = None
    sha256: str | None = None  # a local file's content digest: what outputs record instead of its path (`published`)

    @classmethod
    def parse(cls, value: str | dict | CalibrationSource) -> CalibrationSource:
        if isinstance(value, CalibrationSource):
            return value
        if isinstance(value, str):
            return cls(path=value)
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(
                    f"calibration source has unknown keys {sorted(unknown)}; use path, name, split, text_field, filter"
                )
            return cls(**value)
        raise ValueError(f"calibration source must be a path, a Hub dataset id or a dict, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def published(self) -> dict[str, Any]:
        """`to_dict` as an output records it: a local file or folder by its name and content digest (`sha256`), never
        by a path of this machine (config.json and the manifest reach the Hub); a Hub dataset id as it is."""
        if not looks_local(self.path):
            return self.to_dict()
        path = Path(self.path).expanduser()
        digest = content_sha256(path) if path.exists() else self.sha256
        return {**self.to_dict(), "path": path.name, "sha256": digest}


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, of its files' relative names and bytes (in sorted order)."""
    hasher = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            hasher.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


def paper_calibration_mix() -> tuple[list[CalibrationSource], list[float]]:
    """The REAM paper's mix for coding-oriented models: c4 / NuminaMath-1.5 / the-stack-smol = 0.0 / 0.3 / 0.7."""
    sources = [
        CalibrationSource(path="allenai/c4", name="en", text_field="text"),
        CalibrationSource(
            path="AI-MO/NuminaMath-1.5",
            text_field=["problem", "solution"],
            filter={"source": ["cn_k12", "olympiads"]},
        ),
        CalibrationSource(path="bigcode/the-stack-smol", text_field="content"),
    ]
    return sources, [0.0, 0.3, 0.7]


def _default_sources() -> list[CalibrationSource]:
    return paper_calibration_mix()[0]


def _default_ratios() -> list[float]:
    return paper_calibration_mix()[1]


@dataclass
class ReamConfig(QuantizationConfigMixin):
    """Settings of one compression run. Defaults are the REAM paper's full method.

    Exactly one of `target_experts` (experts kept per MoE layer) and `compression_ratio`
    (fraction of experts removed, e.g. 0.25 for 128 -> 96) must be given.

    Three token samples, nested: each layer keeps one token sample of its hidden states (`layer_sample_tokens`, the
    larger of the two it serves; `sample_tokens` in a saved-statistics index), from which the alignment sample
    (`activation_sample_tokens`: tokens whose activations align neurons before a merge) and the refit sample
    (`refit_tokens`: tokens the least-squares refit fits on) are drawn. The two public fields keep their names
    (config.json's `ream_config` and the `--refit-tokens` flag record them).
    """

    target_experts: int | None = None
    compression_ratio: float | None = None
    method: str = "ream"
    # calibration
    calibration: list[CalibrationSource] = field(default_factory=_default_sources)
    calibration_ratios: list[float] | None = field(default_factory=_default_ratios)
    num_calibration_sequences: int = 3072
    sequence_length: int = 512
    min_sequence_fraction: float = 0.9
    seed: int = 42
    # REAM and its ablations
    group_size: int | None = None  # None: E / 8 (at least ceil(E / target) so every expert fits a group)
    saliency: str | None = None  # None: the method's default (DEFAULT_SALIENCY)
    saliency_mean: str | None = None
    weight_features: str = "scaled"
    # beyond the paper: least-squares corrections of the compressed layer (ream_hf/method/refit.py)
    refit: str | None = None  # None: the method's default (DEFAULT_REFIT)
    refit_target: str = "residual"
    refit_ridge: float = 0.01
    # the refit's sample: tokens per layer it fits on (drawn from the layer's token sample); None: sized from the
    # layer's shape (method/refit.py `sized_refit_config`)
    refit_tokens: int | None = None
    refit_steps: int = 3  # residual refit: how often the layer's error is recomputed and shared again
    prune_fallback: bool = True  # merging: a group whose merge reproduces its gated output on held-out calibration
    # sequences of the refit sample worse than its centroid alone is pruned instead (the merge floor, method/floor.py)
    prune_fallback_margin: float = 0.0  # ... unless the merge's held-out error is lower by more than this fraction
    # REAM: centroids skip an expert within this distance (1 - similarity) of one already chosen (0: the top-k by
    # saliency, the paper's rule; method/grouping.py distinct_centroids)
    distinct_centroids: float = 0.0
    # merging with the down refit: the whole layer is also compressed by pruning alone (its centroids, refit the same
    # way) and the layer keeps whichever has the lower held-out layer-output error (pipeline/layer.py layer_floor)
    layer_floor: bool = True
    gated_similarity: bool = True
    use_router_logits: bool = True
    merge: str = "activations+weights"
    sequential: bool = True
    pca_dim: int = 64
    activation_sample_tokens: int = 32768  # the alignment sample: tokens per layer whose activations align neurons
    # MTP layers (DeepSeek-V3 / GLM-4.5 / Qwen3-Next / Qwen3.5)
    mtp: str = "compress"
    # execution
    streaming: bool = True  # one decoder layer in memory at a time (source folders / Hub ids)
    hidden_states_budget_gb: float = 8.0  # calibration hidden states beyond this spill to memory-mapped files
    max_shard_size: int = 5 * 2**30  # bytes per output safetensors shard
    batch_size: int = 8
    token_chunk_size: int = 2048
    device: str | None = None  # None: the CPU, or under transformers' from_pretrained the device of its device_map
    dtype: str = "auto"
    # None: the source's own storage (a quantized source, FP8 block or MXFP4, in its format); "fp8": FP8 block-wise,
    # 128 x 128 scales, for a plain source too; a dtype: a quantized source dequantized to it
    output_dtype: str | None = None

    quant_method: str = field(default="ream", init=False, repr=False)

    def __post_init__(self) -> None:
        self.calibration = [CalibrationSource.parse(s) for s in self.calibration]
        self.merge = MERGE_MODE_ALIASES.get(self.merge, self.merge)
        if self.method in DEFAULT_SALIENCY:  # an unknown method is refused by validate()
            default_saliency, default_mean = DEFAULT_SALIENCY[self.method]
            self.saliency = default_saliency if self.saliency is None else self.saliency
            self.saliency_mean = default_mean if self.saliency_mean is None else self.saliency_mean
            self.refit = DEFAULT_REFIT[self.method] if self.refit is None else self.refit
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field and the fix; run before any work starts."""
        if (self.target_experts is None) == (self.compression_ratio is None):
            raise ValueError(
                "give exactly one of target_experts (experts kept per layer) or compression_ratio "
                "(fraction removed, e.g. 0.25)"
            )
        if self.target_experts is not None and (
            not isinstance(self.target_experts, int) or isinstance(self.target_experts, bool) or self.target_experts < 1
        ):
            raise ValueError(f"target_experts must be a positive integer, got {self.target_experts!r}")
        if self.compression_ratio is not None and not (0.0 < float(self.compression_ratio) < 1.0):
            raise ValueError(
                f"compression_ratio must be in (0, 1) (fraction of experts removed), got {self.compression_ratio!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}; got {self.merge!r}")
        if self.mtp not in MTP_MODES:
            raise ValueError(f"mtp must be one of {', '.join(MTP_MODES)}; got {self.mtp!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        try:
            torch.device(self.run_device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if self.output_dtype is not None and self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {self.output_dtype!r}")
        if not self.calibration:
            raise ValueError("calibration needs at least one source (a .txt/.jsonl file or a Hub dataset id)")
        if self.calibration_ratios is not None:
            if len(self.calibration_ratios) != len(self.calibration):
                raise ValueError(
                    f"calibration_ratios has {len(self.calibration_ratios)} entries for "
                    f"{len(self.calibration)} calibration sources; give one ratio per source"
                )
            if any(r < 0 for r in self.calibration_ratios) or sum(self.calibration_ratios) <= 0:
                raise ValueError("calibration_ratios must be non-negative with a positive sum")
            total = sum(self.calibration_ratios)
            if not math.isclose(total, 1.0, abs_tol=1e-6):  # refused, not normalised: 0.5 + 0.7 is likely a typo
                suggestion = " ".join(f"{r / total:.4g}" for r in self.calibration_ratios)
                raise ValueError(f"calibration_ratios sum to {total:.6g}, not 1; give the share of each source "
                                 f"(e.g. {suggestion})")
        for name in ("num_calibration_sequences", "sequence_length", "batch_size", "token_chunk_size", "pca_dim",
                     "activation_sample_tokens", "refit_tokens", "refit_steps"):
            value = getattr(self, name)
            if name == "refit_tokens" and value is None:  # sized from the model's shape
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_shard_size, int) or self.max_shard_size < 1:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {self.max_shard_size!r}")
        if self.hidden_states_budget_gb < 0:
            raise ValueError(f"hidden_states_budget_gb must be >= 0, got {self.hidden_states_budget_gb}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 0):
            raise ValueError(f"group_size must be an integer >= 0 (0 = M-SMoE rule) or None (E / "
                             f"{GROUP_SIZE_DIVISOR}), got {self.group_size!r}")
        if self.saliency not in SALIENCY:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCY)}; got {self.saliency!r}")
        if self.saliency_mean not in SALIENCY_MEANS:
            raise ValueError(f"saliency_mean must be one of {', '.join(SALIENCY_MEANS)}; got {self.saliency_mean!r}")
        if self.method == "frequency" and self.saliency != "frequency":
            raise ValueError(f"method 'frequency' ranks experts by routed-token counts; saliency={self.saliency!r} "
                             "contradicts it: use method='reap' with that saliency, or leave saliency unset")
        if self.refit not in REFIT_MODES:
            raise ValueError(f"refit must be one of {', '.join(REFIT_MODES)}; got {self.refit!r}")
        if self.refit_target not in REFIT_TARGETS:
            raise ValueError(f"refit_target must be one of {', '.join(REFIT_TARGETS)}; got {self.refit_target!r}")
        if not isinstance(self.refit_ridge, (int, float)) or isinstance(self.refit_ridge, bool) or not self.refit_ridge > 0:
            raise ValueError(f"refit_ridge must be a number > 0 (relative to the mean Gram diagonal), got {self.refit_ridge!r}")
        if not isinstance(self.distinct_centroids, (int, float)) or isinstance(self.distinct_centroids, bool) \
                or not 0.0 <= self.distinct_centroids < 1.0:
            raise ValueError(f"distinct_centroids must be a distance in [0, 1), got {self.distinct_centroids!r}")
        if not 0.0 <= self.prune_fallback_margin < 1.0:
            raise ValueError(f"prune_fallback_margin must be in [0, 1), got {self.prune_fallback_margin!r}")
        if self.weight_features not in WEIGHT_FEATURES:
            raise ValueError(f"weight_features must be one of {', '.join(WEIGHT_FEATURES)}; got {self.weight_features!r}")
        if not (0.0 < self.min_sequence_fraction <= 1.0):
            raise ValueError(f"min_sequence_fraction must be in (0, 1], got {self.min_sequence_fraction}")

    # -- derived ----------------------------------------------------------------------------
    def resolve_target(self, num_experts: int, top_k: int) -> int:
        """Experts to keep in a layer of `num_experts`; refuses targets the router cannot serve."""
        if self.target_experts is not None:
            target = self.target_experts
        else:
            target = round(num_experts * (1.0 - float(self.compression_ratio)))
        if target > num_experts:
            raise ValueError(
                f"target_experts={target} is more than the model's {num_experts} experts; choose fewer"
            )
        if target < top_k:
            raise ValueError(
                f"target_experts={target} is below the router's top-k ({top_k}); keep at least {top_k} experts"
            )
        return target

    def resolve_group_size(self, num_experts: int, target: int) -> int:
        """REAM's group size C for a layer of `num_experts` kept to `target`: the given value, or E / 8 raised to
        ceil(E / target) so that `target` groups hold every expert. Whether an explicit C can hold them is
        `method.planning.check_plan`'s one rule, checked before any work starts."""
        if self.group_size is None:
            return max(num_experts // GROUP_SIZE_DIVISOR, -(-num_experts // target), 1)
        return self.group_size

    @property
    def run_device(self) -> str:
        """The device the compression runs on: `device`, or the CPU when none was given."""
        return self.device or "cpu"

    @property
    def is_merging(self) -> bool:
        return self.method in MERGING_METHODS

    @property
    def aligns_activations(self) -> bool:
        """Whether merging aligns neurons by their hidden activations (and so needs a token sample of them)."""
        return self.is_merging and self.merge in ("activations+weights", "activations")

    @property
    def layer_sample_tokens(self) -> int:
        """Size of each layer's token sample, the one sample of hidden states the statistics pass keeps: large enough
        for the alignment sample (`activation_sample_tokens`) and the refit's (`refit_tokens`), which are drawn from
        it (0: neither is needed, no sample). Needs a sized `refit_tokens` (method/refit.py `sized_refit_config`)
        where the sample is drawn."""
        uses_sample = self.refit != "none" or (self.is_merging and (self.prune_fallback or self.merge == "neurons"))
        if uses_sample and self.refit_tokens is None:
            raise ValueError("refit_tokens is sized from the model's layer shape: size it first (sized_refit_config)")
        return max(self.activation_sample_tokens if self.aligns_activations else 0,
                   self.refit_tokens if uses_sample else 0)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "calibration":
                value = [s.to_dict() for s in value]
            out[f.name] = value
        return out

    def to_published_dict(self) -> dict[str, Any]:
        """`to_dict` as written into an output's config.json (`ream_config`): calibration files by name and content
        digest (`CalibrationSource.published`), so that nothing written holds a path of this machine; the device it ran
        on; not the `UNRECORDED_SETTINGS`, which change no byte of the output."""
        recorded = {k: v for k, v in self.to_dict().items() if k not in UNRECORDED_SETTINGS}
        return {**recorded, "calibration": [s.published() for s in self.calibration], "device": self.run_device}

    def output_settings(self) -> dict[str, Any]:
        """`to_dict` without `RUN_SETTINGS`: every setting that defines the output's bytes (a resume needs the same)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_SETTINGS}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        data = {k: v for k, v in dict(config_dict).items() if k != "quant_method"}
        unknown = set(data) - {f.name for f in fields(cls) if f.init}
        if unknown:
            raise ValueError(f"unknown ReamConfig fields {sorted(unknown)}")
        return super().from_dict(data, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ReamConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ReamConfig:
        """Read the settings back from a compressed checkpoint's config.json."""
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} has no config.json; give the folder of a ream-hf checkpoint")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if CONFIG_KEY not in config:
            raise ValueError(f"{config_path} has no '{CONFIG_KEY}' entry: it was not written by ream-hf")
        return cls.from_dict(config[CONFIG_KEY])
