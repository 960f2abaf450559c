"""Compression quality on a small MoE whose experts specialise: per-domain perplexity and KL to the original.

The model is `train_tiny_moe.py`'s Qwen3-MoE (4 layers, 32 experts, top-4) trained on local prose,
Python code and arithmetic word problems; it is trained on first use (about 10 minutes on 2 cores) and
cached. Each method compresses it from the saved folder with a calibration mix of the three domains'
calibration files (equal thirds by default); the compressed checkpoint is written (and verified) by
save_pretrained to a temporary folder, reloaded, and scored on held-out text that neither training nor
calibration saw:
  ppl <domain>  exp(mean next-token loss) on `--heldout-sequences` x 256 tokens per domain
  mean KL       KL(original || compressed) of the next-token distributions, float32, averaged over every
                held-out position of the three domains (per-domain values in the details table / JSON)

    python eval/bench_quality.py                                  # 5 methods x 25 % / 50 %, ~6 min (+13 min training)
    python eval/bench_quality.py --methods ream reap --ratios 0.5 --group-size 8
    python eval/bench_quality.py --methods reap "ream:group_size=8,merge=none" "ream:mix=0:1:0"
    python eval/bench_quality.py --ablation                       # REAM ablation grid, both ratios (~45 min)
    python eval/bench_quality.py --redundant-control --ratios 0.5 # experts made redundant: can merging win?
    python eval/bench_quality.py --methods ream reap redundant:ream redundant:reap   # both models in one table
    python eval/bench_quality.py --model-dir ~/.cache/ream-hf/tiny-moe-v1-upcycled   # after
        python eval/train_tiny_moe.py --expert-init upcycled --output ~/.cache/ream-hf/tiny-moe-v1-upcycled

On a 2-core machine shared with other jobs, `--threads 1` is several times faster than 2 (OpenMP
threads wait on each other when either is descheduled).

A method may carry overrides after a colon, comma separated: any ReamConfig field (group_size, merge,
use_router_logits, gated_similarity, sequential, ...), `mix=P:C:M`, the calibration ratios of
prose:code:math for that run, or the diagnostics `merge_weights=uniform|frequency|centroid:W` (replaces
the saliency merge weights after planning) and `alignment_sample=per_expert` (the reference code's alignment
activations: each expert on its own tokens); neither is a ream_hf option.

`regime=NAME` (NAME in REGIMES: qwen3-30b-a3b, qwen3-235b-a22b, glm-4.5-air, deepseek-v3, kimi-k2) sets the
refit's sample (`refit_tokens`) so that its routed rows per unknown, refit_tokens * top_k / (kept * D), equal
those of that published model compressed by the same fraction with the default sample, the one
`sized_refit_tokens` sizes for its shape (Qwen3-30B-A3B 8, GLM-4.5-Air 2.4 / 3.7, DeepSeek-V3 0.49 / 0.68 at
25 / 50 %): the regime in which the refit has to decide there. `regime8192=NAME` does the same for the former fixed
8,192-token sample (0.11 to 1.3 rows per unknown), the regime of the README's earlier tables.
`refit_tokens=N` sets the sample directly.

    python eval/bench_quality.py --threads 1 --methods ream ream:refit=none ream:regime=qwen3-30b-a3b

`reference:ream` / `reference:reap` rows (overrides: group_size, mix) run the paper's reference code
(SamsungSAILMontreal/ream, checked out outside this repository, in its own environment with transformers
4.57.6) through `reference_ream.py`, on the same calibration token sequences ream_hf loads, and score its
checkpoint with the same code:

    python eval/bench_quality.py --reference-repo /path/to/ream --reference-python /path/to/venv/bin/python \
        --methods reap ream reference:reap reference:ream
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tiny_moe as tiny  # noqa: E402

DEFAULT_METHODS = ("ream", "reap", "frequency", "hc_smoe", "m_smoe")
# published MoEs: (experts, top-k, expert width D, hidden size); a regime= row matches their refit rows per unknown
REGIMES = {
    "qwen3-30b-a3b": (128, 8, 768, 2048),
    "qwen3-235b-a22b": (128, 8, 1536, 4096),
    "glm-4.5-air": (128, 8, 1408, 4096),
    "deepseek-v3": (256, 8, 2048, 7168),
    "kimi-k2": (384, 8, 2048, 7168),
}
FORMER_REFIT_TOKENS = 8192  # the refit's former fixed sample (`regime8192=NAME` rows, the README's earlier tables)


def rows_per_unknown(tokens: int, top_k: int, kept: int, inner: int) -> float:
    """The refit's routed rows per unknown of one output channel: tokens * top_k / (kept experts * D)."""
    return tokens * top_k / (kept * inner)


