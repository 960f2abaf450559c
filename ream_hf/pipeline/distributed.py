"""Many processes, one result: `torchrun --nproc-per-node N [--nnodes M ...] ream-hf compress ...`.

Calibration batches are dealt to the ranks in turn (batch b to rank b % world); each rank embeds, measures and
re-forwards only its own batches. What a layer's plan needs is combined so that every rank holds the same
numbers, and the numbers a single process computes:

- statistics: each batch's contribution to every running sum is kept apart (`OrderedReduction`), gathered from
  all ranks and added in global batch order, starting from zero: the very additions, in the very order, of a
  single process, so the sums are bit-identical whatever the number of ranks and whichever finishes first (a
  plain all_reduce would add in an order NCCL chooses, and float sums depend on order);
- the alignment token sample: each rank's rows are gathered and put back in token order;
- merging: each rank merges its share of the multi-member groups, and broadcasts them.

Every rank then reaches the same plan and the same merged experts, so each can re-forward its batches. Rank 0
alone writes the work folder's state, the shard parts and the output; every rank writes its own batches'
hidden states into the same work folder, which must be a path every rank reaches (a shared filesystem across
nodes), and `--resume` reads them back the same way. Only torch.distributed collectives move data: NCCL
between GPUs, gloo on CPUs (and for the background writer's barrier).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..io.folders import StorageError

TIMEOUT = datetime.timedelta(hours=2)  # rank 0 writing a large model's last shards while the others wait
GATHER_BYTES = 64 * 2**20  # float64 partial sums moved per collective
_io_group = None  # a gloo group for the background writer thread's barrier (the main thread's is NCCL's)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, batch: int) -> bool:
        return batch % self.world == self.rank

    def share(self, items: Sequence) -> list:
        """This rank's items of a per-batch list (items b with b % world == rank), in order."""
        return [item for b, item in enumerate(items) if self.owns(b)]

    def owned(self, count: int) -> list[int]:
        return list(range(self.rank, count, self.world))


def current() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def setup(device: str) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL for CUDA devices,
    gloo for the CPU. Nothing to do in a single process or when the caller has initialised torch.distributed."""
    global _io_group
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    ranks = current()
    if ranks.distributed and _io_group is None:  # its own group even under gloo: collectives of one group must
        _io_group = dist.new_group(backend="gloo", timeout=TIMEOUT)  # come from one thread
    return ranks


def shutdown() -> None:
    """Leave the process group (the end of a torchrun job)."""
    global _io_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _io_group = None


def _comm_device(ranks: Ranks) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def io_barrier() -> None:
    """Every rank's background writes reached this point (called from the writer thread, on the gloo group)."""
    if current().distributed:
        dist.barrier(group=_io_group)


def on_main(ranks: Ranks, task: Callable[[], Any]) -> Any:
    """Run `task` on rank 0 only and hand its result to every rank. Whatever it raises there is raised on every
    rank, so no rank waits forever for one that gave up: rank 0 its own exception, the others one with the same
    message, of the same type for a refusal (ValueError) or a failed write (StorageError), so that each ends
    with the same one-line error and exit status."""
    if not ranks.distributed:
        return task()
    box: list[Any] = [None, None]
    failure: BaseException | None = None
    if ranks.is_main:
        try:
            box[0] = task()
        except Exception as error:  # handed to the other ranks, then raised here as it is
            failure = error
            kind = next((k for k in (ValueError, StorageError) if isinstance(error, k)), RuntimeError)
            box = [None, (kind.__name__, str(error) if kind is not RuntimeError else f"rank 0: {error!r}")]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        kind, message = box[1]
        raise {"ValueError": ValueError, "StorageError": StorageError}.get(kind, RuntimeError)(message)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


