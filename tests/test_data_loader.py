"""Tests for sonar_llm.data.loader and batch: packing budgets, order, rank/worker split, resume, DataLoader."""
import numpy as np
import pytest
import torch

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.data.loader import ConceptLoader, make_dataloader
from sonar_llm.data.shards import DatasetWriter, ShardArrays, ShardedDataset, to_storage

N_DOCS = 40
E = 4


def _sentence_tokens(d, j, length):
    return [3, 7, 1000 + d, 500 + j] + [5] * (length - 5) + [3]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """40 documents of 1-8 sentences of 5-12 tokens; row j of doc d has embedding [d, j, r, r]."""
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    n_sent = rng.integers(1, 9, N_DOCS)
    w = DatasetWriter(root, embed_dim=E, dtype="fp16", end_of_doc_text="End of sequence.",
                      end_of_doc_tokens=[3, 7, 3], end_of_doc_embedding=torch.zeros(E))
    bounds = [0, 13, 27, N_DOCS]
    for k in range(3):
        embs, toks, sent_lens, doc_lens = [], [], [], []
        for d in range(bounds[k], bounds[k + 1]):
            for j in range(n_sent[d]):
                embs.append([d, j, rng.standard_normal(), rng.standard_normal()])
                t = _sentence_tokens(d, j, int(rng.integers(5, 13)))
                toks += t
                sent_lens.append(len(t))
            doc_lens.append(n_sent[d])
        arrays = ShardArrays(to_storage(torch.tensor(embs), "fp16"), np.array(toks, np.int32),
                             np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int64),
                             np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64))
        w.add_shard(k, arrays)
    w.finish(3)
    return ShardedDataset(root)


def _pieces(batch, ds):
    """Decode a batch into [(doc, first_sentence, n_sentences)], checking every row against the dataset."""
    batch.validate()
    out = []
    doc_cu = batch.doc_cu_seqlens.tolist()
    tok_cu = batch.tok_cu_seqlens.tolist()
    for a, b in zip(doc_cu[:-1], doc_cu[1:]):
        d = int(batch.embeddings[a, 0])
        emb, tokens, offs = ds.doc(d)
        j0 = int(batch.embeddings[a, 1])
        assert torch.equal(batch.embeddings[a:b], emb[j0:j0 + b - a].float())
        for r in range(a, b):
            j = j0 + r - a
            assert batch.tokens[tok_cu[r]:tok_cu[r + 1]].tolist() == tokens[offs[j]:offs[j + 1]].tolist()
        out.append((d, j0, b - a))
    return out


def _collect(loader, n=None):
    out = []
    if n == 0:
        return out
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _same(b1, b2):
    return all(torch.equal(getattr(b1, f), getattr(b2, f)) for f in
               ("embeddings", "doc_cu_seqlens", "tokens", "tok_cu_seqlens")) and \
        (b1.max_doc_len, b1.max_sent_len) == (b2.max_doc_len, b2.max_sent_len)


@pytest.mark.parametrize("S,T", [(10, 60), (8, 200), (3, 25)])
def test_packing_budgets_order_and_truncation(ds, S, T):
    n_sent, n_tok = ds.doc_lengths()
    loader = ConceptLoader(ds, max_sentences=S, max_tokens=T, seed=5)
    batches = [_pieces(b, ds) for b in loader]
    raw = _collect(ConceptLoader(ds, max_sentences=S, max_tokens=T, seed=5))
    for b in raw:
        assert b.num_sentences <= S and b.num_target_tokens <= T
        assert b.embeddings.dtype == torch.float32
    flat = [p for b in batches for p in b]
    order = np.random.default_rng([5, 0]).permutation(N_DOCS).tolist()
    assert [d for d, _, _ in flat] == order  # every document once, in the epoch's permutation order
    for d, j0, n in flat:
        lens = ds.sentence_token_lengths(d)
        assert j0 == 0
        if n_sent[d] <= S and n_tok[d] <= T:
            assert n == n_sent[d]
        else:  # truncated to the longest prefix within both budgets, alone in its batch
            assert n <= S and lens[:n].sum() <= T and (n == S or lens[:n + 1].sum() > T)
            assert [p for b in batches for p in b if p[0] == d and len(b) == 1]
    for prev, nxt in zip(batches[:-1], batches[1:]):  # greedy: the next document did not fit
        if len(prev) == 1 and prev[0][2] < n_sent[prev[0][0]]:
            continue  # a truncated document is alone in its batch
        d = nxt[0][0]
        used_s = sum(n for _, _, n in prev)
        used_t = sum(int(ds.sentence_token_lengths(p)[j:j + n].sum()) for p, j, n in prev)
        assert used_s + n_sent[d] > S or used_t + n_tok[d] > T


