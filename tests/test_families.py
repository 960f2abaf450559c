"""Every supported family end to end: build, compress (REAP and frequency), save, reload, forward."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ream_hf.arch import family_for_config, parse_moe_name, router_tensors
from ream_hf.pipeline.skeleton import fp32_tensors
from tests.conftest import tensors
from tests.families import FAMILIES, MORE_FAMILIES, assert_pruned_bit_exact, build_family_checkpoint, compress

ALL_FAMILIES = FAMILIES + MORE_FAMILIES


class Checkpoints(dict):
    """Family -> its tiny checkpoint, built on first use (a `-k` run builds only the families it tests)."""

    def __init__(self, folder, **kwargs):
        super().__init__()
        self.folder, self.kwargs = folder, kwargs

    def __missing__(self, family):
        self[family] = build_family_checkpoint(family, self.folder(family) / "source", **self.kwargs)
        return self[family]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp)


def names_and_shapes(folder):
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            out.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
    return out


@pytest.mark.parametrize("method", ["reap", "frequency", "ream"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_compresses_saves_and_reloads(family, method, sources, calibration_txt, tmp_path):
    source = sources[family]
    compressor = compress(source, calibration_txt, tmp_path / "out", method=method, streaming=True)
    src_config = json.loads((source / "config.json").read_text())
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = family_for_config(src_config)
    count_key = next(k for k in arch.expert_count_keys if k in src_config)
    assert out_config[count_key] == 8 and set(out_config) == set(src_config) | {"ream_config"}
    src, out = names_and_shapes(source), names_and_shapes(tmp_path / "out")
    assert set(out) <= set(src), "output names follow the source's naming"
    dropped = set(src) - set(out)
    assert all(".experts." in n for n in dropped), "only expert tensors disappear"
    if any(getattr(parse_moe_name(arch, n), "kind", None) == "fused" for n in src):  # fused on disk (GPT-OSS,
        #                                                                              Granite-MoE): same names
        assert not dropped and all(out[n][0] == 8 for n in out if ".experts." in n)
    else:  # per-expert on disk: experts 8..15 gone, 0..7 kept
        assert dropped and all(int(n.split(".experts.")[1].split(".")[0]) >= 8 for n in dropped)
    for name, shape in out.items():
        if parse_moe_name(arch, name) is None:
            assert shape == src[name], name
    moe_layers = [r.index for r in compressor.result.layers]
    assert moe_layers, "the family's MoE layers were found"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    for index in moe_layers:
        block = getattr(model.model.layers[index], arch.block_attr)
        assert getattr(block, arch.experts_attr).down_proj.shape[0] == 8
        assert router_tensors(arch, block)["weight"].shape[0] == 8
    logits = model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits
    assert logits.shape == (1, 6, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_same_expert_count_reproduces_logits_exactly(family, sources, calibration_txt, tmp_path):
    source = sources[family]
    compress(source, calibration_txt, tmp_path / "out", target=16, streaming=True, allow_full_width=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    before = in_fresh_memory(AutoModelForCausalLM.from_pretrained(str(source)).eval())(ids).logits
    after = in_fresh_memory(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval())(ids).logits
    assert torch.equal(before, after)


def in_fresh_memory(model):
    """The model with its tensors copied out of the memory-mapped shards: CPU GEMMs can round differently with the
    address alignment of their operands (Granite-MoE-Hybrid's experts, 1 ulp apart when the same bytes sit at another
    offset of another file), and the two files' offsets differ with their headers."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    return model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_routed_forward_is_bit_identical_to_the_family_experts_module(family):
    """The compressor re-forwards calibration data through `routed_forward` instead of transformers' experts
    loop (faster on CPU); the next layer's statistics depend on it being exactly the same computation."""
    from ream_hf.arch import decoder_layers, experts, moe_block
    from ream_hf.arch import read_expert_weights
    from ream_hf.method.experts import activation_for, routed_forward
    from tests.families import family_config

    # Granite's fixture has non-square fused experts (2D != H, so that a transposed read or write fails the other
    # tests); at its D = 16 the experts loop's GEMMs block their sums otherwise than routed_forward's (1 ulp apart,
    # as for any family at some widths): bit-identity is checked at the width where the two compute alike
    config = family_config(family, 64, **({"intermediate_size": 32} if family.startswith("granitemoe") else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    adapter = family_for_config(config.to_dict())
    module = next(experts(adapter, block) for layer in decoder_layers(model)
                  if (block := moe_block(adapter, layer)) is not None)
    generator = torch.Generator().manual_seed(1)
    tokens, top_k = 37, int(config.get_text_config().num_experts_per_tok)
    x = torch.randn(tokens, config.get_text_config().hidden_size, generator=generator)
    index = torch.stack([torch.randperm(module.num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    scores = torch.rand(tokens, top_k, generator=generator)
    with torch.no_grad():
        want = module(x, index, scores)
        got = routed_forward(read_expert_weights(adapter, module), activation_for(adapter, module), x, index, scores)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", ["longcat_flash", "llama4", "nemotron_h", "step3p5", "kimi_linear",
                                        "qwen3_omni_moe"])
def test_refused_family_names_what_is_missing(model_type):
    """Families whose shape the method cannot honour are refused from config.json alone, before any read, with the
    reason (as the CLI prints it), also when the decoder's settings sit in text_config."""
    from ream_hf.arch.families import REFUSED_FAMILIES

    for config in ({"model_type": model_type, "num_experts": 8},
                   {"model_type": "wrapper", "text_config": {"model_type": model_type, "num_local_experts": 8}}):
        with pytest.raises(ValueError) as refused:
            family_for_config(config)
        assert str(refused.value).endswith(REFUSED_FAMILIES[model_type]) and "not supported" in str(refused.value)


# -- bfloat16 checkpoints, as most families are published ------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_sources(tmp_path_factory):
    return Checkpoints(lambda family: tmp_path_factory.mktemp(f"{family}-bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_bfloat16_family_prunes_bit_exact_streaming_and_in_memory(family, bf16_sources, calibration_txt, tmp_path):
    """Both paths route exactly as transformers does in bfloat16 (float32 e_score_correction_bias, GPT-OSS router
    and expert biases, Qwen2-MoE's shared-expert gate) and write the same checkpoint: kept rows bit-exact."""
    source = bf16_sources[family]
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    compress(source, calibration_txt, tmp_path / "streamed", streaming=True)
    compress(source, calibration_txt, tmp_path / "in-memory", streaming=False)
    streamed, in_memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[n], in_memory[n]) for n in streamed)
    manifests = [json.loads((tmp_path / f / "ream_manifest.json").read_text())["layers"] for f in ("streamed", "in-memory")]
    assert manifests[0] == manifests[1], "same routing statistics on both paths"
    assert_pruned_bit_exact(source, tmp_path / "streamed")
    expert_biases = [t for n, t in streamed.items() if n.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias"))]
    assert all(t.abs().sum() > 0 for t in expert_biases) and (family == "gpt_oss") == bool(expert_biases)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"), dtype=torch.bfloat16).eval()
    logits = model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits
    assert torch.isfinite(logits).all()
    biases = {n: b for n, b in model.state_dict().items() if n.endswith("e_score_correction_bias")}
    assert bool(biases) == ("e_score_correction_bias" in family_for_config(model.config.to_dict()).router_tensors)
    kept_fp32 = fp32_tensors(model, torch.bfloat16)  # as transformers keeps them: MiniMax-M2's is bfloat16
    assert all((b.dtype == torch.float32) == bool(kept_fp32 and kept_fp32.search(n)) for n, b in biases.items())
    assert (family in ("deepseek_v3", "glm4_moe", "deepseek_v32", "glm_moe_dsa", "dots1", "ernie4_5_moe",
                       "exaone_moe", "solar_open")) == \
        any(b.dtype == torch.float32 for b in biases.values())


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_ream_streaming_equals_in_memory(family, sources, calibration_txt, tmp_path):
    """REAM (merging) writes the same bytes whether the layers stream from disk or the model is loaded whole."""
    compress(sources[family], calibration_txt, tmp_path / "streamed", method="ream", streaming=True)
    compress(sources[family], calibration_txt, tmp_path / "in-memory", method="ream", streaming=False)
    streamed, in_memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[n], in_memory[n]) for n in streamed)


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_mtp_layer_compressed_streaming_and_in_memory(family, calibration_txt, tmp_path):
    """DeepSeek-V3.2's and GLM-5's MTP layer (its indexer included, copied as stored) compressed with the trunk by
    REAM, the same bytes on both paths; the output reloads with the trunk's 8 experts."""
    from tests.test_mtp import add_mtp_layers

    source = add_mtp_layers(build_family_checkpoint(family, tmp_path / "source"))
    compress(source, calibration_txt, tmp_path / "streamed", method="ream", streaming=True)
    compress(source, calibration_txt, tmp_path / "in-memory", method="ream", streaming=False)
    streamed, in_memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[n], in_memory[n]) for n in streamed)
    src = tensors(source)
    mtp = {n for n in streamed if n.startswith("model.layers.3.")}
    assert {n for n in mtp if ".experts." in n} == {f"model.layers.3.mlp.experts.{e}.{p}.weight" for e in range(8)
                                                    for p in ("gate_proj", "up_proj", "down_proj")}
    indexer = [n for n in src if n.startswith("model.layers.3.self_attn.indexer.")]
    assert indexer and all(torch.equal(streamed[n], src[n]) for n in indexer), "the indexer is copied as stored"
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed")).eval()
    assert model.model.layers[2].mlp.experts.down_proj.shape[0] == 8
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


