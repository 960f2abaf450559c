"""Greedy-decode with MTP speculative decoding and describe what vLLM's drafter loaded (run as a subprocess by tests).

    python tests/vllm_mtp_probe.py MODEL_DIR PROMPTS_JSON OUT_JSON [--max-tokens N] [--dtype float32]
                                   [--num-speculative-tokens K] [--extra JSON]

Decoding is `tests/vllm_generate.py`'s (same environment, greedy, EOS masked, exactly N new tokens), with
`speculative_config={"method": "mtp", "num_speculative_tokens": K}`. OUT_JSON receives what vllm_generate.py
writes (`tokens`, `logprobs`, `spec_decode`, `moe_layers` of the target model) and `drafter_moe_layers`: the
same description (`vllm_generate.describe_moe`) of every fused-MoE module of the MTP drafter, read inside the
worker, so a test can check that the MTP layer's experts came from the checkpoint, into the right slots
(vLLM loads a checkpoint with missing or extra MTP experts without a word).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_generate  # noqa: E402  (the environment, describe_moe)


def describe_drafter(worker) -> list[dict]:
    """Runs inside the worker (`LLM.collective_rpc`): the drafter model's fused-MoE modules."""
    drafter = getattr(worker.model_runner, "drafter", None)
    model = getattr(drafter, "model", None)
    if model is None:
        return []
    return vllm_generate.describe_moe(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("prompts_json")
    parser.add_argument("out_json")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=1)
    parser.add_argument("--logprobs", type=int, default=2)
    parser.add_argument("--extra", default=None, help="JSON dict of further vllm.LLM keyword arguments")
    args = parser.parse_args(argv)
    for key, value in vllm_generate.ENVIRONMENT.items():
        os.environ.setdefault(key, value)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts_json).read_text(encoding="utf-8"))
    kwargs = dict(model=args.model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
                  seed=0, trust_remote_code=False, disable_log_stats=False,
                  speculative_config={"method": "mtp", "num_speculative_tokens": args.num_speculative_tokens})
    if args.extra:
        kwargs.update(json.loads(args.extra))
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, min_tokens=args.max_tokens,
                            logprobs=args.logprobs or None, seed=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens = [[int(t) for t in o.outputs[0].token_ids] for o in outputs]
    logprobs = [[{str(t): float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs or []]
                for o in outputs]
    spec_decode = {}
    for metric in llm.get_metrics():
        if "spec_decode" in metric.name:
            spec_decode[metric.name] = metric.values if hasattr(metric, "values") else getattr(metric, "value", None)
    result = {
        "tokens": tokens,
        "logprobs": logprobs,
        "spec_decode": spec_decode,
        "moe_layers": llm.apply_model(vllm_generate.describe_moe)[0],
        "drafter_moe_layers": llm.collective_rpc(describe_drafter)[0],
        "vllm_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
    }
    Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