def test_determinism_seeds_epochs_and_no_shuffle(ds):
    kw = dict(max_sentences=12, max_tokens=100)
    a = _collect(ConceptLoader(ds, seed=1, **kw))
    b = _collect(ConceptLoader(ds, seed=1, **kw))
    assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    docs = lambda bs: [p[0] for x in bs for p in _pieces(x, ds)]  # noqa: E731
    assert docs(_collect(ConceptLoader(ds, seed=2, **kw))) != docs(a)
    assert docs(_collect(ConceptLoader(ds, seed=1, epoch=1, **kw))) != docs(a)
    assert docs(_collect(ConceptLoader(ds, seed=1, shuffle=False, **kw))) == list(range(N_DOCS))


@pytest.mark.parametrize("world,workers", [(3, 1), (2, 2)])
def test_rank_and_worker_split_is_a_partition(ds, world, workers):
    seen = []
    for rank in range(world):
        for wid in range(workers):
            loader = ConceptLoader(ds, max_sentences=16, max_tokens=200, seed=3, rank=rank, world_size=world,
                                   worker_id=wid, num_workers=workers)
            docs = [p[0] for b in loader for p in _pieces(b, ds)]
            slot = rank * workers + wid
            assert docs == np.random.default_rng([3, 0]).permutation(N_DOCS)[slot::world * workers].tolist()
            seen.append(set(docs))
    assert sum(len(s) for s in seen) == N_DOCS and set().union(*seen) == set(range(N_DOCS))


@pytest.mark.parametrize("stop", [0, 3, 7, 11])
def test_resume_mid_epoch_equals_uninterrupted(ds, stop):
    kw = dict(max_sentences=10, max_tokens=70, seed=9, loop=True, rank=1, world_size=2)
    epoch_len = len(ConceptLoader(ds, **kw))
    full = _collect(ConceptLoader(ds, **kw), 2 * epoch_len + 2)
    assert stop < 2 * epoch_len
    first = ConceptLoader(ds, **kw)
    _collect(first, stop)
    state = first.state_dict()
    resumed = ConceptLoader(ds, **kw)
    resumed.load_state_dict(state)
    rest = _collect(resumed, len(full) - stop)
    assert all(_same(x, y) for x, y in zip(rest, full[stop:]))
    assert state["epoch"] == stop // epoch_len or (stop % epoch_len == 0 and stop > 0)
    with pytest.raises(ValueError, match="seed"):
        ConceptLoader(ds, **{**kw, "seed": 10}).load_state_dict(state)


