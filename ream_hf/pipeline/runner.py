"""Running calibration data through a model one decoder layer at a time.

The model is run once with every decoder layer replaced by the identity, which records the
embeddings and the exact arguments each layer receives (masks, rotary embeddings, per-layer-type
masks of hybrid models). Layers are then called one by one on stored hidden states, so each layer
sees the outputs of the already-compressed layers before it (the paper's sequential mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationBatch


class StopLayer(Exception):
    """Raised by a statistics hook once it has the MoE block's input: the rest of the layer is not needed."""


@dataclass
class LayerCall:
    args: tuple
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[CalibrationBatch], device: torch.device,
    carry: str | None = None,
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Embeddings per batch, and per batch the call arguments of every layer (hidden states excluded). `carry`: the
    keyword argument through which a layer takes a value its predecessor returns beside the hidden states
    (`MoEFamily.layer_carry`); the recorder hands on what it was given, and `forward_layer_carrying` fills it in
    as each layer actually runs."""
    base = model.model if hasattr(model, "model") else model
    calls: dict[int, LayerCall] = {}
    first_hidden: list[torch.Tensor] = []

    def make_recorder(index: int) -> Callable:
        def recorder(hidden_states, *args, **kwargs):
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
            calls[index] = LayerCall(args, kwargs)
            if index == 0:
                first_hidden.append(hidden_states.detach())
            if index == len(layers) - 1:
                raise StopLayer  # nothing after the layers is needed (and may still be on the meta device)
            return hidden_states if carry is None else (hidden_states, kwargs.get(carry))

        return recorder

    for index, layer in enumerate(layers):
        layer.forward = make_recorder(index)
    per_batch: list[list[LayerCall]] = []
    try:
        for batch in batches:
            calls.clear()
            try:
                base(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
            except StopLayer:
                pass
            per_batch.append([calls[i] for i in range(len(layers))])
    finally:
        for layer in layers:
            del layer.forward  # drop the instance attribute: the class's forward is back
    return first_hidden, per_batch


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, carry: str | None = None,
              next_call: LayerCall | None = None) -> torch.Tensor:
    """The layer's output hidden states; with `carry`, what it returns beside them goes into `next_call`'s
    keyword argument of that name (GLM-5's shared top-k), so the next layer runs as in the whole model."""
    out = layer(hidden, *call.args, **call.kwargs)
    if carry is not None and next_call is not None:
        next_call.kwargs[carry] = out[1]
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def feed_block_inputs(
    layer: nn.Module,
    block: nn.Module,
    hidden_states: list[torch.Tensor],
    calls: list[LayerCall],
    batches: list[CalibrationBatch],
    consume: Callable[[torch.Tensor], None],
    progress: Callable[[], None] | None = None,
    placement=None,
) -> None:
    """Run the layer up to its MoE block for every batch; `consume` gets the real tokens' block inputs. With a
    `placement` (pipeline/device.py) the hidden states reach its device through `placement.feed`."""
    current_mask: list[torch.Tensor] = []

    def hook(_module, args):
        x = args[0]
        x = x.reshape(-1, x.shape[-1])
        consume(x[current_mask[0].to(x.device)])
        raise StopLayer

    handle = block.register_forward_pre_hook(hook)
    try:
        feed = hidden_states if placement is None else placement.feed(hidden_states)
        for hidden, call, batch in zip(feed, calls, batches):
            current_mask[:] = [batch.token_mask]
            try:
                run_layer(layer, hidden, call)
            except StopLayer:
                pass
            else:
                raise RuntimeError("the MoE block was not called by its decoder layer")
            if progress:
                progress()
    finally:
        handle.remove()


@torch.no_grad()
def forward_layer(layer: nn.Module, hidden_states: list[torch.Tensor], calls: list[LayerCall]) -> list[torch.Tensor]:
    return [run_layer(layer, hidden, call) for hidden, call in zip(hidden_states, calls)]
