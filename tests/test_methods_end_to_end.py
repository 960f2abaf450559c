"""REAM, M-SMoE and HC-SMoE end to end (`ream-hf compress` -> save -> verify -> reload), every output checked
against an independent reference.

The reference below is written from METHOD.md with torch and scipy alone; it calls nothing of ream_hf's method
or pipeline. It takes the MoE block inputs of every layer from the *saved* checkpoint run by plain transformers
(hooks on each layer's MoE block, one calibration row at a time): in the paper's sequential mode layer L is
compressed on the outputs of the already compressed layers before it, which is exactly what the saved model
computes up to layer L. From those inputs and the source's tensors it recomputes the statistics (the default
saliency, p^2 ||f|| with the full-softmax p,
gated output signatures, router-logit columns), the distances, each method's groups, the merge weights, and, for
every member of every group, its neuron permutation: Hungarian matching (scipy) of the centroid's neurons to
the member's on cost = distance of the neurons' hidden activations (columns normalised over the tokens) +
distance of their weight rows. `pca_dim` = 3 * hidden makes the method's PCA of the weight rows a rotation, so
with `--weight-features plain` that distance is the plain distance of the unit rows, which the reference computes
without any PCA. Every output expert must then equal the weighted sum of its group's permuted source experts
(`--refit none`: the refit, which changes the down projections after the merge, is tests/test_refit.py's;
`--no-merge-floor`: the floor, which may prune a group instead, is tests/test_merge_floor.py's), and every router
row the centroid's.

Calibration: pre-tokenised rows of different lengths (used as they are, so the reference knows every token;
batches carry padding that must not count), all of them, and an activation sample larger than the tokens
(every token is in it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from transformers import AutoModelForCausalLM

from ream_hf.arch import family_for_config
from ream_hf.cli import main as cli
from ream_hf.io.source import SourceCheckpoint
from ream_hf.io.verify import verify_checkpoint
from tests.conftest import tensors

TARGET, GROUP_SIZE, TOP_K, EXPERTS = 8, 4, 4, 16
IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def calibration_rows(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=["ream", "m_smoe", "hc_smoe"])
def run(request, qwen3_source, ragged_calibration, tmp_path_factory):
    """One method's output (streaming CLI), reloaded by transformers, with the reference's statistics per layer."""
    method = request.param
    output = tmp_path_factory.mktemp(method) / "out"
    hidden = json.loads((qwen3_source / "config.json").read_text())["hidden_size"]
    rows = calibration_rows(ragged_calibration)
    code = cli(["compress", str(qwen3_source), "--method", method, "--target-experts", str(TARGET),
                "--calibration", str(ragged_calibration), "--num-sequences", str(len(rows)), "--batch-size", "4",
                "--group-size", str(GROUP_SIZE), "--pca-dim", str(3 * hidden), "--weight-features", "plain",
                "--refit", "none", "--no-merge-floor", "--output", str(output)])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    inputs = moe_inputs(model, rows)
    source, saved = tensors(qwen3_source), tensors(output)
    manifest = json.loads((output / "ream_manifest.json").read_text())
    layers = [reference_layer(source, f"model.layers.{i}.mlp.", inputs[i]) for i in range(len(inputs))]
    return method, output, model, source, saved, manifest, layers


# -- the reference ---------------------------------------------------------------------------------------------

def moe_inputs(model, rows: list[list[int]]) -> list[torch.Tensor]:
    """(T, H) inputs of every layer's MoE block over all calibration tokens, one row at a time (no padding)."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args, i=i: captured[i].append(args[0][0]))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for row in rows:
                model.model(input_ids=torch.tensor([row]))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(per_layer).double() for per_layer in captured]


