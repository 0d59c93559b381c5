"""Tiny self-contained model family and data loader for the training-stack tests (no dependency on
sonar_llm.models / sonar_llm.data). Fault injection through `model.overrides` or, for a run that is later
resumed with the same config (a resume refuses changed model.overrides), the environment variable FAKE_FAULTS
(a JSON object of the same keys):
  nan_calls = [i, ...]   training-mode loss call i (0-based, per process) returns NaN
  crash_call = i, crash_rank = r, crash_mode = "raise"|"exit"   rank r fails at training call i
  signal_call = i        the process sends itself SIGUSR1 at training call i
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

E, D = 8, 16


@dataclass
class FakeBatch:
    embeddings: torch.Tensor  # [S, E]
    tokens: torch.Tensor  # [T]

    def to(self, device):
        return FakeBatch(self.embeddings.to(device), self.tokens.to(device))

    @property
    def num_sentences(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_target_tokens(self) -> int:
        return self.tokens.numel()


class FakeLoader:
    """Global stream of micro-batches g = 0, 1, ...; rank r of w gets g = k*w + r. Batch g is a pure
    function of (seed, split, g), so any rank layout sees the same global batches."""

    def __init__(self, seed: int, split: str, rank: int, world_size: int, sentences: int = 12):
        self.seed, self.split, self.rank, self.world = seed, split, rank, world_size
        self.sentences = sentences
        self.k = 0

    def batch(self, g: int) -> FakeBatch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + (0 if self.split == "train" else 7) * 10_007 + g)
        s = self.sentences + g % 3
        return FakeBatch(torch.randn(s, E, generator=gen), torch.randint(0, 50, (3 * s,), generator=gen))

    def __iter__(self):
        while True:
            g = self.k * self.world + self.rank
            self.k += 1
            yield self.batch(g)

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])


def fake_data_factory(cfg, split, info):
    return FakeLoader(cfg.data.seed, split, info.rank, info.world_size)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class FrozenDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(E, E) for _ in range(2)])
        self.requires_grad_(False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x
        return x


class FakeFamily(nn.Module):
    """in-proj -> residual MLP blocks -> out-proj -> frozen 'decoder'; MSE to the next embedding."""

    def __init__(self, n_blocks: int = 2, **faults):
        super().__init__()
        self.inp = nn.Linear(E, D)
        self.blocks = nn.ModuleList([Block() for _ in range(n_blocks)])
        self.out = nn.Linear(D, E)
        self.decoder = FrozenDecoder()
        self.faults = faults
        self.calls = 0

    def transformer_blocks(self):
        return list(self.blocks)

    def decoder_to(self, device=None, dtype=None):  # no frozen modules outside the module tree
        pass

    def flops_per_batch(self, batch) -> float:
        s = batch.embeddings.shape[0]
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.decoder.parameters())
        return 6.0 * trainable * s + 4.0 * frozen * s

    def loss(self, batch):
        if self.training:
            call = self.calls
            self.calls += 1
            f = self.faults
            if call == f.get("signal_call", -1):
                import signal

                os.kill(os.getpid(), signal.SIGUSR1)
            if call == f.get("crash_call", -1) and int(os.environ.get("RANK", "0")) == f.get("crash_rank", 0):
                if f.get("crash_mode", "raise") == "exit":
                    os._exit(17)
                raise RuntimeError(f"injected failure at call {call}")
        x = batch.embeddings
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        pred = self.decoder(self.out(h[:-1]))
        loss = ((pred.float() - x[1:].float()) ** 2).mean()
        if self.training and call in self.faults.get("nan_calls", ()):
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}


def fake_model_factory(cfg):
    import json

    ov = {**cfg.model.overrides, **json.loads(os.environ.get("FAKE_FAULTS") or "{}")}
    return FakeFamily(n_blocks=int(ov.pop("n_blocks", 2)), **ov)