def regime_refit_tokens(name: str, ratio: float, top_k: int, kept: int, inner: int,
                        fixed: int | None = None) -> tuple[int, float]:
    """The sample that gives this model (top_k, kept, inner) the rows per unknown of the published model `name`
    compressed by the same fraction with the default sample (`sized_refit_tokens` for its shape), or with a `fixed`
    token count; and that ratio."""
    from ream_hf.method.refit import sized_refit_tokens

    experts, published_k, published_inner, published_hidden = REGIMES[name]
    published_kept = round(experts * (1 - ratio))
    tokens = fixed or sized_refit_tokens(published_k, published_kept, published_inner, published_hidden)
    target = rows_per_unknown(tokens, published_k, published_kept, published_inner)
    return max(1, round(target * kept * inner / top_k)), target


REFERENCE = "reference:"  # method prefix: the paper's reference code, run by reference_ream.py
REDUNDANT = "redundant:"  # method prefix: run on the redundant-expert control model (build_redundant_model)
ABLATION = (
    "reap",
    "frequency",
    "ream",
    "ream:merge=none",  # REAM's grouping, members dropped: must equal reap (same centroids)
    "ream:group_size=2",
    "ream:group_size=8",
    "ream:group_size=16",
    "ream:group_size=32",
    "ream:merge=weights",
    "ream:merge=activations",
    "ream:merge=avg",
    "ream:merge_weights=uniform",
    "ream:merge_weights=frequency",
    "ream:merge_weights=centroid:0.75",
    "ream:merge_weights=centroid:0.9",
    "ream:use_router_logits=False",
    "ream:gated_similarity=False",
    "ream:sequential=False",
    "ream:mix=0:0.7:0.3",
    "reap:mix=0:0.7:0.3",
    "ream:mix=0:1:0",
    "reap:mix=0:1:0",
    "hc_smoe",
    "hc_smoe:merge=none",  # HC-SMoE's clusters, only each representative kept
    "hc_smoe:merge=avg",
)


def parse_value(text: str):
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple[str, dict, list[float] | None, dict]:
    """'ream:group_size=8,merge=none' -> ('ream', {'group_size': 8, 'merge': 'none'}, mix, diagnostics), where
    diagnostics holds the bench-only rules merge_weights= and alignment_sample=. A `redundant:` prefix (which
    model the row runs on) is not part of the variant."""
    spec = spec.removeprefix(REDUNDANT)
    if spec.startswith(REFERENCE):
        method, overrides, mix, rule = parse_variant(spec[len(REFERENCE):])
        if method not in ("ream", "reap") or set(overrides) - {"group_size"} or rule:
            raise SystemExit(f"{spec!r}: reference rows are reference:ream or reference:reap, overrides group_size/mix")
        return REFERENCE + method, overrides, mix, rule
    method, _, rest = spec.partition(":")
    overrides: dict = {}
    mix = None
    rule: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad override {item!r} in {spec!r}: use key=value")
        if key == "mix":
            mix = [float(v) for v in value.split(":")]
            if len(mix) != len(tiny.DOMAINS):
                raise SystemExit(f"mix needs {len(tiny.DOMAINS)} ratios (prose:code:math), got {value!r}")
        elif key == "merge_weights":
            if value not in ("saliency", "uniform", "frequency") and not re.fullmatch(r"centroid:[0-9.]+", value):
                raise SystemExit(f"merge_weights must be saliency, uniform, frequency or centroid:W, got {value!r}")
            rule[key] = value
        elif key in ("regime", "regime8192"):
            if value not in REGIMES:
                raise SystemExit(f"regime must be one of {', '.join(REGIMES)}, got {value!r}")
            rule[key] = value
        elif key == "alignment_sample":
            if value not in ("shared", "per_expert"):
                raise SystemExit(f"alignment_sample must be shared or per_expert, got {value!r}")
            rule[key] = value
        else:
            overrides[key] = parse_value(value)
    return method, overrides, mix, rule


