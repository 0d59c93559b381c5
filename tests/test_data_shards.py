"""Tests for sonar_llm.data.shards: round trip (fp16, bf16), manifests, rank parts, corruption detection."""
import json
import os

import numpy as np
import pytest
import torch

from sonar_llm.data.shards import (DatasetWriter, ShardArrays, ShardCorruptionError, ShardedDataset, read_manifest,
                                   to_storage)

E = 6


def _random_docs(rng, n_docs):
    """List of docs: (emb float32 [S,E], list of token-id lists)."""
    docs = []
    for _ in range(n_docs):
        s = int(rng.integers(1, 6))
        emb = torch.from_numpy(rng.standard_normal((s, E)).astype(np.float32) * 3)
        toks = [[3, 9] + rng.integers(4, 1000, int(rng.integers(0, 7))).tolist() + [3] for _ in range(s)]
        docs.append((emb, toks))
    return docs


def _arrays(docs, dtype):
    emb = torch.cat([d[0] for d in docs])
    sents = [t for d in docs for t in d[1]]
    sent_off = np.concatenate([[0], np.cumsum([len(t) for t in sents])]).astype(np.int64)
    doc_off = np.concatenate([[0], np.cumsum([len(d[1]) for d in docs])]).astype(np.int64)
    tokens = np.array([x for t in sents for x in t], dtype=np.int32)
    return ShardArrays(to_storage(emb, dtype), tokens, sent_off, doc_off)


def _writer(path, dtype="fp16", rank=0, world_size=1, **kw):
    return DatasetWriter(path, embed_dim=E, dtype=dtype, end_of_doc_text="End of sequence.",
                         end_of_doc_tokens=[3, 9, 5, 3], end_of_doc_embedding=torch.ones(E), encoder="fake",
                         tokenizer="bytes", config={"k": 1}, rank=rank, world_size=world_size, **kw)


def _write_dataset(path, docs_per_shard, dtype):
    w = _writer(path, dtype)
    for k, docs in enumerate(docs_per_shard):
        w.add_shard(k, _arrays(docs, dtype), doc_ids=[f"d{k}-{i}" for i in range(len(docs))])
    return w.finish(len(docs_per_shard), {"documents": 1})


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_trip(tmp_path, dtype, torch_dtype):
    rng = np.random.default_rng(1)
    shards = [_random_docs(rng, 4), _random_docs(rng, 3)]
    m = _write_dataset(tmp_path, shards, dtype)
    assert m["complete"] and m["totals"]["docs"] == 7 and m["dtype"] == dtype and m["embed_dim"] == E
    ds = ShardedDataset(tmp_path, verify="full")
    flat = [d for s in shards for d in s]
    assert ds.num_docs == len(ds) == 7
    n_sent, n_tok = ds.doc_lengths()
    for i, (emb_ref, toks_ref) in enumerate(flat):
        emb, tokens, offs = ds.doc(i)
        assert emb.dtype == torch_dtype and emb.shape == emb_ref.shape
        assert torch.equal(emb, emb_ref.to(torch_dtype))  # exact: the same rounding as a direct cast
        assert [tokens[offs[j]:offs[j + 1]].tolist() for j in range(len(toks_ref))] == toks_ref
        assert n_sent[i] == len(toks_ref) and n_tok[i] == sum(map(len, toks_ref))
        assert ds.sentence_token_lengths(i).tolist() == [len(t) for t in toks_ref]
    assert ds.doc_id(5) == "d1-1"
    assert torch.equal(ds.end_of_doc_embedding(), torch.ones(E, dtype=torch_dtype))
    assert ds.end_of_doc_text == "End of sequence."
    with pytest.raises(IndexError):
        ds.doc(7)


def _corrupt_setup(tmp_path):
    _write_dataset(tmp_path, [_random_docs(np.random.default_rng(2), 3)] * 2, "fp16")
    return tmp_path / "shard_000001"


def test_flipped_byte_is_named_in_full_verification(tmp_path):
    d = _corrupt_setup(tmp_path)
    path = d / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    ShardedDataset(tmp_path, verify="manifest")  # same size: only a checksum can tell
    with pytest.raises(ShardCorruptionError, match=str(path)):
        ShardedDataset(tmp_path, verify="full")


