"""Train a small Qwen3-MoE on local text so its experts specialise; the model `bench_quality.py` compresses.

Three domains, all from this machine, no network:
  prose  GNU info manuals (/usr/share/info), plain-text docs and READMEs under /usr/share/doc (node.js
         docs and changelogs left out), /usr/share/common-licenses;
  code   Python's standard library sources (sysconfig.get_paths()["stdlib"], tests and site-packages
         left out);
  math   generated arithmetic word problems with worked solutions and answers.
Documents are listed in sorted order and split per domain with a fixed seed into held-out,
calibration and train sets; a document lands in exactly one of them, so held-out text is never
seen in training or calibration. Math problems come from three separate random streams.

The result is cached outside the repository (default ~/.cache/ream-hf/tiny-moe-v1):
  model/                    save_pretrained checkpoint + tokenizer (config key `num_experts`, as on the Hub)
  calibration_{prose,code,math}.txt, heldout_{prose,code,math}.txt
  train_summary.json        the settings hash (the reuse marker) and the training summary
It is reused when the marker's hash matches the settings; `--force` retrains.

Training runs in float32 by default: on a CPU without AVX512-BF16 (this machine's AMD EPYC has AVX2 only) bf16
autocast is emulated and measured over 20x slower (no step in 4 minutes, against float32's 2,500 tokens/s, 1.6 s a
step). `--precision bf16` keeps the autocast path for CPUs that have it (about 1.5x faster than float32 there, once
each expert's token count is padded to a multiple of 64, otherwise oneDNN JIT-compiles a kernel for every new
matmul shape).

    python eval/train_tiny_moe.py                       # 600 steps, about 16 minutes on 2 idle cores
    python eval/train_tiny_moe.py --steps 50 --output /tmp/tiny   # a quick smoke run
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import shutil
import sys
import sysconfig
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

from ream_hf.fixtures import SPECIAL_TOKENS

DOMAINS = ("prose", "code", "math")
DOC_SEPARATOR = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when corpus building or training changes in a way the settings do not capture
DEFAULT_OUTPUT = Path("~/.cache/ream-hf/tiny-moe-v1")


@dataclass
class Settings:
    """Everything that determines the cached model; its hash is the reuse marker."""

    seed: int = 0
    # corpus (characters per split and domain)
    train_chars: int = 4_000_000
    calibration_chars: int = 400_000
    heldout_chars: int = 300_000
    math_train_chars: int = 2_500_000
    # tokenizer / model
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    router_aux_loss_coef: float = 0.01
    # training
    steps: int = 600
    batch_size: int = 16
    sequence_length: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"  # "bf16": autocast on CPU (weights stay float32 and are saved as float32)
    domain_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    format_version: int = FORMAT_VERSION
    # "random": every expert its own random init; "upcycled": every expert of a layer starts as one copy
    # (plus upcycle_noise x init std), as in sparse upcycling from a dense FFN (Qwen1.5/2-MoE, Mixtral)
    expert_init: str = "random"
    upcycle_noise: float = 0.1

    def digest(self) -> str:
        data = asdict(self)
        if self.expert_init == "random":  # fields added later, left out at their defaults: old caches stay valid
            data.pop("expert_init")
            data.pop("upcycle_noise")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- corpus -------------------------------------------------------------------------------------------

def _letter_fraction(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / max(1, len(visible))


def _info_nodes(path: Path) -> list[str]:
    """The nodes of a GNU info file, node header lines and the tag table removed."""
    raw = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" else path.read_text(
        encoding="utf-8", errors="replace")
    nodes = []
    for part in raw.split("\x1f"):
        part = part.strip("\n")
        if not part or part.startswith(("Tag Table:", "Indirect:", "End Tag Table")):
            continue
        lines = part.split("\n")
        if lines[0].startswith("File:"):
            lines = lines[1:]
        text = "\n".join(lines).strip()
        if len(text) >= 300:
            nodes.append(text)
    return nodes


def prose_documents() -> list[tuple[str, str]]:
    """(id, text) of local English documentation, sorted by id, exact duplicates removed."""
    docs: list[tuple[str, str]] = []
    info = Path("/usr/share/info")
    if info.is_dir():
        for path in sorted(info.glob("*.info*")):
            docs += [(f"{path}#{i}", text) for i, text in enumerate(_info_nodes(path))]
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for path in sorted(p for p in licenses.iterdir() if p.is_file()):
            docs.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
    doc_root = Path("/usr/share/doc")
    if doc_root.is_dir():
        for path in sorted(doc_root.rglob("*")):
            name = path.name
            if not path.is_file() or path.is_symlink() or "nodejs" in path.parts or "changelog" in name.lower():
                continue
            if not (name.endswith((".txt", ".md")) or name.startswith("README")) or name.endswith(".gz"):
                continue
            if name in ("CMakeLists.txt", "requirements.txt") or path.stat().st_size < 500:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if _letter_fraction(text) >= 0.78:  # prose, not tables, code or signatures
                docs.append((str(path), text))
    seen, unique = set(), []
    for doc_id, text in docs:
        text = text.replace(DOC_SEPARATOR, "").strip()
        key = hashlib.sha1(text.encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            unique.append((doc_id, text))
    return sorted(unique)


def code_documents() -> list[tuple[str, str]]:
    """(relative path, source) of the Python standard library's own modules, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]) or path.stat().st_size > 150_000 or path.stat().st_size < 300:
            continue
        try:
            docs.append((str(rel), path.read_text(encoding="utf-8").replace(DOC_SEPARATOR, "")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kira", "Liam", "Maya",
          "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "coins", "shells", "cards",
          "oranges", "buttons", "tickets", "flowers", "eggs")
_CONTAINERS = ("boxes", "bags", "packs", "crates", "jars", "baskets")


def _word_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    kind = rng.randrange(12)
    if kind == 0:
        a, b, c = rng.randint(2, 60), rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} has {a} {item}. {name} buys {b} {box} with {c} {item} in each. How many {item} does {name} have now?"
        s = f"{b} * {c} = {b * c}. {a} + {b * c} = {a + b * c}."
        ans = a + b * c
    elif kind == 1:
        a = rng.randint(20, 200)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} are left?"
        s = f"{a} - {b} = {a - b}."
        ans = a - b
    elif kind == 2:
        k = rng.randint(2, 12)
        each = rng.randint(2, 30)
        n = k * each
        q = f"{n} {item} are shared equally among {k} friends. How many {item} does each friend get?"
        s = f"{n} / {k} = {each}."
        ans = each
    elif kind == 3:
        price, count = rng.randint(2, 40), rng.randint(2, 9)
        paid = price * count + rng.randint(0, 50)
        paid = ((paid + 9) // 10) * 10
        q = (f"One {item[:-1]} costs {price} dollars. {name} buys {count} of them and pays with {paid} dollars. "
             f"How much change does {name} get?")
        s = f"{price} * {count} = {price * count}. {paid} - {price * count} = {paid - price * count}."
        ans = paid - price * count
    elif kind == 4:
        speed, hours = rng.randint(20, 120), rng.randint(2, 9)
        q = f"A train travels at {speed} kilometres per hour for {hours} hours. How far does it travel?"
        s = f"{speed} * {hours} = {speed * hours}."
        ans = speed * hours
    elif kind == 5:
        w, h = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.5:
            q = f"A rectangle is {w} metres long and {h} metres wide. What is its area?"
            s = f"{w} * {h} = {w * h}."
            ans = w * h
        else:
            q = f"A rectangle is {w} metres long and {h} metres wide. What is its perimeter?"
            s = f"{w} + {h} = {w + h}. 2 * {w + h} = {2 * (w + h)}."
            ans = 2 * (w + h)
    elif kind == 6:
        p = rng.choice((10, 20, 25, 30, 40, 50, 60, 75, 80))
        n = rng.randint(1, 30) * 20
        ans = p * n // 100
        q = f"What is {p} percent of {n}?"
        s = f"{n} * {p} / 100 = {ans}."
    elif kind == 7:
        age, years = rng.randint(5, 40), rng.randint(2, 30)
        q = f"{name} is {age} years old. How old will {name} be in {years} years?"
        s = f"{age} + {years} = {age + years}."
        ans = age + years
    elif kind == 8:
        values = [rng.randint(1, 50) for _ in range(rng.randint(3, 5))]
        total = sum(values)
        values[-1] += (-total) % len(values)
        total = sum(values)
        q = f"What is the average of {', '.join(map(str, values[:-1]))} and {values[-1]}?"
        s = f"{' + '.join(map(str, values))} = {total}. {total} / {len(values)} = {total // len(values)}."
        ans = total // len(values)
    elif kind == 9:
        a, b, c = rng.randint(2, 99), rng.randint(2, 30), rng.randint(1, 99)
        op = rng.choice(("+", "-"))
        ans = a * b + c if op == "+" else a * b - c
        q = f"Compute {a} * {b} {op} {c}."
        s = f"{a} * {b} = {a * b}. {a * b} {op} {c} = {ans}."
    elif kind == 10:
        per_day, days, used = rng.randint(3, 25), rng.randint(3, 14), rng.randint(0, 40)
        total = per_day * days
        used = min(used, total)
        q = (f"{name} collects {per_day} {item} every day for {days} days and then loses {used} of them. "
             f"How many {item} does {name} have?")
        s = f"{per_day} * {days} = {total}. {total} - {used} = {total - used}."
        ans = total - used
    else:
        a, b = rng.randint(10, 500), rng.randint(10, 500)
        q = f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?"
        s = f"{a} + {b} = {a + b}."
        ans = a + b
    return f"Question: {q}\nSolution: {s}\nAnswer: {ans}"


def math_documents(seed: int, chars: int) -> list[tuple[str, str]]:
    """Worksheets of 4-10 generated problems each, from the random stream `seed`, until `chars` characters."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < chars:
        text = "\n\n".join(_word_problem(rng) for _ in range(rng.randint(4, 10)))
        docs.append((f"math-{seed}-{len(docs)}", text))
        total += len(text)
    return docs


def split_documents(docs: list[tuple[str, str]], seed: int, budgets: dict[str, int]) -> dict[str, list[str]]:
    """Seeded shuffle of the sorted documents, then fill held-out, calibration and train in that order;
    each document goes to one split only (documents past every budget are unused)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    splits: dict[str, list[str]] = {name: [] for name in budgets}
    used = dict.fromkeys(budgets, 0)
    names = list(budgets)
    current = 0
    for index in order:
        while current < len(names) and used[names[current]] >= budgets[names[current]]:
            current += 1
        if current == len(names):
            break
        text = docs[index][1]
        splits[names[current]].append(text)
        used[names[current]] += len(text)
    return splits


def build_corpus(settings: Settings) -> dict[str, dict[str, list[str]]]:
    """corpus[domain][split] = list of documents, split in ("heldout", "calibration", "train")."""
    budgets = {"heldout": settings.heldout_chars, "calibration": settings.calibration_chars,
               "train": settings.train_chars}
    corpus = {
        "prose": split_documents(prose_documents(), settings.seed, budgets),
        "code": split_documents(code_documents(), settings.seed + 1, budgets),
        "math": {
            "heldout": [t for _, t in math_documents(settings.seed * 10 + 2, settings.heldout_chars)],
            "calibration": [t for _, t in math_documents(settings.seed * 10 + 1, settings.calibration_chars)],
            "train": [t for _, t in math_documents(settings.seed * 10, settings.math_train_chars)],
        },
    }
    return corpus


def join_documents(docs: list[str]) -> str:
    return f"\n{DOC_SEPARATOR}\n".join(docs) + "\n"


# -- tokenizer -----------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    """Byte-level BPE with single-digit pre-splitting (as Qwen does), saved as a fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ream_hf.fixtures import CHAT_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def token_stream(tokenizer, docs: list[str]):
    """One long id tensor: documents tokenised separately, joined by the separator token (the same ids
    as tokenising `join_documents(docs)`, which is what the .txt files hold)."""
    import torch

    sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for i, doc_ids in enumerate(encoded):
        if i:
            ids += newline + [sep] + newline
        ids += doc_ids
    return torch.tensor(ids, dtype=torch.long)


def text_sequences(tokenizer, path: Path, length: int, count: int | None = None):
    """A held-out or calibration .txt file as (n, length) ids: one stream cut into consecutive pieces."""
    import torch

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // length
    if count is not None:
        n = min(n, count)
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


# -- model ----------------------------------------------------------------------------------------------

def model_config(settings: Settings, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=2 * settings.hidden_size,
        moe_intermediate_size=settings.moe_intermediate_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.hidden_size // settings.num_heads, num_experts=settings.num_experts,
        num_experts_per_tok=settings.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=2 * settings.sequence_length, router_aux_loss_coef=settings.router_aux_loss_coef,
        output_router_logits=False, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, experts_implementation="eager").eval()


def perplexities(model, heldout: dict, batch_size: int = 8) -> dict[str, float]:
    """Per-domain perplexity: exp of the mean next-token loss over every predicted held-out position."""
    import torch
    import torch.nn.functional as F

    out = {}
    with torch.no_grad():
        for domain, ids in heldout.items():
            total, count = 0.0, 0
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size]
                logits = model(input_ids=batch).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                               reduction="sum"))
                count += batch[:, 1:].numel()
            out[domain] = math.exp(total / count)
    return out