@contextlib.contextmanager
def alignment_sample_rule(rule: str | None):
    """Diagnostic only: `per_expert` reproduces the reference code's alignment activations, a separate random
    token sample per expert, so the Hungarian cost compares centroid and member neurons on different tokens.
    Here each member sees its own random order of the shared sample (same tokens, different pairing). ream_hf
    itself uses one sample shared by every expert (METHOD.md, deviations)."""
    if rule in (None, "shared"):
        yield
        return
    import torch

    import ream_hf.pipeline.layer as pipeline
    from ream_hf.method.experts import expert_hidden
    from ream_hf.method.merging import ActivationGram

    original = pipeline.group_activation_gram

    def group_activation_gram(group, activation, sample_inputs):
        group = group.to(torch.float32)
        count, inner, _ = group.gate.shape
        generator = torch.Generator().manual_seed(0)
        orders = [torch.randperm(sample_inputs.shape[0], generator=generator) for _ in range(count)]
        gram = ActivationGram(count, inner)
        for start in range(0, sample_inputs.shape[0], 1024):
            gram.add(torch.stack([
                expert_hidden(group.select([m]), activation, sample_inputs[orders[m][start : start + 1024]].float())[0]
                for m in range(count)]))
        return gram

    pipeline.group_activation_gram = group_activation_gram
    try:
        yield
    finally:
        pipeline.group_activation_gram = original


@contextlib.contextmanager
def merge_weight_rule(rule: str | None):
    """Diagnostic only (no ream_hf option does this): replace each group's merge weights after planning.
    uniform = 1/n; frequency = members' routed-token counts; centroid:W = centroid W, the other members share
    1 - W in proportion to saliency. The package's own rule (METHOD.md section 4) is saliency."""
    if rule in (None, "saliency"):
        yield
        return
    import ream_hf.pipeline.layer as pipeline

    original = pipeline.plan_layer

    def plan_layer(config, stats, target, *args, **kwargs):
        plan = original(config, stats, target, *args, **kwargs)
        weights = []
        for group, old in zip(plan.groups, plan.weights):
            n = len(group.members)
            if n == 1:
                weights.append([1.0])
            elif rule == "uniform":
                weights.append([1.0 / n] * n)
            elif rule == "frequency":
                counts = stats.frequency[list(group.members)].double().clamp(min=1)
                weights.append((counts / counts.sum()).tolist())
            else:
                centroid = float(rule.split(":")[1])
                rest = sum(old[1:])
                weights.append([centroid] + [(1 - centroid) * w / rest for w in old[1:]])
        plan.weights = weights
        return plan

    pipeline.plan_layer = plan_layer
    try:
        yield
    finally:
        pipeline.plan_layer = original


class Scorer:
    """Held-out sequences and the original model's next-token log-probabilities, computed once."""

    def __init__(self, model, heldout: dict, batch_size: int) -> None:
        import torch

        self.heldout, self.batch_size = heldout, batch_size
        self.reference: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for domain, ids in heldout.items():
                self.reference[domain] = [
                    torch.log_softmax(model(input_ids=ids[s : s + batch_size]).logits[:, :-1].float(), dim=-1)
                    for s in range(0, ids.shape[0], batch_size)
                ]

    def score(self, model) -> dict:
        """Per domain: perplexity and mean KL(original || model) over the held-out positions."""
        import torch

        out = {"ppl": {}, "kl": {}}
        total_kl, total_n = 0.0, 0
        with torch.no_grad():
            for domain, ids in self.heldout.items():
                nll, kl, n = 0.0, 0.0, 0
                for i, start in enumerate(range(0, ids.shape[0], self.batch_size)):
                    batch = ids[start : start + self.batch_size]
                    logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), dim=-1)
                    ref = self.reference[domain][i]
                    targets = batch[:, 1:]
                    nll -= float(logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))
                    kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
                    n += targets.numel()
                out["ppl"][domain] = math.exp(nll / n)
                out["kl"][domain] = kl / n
                total_kl, total_n = total_kl + kl, total_n + n
        out["mean_kl"] = total_kl / total_n
        return out