class OrderedReduction:
    """Feeds an accumulator batch by batch, keeping each batch's contribution to its running sums
    (`running_sums()`: name -> tensor) apart, and combines them in global batch order (module docstring).

    In one process the contributions are added as they come, which is the same order. `first_tokens[b]` is the
    global position of batch b's first token (all batches, every rank), which places the alignment sample.
    """

    def __init__(self, accumulator, first_tokens: Sequence[int], total_tokens: int, ranks: Ranks) -> None:
        self.accumulator, self.first_tokens, self.total_tokens, self.ranks = accumulator, list(first_tokens), total_tokens, ranks
        self.partials: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, batch: int, *args) -> None:
        accumulator = self.accumulator
        totals = accumulator.running_sums()
        for name, total in totals.items():
            setattr(accumulator, name, torch.zeros_like(total))
        accumulator.add(*args, position=self.first_tokens[batch])
        partial = accumulator.running_sums()
        for name, total in totals.items():
            setattr(accumulator, name, total)
            if not self.ranks.distributed:
                total += partial[name]
        if self.ranks.distributed:
            self.partials[batch] = partial

    def finalize(self):
        if self.ranks.distributed:
            self._reduce_sums()
            self._gather_sample()
            self.accumulator.seen_tokens = self.total_tokens
        return self.accumulator.finalize()

    def _reduce_sums(self) -> None:
        totals = self.accumulator.running_sums()
        layout = [(name, total.shape, total.numel()) for name, total in totals.items()]
        size = 1 + sum(numel for _, _, numel in layout)  # a presence flag, then every sum, as float64
        world, device = self.ranks.world, _comm_device(self.ranks)
        count = len(self.first_tokens)
        slots = max(1, GATHER_BYTES // (8 * size * world))  # batches per rank and collective
        for first_round in range(0, -(-count // world), slots):
            rounds = range(first_round, min(first_round + slots, -(-count // world)))
            mine = torch.zeros(len(rounds), size, dtype=torch.float64, device=device)
            for slot, round_ in enumerate(rounds):
                batch = round_ * world + self.ranks.rank
                if batch in self.partials:
                    partial = self.partials.pop(batch)
                    mine[slot, 0] = 1
                    mine[slot, 1:] = torch.cat([partial[name].reshape(-1).to(device, torch.float64) for name, _, _ in layout])
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            for slot in range(len(rounds)):
                for rank in range(world):  # batch order: round by round, rank by rank
                    row = gathered[rank][slot]
                    if row[0] == 0:
                        continue
                    offset = 1
                    for name, shape, numel in layout:
                        total = totals[name]
                        total += row[offset : offset + numel].view(shape).to(total.device, total.dtype)
                        offset += numel

    def _gather_sample(self) -> None:
        """The token sample's rows (block inputs, and their routed output where the statistics keep it),
        gathered from the ranks that saw them, in global token order."""
        accumulator = self.accumulator
        positions = accumulator.sample_positions
        if positions is None:
            return
        starts = torch.tensor(self.first_tokens, dtype=torch.long)
        owner = ((torch.searchsorted(starts, positions, right=True) - 1) % self.ranks.world).tolist()
        counts = [owner.count(rank) for rank in range(self.ranks.world)]
        hidden = accumulator.weights.gate.shape[2]
        accumulator.sample_chunks = [self._gather_rows(accumulator.sample_chunks, owner, counts, hidden,
                                                       accumulator.weights.gate.dtype)]
        if accumulator.keeps_sample_outputs:  # the same on every rank: the run's settings and device decide it
            accumulator.sample_output_chunks = [self._gather_rows(accumulator.sample_output_chunks, owner, counts,
                                                                  hidden, torch.float32)]

    def _gather_rows(self, chunks: list[torch.Tensor], owner: list[int], counts: list[int], hidden: int,
                     empty_dtype: torch.dtype) -> torch.Tensor:
        mine = torch.cat(chunks) if chunks else torch.empty(0, hidden, dtype=empty_dtype)
        if mine.shape[0] != counts[self.ranks.rank]:
            raise RuntimeError(f"rank {self.ranks.rank} holds {mine.shape[0]} alignment sample rows, expected "
                               f"{counts[self.ranks.rank]}: the ranks disagree on the calibration batches")
        dtype = mine.dtype
        device = _comm_device(self.ranks)
        wire = torch.float32 if device.type == "cpu" and dtype not in (torch.float32, torch.float64) else dtype
        padded = torch.zeros(max(counts), hidden, dtype=wire, device=device)
        padded[: mine.shape[0]] = mine.to(device, wire)
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded)
        rows = torch.empty(len(owner), hidden, dtype=dtype)
        owner_tensor = torch.tensor(owner, dtype=torch.long)
        for rank, count in enumerate(counts):
            rows[owner_tensor == rank] = gathered[rank][:count].cpu().to(dtype)
        return rows


@dataclass(frozen=True)
class BatchShare:
    """A rank's calibration batches: their global numbers, and where every batch's real tokens start in the
    global token order (all batches, so sample positions and the reduction order are the same on every rank)."""

    numbers: tuple[int, ...]
    first_tokens: tuple[int, ...]
    total_tokens: int
    # every calibration sequence's real tokens, all batches in order (empty: unknown), so a token's global position
    # tells its sequence: the refit holds out whole sequences (`sequence_of`)
    sequence_lengths: tuple[int, ...] = ()

    @classmethod
    def of(cls, token_counts: Sequence[int], ranks: Ranks | None = None,
           sequence_lengths: Sequence[int] = ()) -> BatchShare:
        ranks = ranks or Ranks()
        starts, total = [], 0
        for count in token_counts:
            starts.append(total)
            total += int(count)
        return cls(tuple(ranks.owned(len(starts))), tuple(starts), total, tuple(int(n) for n in sequence_lengths))

    @classmethod
    def of_masks(cls, masks: Sequence[torch.Tensor], ranks: Ranks | None = None) -> BatchShare:
        """From every batch's (B, S) attention mask (1 on real tokens)."""
        return cls.of([int(m.sum()) for m in masks], ranks, [n for m in masks for n in m.sum(dim=1).tolist()])

    def sequence_of(self, positions: torch.Tensor, sequence_length: int) -> torch.Tensor:
        """The calibration sequence of each global token position; without `sequence_lengths`, blocks of
        `sequence_length` positions (sequences are at most that long, so a block overlaps two at most)."""
        if not self.sequence_lengths:
            return positions // sequence_length
        ends = torch.tensor(self.sequence_lengths, dtype=torch.long).cumsum(0)
        return torch.searchsorted(ends, positions.cpu(), right=True)


def broadcast_results(ranks: Ranks, results: list, like: Callable[[int], list[torch.Tensor]]) -> list:
    """Complete `results` (item i: a list of tensors computed by rank i % world, None elsewhere) on every rank,
    from its owner; `like(i)` gives empty tensors of item i's shapes and dtypes."""
    if not ranks.distributed:
        return results
    device = _comm_device(ranks)
    for index in range(len(results)):
        owner = index % ranks.world
        tensors = results[index] if owner == ranks.rank else like(index)
        for position, tensor in enumerate(tensors):
            moved = tensor.to(device)
            dist.broadcast(moved, src=owner)
            if owner != ranks.rank:
                tensors[position] = moved.to(tensor.device)
        results[index] = tensors
    return results
