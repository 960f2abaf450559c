"""Byte-identical outputs: every family fixture compressed as stored in tests/output_digests.json.

Each case builds a tiny source (tests/families.py; MTP layers, FP8, MXFP4 and Kimi-K2.5 INT4 twins, Kimi-K2 and the
Qwen3.5 VLM layout where a writer path depends on them), compresses it (REAM and REAP, streaming and in memory, float32 and
bfloat16) and takes the SHA-256 of every file of the output folder: config.json, the index, the shards, the
manifest, the side files. A refactor that must not change behaviour must leave every digest as it is.

Nothing is excluded from the digests but the per-layer plot (`layer_report.png`) and the model card (`README.md`):
both are drawn from files that are digested (the manifest; config.json and the shard headers), the plot's pixels depend
on the installed matplotlib's text rendering, which changes between its releases (tests/test_layer_report.py checks
the plot), and the card's text changes with its template, not with what the compressor wrote (tests/test_hub.py and
tests/test_layer_report.py check the card). The only things that differed between two runs were paths: the manifest's
`source` and config.json's `ream_config.calibration` record the paths they were given. So every case runs in its
own folder holding `source` and `calibration.txt` (links to the built fixtures) and is given those relative
names: two runs then write identical files, wherever their folders are.

Floating-point results depend on the CPU's kernels and the thread count, so the cases run in one subprocess with
one thread and the vector kernels pinned to AVX2 (`PINNED_ENV`): the digests then hold on any x86-64 machine with
AVX2, not only on the one that stored them. The source fixtures' digests are stored too: when a fixture builder
changes (a new family field, say), the test says so instead of reporting a change of the compressor.

A change that is meant to change outputs (a new method default) updates the stored digests, and says so in its
commit: `PYTHONPATH=. python -m tests.test_output_digests --update`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STORED = Path(__file__).with_name("output_digests.json")
PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Case:
    source: str  # a key of SOURCES
    method: str
    streaming: bool = True
    settings: dict = field(default_factory=dict)  # more ReamConfig fields
    compress: dict = field(default_factory=dict)  # keywords of ReamCompressor.compress
    loaded: bool = False  # compress the model object transformers loaded, not the folder


def _sources() -> dict[str, Callable[[Path], Path]]:
    """Source fixture builders by name; each writes a checkpoint folder at the path it is given."""
    import torch

    from ream_hf.fixtures import (build_tiny_kimi_k25, compressed_tensors_checkpoint, fp8_block_checkpoint,
                                  kimi_int4_scheme, mxfp4_checkpoint)
    from tests.families import FAMILIES, build_family_checkpoint, build_kimi_k2_checkpoint, \
        build_qwen3_5_vlm_checkpoint
    from tests.test_mtp import add_mtp_layers

    def family(name: str, **kw) -> Callable[[Path], Path]:
        return lambda folder: build_family_checkpoint(name, folder, **kw)

    def twin(build: Callable[[Path, Path], Path], plain: str) -> Callable[[Path], Path]:
        return lambda folder: build(SOURCES[plain](folder.with_name(folder.name + "-plain")), folder)

    sources = {name: family(name) for name in FAMILIES}
    sources |= {
        "qwen3_moe-bf16": family("qwen3_moe", dtype=torch.bfloat16),
        "deepseek_v3-bf16": family("deepseek_v3", dtype=torch.bfloat16),  # its routing bias stays float32
        "glm4_moe-mtp": lambda folder: add_mtp_layers(build_family_checkpoint("glm4_moe", folder)),
        "kimi_k2": lambda folder: build_kimi_k2_checkpoint(folder),
        "qwen3_5_vlm-mtp": lambda folder: build_qwen3_5_vlm_checkpoint(folder),
        "qwen3_moe-fp8": twin(lambda plain, out: fp8_block_checkpoint(plain, out), "qwen3_moe"),
        "gpt_oss-mxfp4": twin(mxfp4_checkpoint, "gpt_oss"),
        "kimi_k25": lambda folder: build_tiny_kimi_k25(folder, dtype=torch.bfloat16),
        "kimi_k25-int4": twin(lambda plain, out: compressed_tensors_checkpoint(plain, out, kimi_int4_scheme(),
                                                                              in_text_config=True), "kimi_k25"),
    }
    return sources


def _cases() -> dict[str, Case]:
    from tests.families import FAMILIES

    cases = {f"{name}-{method}": Case(name, method) for name in FAMILIES for method in ("reap", "ream")}
    cases |= {
        "qwen3_moe-bf16-ream": Case("qwen3_moe-bf16", "ream"),
        "deepseek_v3-bf16-reap": Case("deepseek_v3-bf16", "reap"),
        "qwen3_moe-ream-in-memory": Case("qwen3_moe", "ream", streaming=False),
        "deepseek_v3-reap-in-memory": Case("deepseek_v3", "reap", streaming=False),
        "qwen3_moe-reap-loaded-model": Case("qwen3_moe", "reap", streaming=False, loaded=True),
        "glm4_moe-mtp-reap": Case("glm4_moe-mtp", "reap"),
        "glm4_moe-mtp-ream-drop": Case("glm4_moe-mtp", "ream", settings={"mtp": "drop"}),
        "glm4_moe-mtp-reap-keep": Case("glm4_moe-mtp", "reap", settings={"mtp": "keep"}),
        "kimi_k2-reap": Case("kimi_k2", "reap", compress={"trust_remote_code": True}),
        "qwen3_5_vlm-mtp-ream": Case("qwen3_5_vlm-mtp", "ream"),
        "qwen3_moe-fp8-ream": Case("qwen3_moe-fp8", "ream"),
        "qwen3_moe-fp8-reap-bf16": Case("qwen3_moe-fp8", "reap", settings={"output_dtype": "bfloat16"}),
        "qwen3_moe-bf16-ream-fp8": Case("qwen3_moe-bf16", "ream", settings={"output_dtype": "fp8"}),
        "deepseek_v3-bf16-reap-fp8": Case("deepseek_v3-bf16", "reap", settings={"output_dtype": "fp8"}),
        "gpt_oss-mxfp4-reap": Case("gpt_oss-mxfp4", "reap"),
        "kimi_k25-int4-ream": Case("kimi_k25-int4", "ream"),
    }
    return cases


SOURCES: dict[str, Callable[[Path], Path]] = {}


def folder_digests(folder: Path) -> dict[str, str]:
    """File name (relative) -> SHA-256 of its bytes, for every file under `folder` but the plot and the card (module
    docstring)."""
    from ream_hf.release.card import CARD_NAME
    from ream_hf.release.report import LAYER_PLOT_NAME

    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name not in (LAYER_PLOT_NAME, CARD_NAME)}


@contextlib.contextmanager
def _inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def run_case(case: Case, source: Path, calibration: Path, folder: Path) -> dict[str, str]:
    """Compress `source` as `case` says, in `folder` under relative names; the output's digests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ream_hf import ReamCompressor, ReamConfig

    folder.mkdir(parents=True)
    (folder / "source").symlink_to(source, target_is_directory=True)
    (folder / "calibration.txt").symlink_to(calibration)
    config = ReamConfig(target_experts=8, method=case.method, calibration=["calibration.txt"], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4,
                        streaming=case.streaming, **case.settings)
    with _inside(folder):
        compressor = ReamCompressor(config)
        if case.loaded:
            model = AutoModelForCausalLM.from_pretrained("source")
            compressor.compress(model, tokenizer=AutoTokenizer.from_pretrained("source"), **case.compress)
        else:
            compressor.compress("source", work_dir="work", **case.compress)
        compressor.save_pretrained("output")
    return folder_digests(folder / "output")


