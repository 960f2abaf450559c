"""Run the REAM paper's reference code (public repo SamsungSAILMontreal/ream) on a local model, on CPU.

Our adapter, not their code: it imports their `ream.Merger` from a checkout given by `--reference-repo`,
feeds it calibration token ids from a file (instead of their pre-tokenised c4/math/code batches) and saves
the result as a Hugging Face checkpoint. Their math runs unmodified. Run it with a Python environment that
has what their code needs (their requirements.txt pins transformers 4.57.6; torch, scipy, numpy, psutil,
tqdm; CPU torch is enough), kept outside this repository:

    python eval/reference_ream.py --reference-repo /path/to/ream --model MODEL_DIR \\
        --calibration calib.pt --target-experts 16 --method ream --group-size 4 --output OUT_DIR

`--calibration` is a torch file holding {"input_ids": (N, L) long, "attention_mask": (N, L)} (the mask is
optional: all ones), the format of their own batch files. bench_quality.py writes it from the same token
sequences ream_hf loads, so both tools see the same calibration data.

Methods, as their merge.py spells them (everything else at merge.py's defaults: saliency=reap, grouping=ream,
gate outputs, gated similarity and sequential merging on):
  ream   --merging logits+weights --group_size C   (their full REAM)
  reap   --merging none                            (their pruning: keep the k' most salient experts; their
                                                    saliency is the gated one, so it is not REAP's formula)

What the adapter changes around their code, and nothing inside it:
  - calibration: their Merger reads `data/<dataset>_b<N>_seq<L>_<tokenizer>_seed<seed>.pt` relative to the
    working directory; the adapter writes our tokens under that name in a temporary folder and runs there
    with a single dataset (so no mix permutation: sequences in file order);
  - `datasets` (imported by their data/calibration_data.py for Hub downloads) is replaced by a stub when it is
    not installed: nothing is downloaded;
  - seeds: numpy and torch are seeded with --seed (their code seeds numpy only when mixing datasets, so
    their per-expert activation sampling is otherwise unseeded);
  - config: a config.json written by transformers 5 records `rope_parameters`; transformers 4.57 reads
    `rope_theta`/`rope_scaling`, so they are filled from it before loading (refused if they disagree);
  - verbose=False: their verbose prints read the causal mask's shape, and transformers 4.57 (sdpa) builds no
    mask (None) for unpadded batches; the flag only controls printing;
  - saving: `model.save_pretrained` as their merge.py does (transformers 4 per-expert keys, which
    transformers 5 converts on load; no renaming needed for Qwen3-MoE), plus the source's tokenizer files
    copied as they are (transformers 4 need not parse a transformers 5 tokenizer config).
`--report` writes the groups their grouping produced, per layer, recorded by wrapping their pseudo_group.
Only Qwen3-MoE-style models without MTP layers are handled (their other paths are not exercised here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

METHODS = {"ream": "logits+weights", "reap": "none"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def load_config(folder: Path):
    """The source config for transformers 4: rope settings moved back from transformers 5's rope_parameters."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.get("rope_parameters")
    if rope and "rope_theta" not in raw:
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def stub_datasets() -> None:
    """Their data/calibration_data.py imports `datasets` at module level only to download Hub data (stubbed too when
    the installed one cannot import beside their transformers 4 and its huggingface_hub)."""
    try:
        importable = importlib.util.find_spec("datasets") is not None and bool(importlib.import_module("datasets"))
    except ImportError:
        importable = False
    if not importable:
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("reference_ream.py feeds calibration tokens itself; no dataset is loaded")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub


def record_groups(merger_module, log: list) -> None:
    """Wrap their pseudo_group (grouping math untouched) to keep each layer's labels and centroids."""
    original = merger_module.pseudo_group

    def pseudo_group(*args, **kwargs):
        labels, centroids = original(*args, **kwargs)
        log.append({"labels": [int(x) for x in labels], "centroids": [int(x) for x in centroids]})
        return labels, centroids

    merger_module.pseudo_group = pseudo_group


