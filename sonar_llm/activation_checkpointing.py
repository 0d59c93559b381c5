"""The one activation-checkpointing mechanism: which layers are recomputed in the backward pass, and how.

The knob is a mode (`train.activation_checkpointing` in a run config):
  "none"       store every layer's activations;
  "full"       recompute every layer in the backward pass (only the layer inputs are kept);
  "selective"  recompute every other layer (layers 0, 2, 4, ...): half the memory saving for half the
               recompute.
`apply_activation_checkpointing(blocks, mode)` wraps the chosen blocks' `forward` (module hooks, e.g.
FSDP2's, stay outside the recomputed region); `checkpointed_call(mode, index, fn, *args)` does the same
for a layer written as a function (the packed SONAR decoder's fused units). Recomputation only happens
where autograd records (`torch.is_grad_enabled()`); inference runs the plain call.
Imports nothing from sonar_llm.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MODES", "check_mode", "is_checkpointed", "checkpointed_call", "apply_activation_checkpointing",
           "checkpointed_indices"]

MODES = ("none", "selective", "full")


def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES, else ValueError naming the knob."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing: expected none|selective|full, got {mode!r}")
    return mode


def is_checkpointed(mode: str, index: int) -> bool:
    """Whether layer `index` is recomputed under `mode`."""
    return mode == "full" or (mode == "selective" and index % 2 == 0)


def checkpointed_call(mode: str, index: int, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, recomputed in the backward pass if layer `index` is checkpointed under `mode`."""
    if is_checkpointed(mode, index) and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _CheckpointedForward:
    """A block's forward, recomputed in the backward pass (picklable; `inner` is the original forward)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        return self.inner(*args, **kwargs)


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str) -> None:
    """Checkpoint the blocks `mode` selects (by their position in `blocks`), in place; a block already
    wrapped is left as it is, so applying a mode twice changes nothing."""
    check_mode(mode)
    for i, block in enumerate(blocks):
        if is_checkpointed(mode, i) and not isinstance(block.forward, _CheckpointedForward):
            block.forward = _CheckpointedForward(block.forward)


def checkpointed_indices(blocks: Iterable[nn.Module]) -> set[int]:
    """Positions of the blocks whose forward is checkpointed."""
    return {i for i, block in enumerate(blocks) if isinstance(block.forward, _CheckpointedForward)}
