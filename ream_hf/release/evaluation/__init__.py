"""Release evaluation: what `evaluate.py` (serve, score, compare a pair), `lm_eval_tasks.py` (IFEval, GSM8K),
`humaneval.py` (the HumanEval sandbox), `cache.py`, `checks.py` (preflight) and `settings.py` hold, handed on
under one name."""

from ..serve import VLLMServer
from .cache import default_cache_dir, model_hash
from .checks import EvaluationError, MissingNLTKData, check_punkt_tab, preflight, require_vllm
from .evaluate import evaluate_model, evaluate_pair, package_versions, retention, write_results
from .humaneval import (check_program, generate_humaneval_completions, load_humaneval_problems, run_check,
                        run_humaneval, truncate_at_stop)
from .lm_eval_tasks import data_files_from_dir, run_lm_eval_tasks, write_task_configs
from .settings import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_MEMORY,
                       DEFAULT_HUMANEVAL_TIMEOUT, DEFAULT_MAX_TOKENS, GSM8K_VARIANTS, HUB_SOURCES, HUMANEVAL_STOP,
                       LM_EVAL_TASKS, MAX_SERVER_STOPS, METRICS, SCHEMA, TASKS)

__all__ = [
    "DEFAULT_CONCURRENCY", "DEFAULT_HUMANEVAL_MAX_TOKENS", "DEFAULT_HUMANEVAL_MEMORY", "DEFAULT_HUMANEVAL_TIMEOUT",
    "DEFAULT_MAX_TOKENS", "GSM8K_VARIANTS", "HUB_SOURCES", "HUMANEVAL_STOP", "LM_EVAL_TASKS", "MAX_SERVER_STOPS",
    "METRICS", "SCHEMA", "TASKS", "EvaluationError", "MissingNLTKData", "VLLMServer", "check_program",
    "check_punkt_tab", "data_files_from_dir", "default_cache_dir", "evaluate_model", "evaluate_pair",
    "generate_humaneval_completions", "load_humaneval_problems", "model_hash", "package_versions", "preflight",
    "require_vllm", "retention", "run_check", "run_humaneval", "run_lm_eval_tasks", "truncate_at_stop",
    "write_results", "write_task_configs",
]
