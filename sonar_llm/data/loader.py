"""Document stream -> packed `ConceptBatch`es, with rank/worker splitting and exact mid-epoch resume.

Order: each epoch permutes the documents with a numpy Generator seeded by (seed, epoch) (or keeps file
order when shuffle=False). Splitting: with world_size ranks and W DataLoader workers there are
world_size*W slots; slot = rank*W + worker takes the documents at positions slot, slot + world_size*W, ...
of the epoch's order (strided, so every slot sees a random sample and slots never overlap).

Packing (greedy, per slot): documents are added to the current batch while its sentence count stays
<= max_sentences, its target-token count stays <= max_tokens and (when max_docs > 0) it holds at most
max_docs documents (or document pieces); a document that would overflow closes the batch and starts the next. A single document over either budget is truncated to the longest prefix
that fits (the rest is dropped). With split_docs=True documents are instead cut to fill each batch to the
budget and their remainder continues in the next batch (pieces of fewer than 2 sentences are not cut off).

Resuming: the state is (epoch, batches consumed in this epoch). Packing depends only on the document
lengths, so `load_state_dict` replays the plan and the next batch equals the next batch of an
uninterrupted run. `make_dataloader` runs one ConceptLoader per DataLoader worker; its wrapper records how
many batches it has received from each worker (not how many the workers have prefetched) and which worker
is next, and a resumed DataLoader restarts every worker at its own position, rotating the worker ids so
the interleaving continues where it stopped.

Ranks get different numbers of batches per epoch; distributed training should use loop=True and a fixed
number of steps (or stop when any rank runs out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import ConceptBatch
from .shards import from_storage

__all__ = ["ConceptLoader", "ResumableDataLoader", "make_dataloader", "Piece"]


@dataclass(frozen=True)
class Piece:
    """Sentences [start, end) of document `doc` go into a batch."""

    doc: int
    start: int
    end: int


class ConceptLoader:
    """Iterate packed ConceptBatch objects over a dataset (see module docstring for order/split/resume).

    dataset: a `ShardedDataset`-like object with `num_docs`, `doc(i) -> (emb[S,E], tokens[T], offsets[S+1])`,
        `doc_lengths() -> (sentences[D], tokens[D])` and `sentence_token_lengths(i) -> [S]`.
    max_sentences / max_tokens: per-batch budgets (sentences; target-mode tokens).
    max_docs: per-batch document budget (0 = none), e.g. a fixed number of documents per step as the public
        SONAR-LLM recipe counts its batch.
    dtype: dtype of `ConceptBatch.embeddings` (the shards store fp16/bf16).
    worker_id / num_workers: the worker slot; by default taken from torch's worker info inside a
        DataLoader worker (0 / 1 elsewhere).
    """

    def __init__(self, dataset, *, max_sentences: int, max_tokens: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = False, epoch: int = 0,
                 loop: bool = False, split_docs: bool = False, dtype: torch.dtype = torch.float32,
                 worker_id: int | None = None, num_workers: int | None = None, max_docs: int = 0):
        for name, v in (("max_sentences", max_sentences), ("max_tokens", max_tokens), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(max_docs, (int, np.integer)) or max_docs < 0:
            raise ValueError(f"max_docs must be an int >= 0 (0 = no document budget), got {max_docs!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if (worker_id is None) != (num_workers is None):
            raise ValueError("give both worker_id and num_workers, or neither")
        if num_workers is not None and not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id must be in [0, num_workers={num_workers}), got {worker_id}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dataset = dataset
        self.max_sentences = int(max_sentences)
        self.max_tokens = int(max_tokens)
        self.max_docs = int(max_docs)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.loop = loop
        self.split_docs = split_docs
        self.dtype = dtype
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.epoch = int(epoch)
        self.batch_in_epoch = 0
        self._plan_cache: tuple[tuple, list[list[Piece]]] | None = None

    # -- planning ---------------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        if self.num_workers is not None:
            wid, nw = self.worker_id, self.num_workers
        else:
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All document indices in the order of `epoch` (before the slot split)."""
        n = int(self.dataset.num_docs)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n).astype(np.int64)

    def slot_documents(self, epoch: int) -> np.ndarray:
        """The document indices this rank/worker reads in `epoch`, in order."""
        slot, n_slots = self._slot()
        return self.epoch_order(epoch)[slot::n_slots]

    def _fit_prefix(self, doc: int, start: int, max_s: int, max_t: int) -> int:
        """Largest k with sentences [start, start+k) of `doc` within max_s sentences and max_t tokens."""
        lens = self.dataset.sentence_token_lengths(doc)[start:start + max_s]
        return int(np.searchsorted(np.cumsum(lens), max_t, side="right"))

    def plan(self, epoch: int) -> list[list[Piece]]:
        """The batches (lists of Pieces) of this rank/worker in `epoch`; depends only on document lengths."""
        key = (epoch, self._slot())
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        n_sent, n_tok = self.dataset.doc_lengths()
        S, T, D = self.max_sentences, self.max_tokens, self.max_docs
        batches: list[list[Piece]] = []
        cur: list[Piece] = []
        cs = ct = 0
        for d in self.slot_documents(epoch).tolist():
            s, t = int(n_sent[d]), int(n_tok[d])
            if s == 0:
                continue
            if not self.split_docs:
                if s <= S and t <= T:
                    if cs + s > S or ct + t > T or (D and len(cur) >= D):
                        batches.append(cur)
                        cur, cs, ct = [], 0, 0
                    cur.append(Piece(d, 0, s))
                    cs, ct = cs + s, ct + t
                    continue
                k = self._fit_prefix(d, 0, S, T)  # over budget on its own: truncate, alone in its batch
                if k == 0:
                    raise ValueError(f"document {d}: its first sentence has more target tokens than "
                                     f"max_tokens={T}; raise max_tokens")
                if cur:
                    batches.append(cur)
                batches.append([Piece(d, 0, k)])
                cur, cs, ct = [], 0, 0
                continue
            start = 0
            while start < s:
                if D and len(cur) >= D:
                    batches.append(cur)
                    cur, cs, ct = [], 0, 0
                left = s - start
                k = self._fit_prefix(d, start, S - cs, T - ct)
                if k == left:  # the rest of the document fits
                    cur.append(Piece(d, start, s))
                    cs += k
                    ct += int(self.dataset.sentence_token_lengths(d)[start:s].sum())
                    break
                if cur and (k < 2 or left - k < 2):  # would cut off a 1-sentence piece: next batch
                    batches.append(cur)
                    cur, cs, ct = [], 0, 0
                    continue
                if k == 0:
                    raise ValueError(f"document {d}: sentence {start} has more target tokens than "
                                     f"max_tokens={T}; raise max_tokens")
                cur.append(Piece(d, start, start + k))
                batches.append(cur)
                cur, cs, ct = [], 0, 0
                start += k
        if cur and not self.drop_last:  # the last batch is the only one not closed by a full budget
            batches.append(cur)
        self._plan_cache = (key, batches)
        return batches

    # -- batches ----------------------------------------------------------------------------------
    def build(self, pieces: list[Piece]) -> ConceptBatch:
        """Gather the sentences of `pieces` into a ConceptBatch (one copy out of the memory maps)."""
        ds = self.dataset
        raw = getattr(ds, "raw_doc", None)
        embs, toks, tok_lens, doc_lens = [], [], [], []
        for p in pieces:
            emb, tokens, offs = raw(p.doc) if raw is not None else ds.doc(p.doc)
            embs.append(emb[p.start:p.end])
            toks.append(tokens[offs[p.start]:offs[p.end]])
            tok_lens.append(np.diff(offs[p.start:p.end + 1]))
            doc_lens.append(p.end - p.start)
        if not embs:
            raise ValueError("ConceptLoader.build: no pieces")
        if raw is not None:
            embeddings = from_storage(np.concatenate(embs), ds.dtype, copy=False).to(self.dtype)
        else:
            embeddings = torch.cat([torch.as_tensor(e) for e in embs]).to(self.dtype)
        tokens = torch.from_numpy(np.concatenate(toks).astype(np.int64))
        sent_lens = np.concatenate(tok_lens)
        tok_cu = torch.from_numpy(np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int32))
        doc_cu = torch.from_numpy(np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int32))
        return ConceptBatch(embeddings=embeddings, doc_cu_seqlens=doc_cu, tokens=tokens, tok_cu_seqlens=tok_cu,
                            max_doc_len=max(doc_lens), max_sent_len=int(sent_lens.max()))

    def __iter__(self) -> Iterator[ConceptBatch]:
        while True:
            batches = self.plan(self.epoch)
            if not batches and self.loop:
                raise ValueError(f"rank {self.rank} slot {self._slot()} has no batches in epoch {self.epoch} "
                                 f"({self.dataset.num_docs} documents): use fewer ranks/workers or more data")
            while self.batch_in_epoch < len(batches):
                pieces = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1  # advance first: a state saved after this batch resumes after it
                yield self.build(pieces)
            self.epoch += 1
            self.batch_in_epoch = 0
            if not self.loop:
                return

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.plan(self.epoch)) - self.batch_in_epoch

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "split_docs": self.split_docs, "max_sentences": self.max_sentences,
                "max_tokens": self.max_tokens, "max_docs": self.max_docs, "num_docs": int(self.dataset.num_docs)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        cfg = self._config()
        bad = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in cfg.items() if state.get(k) != v]
        if bad:
            raise ValueError("ConceptLoader state does not match this loader: " + "; ".join(bad))
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


