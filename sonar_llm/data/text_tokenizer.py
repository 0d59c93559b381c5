"""A user's own tokenizer for the token LLM: a Hugging Face `tokenizer.json` or a SentencePiece model.

`load_text_tokenizer(path)` reads either file (`.json`: the `tokenizers` library, imported only here and
only when such a file is used: `pip install 'sonar-llm[tokenizers]'`; else a SentencePiece model) and returns a
`TextTokenizer` with `encode(text) -> ids` (no special tokens), `decode(ids) -> text`, `bos_id`, `eos_id`,
`vocab_size` and `identity` (file name + sha256, recorded in the data manifest and checked at training).

The paper's token-baseline document (built by `sonar_llm.data.preprocess_tokens`) is `[BOS] + encode(text) +
[EOS]`, the whole story as one stream with no sentence splitting. The public `train_llm.py` builds it as
`tokenizer(text, add_special_tokens=True)["input_ids"]` (Llama-3's post-processor prepends
`<|begin_of_text|>`) and appends `eos_token_id` when the last id is not already EOS; we add the BOS
ourselves so that a tokenizer without such a post-processor gives the same format.

BOS / EOS: given explicitly (token strings), else the first special token found among the usual names
(Llama-3's `<|begin_of_text|>` / `<|end_of_text|>`, `<s>` / `</s>`, `<bos>` / `<eos>`, `[BOS]` / `[EOS]`,
GPT-2's `<|endoftext|>` for both); SentencePiece models use their own bos/eos ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["TextTokenizer", "load_text_tokenizer", "BOS_NAMES", "EOS_NAMES"]

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")


@dataclass
class TextTokenizer:
    """A loaded tokenizer (see the module docstring)."""

    kind: str  # "tokenizers" (a tokenizer.json) | "sentencepiece"
    path: str  # the file it was read from
    identity: str  # "<file name> (sha256 <16 hex digits>)"
    vocab_size: int  # ids are in [0, vocab_size)
    bos_id: int  # document start
    eos_id: int  # document end
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]
    _encode_batch: Callable[[list[str]], list[list[int]]] | None = None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no special token added."""
        return [int(t) for t in self._encode(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (the library's batch call where it has one)."""
        if self._encode_batch is not None:
            return [[int(t) for t in ids] for ids in self._encode_batch(list(texts))]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the BOS and EOS ids are dropped."""
        return self._decode([int(t) for t in ids if int(t) not in (self.bos_id, self.eos_id)])

    def describe(self) -> dict[str, Any]:
        """What the data manifest and the run record about it."""
        return {"kind": self.kind, "identity": self.identity, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


def _file_identity(path: Path) -> str:
    from .shards import sha256_file

    return f"{path.name} (sha256 {sha256_file(path)[:16]})"


def _pick(found: dict[str, int], explicit: str | None, names: Sequence[str], what: str, path: Path) -> int:
    if explicit:
        if explicit not in found:
            raise ValueError(f"{path}: the {what} token {explicit!r} is not in the vocabulary")
        return found[explicit]
    for n in names:
        if n in found:
            return found[n]
    raise ValueError(f"{path}: no {what} token among {list(names)}; name it explicitly (--{what.lower()}-token)")


def _load_hf(path: Path, bos: str | None, eos: str | None) -> TextTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{path}: reading a tokenizer.json needs the `tokenizers` library "
                          "(pip install 'sonar-llm[tokenizers]')") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception type on a bad file
        raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    bos_id = _pick(vocab, bos, BOS_NAMES, "BOS", path)
    eos_id = _pick(vocab, eos, EOS_NAMES, "EOS", path)
    return TextTokenizer(
        kind="tokenizers", path=str(path), identity=_file_identity(path),
        vocab_size=int(tok.get_vocab_size(with_added_tokens=True)), bos_id=bos_id, eos_id=eos_id,
        _encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        _decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        _encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)])


def _load_spm(path: Path, bos: str | None, eos: str | None) -> TextTokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:200]})") from None
    if not ok:
        raise ValueError(f"{path}: not a SentencePiece model")
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    bos_id = vocab[bos] if bos in vocab else sp.bos_id()
    eos_id = vocab[eos] if eos in vocab else sp.eos_id()
    for name, given, got in (("BOS", bos, bos_id), ("EOS", eos, eos_id)):
        if given and given not in vocab:
            raise ValueError(f"{path}: the {name} token {given!r} is not in the vocabulary")
        if got < 0:
            raise ValueError(f"{path}: the SentencePiece model has no {name} id; name a token explicitly")
    return TextTokenizer(kind="sentencepiece", path=str(path), identity=_file_identity(path),
                         vocab_size=int(sp.GetPieceSize()), bos_id=int(bos_id), eos_id=int(eos_id),
                         _encode=lambda text: sp.EncodeAsIds(text), _decode=lambda ids: sp.DecodeIds(ids))


def load_text_tokenizer(path: str | os.PathLike, *, bos_token: str | None = None,
                        eos_token: str | None = None) -> TextTokenizer:
    """A `TextTokenizer` from a Hugging Face tokenizer.json (`.json`) or a SentencePiece model (any other
    file). FileNotFoundError / ValueError / ImportError name the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    if p.suffix == ".json":
        return _load_hf(p, bos_token, eos_token)
    return _load_spm(p, bos_token, eos_token)