def test_truncated_and_missing_files_are_named(tmp_path):
    d = _corrupt_setup(tmp_path)
    tok = d / "tokens.npy"
    tok.write_bytes(tok.read_bytes()[:-4])
    with pytest.raises(ShardCorruptionError, match=str(tok)):
        ShardedDataset(tmp_path)
    ds = ShardedDataset(tmp_path, verify="none")  # unchecked: reading the truncated array still fails clearly
    with pytest.raises(ShardCorruptionError, match=str(tok)):
        ds.doc(4)
    d0 = tmp_path / "shard_000000"
    os.remove(d0 / "sent_offsets.npy")
    with pytest.raises(FileNotFoundError, match=str(d0 / "sent_offsets.npy")):
        ShardedDataset(tmp_path)


def test_edited_shard_json_is_named(tmp_path):
    d = _corrupt_setup(tmp_path)
    info = json.loads((d / "shard.json").read_text())
    info["num_docs"] += 1
    (d / "shard.json").write_text(json.dumps(info))
    with pytest.raises(ShardCorruptionError, match=str(d / "shard.json")):
        ShardedDataset(tmp_path)


@pytest.mark.parametrize("verify", ["manifest", "size", "full", "sampled"])
def test_shard_json_checksum_is_checked_in_every_verifying_mode(tmp_path, verify):
    """An edit that leaves shard.json valid and consistent (an added key: no count or size check can see it)
    is refused by its sha256 in the manifest, in every mode that verifies, naming the file."""
    d = _corrupt_setup(tmp_path)
    info = json.loads((d / "shard.json").read_text())
    info["note"] = "edited"
    (d / "shard.json").write_text(json.dumps(info))
    with pytest.raises(ShardCorruptionError, match=str(d / "shard.json")):
        ShardedDataset(tmp_path, verify=verify)


def test_incomplete_dataset_and_settings_mismatch(tmp_path):
    w = _writer(tmp_path)
    w.add_shard(0, _arrays(_random_docs(np.random.default_rng(3), 2), "fp16"))
    with pytest.raises(ValueError, match="not finished"):
        ShardedDataset(tmp_path)
    assert ShardedDataset(tmp_path, allow_incomplete=True).num_docs == 2
    again = _writer(tmp_path)  # re-opening keeps the completed shard
    assert again.completed == {0}
    with pytest.raises(ValueError, match="dtype"):
        _writer(tmp_path, dtype="bf16")
    with pytest.raises(ValueError, match="shards \\[1\\]"):
        again.finish(2)
    with pytest.raises(TypeError, match="float16"):
        again.add_shard(1, _arrays(_random_docs(np.random.default_rng(3), 2), "bf16"))


def test_rank_parts_merge_in_shard_order(tmp_path):
    rng = np.random.default_rng(4)
    shards = [_random_docs(rng, n) for n in (2, 3, 1, 2, 2)]
    w0, w1 = _writer(tmp_path, rank=0, world_size=2), _writer(tmp_path, rank=1, world_size=2)
    for k, docs in enumerate(shards):
        (w0 if k % 2 == 0 else w1).add_shard(k, _arrays(docs, "fp16"))
    with pytest.raises(ValueError, match="belongs to rank 1"):
        w0.add_shard(1, _arrays(shards[1], "fp16"))
    assert w1.finish(5)["rank"] == 1  # rank 0 not finished yet: no merged manifest
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="incomplete manifest parts"):
        read_manifest(tmp_path)
    merged = w0.finish(5)
    assert (tmp_path / "manifest.json").exists() and merged["complete"]
    assert [s["index"] for s in merged["shards"]] == [0, 1, 2, 3, 4]
    ds = ShardedDataset(tmp_path, verify="full")
    flat = [d for s in shards for d in s]
    assert ds.num_docs == len(flat)
    for i, (emb_ref, _) in enumerate(flat):
        assert torch.equal(ds.doc(i)[0], emb_ref.half())
    os.remove(tmp_path / "manifest.json")  # the reader merges the parts itself
    assert ShardedDataset(tmp_path).num_docs == len(flat)