def _identity(x):
    return x


class _WorkerStream(IterableDataset):
    """Runs inside each DataLoader worker: one ConceptLoader on the worker's slot, from its saved position."""

    def __init__(self, template: ConceptLoader, positions: list[tuple[int, int]], rotation: int):
        self.template = template
        self.positions = positions
        self.rotation = rotation

    def __iter__(self):
        info = get_worker_info()
        nw = len(self.positions)
        wid = (info.id + self.rotation) % nw if info is not None else 0
        t = self.template
        loader = ConceptLoader(t.dataset, max_sentences=t.max_sentences, max_tokens=t.max_tokens,
                               max_docs=t.max_docs, seed=t.seed,
                               rank=t.rank, world_size=t.world_size, shuffle=t.shuffle, drop_last=t.drop_last,
                               loop=t.loop, split_docs=t.split_docs, dtype=t.dtype, worker_id=wid, num_workers=nw)
        loader.epoch, loader.batch_in_epoch = self.positions[wid]
        for batch in loader:
            yield wid, loader.epoch, loader.batch_in_epoch, batch


class ResumableDataLoader:
    """A torch DataLoader over per-worker ConceptLoaders that can save and restore its position.

    `state_dict()` records, per worker, the (epoch, batches) it has delivered to this process, and the
    worker that delivers next; after `load_state_dict` the next `iter()` continues exactly there.
    """

    def __init__(self, loader: ConceptLoader, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.loader = loader
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        n = max(num_workers, 1)
        self.positions: list[tuple[int, int]] = [(loader.epoch, loader.batch_in_epoch)] * n
        self.next_worker = 0

    def __iter__(self) -> Iterator[ConceptBatch]:
        if self.num_workers == 0:
            self.loader.epoch, self.loader.batch_in_epoch = self.positions[0]
            for batch in self.loader:
                self.positions[0] = (self.loader.epoch, self.loader.batch_in_epoch)
                yield batch
            self.positions[0] = (self.loader.epoch, self.loader.batch_in_epoch)
            return
        start_epoch = self.positions[0][0]
        kwargs = {}
        if self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        dl = DataLoader(_WorkerStream(self.loader, list(self.positions), self.next_worker), batch_size=None,
                        num_workers=self.num_workers, collate_fn=_identity, pin_memory=self.pin_memory,
                        multiprocessing_context=self.multiprocessing_context, **kwargs)
        for wid, epoch, done, batch in dl:
            self.positions[wid] = (epoch, done)
            self.next_worker = (wid + 1) % self.num_workers
            yield batch
        if not self.loader.loop:  # every worker finished its epoch: the next iter() starts the next one
            self.positions = [(start_epoch + 1, 0)] * self.num_workers
            self.next_worker = 0

    def state_dict(self) -> dict:
        return {"num_workers": self.num_workers, "positions": [list(p) for p in self.positions],
                "next_worker": self.next_worker, "loader": self.loader._config()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_workers") != self.num_workers:
            raise ValueError(f"state was saved with num_workers={state.get('num_workers')}, this loader has "
                             f"{self.num_workers}; resume with the same number of workers")
        cfg = self.loader._config()
        bad = [k for k, v in cfg.items() if state["loader"].get(k) != v]
        if bad:
            raise ValueError(f"ResumableDataLoader state does not match this loader on {bad}")
        self.positions = [tuple(int(x) for x in p) for p in state["positions"]]
        self.next_worker = int(state["next_worker"])


def make_dataloader(dataset, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None,
                    multiprocessing_context=None, **loader_kwargs) -> ResumableDataLoader:
    """A resumable DataLoader (batch_size=None) running one ConceptLoader per worker.

    `loader_kwargs` go to ConceptLoader (max_sentences, max_tokens, seed, rank, world_size, ...). Save
    `state_dict()` with the training checkpoint and `load_state_dict()` it before iterating again;
    resuming needs the same num_workers (the worker count is part of the document split).
    """
    return ResumableDataLoader(ConceptLoader(dataset, **loader_kwargs), num_workers=num_workers,
                               pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                               multiprocessing_context=multiprocessing_context)