def expert_specialisation(model, heldout: dict, top_k: int, batch_size: int = 8) -> list[float]:
    """Per layer: mean over experts of the largest share one domain has of the expert's (domain-size
    normalised) routed tokens. 1/3 = experts used alike by every domain, 1.0 = each expert serves one domain."""
    import torch

    layers = None
    with torch.no_grad():
        counts = []
        for domain, ids in heldout.items():
            per_layer = None
            for start in range(0, ids.shape[0], batch_size):
                router_logits = model(input_ids=ids[start : start + batch_size], output_router_logits=True).router_logits
                hits = [torch.bincount(r.topk(top_k, dim=-1).indices.reshape(-1), minlength=r.shape[-1]).double()
                        for r in router_logits]
                per_layer = hits if per_layer is None else [a + b for a, b in zip(per_layer, hits)]
            counts.append(torch.stack(per_layer) / ids.numel())  # (layers, E), normalised by domain size
        layers = torch.stack(counts, dim=-1)  # (layers, E, domains)
    share = layers / layers.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return [round(float(v), 3) for v in share.max(dim=-1).values.mean(dim=-1)]


PAD_ROWS = 64


def _bucketed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Training forward of transformers' eager Qwen3MoeExperts with every expert's token count padded to a
    multiple of PAD_ROWS. Same result; but bf16 matmuls on CPU go through oneDNN, which JIT-compiles a kernel
    per new shape, and with one shape per distinct token count its primitive cache thrashes (seen: 1 s/step
    becoming 30 s/step). Padding leaves a few dozen shapes."""
    import torch
    import torch.nn.functional as F

    output = torch.zeros_like(hidden_states)
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token_of = order // top_k_index.shape[1]
    weight_of = top_k_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of[start : start + count]
        weights = weight_of[start : start + count]
        start += count
        pad = -count % PAD_ROWS
        x = F.pad(hidden_states[tokens], (0, 0, 0, pad))
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])[:count]
        output.index_add_(0, tokens, (y * weights[:, None]).to(output.dtype))
    return output


def train(settings: Settings, model_dir: Path, streams: dict, log_every: int) -> dict:
    import torch

    from ream_hf.fixtures import hub_style_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = model_config(settings, tokenizer)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager", attn_implementation="sdpa")
    if settings.expert_init == "upcycled":
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__ == "Qwen3MoeExperts":
                    for weight in (module.gate_up_proj, module.down_proj):
                        base = weight[0].clone()
                        weight.copy_(base.expand_as(weight) + settings.upcycle_noise * base.std()
                                     * torch.randn_like(weight))
    model.train()
    if settings.precision == "bf16":
        for module in model.modules():
            if type(module).__name__ == "Qwen3MoeExperts":
                module.forward = types.MethodType(_bucketed_experts_forward, module)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(settings.seed)
    weights = torch.tensor(settings.domain_weights, dtype=torch.float)
    length = settings.sequence_length
    autocast = settings.precision == "bf16"
    started, history = time.perf_counter(), []
    window_lm, window_aux, window_n = 0.0, 0.0, 0
    print(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters for {settings.steps} steps "
          f"x {settings.batch_size} x {length} tokens ({settings.precision})", flush=True)
    for step in range(settings.steps):
        domains = torch.multinomial(weights, settings.batch_size, replacement=True, generator=generator)
        rows = []
        for d in domains.tolist():
            stream = streams[DOMAINS[d]]
            offset = int(torch.randint(0, stream.numel() - length, (1,), generator=generator))
            rows.append(stream[offset : offset + length])
        batch = torch.stack(rows)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        window_lm += float(out.loss.detach()) - settings.router_aux_loss_coef * aux
        window_aux += aux
        window_n += 1
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - started
            entry = {"step": step + 1, "lm_loss": window_lm / window_n, "aux_loss": window_aux / window_n,
                     "lr": lr_at(step), "seconds": elapsed}
            history.append(entry)
            print(f"step {step + 1:5d}  loss {entry['lm_loss']:.3f}  aux {entry['aux_loss']:.3f}  "
                  f"lr {entry['lr']:.2e}  {elapsed:6.0f}s  "
                  f"{(step + 1) * settings.batch_size * length / elapsed:,.0f} tok/s", flush=True)
            window_lm, window_aux, window_n = 0.0, 0.0, 0
    seconds = time.perf_counter() - started
    model.eval()
    model.save_pretrained(str(model_dir))
    hub_style_config(model_dir, {"num_local_experts": "num_experts"})
    return {"seconds": seconds, "history": history}


# -- the cached artefact -----------------------------------------------------------------------------------

SUMMARY = "train_summary.json"


def paths(output: Path) -> dict:
    output = Path(output).expanduser()
    return {
        "model": output / "model",
        "calibration": {d: output / f"calibration_{d}.txt" for d in DOMAINS},
        "heldout": {d: output / f"heldout_{d}.txt" for d in DOMAINS},
        "summary": output / SUMMARY,
    }


def cached(output: Path, settings: Settings | None) -> dict | None:
    """The training summary if `output` holds a finished model for these settings (any settings: None)."""
    p = paths(output)
    if not p["summary"].is_file() or not (p["model"] / "config.json").is_file():
        return None
    summary = json.loads(p["summary"].read_text())
    if settings is not None and summary.get("settings_hash") != settings.digest():
        return None
    if not all(f.is_file() for f in (*p["calibration"].values(), *p["heldout"].values())):
        return None
    return summary


def ensure_model(output: Path = DEFAULT_OUTPUT, settings: Settings | None = None, *, force: bool = False,
                 log_every: int = 25, eval_sequences: int = 48, threads: int = 2) -> dict:
    """Build corpus, tokenizer and model into `output` unless a matching cached copy exists; returns the summary.
    `settings=None` reuses a finished folder whatever it was trained with, else trains with the defaults."""
    import torch

    output = Path(output).expanduser()
    if not force and (summary := cached(output, settings)) is not None:
        print(f"reusing {output} (settings {summary['settings_hash']}, {summary['settings']['steps']} steps)", flush=True)
        return summary
    settings = settings or Settings()
    torch.set_num_threads(threads)
    p = paths(output)
    if p["summary"].exists():
        p["summary"].unlink()  # the marker goes last: a half-written folder is never reused
    if p["model"].exists():
        shutil.rmtree(p["model"])
    p["model"].mkdir(parents=True)

    t0 = time.perf_counter()
    corpus = build_corpus(settings)
    sizes = {d: {s: sum(map(len, docs)) for s, docs in splits.items()} for d, splits in corpus.items()}
    docs = {d: {s: len(v) for s, v in splits.items()} for d, splits in corpus.items()}
    for d in DOMAINS:
        p["calibration"][d].write_text(join_documents(corpus[d]["calibration"]), encoding="utf-8")
        p["heldout"][d].write_text(join_documents(corpus[d]["heldout"]), encoding="utf-8")
        print(f"corpus {d:5s}: " + ", ".join(f"{s} {docs[d][s]} docs / {sizes[d][s] / 1e6:.2f} MB" for s in sizes[d]),
              flush=True)
    tokenizer = train_tokenizer([t for d in DOMAINS for t in corpus[d]["train"]], settings.vocab_size, p["model"])
    streams = {d: token_stream(tokenizer, corpus[d]["train"]) for d in DOMAINS}
    tokens = {d: int(s.numel()) for d, s in streams.items()}
    print(f"tokenizer: vocab {len(tokenizer)}; train tokens " + ", ".join(f"{d} {n:,}" for d, n in tokens.items())
          + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    del corpus

    result = train(settings, p["model"], streams, log_every)
    model = load_model(p["model"])
    heldout = {d: text_sequences(tokenizer, p["heldout"][d], settings.sequence_length, eval_sequences) for d in DOMAINS}
    ppl = perplexities(model, heldout)
    special = expert_specialisation(model, heldout, settings.top_k)
    print("held-out perplexity: " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items())
          + f"  ({eval_sequences} x {settings.sequence_length} tokens per domain)", flush=True)
    print(f"expert domain specialisation per layer (1/3 = none, 1 = full): {special}", flush=True)
    summary = {
        "settings_hash": settings.digest(), "settings": asdict(settings), "corpus_chars": sizes, "corpus_docs": docs,
        "train_tokens": tokens, "train_seconds": round(result["seconds"], 1), "history": result["history"],
        "heldout_perplexity": ppl, "heldout_sequences": eval_sequences, "specialisation": special,
        "python": sys.version.split()[0],
    }
    p["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="cache folder (default %(default)s)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=Settings.precision)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--expert-init", choices=("random", "upcycled"), default=Settings.expert_init,
                        help="upcycled: all experts of a layer start from one copy (use another --output)")
    parser.add_argument("--num-experts", type=int, default=Settings.num_experts,
                        help="experts per MoE layer (another shape: use another --output)")
    parser.add_argument("--top-k", type=int, default=Settings.top_k, help="experts each token is routed to")
    parser.add_argument("--moe-intermediate-size", type=int, default=Settings.moe_intermediate_size,
                        help="each expert's intermediate size D")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 trains faster when other jobs share the 2 cores)")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching cached model exists")
    args = parser.parse_args()
    settings = Settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                        seed=args.seed, expert_init=args.expert_init, num_experts=args.num_experts, top_k=args.top_k,
                        moe_intermediate_size=args.moe_intermediate_size)
    summary = ensure_model(Path(args.output), settings, force=args.force, log_every=args.log_every,
                           threads=args.threads)
    print(json.dumps({k: summary[k] for k in ("train_seconds", "heldout_perplexity", "specialisation")}))


if __name__ == "__main__":
    main()
