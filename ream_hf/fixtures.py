"""Tiny models the package builds itself, offline, in seconds: a byte-level BPE tokenizer, a random Qwen3-MoE
checkpoint laid out like the Hub's, and a calibration text. Shared by the demo, the tests and the benchmarks;
nothing in the pipeline depends on them."""

from __future__ import annotations

import math
import random
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-style ChatML template, so chat endpoints and lm-eval's --apply_chat_template work on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the expert router token layer model merge prune weight sum number code data math train "
    "def return import for while if else class self value list print range len true false "
    "one two three four five six seven eight nine ten plus minus times equals answer question "
    "a an of to in is it that with as on by at from this be are was we you they he she"
).split()


DEMO_DOMAINS = ("prose", "arithmetic", "code")  # demo_corpus line i is of kind DEMO_DOMAINS[i % 3]


def demo_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic prose/code/arithmetic lines (line i of kind `DEMO_DOMAINS[i % 3]`): enough structure for a BPE,
    for calibration and for a few seconds of training."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 3
        if kind == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 24))) + ".")
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"Question: what is {a} plus {b}? Answer: {a + b}.")
        else:
            name = rng.choice(["f", "g", "step", "merge", "score"])
            lines.append(f"def {name}(x, y):\n    return x * {rng.randint(1, 9)} + y - {rng.randint(0, 9)}\n")
    return lines


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE on the demo corpus and save it as a fast tokenizer folder.

    A real BPE (not a character map) keeps tokenisation behaviour close to the Hub models'
    while costing about a second and no download.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def hub_style_config(folder: str | Path, renames: dict[str, str]) -> None:
    """Rename config.json keys to what Hub checkpoints use (transformers re-serialises some under new names)."""
    import json

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config = {renames.get(key, key): value for key, value in config.items()}
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_tiny_qwen3_moe(folder: str | Path, *, seed: int = 0, num_experts: int = 16, num_layers: int = 2,
                         hidden_size: int = 128, moe_intermediate_size: int = 64, top_k: int = 4,
                         initializer_range: float = 0.1, dtype=None) -> Path:
    """A random Qwen3-MoE checkpoint + tokenizer, laid out like the Hub's (config key `num_experts`); float32, or
    `dtype` (a torch dtype: bfloat16 like the Hub's checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(folder)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        moe_intermediate_size=moe_intermediate_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden_size // 4, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, max_position_embeddings=1024, initializer_range=initializer_range, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    model.save_pretrained(str(folder))
    hub_style_config(folder, {"num_local_experts": "num_experts"})
    return folder


def train_on_demo_corpus(folder: str | Path, *, steps: int = 60, batch_size: int = 16, sequence_length: int = 128,
                         lr: float = 3e-3, seed: int = 11, threads: int = 1) -> list[float]:
    """Train the checkpoint in `folder` in place on demo text (its own lines, not the calibration's or the held-out
    ones of `demo_corpus`'s other seeds) and save it as the Hub lays it out; returns the training losses.

    60 steps of 16 x 128 tokens take about 10 CPU seconds for the default tiny model and bring its loss from
    ln(vocab) = 6.2 to about 1.9: a model whose compression can be seen to cost something. `threads`: torch threads
    while training (restored after); one is the fastest for matrices this small, and the only sane choice on a
    shared machine, where more threads than free cores slow each step tenfold.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # fresh text for every step (one pass, no repeats): repeated random-word prose is memorised, and compression
    # then "improves" the held-out loss by forgetting some of it
    tokens = steps * batch_size * sequence_length
    ids = torch.tensor(tokenizer("\n".join(demo_corpus(tokens // 12, seed=seed)))["input_ids"])
    if ids.numel() < tokens:
        raise ValueError(f"demo text of {ids.numel()} tokens is too short for {steps} steps")
    batches = ids[:tokens].view(steps, batch_size, sequence_length)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        # cosine decay to a tenth: at a constant rate the last steps' noise decides what the model ends up knowing
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        losses = []
        for batch in batches:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(float(loss.detach()))
        model.eval().save_pretrained(str(folder))
    finally:
        torch.set_num_threads(previous_threads)
    hub_style_config(folder, {"num_local_experts": "num_experts"})
    return losses


def write_demo_calibration(path: str | Path, num_lines: int = 600, seed: int = 1) -> Path:
    path = Path(path)
    path.write_text("\n".join(demo_corpus(num_lines, seed)), encoding="utf-8")
    return path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))



def _save_quantized(src, output: Path, tensors: dict, quantization: dict) -> Path:
    """A quantized checkpoint folder: `tensors` in one shard, the source's config.json with `quantization_config`
    and dtype bfloat16 (as published), the source's side files."""
    import json

    from safetensors.torch import save_file

    from .io import safetensors as st
    from .io.quantization import dequantized_config
    from .io.writer import copy_side_files

    save_file(tensors, str(output / st.SINGLE_NAME), metadata={"format": "pt"})
    config = dict(dequantized_config(src.config, "bfloat16"), quantization_config=quantization)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    copy_side_files(src.folder, output)
    return output


def fp8_block_checkpoint(source: str | Path, output: str | Path, block: tuple[int, int] = (128, 128),
                         scale_fmt: str | None = None, quantization_config: dict | None = None) -> Path:
    """The FP8 block-wise twin of a plain checkpoint, laid out as DeepSeek-V3 / Qwen3-*-FP8 publish theirs: every
    2-D linear weight of the decoder layers (MTP layers included) as float8_e4m3fn with a float32
    `weight_scale_inv` per block (partial edge blocks where a dim is not a multiple of the block), quantized with
    transformers' rounding; routers, norms, embeddings, lm_head and MTP heads in bfloat16, routing-bias
    corrections (`e_score_correction_bias`) in float32 as DeepSeek-V3 publishes them. `quantization_config`: keys
    that replace the written config's (a family's own spelling, e.g. MiniMax-M2's `fmt` and `modules_to_not_convert`)."""
    import torch

    from .arch import family_for_config, parse_moe_name
    from .io.quantization import Fp8BlockFormat
    from .io.source import SourceCheckpoint

    src = SourceCheckpoint(source)
    family = family_for_config(src.config)
    quantization = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    if scale_fmt:
        quantization["scale_fmt"] = scale_fmt
    quantization.update(quantization_config or {})
    fmt = Fp8BlockFormat(quantization)
    output = Path(output)
    output.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in src.iter_tensors(list(src.weight_map)):
        parsed = parse_moe_name(family, name)
        if tensor.dim() == 2 and name.endswith(".weight") and ".layers." in name and \
                not (parsed and parsed.kind == "router") and not name.endswith(("embed_tokens.weight", "head.weight")):
            tensors.update(fmt.quantize(name, tensor, {}))
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = tensor.to(torch.float32)
        else:
            tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    return _save_quantized(src, output, tensors, quantization)


FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4_pack(weight):
    """(blocks, scales) of an (E, in, out) GPT-OSS expert weight in the official MXFP4 layout: per output row, groups
    of 32 input values share an e8m0 exponent (uint8, bias 127) chosen so the group's largest value fits e2m1's 6;
    values round to the nearest e2m1 code, two a byte, low nibble first. The inverse of transformers'
    `convert_moe_packed_tensors`, for test fixtures (the real quantizer is OpenAI's, GPU only)."""
    import torch

    rows = weight.transpose(1, 2).to(torch.float32)  # (E, out, in)
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // 32, 32)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp(min=1e-30) / 6.0)), torch.zeros_like(amax))
    scaled = groups / torch.pow(2.0, exponent).unsqueeze(-1)
    grid = torch.tensor(FP4_E2M1_MAGNITUDES)
    codes = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1) + 8 * (scaled < 0).long()
    codes = codes.reshape(experts, out, width // 32, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def mxfp4_checkpoint(source: str | Path, output: str | Path) -> Path:
    """The MXFP4 twin of a plain GPT-OSS checkpoint, laid out as the official GPT-OSS releases: every expert
    `gate_up_proj` / `down_proj` as `*_blocks` + `*_scales`, the rest (expert biases included) in bfloat16."""
    import torch

    from .io.source import SourceCheckpoint

    src = SourceCheckpoint(source)
    output = Path(output)
    output.mkdir(parents=True)
    tensors = {}
    for name, tensor in src.iter_tensors(list(src.weight_map)):
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_pack(tensor)
        else:
            tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return _save_quantized(src, output, tensors, quantization)


# -- compressed-tensors (Kimi-K2-Thinking / K2.5 / K2.6 INT4, RedHatAI W4A16 / W8A16 / FP8) ---------------------------
def kimi_int4_scheme() -> dict:
    """The `quantization_config` Kimi-K2-Thinking publishes and Kimi-K2.5 / K2.6 adopt ("the same native int4
    quantization method"): W4A16, symmetric INT4 in groups of 32 along the input dim, `pack-quantized`, on the routed
    experts only: attention, shared experts, dense MLPs and lm_head ignored, and in the VL models the vision tower and
    projector too (Kimi-K2.5 / K2.6 keep it in `text_config`)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "format": "pack-quantized", "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "kv_cache_scheme": None,
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*", "re:.*vision_tower.*", "re:.*mm_projector.*"]}


class _RoundToNearest:
    """A compressed-tensors `Converter` (compressed_tensors.entrypoints.convert) that quantizes a plain checkpoint's
    expert projections (`selected` names) with a `quantization_config`'s schemes, as llm-compressor's weight-only
    round-to-nearest pass does: min/max per quantization unit, compressed-tensors' qparams (`calculate_qparams`, or
    `compute_dynamic_scales_and_zp` where it handles the strategy), its compressor for the stored layout. Scales take
    the weight's dtype. Everything else passes through as it is."""

    def __init__(self, quantization: dict, selected) -> None:
        from compressed_tensors.quantization import QuantizationConfig

        self.config = QuantizationConfig.model_validate(quantization)
        self.selected = selected

    def validate(self, tensors) -> None:
        return None

    def get_dependencies(self, weight_name: str) -> set[str]:
        return set()

    def create_config(self):
        return self.config

    def process(self, tensors: dict) -> dict:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
        from compressed_tensors.utils.match import match_quantizable_tensors

        from .io.compressed_tensors import _group_format, observed_min_max

        out = dict(tensors)
        for scheme in self.config.config_groups.values():
            for module, name in list(match_quantizable_tensors(out, self.config.ignore, scheme.targets)):
                if not self.selected(name):
                    continue
                weight = out.pop(name)
                args = scheme.weights
                if str(getattr(args.strategy, "value", args.strategy)) in ("tensor", "group"):
                    scale, zero_point = compute_dynamic_scales_and_zp(weight, args, module=None)
                else:
                    scale, zero_point = calculate_qparams(*observed_min_max(weight, args), args)
                compressor = BaseCompressor.get_value_from_registry(_group_format(self.config, scheme))
                state = {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
                for param, tensor in compressor.compress(state, scheme).items():
                    out[f"{module}.{param}"] = tensor.contiguous()
        return out


def compressed_tensors_checkpoint(source: str | Path, output: str | Path, quantization: dict, *,
                                  in_text_config: bool = False) -> Path:
    """The compressed-tensors twin of a plain checkpoint, written by compressed-tensors' own model-free
    `convert_checkpoint` with `_RoundToNearest`: every routed-expert projection the config's targets and ignore
    list select is quantized (as the published checkpoints quantize experts only); `in_text_config` puts the
    quantization_config in `text_config` as Kimi-K2.5 / K2.6 do."""
    import json

    from compressed_tensors.entrypoints.convert import convert_checkpoint

    from .arch import family_for_config, parse_moe_name
    from .io.source import SourceCheckpoint

    src = SourceCheckpoint(source)
    family = family_for_config(src.config)
    output = Path(output)
    experts_only = lambda name: getattr(parse_moe_name(family, name), "kind", "") == "expert"  # noqa: E731
    convert_checkpoint(str(src.folder), str(output), _RoundToNearest(quantization, experts_only))
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    if in_text_config:
        config["text_config"]["quantization_config"] = config.pop("quantization_config")
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return output


def compressed_tensors_twin(source: str | Path, output: str | Path) -> Path:
    """The bfloat16 twin of a compressed-tensors checkpoint, dequantized by compressed-tensors itself
    (`convert_checkpoint` with its `CompressedTensorsDequantizer`; the quantization_config removed, from text_config
    too): the reference a compressed output is compared against, computed by the format's own library."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint

    import json

    from compressed_tensors.config import CompressionFormat

    from .io.quantization import quantization_config

    declared = quantization_config(json.loads((Path(source) / "config.json").read_text(encoding="utf-8")))
    dequantizer = CompressedTensorsDequantizer(str(source))
    for name, scheme in dequantizer.quant_config.config_groups.items():
        # the dequantizer (0.17) re-infers each group's format as the one it would pack a Linear in, which is
        # pack-quantized for a naive-quantized INT8 checkpoint: it would then find nothing to dequantize
        stored = declared["config_groups"][name].get("format") or declared.get("format")
        if stored not in (None, "mixed-precision"):
            scheme.format = CompressionFormat(stored)
    convert_checkpoint(str(source), str(output), dequantizer)
    return Path(output)


# a DeepSeek-V3 text model shaped as Kimi-K2.5's (MLA with a q LoRA, a dense first layer, a shared expert, sigmoid
# routing with a correction bias in one group, no MTP layer), its dims multiples of the INT4 group of 32
KIMI_K25_TEXT = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1,
                     topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                     topk_method="noaux_tc", kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                     v_head_dim=16, max_position_embeddings=512, num_nextn_predict_layers=0, initializer_range=0.1,
                     tie_word_embeddings=False)
KIMI_K25_VISION = dict(patch_size=14, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2, num_attention_heads=2,
                       num_hidden_layers=1, hidden_size=32, intermediate_size=64)


def build_tiny_kimi_k25(folder: str | Path, text_config: dict | None = None, *, seed: int = 0, dtype=None) -> Path:
    """A random Kimi-K2.5 / K2.6 (`kimi_k25`: a DeepSeek-V3 text model under a MoonViT vision tower) saved in the
    published tensor names: `language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.encoder.blocks.*`
    (fused `wqkv`), `vision_tower.patch_embed.*`, `mm_projector.*`. transformers 5.19 reads those names but writes three
    of them back wrong (its reverse of `blocks -> layers` also renames the text layers, and two prefixes), which are
    mended here; the folder reloads in transformers parameter for parameter. `dtype`: saved as transformers saves the
    model loaded in it (the routing bias stays float32)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, Kimi_K25Config

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(folder)
    text = dict(KIMI_K25_TEXT if text_config is None else text_config, vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = Kimi_K25Config(text_config=text, vision_config=KIMI_K25_VISION, projection_hidden_size=32,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    for module in model.modules():  # bias-corrected routers: make selection differ from scores
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data.copy_(torch.randn(bias.shape) * 0.3)
    mended = (("language_model.model.blocks.", "language_model.model.layers."),
              ("model.mm_projector.", "mm_projector."), ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."))
    for step in ("save", "reload") if dtype is not None else ("save",):
        if step == "reload":
            model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
        model.save_pretrained(str(folder))
        saved = {}
        for name, tensor in load_file(folder / "model.safetensors").items():
            for wrong, right in mended:
                name = right + name[len(wrong):] if name.startswith(wrong) else name
            saved[name] = tensor
        save_file(saved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    written = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    written["architectures"] = ["KimiK25ForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return folder