def compute(names: list[str], workdir: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{case: {"source": digests, "output": digests}} for the cases `names`, built and run under `workdir`."""
    import torch

    from ream_hf.fixtures import write_demo_calibration

    torch.set_num_threads(1)
    SOURCES.update(_sources())
    cases = _cases()
    workdir.mkdir(parents=True, exist_ok=True)
    calibration = write_demo_calibration(workdir / "calibration.txt")
    built: dict[str, Path] = {}
    results = {}
    for name in names:
        case = cases[name]
        if case.source not in built:
            built[case.source] = SOURCES[case.source](workdir / "sources" / case.source)
        source = built[case.source]
        results[name] = {"source": folder_digests(source),
                         "output": run_case(case, source, calibration, workdir / "runs" / name)}
    return results


def compute_in_subprocess(names: list[str], workdir: Path) -> dict:
    """`compute` in a fresh interpreter with `PINNED_ENV` (thread count and vector kernels are fixed at start)."""
    result = workdir / "digests.json"
    env = {**os.environ, **PINNED_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                                    os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "tests.test_output_digests", "--workdir", str(workdir),
                          "--out", str(result), *names], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"computing the digests failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(result.read_text())


def stored() -> dict:
    """The stored digests (none before the first --update)."""
    return json.loads(STORED.read_text(encoding="utf-8")) if STORED.is_file() else {}


# -- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> dict:
    return compute_in_subprocess(sorted(stored()), tmp_path_factory.mktemp("digests"))


def test_every_case_has_stored_digests():
    """A case (or a family) without stored digests would be checked by nothing: store them (--update)."""
    missing = sorted(set(_cases()) - set(stored()))
    assert not missing, f"no stored digests for {missing}: run `PYTHONPATH=. python -m tests.test_output_digests " \
                        "--update` on unchanged code and commit tests/output_digests.json"


@pytest.mark.parametrize("case", sorted(stored()))
def test_output_is_byte_identical_to_the_stored_digests(case, computed):
    want, got = stored()[case], computed[case]
    assert got["source"] == want["source"], (
        f"the {case} source fixture itself changed (tests/families.py or its builders): its outputs cannot be "
        "compared; if that change is intended, store new digests (--update) in the same commit")
    changed = sorted(name for name in want["output"].keys() | got["output"].keys()
                     if want["output"].get(name) != got["output"].get(name))
    assert not changed, f"{case}: these output files changed: {changed}"


def main() -> None:
    parser = argparse.ArgumentParser(description="compute (or, with --update, store) the output digests")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--update", action="store_true", help=f"rewrite {STORED.name} with every case")
    parser.add_argument("--workdir", type=Path, help="where to build and run (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the digests here (the subprocess of the test)")
    args = parser.parse_args()
    if args.update:
        with tempfile.TemporaryDirectory() as temp:
            digests = compute_in_subprocess(sorted(_cases()), Path(temp))
        STORED.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"stored {len(digests)} cases in {STORED}")
        return
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        digests = compute(args.cases or sorted(_cases()), workdir)
    text = json.dumps(digests, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)


if __name__ == "__main__":
    main()