def group_summary(result) -> dict:
    """How much merging the plan does: largest group and experts folded into another, per layer."""
    sizes = [[len(g.members) for g in report.plan.groups] for report in result.layers]
    return {
        "max_group": [max(s) for s in sizes],
        "merged_experts": [sum(n - 1 for n in s) for s in sizes],
        # groups the merge floor sent back to their centroid (pruned), per layer
        "fell_back": [sum(1 for c in (report.floor or []) if c and not c["merged"]) for report in result.layers],
        "centroids": [report.plan.centroids for report in result.layers],
    }


def build_redundant_model(source: Path, folder: Path, noise: float = 0.01, seed: int = 0) -> Path:
    """Positive control for merging: a copy of the trained model whose 32 experts per layer are 16 of its
    experts twice, the second copy with its hidden neurons randomly permuted (same function) plus `noise` x
    weight std, and both copies' router rows the original row plus the same relative noise. Merging each pair
    (after alignment) is then nearly lossless, while pruning must drop one of every pair it cannot tell apart."""
    import shutil

    import torch

    from ream_hf.fixtures import hub_style_config

    source, folder = Path(source).expanduser(), Path(folder).expanduser()
    marker = folder / tiny.SUMMARY
    if marker.is_file():
        return folder
    src = tiny.paths(source)
    model = tiny.load_model(src["model"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            experts, router = layer.mlp.experts, layer.mlp.gate
            count = experts.gate_up_proj.shape[0]
            half, inner = count // 2, experts.down_proj.shape[2]
            gate_up, down, rows = experts.gate_up_proj.clone(), experts.down_proj.clone(), router.weight.clone()

            def jitter(t):
                return t + noise * t.std() * torch.randn(t.shape, generator=generator)

            for i in range(half):
                perm = torch.randperm(inner, generator=generator)
                gate_up_perm = torch.cat([gate_up[i, :inner][perm], gate_up[i, inner:][perm]])
                experts.gate_up_proj[2 * i] = gate_up[i]
                experts.down_proj[2 * i] = down[i]
                experts.gate_up_proj[2 * i + 1] = jitter(gate_up_perm)
                experts.down_proj[2 * i + 1] = jitter(down[i][:, perm])
                router.weight[2 * i] = rows[i]
                router.weight[2 * i + 1] = jitter(rows[i])
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "model").mkdir(parents=True)
    model.save_pretrained(str(folder / "model"))
    hub_style_config(folder / "model", {"num_local_experts": "num_experts"})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src["model"] / name).is_file():
            shutil.copy2(src["model"] / name, folder / "model" / name)
    for path in (*src["calibration"].values(), *src["heldout"].values()):
        shutil.copy2(path, folder / path.name)
    summary = json.loads((source / tiny.SUMMARY).read_text())
    summary["redundant_control"] = {"source": str(source), "noise": noise, "seed": seed}
    marker.write_text(json.dumps(summary, indent=2) + "\n")
    return folder


