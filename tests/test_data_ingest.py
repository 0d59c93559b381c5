"""Tests for sonar_llm.data.ingest: text / JSONL / Parquet readers, bad-record counting, file expansion."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sonar_llm.data.ingest import IngestStats, iter_documents, list_input_files


def _read(inputs, **kw):
    stats = IngestStats()
    docs = list(iter_documents(inputs, stats=stats, **kw))
    return docs, stats


def test_text_blank_line_blocks_and_bad_utf8(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"First doc line one.\nline two.\n\n  \t \n\nSecond doc.\n\n"
                  b"Bad \xff\xfe bytes here.\n\n\n\nThird doc\r\nwith CRLF.\r\n")
    docs, stats = _read(p)
    assert [t for _, t in docs] == ["First doc line one.\nline two.", "Second doc.", "Third doc\r\nwith CRLF."]
    assert [i for i, _ in docs] == [f"{p}:1", f"{p}:6", f"{p}:12"]
    assert stats.files == 1 and stats.documents == 3 and stats.records == 4
    assert dict(stats.skipped) == {"bad_utf8": 1}


def test_text_one_document_per_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"one\n\n   \ntwo \xc3\x28 bad\nthree\n")
    docs, stats = _read(p, doc_separator="line")
    assert docs == [(f"{p}:1", "one"), (f"{p}:5", "three")]
    assert dict(stats.skipped) == {"empty": 1, "whitespace_only": 1, "bad_utf8": 1}
    assert stats.records == 5 and stats.num_skipped == 3


def test_jsonl_every_bad_record_kind_is_counted(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [json.dumps({"body": "good one"}).encode(), b"{not json", json.dumps([1, 2]).encode(),
             json.dumps({"other": "x"}).encode(), json.dumps({"body": None}).encode(),
             json.dumps({"body": 5}).encode(), json.dumps({"body": ""}).encode(),
             json.dumps({"body": " \n "}).encode(), b'{"body": "caf\xe9"}', b"",
             json.dumps({"body": "good two", "n": 1}).encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    docs, stats = _read(p, text_field="body")
    assert docs == [(f"{p}:1", "good one"), (f"{p}:11", "good two")]
    assert dict(stats.skipped) == {"bad_json": 1, "not_an_object": 1, "missing_field": 2, "non_string_field": 1,
                                   "empty": 1, "whitespace_only": 1, "bad_utf8": 1}
    assert stats.records == 10 and stats.documents == 2
    assert stats.to_dict()["skipped"]["missing_field"] == 2


def test_parquet_column_and_bad_values(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "", "  ", "beta"], "id": [1, 2, 3, 4, 5]}), p)
    docs, stats = _read(p, text_field="content")
    assert docs == [(f"{p}:0", "alpha"), (f"{p}:4", "beta")]
    assert dict(stats.skipped) == {"missing_field": 1, "empty": 1, "whitespace_only": 1}
    _, stats = _read(p, text_field="id")
    assert dict(stats.skipped) == {"non_string_field": 5}
    with pytest.raises(ValueError, match="no column 'text'"):
        _read(p)


def test_directory_glob_gzip_and_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B doc\n")
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps({"text": "A doc"}) + "\n")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("C doc one\n\nC doc two\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs, stats = _read(tmp_path)
    assert [t for _, t in docs] == ["B doc", "C doc one", "C doc two", "A doc"]  # sorted paths
    assert stats.files == 3
    assert [p.name for p in list_input_files(str(tmp_path / "*.txt*"))] == ["b.txt", "c.txt.gz"]
    # a file listed twice (directly and via its directory) is read once
    assert len(list_input_files([tmp_path / "b.txt", tmp_path])) == 3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(iter_documents(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ValueError, match="doc_separator"):
        list(iter_documents(tmp_path / "a.txt", doc_separator="para"))
    (tmp_path / "a.dat").write_text("x\n")
    with pytest.raises(ValueError, match="a.dat"):
        list(iter_documents(tmp_path / "a.dat"))
    assert list(iter_documents(tmp_path / "a.dat", file_format="text")) == [(f"{tmp_path / 'a.dat'}:1", "x")]