def reference_layer(source: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> dict:
    """METHOD.md §1-2 for one layer of the tiny Qwen3-MoE (softmax router, top-k renormalised, SwiGLU experts)."""
    gate = torch.stack([source[f"{prefix}experts.{e}.gate_proj.weight"] for e in range(EXPERTS)]).double()
    up = torch.stack([source[f"{prefix}experts.{e}.up_proj.weight"] for e in range(EXPERTS)]).double()
    down = torch.stack([source[f"{prefix}experts.{e}.down_proj.weight"] for e in range(EXPERTS)]).double()
    logits = x @ source[f"{prefix}gate.weight"].double().T  # (T, E)
    probs = torch.softmax(logits, dim=-1)
    top, chosen = torch.topk(probs, TOP_K, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    acts = torch.nn.functional.silu(torch.einsum("th,edh->etd", x, gate)) * torch.einsum("th,edh->etd", x, up)
    outputs = torch.einsum("etd,ehd->eth", acts, down)  # f_i(x): (E, T, H)
    saliency = torch.zeros(EXPERTS, dtype=torch.float64)
    for e in range(EXPERTS):
        picked = chosen == e  # (T, k)
        tokens = picked.any(dim=1)
        if tokens.any():
            # the default saliency: p_i(x)^2 ||f_i(x)|| with p the softmax over all experts, mean over routed tokens
            saliency[e] = (probs[tokens, e] ** 2 * outputs[e, tokens].norm(dim=1)).mean()
    signatures = (probs.T.unsqueeze(-1) * outputs).mean(dim=1)  # o_i = mean_x g_i(x) f_i(x)
    unit = signatures / signatures.norm(dim=1, keepdim=True)
    sim_out = (unit @ unit.T + 1) / 2
    columns = logits / logits.norm(dim=0, keepdim=True)
    d = torch.cdist(columns.T, columns.T)
    distance = 1 - (sim_out + (1 - d / d.max())) / 2
    distance.fill_diagonal_(0)
    return {"gate": gate, "up": up, "down": down, "acts": acts, "saliency": saliency, "signatures": signatures,
            "distance": distance}


def reference_groups(method: str, ref: dict) -> set[tuple[int, frozenset[int]]]:
    """(centroid, members) of each output expert by METHOD.md §3."""
    saliency, distance = ref["saliency"], ref["distance"]
    if method == "hc_smoe":
        points = ref["signatures"].numpy()
        labels = fcluster(linkage(points, method="average", metric="euclidean"), TARGET, criterion="maxclust")
        groups = set()
        for label in set(labels.tolist()):
            members = [e for e in range(EXPERTS) if labels[e] == label]
            mean = ref["signatures"][members].mean(dim=0)
            representative = min(members, key=lambda e: float((ref["signatures"][e] - mean).norm()))
            groups.add((representative, frozenset(members)))
        return groups
    centroids = torch.argsort(saliency, descending=True)[:TARGET].tolist()  # most salient first
    members = {c: {c} for c in centroids}
    if method == "m_smoe":
        for e in set(range(EXPERTS)) - set(centroids):
            members[min(centroids, key=lambda c: float(distance[e, c]))].add(e)
    else:  # REAM pseudo-pruning: in saliency order, up to C - 1 nearest unassigned non-centroids each
        free = set(range(EXPERTS)) - set(centroids)
        for c in centroids:
            for e in torch.argsort(distance[c]).tolist():
                if len(members[c]) == GROUP_SIZE or not free:
                    break
                if e in free:
                    free.remove(e)
                    members[c].add(e)
    return {(c, frozenset(m)) for c, m in members.items()}


def reference_permutation(ref: dict, centroid: int, member: int) -> torch.Tensor:
    """perm with member neuron perm[n] matched to centroid neuron n (METHOD.md §4), by scipy's Hungarian."""
    def unit_columns(acts: torch.Tensor) -> torch.Tensor:  # (T, D), each neuron's column over the tokens
        return acts / acts.norm(dim=0, keepdim=True)

    def unit_rows(e: int) -> torch.Tensor:  # (D, 3H): gate row, up row, down column of each neuron
        rows = torch.cat([ref["gate"][e], ref["up"][e], ref["down"][e].T], dim=1)
        return rows / rows.norm(dim=1, keepdim=True)

    cost = torch.cdist(unit_columns(ref["acts"][centroid]).T, unit_columns(ref["acts"][member]).T) \
        + torch.cdist(unit_rows(centroid), unit_rows(member))
    rows, columns = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return perm


# -- the checks ----------------------------------------------------------------------------------------------

def test_output_is_a_verified_checkpoint_that_reloads(run, qwen3_source):
    method, output, model, *_ = run
    source = SourceCheckpoint(qwen3_source)
    verify_checkpoint(output, family_for_config(source.config), source)
    assert model.config.num_experts == TARGET
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == TARGET for layer in model.model.layers)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_statistics_and_groups_are_the_methods(run):
    method, _, _, _, _, manifest, layers = run
    for entry, ref in zip(manifest["layers"], layers):
        torch.testing.assert_close(torch.tensor(entry["saliency"], dtype=torch.float64), ref["saliency"],
                                   rtol=1e-4, atol=1e-7)
        groups = {(g["centroid"], frozenset(g["members"])) for g in entry["groups"]}
        assert len(groups) == TARGET and sorted(e for _, m in groups for e in m) == list(range(EXPERTS)), \
            "exactly k groups partitioning the experts"
        assert all(g["members"][0] == g["centroid"] for g in entry["groups"])
        assert groups == reference_groups(method, ref)
        if method == "ream":
            assert max(len(m) for _, m in groups) <= GROUP_SIZE and any(len(m) > 1 for _, m in groups)


def test_every_output_expert_is_the_aligned_weighted_merge_of_its_group(run):
    method, _, _, source, saved, manifest, layers = run
    permuted_somewhere = False
    for entry, ref in zip(manifest["layers"], layers):
        prefix = f"model.layers.{entry['index']}.mlp."
        saliency = ref["saliency"]
        floor = min(0.5, float(saliency[saliency > 0].min()))
        raised = torch.where(saliency > 0, saliency, torch.full_like(saliency, floor))
        for group in entry["groups"]:
            j, centroid, members = group["output_expert"], group["centroid"], group["members"]
            weights = torch.tensor(group["weights"], dtype=torch.float64)
            torch.testing.assert_close(weights, raised[members] / raised[members].sum(), rtol=1e-4, atol=1e-7)
            expected = {name: torch.zeros_like(ref[name][0]) for name in ("gate", "up", "down")}
            unaligned = {name: torch.zeros_like(ref[name][0]) for name in ("gate", "up", "down")}
            for member, weight in zip(members, weights.tolist()):
                perm = reference_permutation(ref, centroid, member)
                permuted_somewhere |= not torch.equal(perm, torch.arange(len(perm)))
                expected["gate"] += weight * ref["gate"][member][perm]
                expected["up"] += weight * ref["up"][member][perm]
                expected["down"] += weight * ref["down"][member][:, perm]
                for name in unaligned:
                    unaligned[name] += weight * ref[name][member]
            for name, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out = saved[f"{prefix}experts.{j}.{proj}.weight"].double()
                torch.testing.assert_close(out, expected[name], rtol=0, atol=1e-6)
                if len(members) > 1:
                    assert not torch.allclose(out, unaligned[name], atol=1e-3), "alignment must matter here"
            # the router row of output expert j is the centroid's
            assert torch.equal(saved[f"{prefix}gate.weight"][j], source[f"{prefix}gate.weight"][centroid])
        assert f"{prefix}experts.{TARGET}.gate_proj.weight" not in saved
    assert permuted_somewhere, "some member needed a non-trivial permutation"
