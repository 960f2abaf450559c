"""How much each GEMM precision a GPU could use changes each statistic, measured on the CPU by emulation.

One random MoE layer of Qwen3-30B-A3B's width (hidden 2048, expert 768; fewer experts to keep the CPU time short),
a bfloat16 checkpoint (weights and hidden states hold bfloat16 values) and a float32 one, router logits from a
random router. Every variant runs the real `LayerStatsAccumulator`; errors are against its float32 GEMMs:

- bf16 x bf16 -> fp32: the CUDA default for a bfloat16 checkpoint (`mm(..., out_dtype=float32)`), emulated by
  float32 GEMMs on the bfloat16 values (products of bfloat16 numbers are exact in float32, so only the summation
  order differs: shown by the float32 run with another chunking), and saliency's grouped bf16 down projection;
- bf16 x bf16 -> bf16: the fallback where torch has no float32 result (gate/up rounded to bfloat16);
- for a float32 checkpoint: its operands rounded to TF32 (10-bit mantissa) or to bfloat16.

    python eval/bench_precision.py                 # 32 experts top-4, 4096 tokens (about 2 minutes on 2 cores)
    python eval/bench_precision.py --experts 64 --tokens 8192
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ream_hf.arch import ExpertWeights
from ream_hf.config import ReamConfig
from ream_hf.method.experts import Activation
from ream_hf.method.planning import plan_layer
from ream_hf.method.similarity import expert_distance
from ream_hf.method.stats import GemmPolicy, LayerStatsAccumulator


class EmulatedFloat32Results(LayerStatsAccumulator):
    """bfloat16 operands with float32 results, as CUDA's `mm(..., out_dtype=float32)` computes them: exact
    products, float32 sums. On the CPU: a float32 GEMM on the (bfloat16-valued) operands."""

    def _gate_up(self, x):
        return torch.mm(x.to(self.gemm.operands).float(), self.gate_up_matrix.float())


def round_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 mantissa bits), as a TF32 tensor-core GEMM reads its operands."""
    bits = tensor.float().contiguous().view(torch.int32)
    rounded = (bits + 0x1000 + ((bits >> 13) & 1)) & ~0x1FFF  # round to nearest even on the 13 dropped bits
    return rounded.view(torch.float32)


def statistics(weights, x, logits, topk_w, topk_i, policy=GemmPolicy(), cls=LayerStatsAccumulator, chunk=2048):
    acc = cls(weights, Activation("glu", act_fn=nn.SiLU()), "softmax", dense=True, with_logit_gram=True,
              chunk_size=chunk, gemm=policy, chunk_bytes=2**40, routed_bytes=2**40)
    for start in range(0, x.shape[0], 1024):  # batches of 1024 tokens
        stop = start + 1024
        acc.add(x[start:stop], logits[start:stop], topk_w[start:stop], topk_i[start:stop])
    return acc.finalize()


def compare(reference, other, target: int) -> dict[str, float | str]:
    config = ReamConfig(target_experts=target, method="ream", group_size=4)
    sal = (other.saliency - reference.saliency).abs() / reference.saliency.abs().clamp_min(1e-30)
    sig = (other.output_signatures - reference.output_signatures).norm(dim=1) / reference.output_signatures.norm(dim=1)
    dist = (expert_distance(other.output_signatures, other.router_logit_gram)
            - expert_distance(reference.output_signatures, reference.router_logit_gram)).abs().max()
    same = [g.members for g in plan_layer(config, reference, target).groups] == \
        [g.members for g in plan_layer(config, other, target).groups]
    return {"saliency": float(sal.max()), "signature": float(sig.max()), "distance": float(dist),
            "plan": "same" if same else "DIFFERENT"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    experts, hidden, inner = args.experts, args.hidden, args.inner
    f32 = ExpertWeights(torch.randn(experts, inner, hidden) * 0.02, torch.randn(experts, inner, hidden) * 0.02,
                        torch.randn(experts, hidden, inner) * 0.02)
    x32 = torch.randn(args.tokens, hidden)
    router = torch.randn(experts, hidden) * 0.02
    bf16 = ExpertWeights(f32.gate.bfloat16(), f32.up.bfloat16(), f32.down.bfloat16())
    x16 = x32.bfloat16()
    target = experts * 3 // 4

    def routing(x):
        logits = x.float() @ router.T
        topk_w, topk_i = torch.softmax(logits, -1).topk(args.top_k, dim=-1)
        return logits, topk_w / topk_w.sum(-1, keepdim=True), topk_i

    rows = []
    started = time.perf_counter()
    logits, topk_w, topk_i = routing(x16)
    reference = statistics(bf16, x16, logits, topk_w, topk_i)
    rows.append(("bf16 checkpoint", "float32 GEMMs, chunks of 256 rows (summation order only)",
                 compare(reference, statistics(bf16, x16, logits, topk_w, topk_i, chunk=256), target)))
    rows.append(("bf16 checkpoint", "bf16 x bf16 -> fp32, grouped bf16 saliency (CUDA default)",
                 compare(reference, statistics(bf16, x16, logits, topk_w, topk_i,
                                               GemmPolicy(torch.bfloat16, torch.float32, grouped=True),
                                               EmulatedFloat32Results), target)))
    rows.append(("bf16 checkpoint", "bf16 x bf16 -> bf16 (no float32 results)",
                 compare(reference, statistics(bf16, x16, logits, topk_w, topk_i,
                                               GemmPolicy(torch.bfloat16, torch.bfloat16)), target)))
    logits, topk_w, topk_i = routing(x32)
    reference = statistics(f32, x32, logits, topk_w, topk_i)
    tf32 = ExpertWeights(round_tf32(f32.gate), round_tf32(f32.up), round_tf32(f32.down))
    rows.append(("fp32 checkpoint", "operands rounded to TF32",
                 compare(reference, statistics(tf32, round_tf32(x32), logits, topk_w, topk_i), target)))
    rows.append(("fp32 checkpoint", "operands rounded to bf16",
                 compare(reference, statistics(bf16, x16, logits, topk_w, topk_i), target)))
    print(f"\nbench_precision: {experts} experts top-{args.top_k}, hidden {hidden}, expert {inner}, "
          f"{args.tokens} tokens, {experts} -> {target} REAM (C=4); errors against float32 GEMMs "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| checkpoint | GEMMs | saliency max rel. err | signature max rel. err | distance max abs. err | plan |")
    print("|---|---|---|---|---|---|")
    for checkpoint, name, r in rows:
        print(f"| {checkpoint} | {name} | {r['saliency']:.1e} | {r['signature']:.1e} | {r['distance']:.1e} | {r['plan']} |")


if __name__ == "__main__":
    main()
