"""`ream-hf plan` from config.json alone (no weight read), checked by hand on Qwen3-30B-A3B's published shape; and
`compress` refusing a job whose layer cannot fit the device, with the plan's numbers, before any work."""

import json

import pytest

from ream_hf.cli import main
from ream_hf.pipeline import job_plan as plan_module

# Qwen/Qwen3-30B-A3B's config.json as published on the Hub
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}

# by hand (README, "Planning a job"): H = 2048, D = 768, E = 128, k = 96 kept, 48 layers, vocab 151936, bf16 = 2 bytes
EXPERT = 3 * 2048 * 768  # gate, up, down of one expert: 4,718,592 parameters
ATTENTION = 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048 + 2 * 128  # q, k, v, o, q_norm, k_norm
LAYER = 128 * EXPERT + ATTENTION + 128 * 2048 + 2 * 2048  # experts, attention, router, two norms: 623,120,640
MODEL = 48 * LAYER + 2 * 151936 * 2048 + 2048  # layers, embeddings and lm_head (untied), final norm: 30,532,122,624
REMOVED = 48 * 32 * (EXPERT + 2048)  # 32 experts and their router rows per layer
TOKENS = 3072 * 512


def test_plan_json_of_qwen3_30b_a3b_is_checkable_by_hand(tmp_path, capsys, no_weight_reads):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    assert main(["plan", str(tmp_path), "--target-experts", "96", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["num_layers"], plan["moe_layers"], plan["experts_before"], plan["experts_after"]) == (48, 48, 128, 96)
    assert plan["source_bytes"] == 2 * MODEL == 61_064_245_248 and plan["source_bytes_from"] == "config"
    assert plan["output_bytes"] == 2 * (MODEL - REMOVED) == 46_562_439_168
    assert plan["layer_bytes_max"] == 2 * LAYER == 1_246_241_280
    assert plan["hidden_states_bytes"] == TOKENS * 2048 * 2 == 6_442_450_944
    assert plan["statistics_flops"] == 48 * 6 * 2048 * 768 * 128 * TOKENS  # 91.2 PFLOP: every expert, every token
    assert plan["work_dir_bytes"] == plan["output_bytes"] + 2 * plan["hidden_states_bytes"]
    assert plan["fits_ram"] in (True, False) and plan["estimated_seconds"] > 0


def test_plan_takes_the_index_total_size(tmp_path, capsys, no_weight_reads):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 61_064_245_312}, "weight_map": {"model.norm.weight": "model-00001-of-00016.safetensors"}}))
    assert main(["plan", str(tmp_path), "--compression-ratio", "0.25", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["source_bytes"] == 61_064_245_312 and plan["source_bytes_from"] == "index"
    assert plan["output_bytes"] == 61_064_245_312 - 2 * REMOVED


def test_compress_refuses_a_layer_that_cannot_fit_the_device(qwen3_source, calibration_txt, tmp_path, capsys,
                                                               monkeypatch, no_work_started):
    monkeypatch.setattr(plan_module, "memory_bytes", lambda device: 1_000_000)  # a 1 MB device
    code = main(["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot fit cpu (0.00 GB)" in err and "largest layer is" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [(["--target-experts", "200"], "more than the model's 128 experts"),
                                           ([], "exactly one of")])
def test_plan_refuses_bad_targets(tmp_path, capsys, args, message, no_weight_reads):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    assert main(["plan", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_plan_output_bytes_are_a_real_runs(qwen3_source, calibration_txt, tmp_path, capsys):
    from ream_hf import ReamCompressor, ReamConfig

    assert main(["plan", str(qwen3_source), "--target-experts", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    compressor = ReamCompressor(ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)],
                                           calibration_ratios=None, num_calibration_sequences=4, sequence_length=32))
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert plan["source_bytes_from"] == "safetensors headers"
    assert plan["output_bytes"] == index["metadata"]["total_size"]


def test_plan_of_a_hub_id_downloads_config_and_index_only(tmp_path, capsys, monkeypatch, no_weight_reads):
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if filename != "config.json":
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("snapshot_download called"))
    assert main(["plan", "Qwen/Qwen3-30B-A3B", "--target-experts", "96", "--json"]) == 0
    assert asked == [("Qwen/Qwen3-30B-A3B", "config.json"), ("Qwen/Qwen3-30B-A3B", "model.safetensors.index.json")]
    assert json.loads(capsys.readouterr().out)["output_bytes"] == 2 * (MODEL - REMOVED)


def test_plan_output_bytes_of_an_fp8_source_are_a_real_runs(tmp_path, calibration_txt):
    """An FP8 source's experts leave it as FP8 weights and their float32 block scales."""
    from ream_hf import ReamCompressor, ReamConfig
    from ream_hf.fixtures import fp8_block_checkpoint
    from tests.families import build_family_checkpoint

    source = fp8_block_checkpoint(build_family_checkpoint("deepseek_v3", tmp_path / "plain"), tmp_path / "fp8",
                                  block=(16, 16))
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=4, sequence_length=32)
    plan = plan_module.plan_job(source, config)
    compressor = ReamCompressor(config)
    compressor.compress(str(source))
    compressor.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert abs(plan.output_bytes - written) <= 64  # the routers' float32 bias rows, counted in the config's bf16


def test_plan_counts_the_merge_floor_and_the_neuron_merge(tmp_path, capsys, no_weight_reads):
    """The merge floor and `--merge neurons` run on the layer's token sample: the plan's executed FLOPs grow with
    them and not with the calibration (3072 x 512 tokens here; the sample sized for Qwen3-30B-A3B 128 -> 96: 8 routed
    rows per unknown, 8 x 96 x 768 / 8 = 73,728 tokens)."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))

    from ream_hf import ReamConfig

    def executed(**settings):
        return plan_module.plan_job(tmp_path, ReamConfig(target_experts=96, **settings)).executed_flops

    plain, floor, neurons = executed(prune_fallback=False), executed(), executed(merge="neurons")
    assert plain < floor < neurons
    assert floor - plain == 2 * 3 * 2048 * 768 * 8 * 73728 * (16 + 2) * 48  # group size 16 = 128 / 8
    assert neurons - floor < 0.1 * plain  # a sample, not the calibration: a few % of the job at the paper's calibration
    plan = plan_module.plan_job(tmp_path, ReamConfig(target_experts=96))
    assert (plan.refit_sample_tokens, plan.refit_rows_per_unknown) == (73728, 8.0)
    assert "refit sample      73,728 tokens per layer (8.00 routed rows per unknown)" in plan.summary_lines()
    given = plan_module.plan_job(tmp_path, ReamConfig(target_experts=96, refit_tokens=8192))
    assert given.refit_sample_tokens == 8192 and given.ram_bytes_needed < plan.ram_bytes_needed
