"""Release evaluation: what `evaluate.py` (serve, score, compare a pair), `lm_eval_tasks.py` (IFEval, GSM8K and
HumanEval through lm-eval), `cache.py`, `checks.py` (preflight) and `settings.py` hold, handed on under one name."""

from ..serve import VLLMServer
from .cache import default_cache_dir, model_hash
from .checks import EvaluationError, MissingNLTKData, check_punkt_tab, preflight, require_vllm
from .evaluate import evaluate_model, evaluate_pair, package_versions, retention, write_results
from .lm_eval_tasks import (HUMANEVAL_TASKS, data_files_from_dir, has_chat_template, humaneval_task_config, pass_at_k,
                            run_lm_eval_humaneval, run_lm_eval_tasks, write_task_configs)
from .settings import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_TIMEOUT, DEFAULT_MAX_TOKENS,
                       GSM8K_VARIANTS, HUB_SOURCES, LM_EVAL_TASKS, METRICS, SCHEMA, TASKS)

__all__ = [
    "DEFAULT_CONCURRENCY", "DEFAULT_HUMANEVAL_MAX_TOKENS", "DEFAULT_HUMANEVAL_TIMEOUT", "DEFAULT_MAX_TOKENS",
    "GSM8K_VARIANTS", "HUB_SOURCES", "HUMANEVAL_TASKS", "LM_EVAL_TASKS", "METRICS", "SCHEMA", "TASKS",
    "EvaluationError", "MissingNLTKData", "VLLMServer", "check_punkt_tab", "data_files_from_dir", "default_cache_dir",
    "evaluate_model", "evaluate_pair", "has_chat_template", "humaneval_task_config", "model_hash", "package_versions",
    "pass_at_k", "preflight", "require_vllm", "retention", "run_lm_eval_humaneval", "run_lm_eval_tasks",
    "write_results", "write_task_configs",
]
