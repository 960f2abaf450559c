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
                         scale_fmt: str | None = None) -> Path:
    """The FP8 block-wise twin of a plain checkpoint, laid out as DeepSeek-V3 / Qwen3-*-FP8 publish theirs: every
    2-D linear weight of the decoder layers (MTP layers included) as float8_e4m3fn with a float32
    `weight_scale_inv` per block (partial edge blocks where a dim is not a multiple of the block), quantized with
    transformers' rounding; routers, norms, embeddings, lm_head and MTP heads in bfloat16, routing-bias
    corrections (`e_score_correction_bias`) in float32 as DeepSeek-V3 publishes them."""
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