@pytest.mark.parametrize("family", ["glm4v_moe", "qwen3_vl_moe"])
def test_vlm_text_model_compressed_vision_tower_kept(family, calibration_txt, tmp_path):
    """GLM-4.5V and Qwen3-VL-MoE: the text model is built as GLM-4.5 / Qwen3-MoE from text_config (the same logits
    on text, bit for bit) and compressed by REAP and REAM; the vision tower (`model.visual.*`) is copied as stored;
    the output reloads as the vision-language model with 8 experts. In memory it is refused (the streaming loader
    reads the published names)."""
    import transformers

    from ream_hf.io.source import SourceCheckpoint
    from tests.families import build_vlm_checkpoint

    source = build_vlm_checkpoint(family, tmp_path / "source")
    vlm = transformers.AutoModelForImageTextToText.from_pretrained(str(source), dtype=torch.float32).eval()
    text = AutoModelForCausalLM.from_config(SourceCheckpoint(source).transformers_config(), dtype=torch.float32).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in vlm.state_dict().items() if ".visual." not in k}
    text.load_state_dict(state, strict=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    assert torch.equal(vlm(input_ids=ids).logits, text(input_ids=ids).logits)

    src = tensors(source)
    for method in ("reap", "ream"):
        compress(source, calibration_txt, tmp_path / method, method=method, streaming=True)
        out = tensors(tmp_path / method)
        visual = [n for n in src if n.startswith("model.visual.")]
        assert visual and all(torch.equal(out[n], src[n]) for n in visual), "vision tower copied as stored"
    assert_pruned_bit_exact(source, tmp_path / "reap")
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "ream")).eval()
    assert model.model.language_model.layers[1].mlp.experts.down_proj.shape[0] == 8
    assert torch.isfinite(model(input_ids=ids).logits).all()
    with pytest.raises(ValueError, match="streaming loader only"):
        compress(source, calibration_txt, tmp_path / "in-memory", streaming=False)