def run_variant(spec: str, ratio: float, args, paths: dict, scorer: Scorer, num_experts: int) -> dict:
    import torch

    from ream_hf import ReamCompressor, ReamConfig

    method, overrides, mix, rule = parse_variant(spec)
    target = round(num_experts * (1 - ratio))
    ratios = mix if mix is not None else args.calibration_ratios
    ratios = [r / sum(ratios) for r in ratios]  # ReamConfig takes shares that sum to 1
    fields = dict(
        target_experts=target, method=method,
        calibration=[str(paths["calibration"][d]) for d in tiny.DOMAINS], calibration_ratios=ratios,
        num_calibration_sequences=args.calibration_sequences, sequence_length=args.sequence_length,
        group_size=args.group_size, merge="activations+weights", seed=42, batch_size=8, dtype="float32",
    )
    fields.update(overrides)
    text = json.loads((Path(paths["model"]) / "config.json").read_text())
    top_k, inner = int(text["num_experts_per_tok"]), int(text["moe_intermediate_size"])
    if "regime" in rule or "regime8192" in rule:
        fields["refit_tokens"], _ = regime_refit_tokens(rule.get("regime") or rule["regime8192"], ratio, top_k, target,
                                                        inner, None if "regime" in rule else FORMER_REFIT_TOKENS)
    config = ReamConfig(**fields)
    compressor = ReamCompressor(config)
    with tempfile.TemporaryDirectory(prefix="ream-quality-") as temp:
        # a private work folder: no stale run under ~/.cache blocks a rerun, nothing is left behind
        started = time.perf_counter()
        with merge_weight_rule(rule.get("merge_weights")), alignment_sample_rule(rule.get("alignment_sample")):
            compressor.compress(str(paths["model"]), work_dir=Path(temp) / "work")
        seconds = time.perf_counter() - started
        # score the checkpoint as users get it: written, verified and reloaded
        started = time.perf_counter()
        output = compressor.save_pretrained(Path(temp) / "compressed")
        save_seconds = time.perf_counter() - started
        model = tiny.load_model(output)
        scores = scorer.score(model)
    row = {
        "method": spec, "ratio": ratio, "experts": target, "compress_seconds": seconds, "save_seconds": save_seconds,
        "calibration_ratios": ratios, "calibration_sequences": compressor.result.calibration_sequences,
        "calibration_tokens": compressor.result.calibration_tokens, **scores, **group_summary(compressor.result),
        "refit": config.refit, **refit_summary(compressor, config, top_k, target, inner),
    }
    del model, compressor
    gc.collect()
    torch.set_num_threads(args.threads)
    return row


def refit_summary(compressor, config, top_k: int, kept: int, inner: int) -> dict:
    """The down refit's regime, rows per unknown of the sample it drew (at most the calibration's tokens), and
    per layer whether its held-out check kept it and for how many output experts."""
    checks = [layer["refit"] for layer in compressor.manifest()["layers"] if layer.get("refit")]
    if not checks:
        return {}
    tokens = checks[0]["train_tokens"] + checks[0]["heldout_tokens"]
    return {"refit_sample_tokens": tokens, "rows_per_unknown": rows_per_unknown(tokens, top_k, kept, inner),
            "refit_kept": [c["kept"] for c in checks], "refit_experts": [c["experts_refit"] for c in checks]}


def check_reloaded(model, folder: Path) -> None:
    """The reference checkpoint (transformers 4 per-expert keys) reloaded by transformers 5 holds exactly its
    tensors: no key dropped or renamed on the way (a silently re-initialised tensor would still score)."""
    import torch
    from safetensors.torch import load_file

    params = model.state_dict()
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if match is None:
            loaded = params[name]
        elif match[3] == "down":
            loaded = params[f"{match[1]}.down_proj"][int(match[2])]
        else:
            gate_up = params[f"{match[1]}.gate_up_proj"][int(match[2])]
            half = gate_up.shape[0] // 2
            loaded = gate_up[:half] if match[3] == "gate" else gate_up[half:]
        if not torch.equal(loaded, tensor):
            raise SystemExit(f"{folder}: {name} differs after reloading with transformers 5")


