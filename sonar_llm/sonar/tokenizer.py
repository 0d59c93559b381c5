"""NLLB/SONAR tokenizer over a SentencePiece model, with fairseq2's id layout (no fairseq2 needed).

Ids: pad 0, unk 1, bos 2, eos 3; a piece with SentencePiece id p (raw model: <unk>=0, <s>=1, </s>=2) gets
p + 1; language tags ``__xxx_Yyyy__`` follow at ``spm_size + 1 + i`` (256001 + i for the released
256,000-piece model, so eng_Latn = 256047), then three internal tags (<MINED_DATA>, <MMT_BT_DATA>,
<SMT_BT_DATA>). Source (encoder) mode: ``[lang] pieces [eos]``; target (decoder) mode:
``[eos, lang] pieces [eos]``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NllbTokenizer", "SONAR_LANGS", "INTERNAL_TAGS", "PAD_IDX", "UNK_IDX", "BOS_IDX", "EOS_IDX"]

PAD_IDX, UNK_IDX, BOS_IDX, EOS_IDX = 0, 1, 2, 3
INTERNAL_TAGS = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")

# The 202 languages of the SONAR text cards, in card order (language tag i -> spm_size + 1 + i).
SONAR_LANGS: tuple[str, ...] = (
    "ace_Arab", "ace_Latn", "acm_Arab", "acq_Arab", "aeb_Arab", "afr_Latn", "ajp_Arab", "aka_Latn",
    "amh_Ethi", "apc_Arab", "arb_Arab", "ars_Arab", "ary_Arab", "arz_Arab", "asm_Beng", "ast_Latn",
    "awa_Deva", "ayr_Latn", "azb_Arab", "azj_Latn", "bak_Cyrl", "bam_Latn", "ban_Latn", "bel_Cyrl",
    "bem_Latn", "ben_Beng", "bho_Deva", "bjn_Arab", "bjn_Latn", "bod_Tibt", "bos_Latn", "bug_Latn",
    "bul_Cyrl", "cat_Latn", "ceb_Latn", "ces_Latn", "cjk_Latn", "ckb_Arab", "crh_Latn", "cym_Latn",
    "dan_Latn", "deu_Latn", "dik_Latn", "dyu_Latn", "dzo_Tibt", "ell_Grek", "eng_Latn", "epo_Latn",
    "est_Latn", "eus_Latn", "ewe_Latn", "fao_Latn", "pes_Arab", "fij_Latn", "fin_Latn", "fon_Latn",
    "fra_Latn", "fur_Latn", "fuv_Latn", "gla_Latn", "gle_Latn", "glg_Latn", "grn_Latn", "guj_Gujr",
    "hat_Latn", "hau_Latn", "heb_Hebr", "hin_Deva", "hne_Deva", "hrv_Latn", "hun_Latn", "hye_Armn",
    "ibo_Latn", "ilo_Latn", "ind_Latn", "isl_Latn", "ita_Latn", "jav_Latn", "jpn_Jpan", "kab_Latn",
    "kac_Latn", "kam_Latn", "kan_Knda", "kas_Arab", "kas_Deva", "kat_Geor", "knc_Arab", "knc_Latn",
    "kaz_Cyrl", "kbp_Latn", "kea_Latn", "khm_Khmr", "kik_Latn", "kin_Latn", "kir_Cyrl", "kmb_Latn",
    "kon_Latn", "kor_Hang", "kmr_Latn", "lao_Laoo", "lvs_Latn", "lij_Latn", "lim_Latn", "lin_Latn",
    "lit_Latn", "lmo_Latn", "ltg_Latn", "ltz_Latn", "lua_Latn", "lug_Latn", "luo_Latn", "lus_Latn",
    "mag_Deva", "mai_Deva", "mal_Mlym", "mar_Deva", "min_Latn", "mkd_Cyrl", "plt_Latn", "mlt_Latn",
    "mni_Beng", "khk_Cyrl", "mos_Latn", "mri_Latn", "zsm_Latn", "mya_Mymr", "nld_Latn", "nno_Latn",
    "nob_Latn", "npi_Deva", "nso_Latn", "nus_Latn", "nya_Latn", "oci_Latn", "gaz_Latn", "ory_Orya",
    "pag_Latn", "pan_Guru", "pap_Latn", "pol_Latn", "por_Latn", "prs_Arab", "pbt_Arab", "quy_Latn",
    "ron_Latn", "run_Latn", "rus_Cyrl", "sag_Latn", "san_Deva", "sat_Beng", "scn_Latn", "shn_Mymr",
    "sin_Sinh", "slk_Latn", "slv_Latn", "smo_Latn", "sna_Latn", "snd_Arab", "som_Latn", "sot_Latn",
    "spa_Latn", "als_Latn", "srd_Latn", "srp_Cyrl", "ssw_Latn", "sun_Latn", "swe_Latn", "swh_Latn",
    "szl_Latn", "tam_Taml", "tat_Cyrl", "tel_Telu", "tgk_Cyrl", "tgl_Latn", "tha_Thai", "tir_Ethi",
    "taq_Latn", "taq_Tfng", "tpi_Latn", "tsn_Latn", "tso_Latn", "tuk_Latn", "tum_Latn", "tur_Latn",
    "twi_Latn", "tzm_Tfng", "uig_Arab", "ukr_Cyrl", "umb_Latn", "urd_Arab", "uzn_Latn", "vec_Latn",
    "vie_Latn", "war_Latn", "wol_Latn", "xho_Latn", "ydd_Hebr", "yor_Latn", "yue_Hant", "zho_Hans",
    "zho_Hant", "zul_Latn",
)


class NllbTokenizer:
    """SentencePiece tokenizer with the fairseq2 NLLB id layout.

    ``model_path``: the ``.model`` file; ``langs``: language codes in tag order (default: the 202 SONAR
    languages); ``default_lang``: used when ``lang`` is not given (default eng_Latn, else the first).
    """

    def __init__(self, model_path: str | os.PathLike, langs: Sequence[str] | None = None,
                 default_lang: str | None = None) -> None:
        import sentencepiece as spm

        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError on bad files
            raise ValueError(f"not a valid SentencePiece model: {path} ({exc})") from exc
        if ok is False:
            raise ValueError(f"not a valid SentencePiece model: {path}")
        if (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (0, 1, 2):
            raise ValueError(
                f"{path}: expected raw ids <unk>=0, <s>=1, </s>=2, got unk={self.sp.unk_id()}, "
                f"bos={self.sp.bos_id()}, eos={self.sp.eos_id()}"
            )
        self.langs: tuple[str, ...] = tuple(SONAR_LANGS if langs is None else langs)
        if not self.langs:
            raise ValueError("langs must name at least one language")
        if len(set(self.langs)) != len(self.langs):
            raise ValueError("langs contains duplicates")
        for lang in self.langs:
            if not isinstance(lang, str) or not lang:
                raise TypeError(f"langs must be non-empty strings, got {lang!r}")
        self.spm_size = self.sp.GetPieceSize()
        self.lang_offset = self.spm_size + 1
        self._lang_to_id = {lang: self.lang_offset + i for i, lang in enumerate(self.langs)}
        self.internal_offset = self.lang_offset + len(self.langs)
        if default_lang is None:
            default_lang = "eng_Latn" if "eng_Latn" in self._lang_to_id else self.langs[0]
        if default_lang not in self._lang_to_id:
            raise ValueError(f"default_lang {default_lang!r} is not among the tokenizer languages")
        self.default_lang = default_lang

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.internal_offset + len(INTERNAL_TAGS)

    pad_idx, unk_idx, bos_idx, eos_idx = PAD_IDX, UNK_IDX, BOS_IDX, EOS_IDX

    def lang_id(self, lang: str | None = None) -> int:
        """Token id of the language tag ``__lang__``."""
        lang = self.default_lang if lang is None else lang
        try:
            return self._lang_to_id[lang]
        except KeyError:
            raise ValueError(
                f"unknown language {lang!r}; expected a code like 'eng_Latn' among {len(self.langs)} languages"
            ) from None

    def id_to_token(self, idx: int) -> str:
        if idx == PAD_IDX:
            return "<pad>"
        if 1 <= idx <= self.spm_size:
            return self.sp.IdToPiece(idx - 1)
        if self.lang_offset <= idx < self.internal_offset:
            return f"__{self.langs[idx - self.lang_offset]}__"
        if self.internal_offset <= idx < self.vocab_size:
            return INTERNAL_TAGS[idx - self.internal_offset]
        raise ValueError(f"token id {idx} outside the vocabulary [0, {self.vocab_size})")

    def is_special(self, idx: int) -> bool:
        """pad, bos, eos, language tags and internal tags (dropped when decoding)."""
        return idx in (PAD_IDX, BOS_IDX, EOS_IDX) or idx >= self.lang_offset

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _as_list(texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
        return texts

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Piece ids (already shifted by +1), no control tokens."""
        raw = self.sp.Encode(self._as_list(texts), out_type=int)
        return [[p + 1 for p in seq] for seq in raw]

    @staticmethod
    def _truncate(seqs: list[list[int]], max_len: int | None) -> list[list[int]]:
        if max_len is None:
            return seqs
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        n = sum(len(s) > max_len for s in seqs)
        if n:
            warnings.warn(f"{n} sequence(s) longer than max_len={max_len} tokens were truncated", stacklevel=3)
            seqs = [s[:max_len] for s in seqs]
        return seqs

    def encode_source(self, texts: str | Sequence[str], lang: str | None = None,
                      max_len: int | None = None) -> list[list[int]]:
        """Encoder input: ``[lang] pieces [eos]`` per text (truncated to ``max_len`` with a warning)."""
        tag = self.lang_id(lang)
        return self._truncate([[tag, *s, EOS_IDX] for s in self.tokenize(texts)], max_len)

    def encode_target(self, texts: str | Sequence[str], lang: str | None = None,
                      max_len: int | None = None) -> list[list[int]]:
        """Decoder target sequence: ``[eos, lang] pieces [eos]`` per text."""
        tag = self.lang_id(lang)
        return self._truncate([[EOS_IDX, tag, *s, EOS_IDX] for s in self.tokenize(texts)], max_len)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids_list: Sequence[Sequence[int]] | Tensor) -> list[str]:
        """Token ids -> texts, dropping pad/bos/eos/language/internal tags (unk renders as spm's ⁇)."""
        if isinstance(ids_list, Tensor):
            if ids_list.dim() == 1:
                ids_list = ids_list[None]
            ids_list = ids_list.tolist()
        out = []
        for i, ids in enumerate(ids_list):
            if isinstance(ids, int):
                raise TypeError("decode expects a list of id lists (or a [B, S] tensor), got a flat list")
            pieces = []
            for t in ids:
                t = int(t)
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"ids_list[{i}] has id {t} outside [0, {self.vocab_size})")
                if not self.is_special(t):
                    pieces.append(t - 1)
            out.append(self.sp.Decode(pieces))
        return out

    # ------------------------------------------------------------------ batching
    @staticmethod
    def pad_batch(seqs: Sequence[Sequence[int]], pad_to_multiple: int = 1,
                  device=None) -> tuple[Tensor, Tensor]:
        """Right-pad with 0 -> (tokens [B, S] int64, padding_mask [B, S] bool, True = real token)."""
        if len(seqs) == 0:
            raise ValueError("pad_batch needs at least one sequence")
        lengths = [len(s) for s in seqs]
        width = max(lengths)
        if pad_to_multiple > 1:
            width = -(-width // pad_to_multiple) * pad_to_multiple
        tokens = torch.full((len(seqs), width), PAD_IDX, dtype=torch.int64)
        for i, s in enumerate(seqs):
            if len(s):
                tokens[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return tokens.to(device), mask.to(device)