def test_lazy_full_check_names_a_flipped_block_when_the_shard_is_first_opened(tmp_path):
    d = _corrupt_setup(tmp_path)
    emb = d / "embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-3] ^= 0x40
    emb.write_bytes(bytes(data))
    ds = ShardedDataset(tmp_path, verify="full", lazy=True)  # nothing read yet
    assert ds.locate(0)[0] == 0 and ds.locate(3)[0] == 1  # 3 documents per shard; shard 1 is the corrupted one
    ds.doc(0)  # shard 0: verified and read
    with pytest.raises(ShardCorruptionError, match=str(emb) + ": sha256"):
        ds.doc(3)
    with pytest.raises(ValueError, match="verify must be one of"):
        ShardedDataset(tmp_path, verify="some")


def test_sampled_check_splits_blocks_over_ranks_and_catches_one_flipped_block(tmp_path):
    """A 3-block embeddings file (8 MiB of fp16 + the .npy header): block 1 flipped. With 2 ranks, rank 1 checks
    blocks 1, 3, ... and names it; rank 0 reads the other blocks and passes; one rank alone catches it."""
    from sonar_llm.data.shards import BLOCK_BYTES

    n, e = 8192, 512
    w = DatasetWriter(tmp_path, embed_dim=e, dtype="fp16", end_of_doc_text="End.", end_of_doc_tokens=[3],
                      end_of_doc_embedding=torch.ones(e))
    w.add_shard(0, ShardArrays(np.full((n, e), 0.5, np.float16), np.ones(n, np.int32),
                               np.arange(n + 1, dtype=np.int64), np.array([0, n], np.int64)))
    w.finish(1)
    emb = tmp_path / "shard_000000" / "embeddings.npy"
    info = json.loads((tmp_path / "shard_000000" / "shard.json").read_text())["files"]["embeddings.npy"]
    assert len(info["block_sha256"]) == 3 and info["block_bytes"] == BLOCK_BYTES
    with open(emb, "r+b") as f:
        f.seek(BLOCK_BYTES + 12345)
        byte = f.read(1)
        f.seek(BLOCK_BYTES + 12345)
        f.write(bytes([byte[0] ^ 1]))
    ShardedDataset(tmp_path, verify="sampled", rank=0, world_size=2)
    with pytest.raises(ShardCorruptionError, match=str(emb) + r": block 1 \(bytes 4194304-8388607\)"):
        ShardedDataset(tmp_path, verify="sampled", rank=1, world_size=2)
    with pytest.raises(ShardCorruptionError, match=str(emb) + ": block 1"):
        ShardedDataset(tmp_path, verify="sampled")


@pytest.mark.parametrize("fname, value", [("doc_offsets.npy", 10**6), ("sent_offsets.npy", -5)])
def test_garbage_offsets_are_named_even_unverified(tmp_path, fname, value):
    d = _corrupt_setup(tmp_path)
    path = d / fname
    arr = np.load(path)
    arr[1] = value  # same size, same dtype: only the checksum (not asked for here) or the bounds can tell
    np.save(path, arr)
    ds = ShardedDataset(tmp_path, verify="none")
    with pytest.raises(ShardCorruptionError, match=str(path)):
        for i in range(ds.num_docs):
            ds.doc(i)


def test_shard_groups_assign_documents_by_position_whatever_is_skipped():
    """Shard k holds documents k*size .. k*size+size-1 (so resumed and multi-rank runs agree), skipped shards
    are passed over but counted, and the planned shard count covers every document."""
    from sonar_llm.data.shards import ShardGroups

    docs = [f"d{i}" for i in range(11)]
    groups = ShardGroups(iter(docs), 3, skip=lambda k: k % 2 == 1)  # rank 0 of 2: shards 0 and 2
    assert list(groups) == [(0, ["d0", "d1", "d2"]), (2, ["d6", "d7", "d8"])]
    assert groups.num_docs == 11 and groups.num_shards == 4
    resumed = ShardGroups(iter(docs), 3, skip=lambda k: k in {0, 1})
    assert list(resumed) == [(2, ["d6", "d7", "d8"]), (3, ["d9", "d10"])]
