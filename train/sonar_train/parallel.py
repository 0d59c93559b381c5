"""Distributed setup: process group from the torchrun environment, device choice, FSDP2 sharding
(per transformer block, then the root), activation checkpointing, compile.

Frozen submodules (any submodule whose parameters all have requires_grad=False) are replicated on every
rank: excluded from FSDP (`ignored_params`) and cast to the compute dtype, so they cost no communication.
SonarLLM keeps its frozen SONAR decoder outside the module tree altogether (`decoder_to` moves and casts it).
Whether FSDP2 is used is decided by `uses_fsdp(cfg)` (the trainer asks it; nothing probes the module).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from sonar_llm.activation_checkpointing import apply_activation_checkpointing
from sonar_llm.compile import compile_block
from sonar_llm.models.family import ConceptFamily
from sonar_llm.sonar.checkpoint import DTYPES  # noqa: F401  (the one dtype table; train/sonar_train/loop.py reads it here)
from sonar_train.config import ConfigError, RunConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # whether this module created a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(cfg: RunConfig) -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).
    NCCL on CUDA, gloo on CPU; the collective timeout is `parallel.timeout_minutes`. Without WORLD_SIZE
    (a plain `python train/main.py`) runs as a single process without a process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if "WORLD_SIZE" not in os.environ:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=cfg.parallel.timeout_minutes), **kwargs)
        info.initialized = True
    info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def shutdown_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Largest submodules whose parameters are all frozen (e.g. SonarLLM's SONAR decoder)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def uses_fsdp(cfg: RunConfig) -> bool:
    """FSDP2 sharding: `parallel.fsdp` and a process group exists (else one process, or full replicas)."""
    return cfg.parallel.fsdp and dist.is_initialized()


def compile_model(model: nn.Module, blocks: list[nn.Module], backend: str | None = None) -> None:
    """`train.compile`: every transformer block's forward compiled with fullgraph=True and dynamic shapes
    (torchtitan style, before FSDP2 wraps the blocks; `sonar_llm.compile`), and the frozen SONAR decoder's
    layer units when the family has one (`PackedSonarDecoder.compile_layers`). The kernels (attention, fused
    add+LayerNorm, linear cross-entropy) are sonar_kernels custom ops, which the graphs call as they are.
    `backend`: torch.compile's (default inductor)."""
    for b in blocks:
        compile_block(b, backend)
    packed = getattr(model, "_packed", None)  # SonarLLM keeps its frozen decoder outside the module tree
    if packed is not None:
        packed.compile_layers(backend)


def parallelize(model: nn.Module, cfg: RunConfig, info: DistInfo) -> nn.Module:
    """Move to device, then activation checkpointing, compile (per block) and FSDP2 as configured.
    Returns the (same, now sharded) module; call `model.loss` as usual."""
    if not hasattr(model, "transformer_blocks"):
        raise TypeError(f"model {type(model).__name__} has no transformer_blocks() method")
    blocks = list(model.transformer_blocks())
    dtype = DTYPES[cfg.train.precision]
    model.to(info.device)
    frozen = frozen_modules(model)
    use_fsdp = uses_fsdp(cfg)
    if dtype != torch.float32:
        for m in frozen:  # frozen weights need no fp32 master copy
            m.to(dtype)
    # frozen modules a family keeps outside its module tree (SonarLLM's SONAR decoder: no state_dict entries,
    # never sharded) are always replicated, moved and cast here; a no-op for the other families
    model.decoder_to(info.device, dtype if dtype != torch.float32 else None)
    if isinstance(model, ConceptFamily):  # its blocks and, for SONAR-LLM, the frozen decoder's layers
        model.apply_activation_checkpointing(cfg.train.activation_checkpointing)
    else:
        apply_activation_checkpointing(blocks, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_model(model, blocks)
    if not use_fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy() if dtype == torch.float32 else MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp)
    reshard = cfg.parallel.reshard_after_forward
    for b in blocks:
        fully_shard(b, reshard_after_forward=reshard, **kw)
    ignored = {p for m in frozen for p in m.parameters()}
    # the root keeps its parameters gathered after forward: backward needs them straight away
    fully_shard(model, reshard_after_forward=False, ignored_params=ignored or None, **kw)
    register_fsdp_forward_method(model, "loss")  # the trainer calls loss(), not forward()
    return model
