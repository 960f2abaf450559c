"""`torchrun --nproc-per-node 2` on the CPU (gloo) writes the single process's output, byte for byte, and resumes
after a rank is killed. The model has a dense first layer, grouped routing and an MTP layer (GLM-4.5 layout), so
every kind of layer is split over the ranks; REAM merges, so the alignment sample is gathered and merging is
shared out too. Both runs use one thread per process (torchrun's default; the single-process run sets it), so the
GEMMs add in one order."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ream_hf.cli import main
from tests.conftest import snapshot
from tests.families import build_family_checkpoint
from ream_hf.kill_points import ENV as KILL_ENV
from tests.test_mtp import add_mtp_layers

@pytest.fixture(scope="module")
def job(tmp_path_factory, calibration_txt):
    folder = tmp_path_factory.mktemp("distributed")
    source = add_mtp_layers(build_family_checkpoint("glm4_moe", folder / "source", num_hidden_layers=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}

    def args(output, work, *extra):
        return ["compress", str(source), "--target-experts", "8", "--method", "ream", "--group-size", "4",
                "--calibration", str(calibration_txt), "--num-sequences", "10", "--sequence-length", "32",
                "--batch-size", "2", "--max-shard-size", "300000", "--output", str(output), "--work-dir", str(work),
                # the refit on a token sample gathered from both ranks; the saliency's mean over batches counts
                # every rank's batches (the manifest records the saliency)
                "--refit", "down", "--refit-tokens", "64", "--saliency-mean", "batches", *extra]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the GEMMs then add in the same order
    try:
        assert main(args(folder / "single", folder / "w1")) == 0
    finally:
        torch.set_num_threads(threads)
    return folder, env, args


def torchrun(env, module, arguments, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", module, *arguments], env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_write_the_single_process_output(job):
    folder, env, args = job
    run = torchrun(env, "ream_hf.cli", args(folder / "two", folder / "w2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1, "rank 0 alone reports (and writes)"
    assert snapshot(folder / "two") == snapshot(folder / "single")
    manifest = json.loads((folder / "two" / "ream_manifest.json").read_text())
    assert [entry["layer"] for entry in manifest["layers"]] == ["model.layers.1", "model.layers.2", "model.layers.3"]
    # the down refit (computed on rank 0, broadcast) ran and changed weights, so the equality above covers it
    checks = [entry["refit"] for entry in manifest["layers"]]
    assert all(c["mode"] == "down" and c["heldout_tokens"] > 0 for c in checks) and any(c["kept"] for c in checks), checks


def test_two_ranks_resume_after_a_rank_is_killed(job):
    folder, env, args = job
    # rank 0 (the one that writes) kills itself between the third layer's shard part and its commit
    killed = torchrun({**env, KILL_ENV: "layer-written:3"}, "ream_hf.cli", args(folder / "resumed", folder / "w3"))
    assert killed.returncode != 0 and not (folder / "resumed").exists()  # rank 0 SIGKILLed, torchrun stopped rank 1
    assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-2000:]
    state = json.loads((folder / "w3" / "state.json").read_text())
    assert state["finished_layers"] == 2
    assert sorted(p.name for p in (folder / "w3" / "hidden-00002").iterdir()) == [f"{b:06d}.pt" for b in range(5)], \
        "both ranks wrote their batches' inputs of layer 2"
    resumed = torchrun(env, "ream_hf.cli", args(folder / "resumed", folder / "w3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert snapshot(folder / "resumed") == snapshot(folder / "single")


def test_a_refusal_ends_every_rank(job):
    """Rank 0 alone looks at the folders (the output exists, no --overwrite): every rank ends with the same one-line
    error and exit status, none waits for the others, nothing is created."""
    folder, env, args = job
    before = sorted(p.name for p in folder.iterdir())
    run = torchrun(env, "ream_hf.cli", args(folder / "single", folder / "w4"), timeout=300)
    assert run.returncode != 0
    message = f"error: output folder {folder / 'single'} already exists; choose another or pass --overwrite"
    assert run.stderr.count(message) == 2, run.stderr[-3000:]  # one per rank (their lines may interleave)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_every_sum_the_accumulator_adds_to_is_reduced():
    """A distributed run reduces exactly `running_sums()`: a statistic added to LayerStatsAccumulator without listing
    its sums there would be silently wrong on several ranks. Every tensor that `add` changes must be listed."""
    from torch import nn

    from ream_hf.arch import ExpertWeights
    from ream_hf.method.experts import Activation
    from ream_hf.method.stats import LayerStatsAccumulator
    from ream_hf.pipeline.distributed import OrderedReduction, Ranks

    torch.manual_seed(0)
    weights = ExpertWeights(torch.randn(6, 8, 16), torch.randn(6, 8, 16), torch.randn(6, 16, 8))
    x, logits = torch.randn(40, 16), torch.randn(40, 6)
    topk_w, topk_i = torch.softmax(logits, -1).topk(2, dim=-1)
    for dense in (True, False):
        acc = LayerStatsAccumulator(weights, Activation("glu", act_fn=nn.SiLU()), "softmax", dense=dense,
                                    with_logit_gram=dense, sample_positions=torch.tensor([1, 30]))
        before = {name: t.clone() for name, t in vars(acc).items() if isinstance(t, torch.Tensor)}
        acc.add(x, logits, topk_w, topk_i)
        changed = {name for name, t in vars(acc).items() if name in before and not torch.equal(before[name], t)}
        assert changed and changed <= set(acc.running_sums()), changed - set(acc.running_sums())

    # batch by batch, in order, the reduction adds what a plain accumulation adds (up to float association)
    plain = LayerStatsAccumulator(weights, Activation("glu", act_fn=nn.SiLU()), "softmax", dense=True)
    ordered = LayerStatsAccumulator(weights, Activation("glu", act_fn=nn.SiLU()), "softmax", dense=True)
    reduction = OrderedReduction(ordered, [0, 25], 40, Ranks())
    for batch, rows in enumerate((slice(0, 25), slice(25, 40))):
        plain.add(x[rows], logits[rows], topk_w[rows], topk_i[rows])
        reduction.add(batch, x[rows], logits[rows], topk_w[rows], topk_i[rows])
    a, b = plain.finalize(), reduction.finalize()
    assert torch.equal(a.frequency, b.frequency) and a.saliency.keys() == b.saliency.keys()
    assert all(torch.allclose(a.saliency[name], b.saliency[name]) for name in a.saliency)
    assert torch.allclose(a.output_signatures, b.output_signatures, rtol=1e-5, atol=1e-6)


def test_two_ranks_write_the_single_process_output_where_the_layer_floor_falls_back(job, monkeypatch):
    """The layer floor's fallback (the pruned layer, computed on rank 0 and broadcast) forced in every layer
    (tests/forced_layer_floor.py): two ranks write what one process writes, and every layer where a merge survived
    the group floor fell back."""
    import dataclasses

    from ream_hf.pipeline import layer as layer_module

    folder, env, args = job
    refit_down = layer_module.refit_down
    monkeypatch.setattr(layer_module, "refit_down", lambda *a: dataclasses.replace(refit_down(*a),
                                                                                   heldout_error_after=float("inf")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args(folder / "forced-single", folder / "w5")) == 0
    finally:
        torch.set_num_threads(threads)
    run = torchrun(env, "tests.forced_layer_floor", args(folder / "forced-two", folder / "w6"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert snapshot(folder / "forced-two") == snapshot(folder / "forced-single")
    manifest = json.loads((folder / "forced-two" / "ream_manifest.json").read_text())
    floors = [entry["refit"].get("layer_floor") for entry in manifest["layers"]]
    assert any(f is not None for f in floors), floors
    for entry, floor in zip(manifest["layers"], floors):
        if floor is None:  # the group floor left no merge in this layer: nothing for the layer floor to compare
            assert all(len(group["members"]) == 1 for group in entry["groups"]), entry["groups"]
        else:
            assert not floor["merged"], floor