def run_reference(spec: str, ratio: float, args, paths: dict, scorer: Scorer, num_experts: int) -> dict:
    """A reference-code row: ream_hf's calibration sequences for this run, written in the reference's batch-file
    format, compressed by reference_ream.py in the reference environment, scored like every other row."""
    import torch
    from transformers import AutoTokenizer

    from ream_hf import ReamConfig
    from ream_hf.pipeline.calibration import load_calibration

    method, overrides, mix, _ = parse_variant(spec)
    method = method[len(REFERENCE):]
    target = round(num_experts * (1 - ratio))
    ratios = mix if mix is not None else args.calibration_ratios
    ratios = [r / sum(ratios) for r in ratios]  # ReamConfig takes shares that sum to 1
    config = ReamConfig(  # the calibration fields run_variant gives ream_hf
        target_experts=target, method=method, group_size=overrides.get("group_size", args.group_size),
        calibration=[str(paths["calibration"][d]) for d in tiny.DOMAINS], calibration_ratios=ratios,
        num_calibration_sequences=args.calibration_sequences, sequence_length=args.sequence_length, seed=42,
    )
    group_size = config.resolve_group_size(num_experts, target)  # ream_hf's rule when not given
    tokenizer = AutoTokenizer.from_pretrained(str(paths["model"]))
    sequences = load_calibration(config, tokenizer)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    with tempfile.TemporaryDirectory(prefix="ream-reference-") as temp:
        calibration, output, report = Path(temp) / "calibration.pt", Path(temp) / "compressed", Path(temp) / "report.json"
        torch.save({"input_ids": ids, "attention_mask": mask}, calibration)
        command = [args.reference_python, str(Path(__file__).resolve().parent / "reference_ream.py"),
                   "--reference-repo", args.reference_repo, "--model", str(paths["model"]),
                   "--calibration", str(calibration), "--target-experts", str(target), "--method", method,
                   "--group-size", str(group_size), "--batch-size", "8", "--seed", "42",
                   "--threads", str(args.threads), "--output", str(output), "--report", str(report)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"reference run failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        model = tiny.load_model(output)
        check_reloaded(model, output)
        scores = scorer.score(model)
        groups = json.loads(report.read_text())
    row = {
        "method": spec, "ratio": ratio, "experts": target, "compress_seconds": seconds, "save_seconds": None,
        "calibration_ratios": ratios, "calibration_sequences": len(sequences),
        "calibration_tokens": int(mask.sum()), **scores,
        **{k: groups[k] for k in ("max_group", "merged_experts", "centroids")},
    }
    del model
    gc.collect()
    return row


def fmt_row(row: dict) -> str:
    ppl = " | ".join(f"{row['ppl'][d]:.2f}" for d in tiny.DOMAINS)
    seconds = "" if row.get("compress_seconds") is None else f"{row['compress_seconds']:.1f}"
    label = row["method"] if row["ratio"] == 0 else f"{row['method']} @ {row['ratio']:.0%}"
    refit = "" if row.get("rows_per_unknown") is None else \
        f"{row['rows_per_unknown']:.2f} ({sum(e for e in row['refit_experts'])}/{row['experts'] * len(row['refit_experts'])})"
    return f"| {label} | {row['experts']} | {ppl} | {row['mean_kl']:.4f} | {refit} | {seconds} |"


def print_tables(rows: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| method @ compression | experts | ppl prose | ppl code | ppl math | mean KL | refit rows/unknown (experts "
          "kept refit) | compress s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(fmt_row(row))
    print("\n| method @ compression | KL prose | KL code | KL math | largest group per layer | experts merged per layer "
          "| groups the floor pruned per layer |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["ratio"] == 0:
            continue
        kl = " | ".join(f"{row['kl'][d]:.4f}" for d in tiny.DOMAINS)
        print(f"| {row['method']} @ {row['ratio']:.0%} | {kl} | {row['max_group']} | {row['merged_experts']} "
              f"| {row.get('fell_back', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model-dir", default=str(tiny.DEFAULT_OUTPUT),
                        help="train_tiny_moe.py cache folder; trained there if missing (default %(default)s)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="methods, each optionally with overrides: ream:group_size=8,merge=none")
    parser.add_argument("--ablation", action="store_true", help="run the REAM ablation grid instead of --methods")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5], help="fractions of experts removed")
    parser.add_argument("--group-size", type=int, default=None,
                        help="REAM group size C (default: ream_hf's rule, E/8 = 4 for 32 experts; the paper's 16 for 128)")
    parser.add_argument("--calibration-sequences", type=int, default=192)
    parser.add_argument("--calibration-ratios", nargs=3, type=float, default=[1.0, 1.0, 1.0],
                        metavar=("PROSE", "CODE", "MATH"), help="calibration mix (default equal thirds)")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--heldout-sequences", type=int, default=48, help="per domain, of --sequence-length tokens")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--redundant-control", action="store_true",
                        help="positive control: run on a copy whose experts are duplicated pairs (built beside "
                             "--model-dir as <model-dir>-redundant)")
    parser.add_argument("--json", help="write every row (per-domain KL, groups, centroids) to this file")
    parser.add_argument("--reference-repo", help="checkout of SamsungSAILMontreal/ream, for reference:* rows")
    parser.add_argument("--reference-python", help="python of the reference's own environment (transformers 4.57.6)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    summary = tiny.ensure_model(Path(args.model_dir))
    if args.redundant_control:
        args.model_dir = str(build_redundant_model(Path(args.model_dir), Path(str(Path(args.model_dir).expanduser()) + "-redundant")))
        print(f"redundant-expert control model: {args.model_dir}", flush=True)
    methods = list(ABLATION) if args.ablation else args.methods
    for method in methods:
        parse_variant(method)  # refuse typos before hours of work
        if method.startswith(REFERENCE) and not (args.reference_repo and args.reference_python):
            raise SystemExit(f"{method!r} needs --reference-repo and --reference-python")
        if method.startswith(REDUNDANT) and (args.redundant_control or method.startswith(REDUNDANT + REFERENCE)):
            raise SystemExit(f"{method!r}: redundant: rows are ream_hf rows, without --redundant-control")
    rows: list[dict] = []
    models = {}  # "" (--model-dir) or REDUNDANT -> (paths, scorer, experts), each with its original's row
    for kind in dict.fromkeys(REDUNDANT if m.startswith(REDUNDANT) else "" for m in methods):
        folder = Path(args.model_dir)
        if kind:
            folder = build_redundant_model(folder, Path(str(folder.expanduser()) + "-redundant"))
            print(f"redundant-expert control model: {folder}", flush=True)
        paths = tiny.paths(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(paths["model"]))
        heldout = {d: tiny.text_sequences(tokenizer, paths["heldout"][d], args.sequence_length, args.heldout_sequences)
                   for d in tiny.DOMAINS}
        original = tiny.load_model(paths["model"])
        num_experts = int(original.config.num_experts)
        scorer = Scorer(original, heldout, args.eval_batch_size)
        rows.append({"method": kind + "original", "ratio": 0.0, "experts": num_experts, "compress_seconds": None,
                     **scorer.score(original)})
        del original
        gc.collect()
        models[kind] = (paths, scorer, num_experts)
    started = time.perf_counter()
    for ratio in args.ratios:
        for method in methods:
            run = run_reference if method.startswith(REFERENCE) else run_variant
            row = run(method, ratio, args, *models[REDUNDANT if method.startswith(REDUNDANT) else ""])
            rows.append(row)
            print(fmt_row(row) + f"   [{time.perf_counter() - started:.0f}s]", flush=True)
    mix = ":".join(f"{r:g}" for r in args.calibration_ratios)
    header = (
        ("REDUNDANT-EXPERT CONTROL (16 experts x 2 near-copies), " if args.redundant_control else "") +
        ("redundant: rows run on the redundant-expert control (16 experts x 2 near-copies), scored against its own "
         "original; " if REDUNDANT in models else "") +
        f"bench_quality: tiny Qwen3-MoE ({summary['settings']['num_layers']} layers, {rows[0]['experts']} experts, "
        f"top-{summary['settings']['top_k']}, trained {summary['settings']['steps']} steps); calibration "
        f"{args.calibration_sequences} x {args.sequence_length} tokens, prose:code:math = {mix} unless a row says "
        f"mix=; REAM group size {args.group_size or 'E/8'} unless a row says group_size=; held-out "
        f"{args.heldout_sequences} x {args.sequence_length} tokens per domain; total {time.perf_counter() - started:.0f}s"
    )
    print_tables(rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "args": vars(args), "rows": rows}, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