def summarise_groups(log: list, merging: str) -> dict:
    """Groups in output-expert order (kept experts sorted by index, as their Merger keeps them)."""
    layers = []
    for entry in log:
        members: dict[int, list[int]] = {}
        for expert, label in enumerate(entry["labels"]):
            members.setdefault(label, []).append(expert)
        groups = []
        for label, centroid in enumerate(entry["centroids"]):
            rest = [e for e in members[label] if e != centroid]
            groups.append([centroid] + ([] if merging == "none" else rest))
        layers.append(sorted(groups))
    return {
        "groups": layers,
        "max_group": [max(len(g) for g in groups) for groups in layers],
        "merged_experts": [sum(len(g) - 1 for g in groups) for groups in layers],
        "centroids": [[g[0] for g in groups] for groups in layers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--reference-repo", required=True, help="checkout of SamsungSAILMontreal/ream")
    parser.add_argument("--model", required=True, help="local Hugging Face model folder (Qwen3-MoE)")
    parser.add_argument("--calibration", required=True, help='torch file {"input_ids": (N, L), "attention_mask"}')
    parser.add_argument("--target-experts", type=int, required=True)
    parser.add_argument("--method", choices=sorted(METHODS), default="ream")
    parser.add_argument("--group-size", type=int, default=16, help="their C (merge.py default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward chunk (merge.py default 8)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True)
    parser.add_argument("--report", help="write the run's settings, time and groups to this JSON file")
    args = parser.parse_args()

    repo, model_dir, output = (Path(p).expanduser().resolve() for p in (args.reference_repo, args.model, args.output))
    calibration = Path(args.calibration).expanduser().resolve()
    if not (repo / "ream" / "merger.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of SamsungSAILMontreal/ream (no ream/merger.py)")
    sys.path.insert(0, str(repo))

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    stub_datasets()  # after transformers, which probes for an installed `datasets` on import
    import ream.merger as merger_module
    from ream import Merger

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    batch = torch.load(calibration)
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    batch = {"input_ids": input_ids,
             "attention_mask": torch.ones_like(input_ids) if mask is None else mask.long()}
    count, length = input_ids.shape

    config = load_config(model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(model_dir), config=config, dtype="auto", device_map="cpu", local_files_only=True,
        low_cpu_mem_usage=False, output_loading_info=True)  # as their merge.py loads it
    model.eval()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise SystemExit(f"transformers {__import__('transformers').__version__} did not load {model_dir} "
                         f"cleanly: {info}")

    groups: list = []
    record_groups(merger_module, groups)
    merging = METHODS[args.method]
    cwd = os.getcwd()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reference-ream-") as temp:
        name = "reamhf"
        (Path(temp) / "data").mkdir()
        torch.save(batch, Path(temp) / "data" / f"{name}_b{count}_seq{length}_qwen3_seed{args.seed}.pt")
        os.chdir(temp)  # their Merger reads data/... relative to the working directory
        try:
            merger = Merger(model, merge_size=args.target_experts, grouping="ream", merging=merging,
                            saliency="reap", dataset=name, mix_ratio="1.0", tokenizer_name="qwen3",
                            batch_size=args.batch_size, group_size=args.group_size, sequential=True,
                            use_gate_output=True, gated_sim=True, calibration_data_size=count,
                            calibration_data_seq_len=length, seed=args.seed,
                            verbose=False)  # prints only; verbose=True reads the causal mask's .shape, None here
            model = merger.fit()
        finally:
            os.chdir(cwd)
    seconds = time.perf_counter() - started

    settings = {"method": args.method, "merging": merging, "group_size": args.group_size,
                "merge_size": args.target_experts, "batch_size": args.batch_size, "seed": args.seed,
                "calibration": [count, length], "reference_repo": str(repo)}
    model.config.merge_args = settings  # as their merge.py records its arguments
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output / name)
    print(f"reference {args.method} -> {args.target_experts} experts saved to {output} ({seconds:.1f}s)", flush=True)
    if args.report:
        report = {"settings": settings, "seconds": seconds, **summarise_groups(groups, merging)}
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