def test_epoch_ends_and_next_iteration_starts_next_epoch(ds):
    loader = ConceptLoader(ds, max_sentences=12, max_tokens=100, seed=4)
    e0 = _collect(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_in_epoch"] == 0
    e1 = _collect(loader)
    ref1 = _collect(ConceptLoader(ds, max_sentences=12, max_tokens=100, seed=4, epoch=1))
    assert len(e1) == len(ref1) and all(_same(x, y) for x, y in zip(e1, ref1)) and len(e0) > 0


def test_split_docs_fills_batches_and_keeps_every_sentence(ds):
    S, T = 9, 70
    n_sent, _ = ds.doc_lengths()
    batches = [_pieces(b, ds) for b in ConceptLoader(ds, max_sentences=S, max_tokens=T, seed=0, split_docs=True)]
    covered = {}
    for b in batches:
        for d, j0, n in b:
            for j in range(j0, j0 + n):
                assert (d, j) not in covered
                covered[(d, j)] = True
    assert len(covered) == int(n_sent.sum())
    for prev, nxt in zip(batches[:-1], batches[1:]):
        used_s = sum(n for _, _, n in prev)
        used_t = sum(int(ds.sentence_token_lengths(p)[j:j + n].sum()) for p, j, n in prev)
        assert used_s <= S and used_t <= T
        d, j0, _ = nxt[0]
        lens = ds.sentence_token_lengths(d)[j0:]
        k = min(S - used_s, int(np.searchsorted(np.cumsum(lens), T - used_t, side="right")))
        left = len(lens)
        if prev[-1][0] == d:  # a cut document continues: the cut filled the batch
            assert k == 0
        else:  # the next piece did not fit, and cutting it would have left a 1-sentence piece
            assert k < left and (k < 2 or left - k < 2)
    assert any(prev[-1][0] == nxt[0][0] for prev, nxt in zip(batches[:-1], batches[1:]))


def test_drop_last_and_oversized_sentence(ds):
    kw = dict(max_sentences=12, max_tokens=100, seed=4)
    keep = _collect(ConceptLoader(ds, **kw))
    drop = _collect(ConceptLoader(ds, drop_last=True, **kw))
    assert len(drop) == len(keep) - 1 and all(_same(x, y) for x, y in zip(drop, keep))
    with pytest.raises(ValueError, match="max_tokens"):
        _collect(ConceptLoader(ds, max_sentences=4, max_tokens=4, seed=0))
    with pytest.raises(ValueError, match="rank"):
        ConceptLoader(ds, max_sentences=4, max_tokens=40, rank=2, world_size=2)


def test_dataloader_workers_interleave_and_resume(ds):
    kw = dict(max_sentences=12, max_tokens=100, seed=6)
    streams = [_collect(ConceptLoader(ds, worker_id=w, num_workers=2, **kw)) for w in range(2)]
    expected = []
    for i in range(max(map(len, streams))):
        expected += [s[i] for s in streams if i < len(s)]
    dl = make_dataloader(ds, num_workers=2, **kw)
    got = _collect(dl)
    assert len(got) == len(expected) and all(_same(x, y) for x, y in zip(got, expected))
    assert dl.state_dict()["positions"] == [[1, 0], [1, 0]]  # next iter() is epoch 1
    part = make_dataloader(ds, num_workers=2, **kw)
    _collect(part, 3)
    state = part.state_dict()
    resumed = make_dataloader(ds, num_workers=2, **kw)
    resumed.load_state_dict(state)
    rest = _collect(resumed)
    assert len(rest) == len(expected) - 3 and all(_same(x, y) for x, y in zip(rest, expected[3:]))
    with pytest.raises(ValueError, match="num_workers"):
        make_dataloader(ds, num_workers=0, **kw).load_state_dict(state)


def test_concept_batch_validate_and_to():
    good = ConceptBatch(torch.zeros(3, 2), torch.tensor([0, 1, 3], dtype=torch.int32),
                        torch.arange(7), torch.tensor([0, 2, 5, 7], dtype=torch.int32), 2, 3)
    assert good.validate() is good
    assert (good.num_docs, good.num_sentences, good.num_target_tokens) == (2, 3, 7)
    moved = good.to("cpu", dtype=torch.float16)
    assert moved.embeddings.dtype == torch.float16 and moved.validate()
    with pytest.raises(TypeError, match="doc_cu_seqlens must be int32"):
        ConceptBatch(good.embeddings, good.doc_cu_seqlens.long(), good.tokens, good.tok_cu_seqlens, 2, 3).validate()
    with pytest.raises(TypeError, match="tokens must be int64"):
        ConceptBatch(good.embeddings, good.doc_cu_seqlens, good.tokens.int(), good.tok_cu_seqlens, 2, 3).validate()
    with pytest.raises(ValueError, match="tok_cu_seqlens must have shape"):
        ConceptBatch(good.embeddings, good.doc_cu_seqlens, good.tokens, good.tok_cu_seqlens[:3], 2, 3).validate()
    with pytest.raises(ValueError, match="end at S_total=3"):
        ConceptBatch(good.embeddings, torch.tensor([0, 1, 2], dtype=torch.int32), good.tokens,
                     good.tok_cu_seqlens, 2, 3).validate()
    with pytest.raises(ValueError, match="max_sent_len=4"):
        ConceptBatch(good.embeddings, good.doc_cu_seqlens, good.tokens, good.tok_cu_seqlens, 2, 4).validate()
    with pytest.raises(ValueError, match="strictly increasing"):
        ConceptBatch(good.embeddings, good.doc_cu_seqlens, good.tokens,
                     torch.tensor([0, 2, 2, 7], dtype=torch.int32), 2, 5).validate()


def test_bf16_dataset_batches_match_the_stored_values(tmp_path):
    rng = np.random.default_rng(7)
    emb = torch.from_numpy(rng.standard_normal((7, E)).astype(np.float32))
    w = DatasetWriter(tmp_path, embed_dim=E, dtype="bf16", end_of_doc_text="End.", end_of_doc_tokens=[3, 7, 3],
                      end_of_doc_embedding=torch.zeros(E))
    tokens = np.array([3, 7, 9, 3] * 7, np.int32)
    w.add_shard(0, ShardArrays(to_storage(emb, "bf16"), tokens, np.arange(0, 29, 4, dtype=np.int64),
                               np.array([0, 3, 7], np.int64)))
    w.finish(1)
    ds_bf16 = ShardedDataset(tmp_path, verify="full")
    (batch,) = _collect(ConceptLoader(ds_bf16, max_sentences=8, max_tokens=64, shuffle=False, dtype=torch.float64))
    assert batch.embeddings.dtype == torch.float64
    assert torch.equal(batch.embeddings, emb.to(torch.bfloat16).double())  # exact: bf16 -> f64 is lossless
    assert batch.doc_cu_seqlens.tolist() == [0, 3, 7] and batch.tokens.tolist() == tokens.tolist()


@pytest.mark.parametrize("split_docs", [False, True])
def test_document_budget(ds, split_docs):
    """max_docs caps the documents (pieces) per batch; with the sentence and token budgets out of the way the
    batches are exactly consecutive runs of max_docs documents of the epoch's order (the public recipe's
    fixed documents per step)."""
    D = 3
    n_sent, n_tok = ds.doc_lengths()
    big = dict(max_sentences=int(n_sent.sum()), max_tokens=int(n_tok.sum()))
    batches = [_pieces(b, ds) for b in ConceptLoader(ds, max_docs=D, seed=2, split_docs=split_docs, **big)]
    order = np.random.default_rng([2, 0]).permutation(N_DOCS).tolist()
    expected = [order[i:i + D] for i in range(0, N_DOCS, D)]
    assert [[d for d, _, _ in b] for b in batches] == expected
    assert all(j0 == 0 and n == n_sent[d] for b in batches for d, j0, n in b)
    tight = [_pieces(b, ds) for b in ConceptLoader(ds, max_docs=D, max_sentences=9, max_tokens=70, seed=2,
                                                   split_docs=split_docs)]
    assert max(len(b) for b in tight) == D  # all three budgets in play: never more than D documents
    if split_docs:  # cut documents continue in the next batch: every sentence once
        assert sum(n for b in tight for _, _, n in b) == int(n_sent.sum())
    with pytest.raises(ValueError, match="max_docs"):
        ConceptLoader(ds, max_docs=-1, **big)
    a = ConceptLoader(ds, max_docs=D, seed=2, **big)
    with pytest.raises(ValueError, match="max_docs"):  # a resumed loader must pack the same way
        ConceptLoader(ds, max_docs=D + 1, seed=2, **big).load_state_dict(a.state_dict())


def test_training_data_factory_applies_the_document_budget(ds):
    """`data.max_docs` of a run config reaches the trainer's loader: its batches are the same as a
    ConceptLoader's with that budget."""
    from sonar_train.config import RunConfig
    from sonar_train.loop import default_data_factory
    from sonar_train.parallel import DistInfo

    cfg = RunConfig()
    cfg.data.path, cfg.data.max_docs, cfg.data.max_sentences, cfg.data.max_tokens = str(ds.root), 4, 1000, 100000
    cfg.data.seed = 3
    got = _collect(default_data_factory(cfg, "train", DistInfo()), 5)
    want = _collect(ConceptLoader(ds, max_docs=4, max_sentences=1000, max_tokens=100000, seed=3), 5)
    assert [b.num_docs for b in got] == [4] * 5
    assert all(_same(a, b) for a, b in zip(got, want))
