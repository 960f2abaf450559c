"""Cost of the NaN/inf check on source weights (`ream_hf.pipeline.loading.check_finite`), measured where it runs:
`LayerLoader.fill`, which reads each decoder layer's tensors from the source shards into the model.

The check is one `torch.aminmax` pass over each tensor right after it is read (no temporary the size of the
tensor). This times filling every layer of a random Qwen3-MoE with the check and with it disabled, alternating, the
page cache warm for both, and prints the median per layer and the overhead. A second table times the check alone
against the read of one large tensor.

    python eval/bench_finite_check.py                        # bench_compress's model: 8 layers, 64 experts, float32
    python eval/bench_finite_check.py --dtype bfloat16 --hidden 1024 --inner 512 --layers 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_source(folder: Path, args: argparse.Namespace) -> Path:
    from safetensors.torch import load_file, save_file

    from ream_hf.fixtures import build_tiny_qwen3_moe

    build_tiny_qwen3_moe(folder, num_experts=args.experts, num_layers=args.layers, hidden_size=args.hidden,
                         moe_intermediate_size=args.inner, top_k=8, initializer_range=0.05)
    if args.dtype != "float32":
        dtype = getattr(torch, args.dtype)
        for shard in folder.glob("*.safetensors"):
            save_file({k: v.to(dtype) for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = args.dtype
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def fill_seconds(model, loader, prefix: str) -> list[float]:
    from ream_hf.arch import decoder_layers

    times = []
    for index, layer in enumerate(decoder_layers(model)):
        started = time.perf_counter()
        loader.fill(layer, f"{prefix}{index}.")
        times.append(time.perf_counter() - started)
        loader.release(layer)
    return times


def fill_seconds_each(model, loader, prefix: str, inside: list[float], counting: bool):
    from ream_hf.arch import decoder_layers

    for index, layer in enumerate(decoder_layers(model)):
        if counting:
            inside.append(0.0)
        started = time.perf_counter()
        loader.fill(layer, f"{prefix}{index}.")
        yield time.perf_counter() - started
        loader.release(layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inner", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ream_hf.pipeline.loading as loading
    import ream_hf.pipeline.skeleton as skeleton
    from ream_hf.arch import family_for_config
    from ream_hf.io.source import SourceCheckpoint
    from transformers import AutoConfig

    checked = loading.check_finite
    with tempfile.TemporaryDirectory(prefix="ream-bench-finite-") as temp:
        folder = build_source(Path(temp) / "source", args)
        source = SourceCheckpoint(folder)
        family = family_for_config(source.config)
        loader = loading.LayerLoader(source, family, torch.device("cpu"))
        model = skeleton.build_skeleton(AutoConfig.from_pretrained(folder), getattr(torch, args.dtype),
                                         torch.device("cpu"), loader)
        layer_bytes = sum(info.nbytes for name, info in source.tensor_infos.items()
                          if name.startswith("model.layers.0."))
        fill_seconds(model, loader, "model.layers.")  # warm the page cache
        runs: dict[str, list[float]] = {"with check": [], "without": []}
        inside: list[float] = []  # seconds spent in check_finite itself, per layer fill

        def timed(*a, **k):
            started = time.perf_counter()
            checked(*a, **k)
            inside[-1] += time.perf_counter() - started

        for _ in range(args.repeat):
            for mode in runs:
                loading.check_finite = timed if mode == "with check" else (lambda *a, **k: None)
                for seconds in fill_seconds_each(model, loader, "model.layers.", inside, mode == "with check"):
                    runs[mode].append(seconds)
        loading.check_finite = checked

        big = torch.randn(64 * 2**20 // 4).to(getattr(torch, args.dtype))  # 64 Mi float32 elements' worth
        copy_times, check_times = [], []
        target = torch.empty_like(big)
        for _ in range(args.repeat):
            started = time.perf_counter()
            target.copy_(big)
            copy_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            checked("big", big, "memory")
            check_times.append(time.perf_counter() - started)

    with_check, without = statistics.median(runs["with check"]), statistics.median(runs["without"])
    print(f"\nbench_finite_check: {args.layers} layers, {args.experts} experts, hidden {args.hidden}, expert "
          f"intermediate {args.inner}, {args.dtype}, {layer_bytes / 1e6:.1f} MB per layer, {args.threads} threads, "
          f"median of {args.repeat} x {args.layers} layer fills\n")
    print("| LayerLoader.fill | ms per layer | GB/s |")
    print("|---|---|---|")
    for name, seconds in (("without the check", without), ("with the check", with_check)):
        print(f"| {name} | {seconds * 1e3:.2f} | {layer_bytes / seconds / 1e9:.2f} |")
    print(f"| difference of the medians | {(with_check - without) * 1e3:+.2f} ({(with_check / without - 1) * 100:+.1f}%) "
          "| |")
    check = statistics.median(inside)
    print(f"| time inside check_finite (measured directly) | {check * 1e3:.2f} ({check / with_check * 100:.1f}% of the "
          "fill) | |")
    size = big.numel() * big.element_size()
    print(f"\n| one {size / 2**20:.0f} MiB {args.dtype} tensor | ms | GB/s |")
    print("|---|---|---|")
    for name, times in (("copy (what loading costs at least)", copy_times), ("check_finite", check_times)):
        seconds = statistics.median(times)
        print(f"| {name} | {seconds * 1e3:.1f} | {size / seconds / 1e9:.2f} |")


if __name__ == "__main__":
    main()
