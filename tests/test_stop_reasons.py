"""Why generations stop (issue 26): Meta's repetition stop (`stop_on_repetition_cosine_threshold`) for SONAR-LLM,
Base-LCM and the Two-Tower on hand-made concept sequences (expected stops from cosines computed here in float64
numpy), the recorded stop reasons of every story generator (the token LLM's unterminated output is returned as
`token_cap`), and the protocol's stop shares and duplicate-sentence rate."""
import numpy as np
import pytest
import torch
from torch import nn

from sonar_llm.eval.protocol import ProtocolConfig, run_protocol
from sonar_llm.models.generate import (
    STOP_END,
    STOP_REPETITION,
    STOP_SENTENCE_CAP,
    STOP_TOKEN_CAP,
    generate_base_lcm,
    generate_sonar_llm,
    stop_reasons,
)
from sonar_llm.models.stories import StoryContext, StoryContinuation, token_llm_stories

E = 8


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_stop_reasons_rule_matches_independent_cosines():
    g = torch.Generator().manual_seed(0)
    x, prev, eos = torch.randn(64, E, generator=g), torch.randn(64, E, generator=g), torch.randn(E, generator=g)
    x[:8] = eos + 0.05 * torch.randn(8, E, generator=g)  # near the end embedding
    x[8:16] = prev[8:16] + 0.05 * torch.randn(8, E, generator=g)  # near their previous concept
    for eos_t, rep_t in ((0.9, 0.9), (0.99, 0.5), (0.9, None), (None, 0.95)):
        got = stop_reasons(x, prev, eos_embedding=eos, eos_threshold=eos_t, repetition_threshold=rep_t)
        for i in range(64):
            end = eos_t is not None and _cos(x[i], eos) >= eos_t
            rep = rep_t is not None and _cos(x[i], prev[i]) >= rep_t
            assert got[i] == (STOP_END if end else STOP_REPETITION if rep else None), (i, eos_t, rep_t)


class _Identity(nn.Module):
    """A 'backbone' whose hidden state is its input: the KV cache holds nothing."""

    class Cache:
        upper = 0  # nothing is cached: the loop's growth requests (`KVCache.reserve`) have nothing to do

        def reorder(self, index):
            pass

        def reserve(self, length):
            pass

    def new_cache(self, batch, max_len, device=None, dtype=None):
        return self.Cache()

    def step(self, x, cache, lengths=None):
        return x


class Chain(nn.Module):
    """The next concept is the hand-made successor of the last one (nearest key by cosine)."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = keys, values
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # device / dtype for the loop
        self.backbone = _Identity()
        self.normalizer = type("Identity", (), {"denormalize": staticmethod(lambda v: v)})()

    def embed_inputs(self, x):
        return x.double()

    def predict_embedding(self, h):
        sims = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(self.keys, dim=-1).T
        return self.values[sims.argmax(-1)]

    predict_normalized = predict_embedding


def _story(seed=0):
    """a -> b (prompt), then c, d, d' (a near-copy of d), e, f, ... in a chain of 16 concepts."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(16, E, generator=g, dtype=torch.float64), dim=-1)
    v[4] = v[3] + 0.08 * torch.randn(E, generator=g, dtype=torch.float64)  # d' repeats d
    return v


def _expected(chain, start, threshold, min_new, cap, prompt_len=2):
    """From a prompt of `prompt_len` concepts ending at chain[start]: (how many new concepts are kept, why it
    stops), computed here: a story grows while it has at most `cap` sentences."""
    kept = 0
    for i in range(start + 1, len(chain)):
        if threshold is not None and _cos(chain[i], chain[i - 1]) >= threshold and kept + 1 >= min_new:
            return kept, STOP_REPETITION
        kept += 1
        if prompt_len + kept > cap:
            return kept, STOP_SENTENCE_CAP
    raise AssertionError("chain too short")


@pytest.mark.parametrize("threshold", [None, 0.9, 0.999])
def test_repetition_stop_on_a_hand_made_sequence(threshold):
    v = _story()
    model = Chain(v[:-1], v[1:])
    eos = -v.sum(0)  # far from every concept: the end rule never fires
    cap = 8
    rep_cos = _cos(v[4], v[3])
    assert 0.9 < rep_cos < 0.999  # the hand-made repetition: above one threshold, below the other
    prompt = [v[:2]]  # a, b
    want = _expected(v, 1, threshold, 1, cap)
    got = generate_sonar_llm(model, prompt, lambda e: [f"s{i}" for i in range(e.shape[0])], None, reencode=False,
                             max_sentences=cap, eos_embedding=eos, eos_threshold=0.99,
                             stop_on_repetition_cosine_threshold=threshold)[0]
    assert (got.embeddings.shape[0], got.stop_reason) == want
    assert torch.equal(got.embeddings, v[2:2 + want[0]].float())  # the repeated concept is not kept
    lcm = generate_base_lcm(model, prompt, max_sentences=cap, eos_embedding=eos, eos_threshold=0.99,
                            stop_on_repetition_cosine_threshold=threshold)[0]
    assert (lcm.embeddings.shape[0], lcm.stop_reason) == _expected(v, 1, threshold, 2, cap)


def test_repetition_of_the_prompts_last_concept_and_metas_minimum_length():
    """The first new concept is compared with the prompt's last one; Meta's LCM generator cannot stop on its first
    new concept (min_sentences 2), SONAR-LLM can."""
    v = _story(1)
    prompt = [v[2:4]]  # ends at d; its successor d' repeats it
    model = Chain(v[:-1], v[1:])
    eos = -v.sum(0)
    sonar = generate_sonar_llm(model, prompt, lambda e: ["x"] * e.shape[0], None, reencode=False, max_sentences=8,
                               eos_embedding=eos, eos_threshold=0.99, stop_on_repetition_cosine_threshold=0.9)[0]
    assert (sonar.embeddings.shape[0], sonar.stop_reason, sonar.texts) == (0, STOP_REPETITION, [])
    lcm = generate_base_lcm(model, prompt, max_sentences=8, eos_embedding=eos, eos_threshold=0.99,
                            stop_on_repetition_cosine_threshold=0.9)[0]
    assert (lcm.embeddings.shape[0], lcm.stop_reason) == _expected(v, 3, 0.9, 2, 8)
    assert lcm.embeddings.shape[0] >= 1 and torch.equal(lcm.embeddings[0], v[4].float())


def test_end_stop_is_recorded_as_end():
    v = _story(2)
    model = Chain(v[:-1], v[1:])
    res = generate_sonar_llm(model, [v[:2]], lambda e: ["x"] * e.shape[0], None, reencode=False, max_sentences=8,
                             eos_embedding=v[5], eos_threshold=0.999)[0]
    assert (res.embeddings.shape[0], res.stop_reason, res.stopped_by_eos) == (3, STOP_END, True)  # c, d, d'; e ends


def test_reads_as_end_ends_a_story_whatever_the_draw_said():
    """A sampled decode_fn turns the prediction that reads as the end (here concept e, v[5]) into another
    sentence; `reads_as_end` still ends that story there, and the draw is not kept. The other story of the batch,
    whose chain never meets e, runs on to the cap."""
    v = _story(2)
    model = Chain(v[:-1], v[1:])
    eos = -v.sum(0)  # the cosine rule never fires
    draws = lambda e: [f"Tara End of sequence. {i}" for i in range(e.shape[0])]  # noqa: E731
    reads = lambda e: torch.tensor([_cos(x, v[5]) > 0.999 for x in e])  # noqa: E731
    prompts = [v[:2], v[6:8]]
    res = generate_sonar_llm(model, prompts, draws, None, reencode=False, max_sentences=8, eos_embedding=eos,
                             eos_threshold=0.99, reads_as_end=reads)
    assert (res[0].embeddings.shape[0], res[0].stop_reason, len(res[0].texts)) == (3, STOP_END, 3)  # c, d, d'
    assert torch.equal(res[0].embeddings, v[2:5].float())
    assert (res[1].embeddings.shape[0], res[1].stop_reason) == (7, STOP_SENTENCE_CAP)
    plain = generate_sonar_llm(model, prompts[:1], draws, None, reencode=False, max_sentences=8, eos_embedding=eos,
                               eos_threshold=0.99)[0]
    assert plain.stop_reason == STOP_SENTENCE_CAP  # without it, the draw runs on past the end
    with pytest.raises(ValueError, match="reads_as_end"):
        generate_sonar_llm(model, prompts, draws, None, reencode=False, eos_embedding=eos,
                           reads_as_end=lambda e: torch.ones(1, dtype=torch.bool))


def test_end_reader_only_when_sampling():
    """`end_reader` asks the decoder for the end sentence's greedy reading under the run's decoding, and only
    when that decoding samples (beam search and greedy decoding decide the end themselves)."""
    from sonar_llm.models.generate import end_reader
    from sonar_llm.sonar.generation import GenerationConfig

    calls = []

    class Reader:
        def reads_as(self, e, text, lang, *, cfg):
            calls.append((e.shape[0], text, lang, cfg))
            return torch.zeros(e.shape[0], dtype=torch.bool)

    assert end_reader(Reader(), "The end.", "eng_Latn", GenerationConfig(beam_size=1)) is None
    sampled = GenerationConfig(do_sample=True, temperature=0.8)
    fn = end_reader(Reader(), "The end.", "eng_Latn", sampled)
    assert fn(torch.zeros(3, E)).tolist() == [False] * 3 and calls == [(3, "The end.", "eng_Latn", sampled)]


def test_two_tower_shares_the_rule():
    from sonar_llm.models.generate import GenerationSettings
    from sonar_llm.models.generate_two_tower import two_tower_concepts
    from sonar_llm.models.two_tower import TwoTowerLCM, two_tower_tiny

    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny()).eval()
    dim = model.cfg.sonar_dim
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(3, dim, generator=g)]
    eos = torch.randn(dim, generator=g)
    s = GenerationSettings(eos_embedding=eos, max_sentences=6, eos_threshold=1.5, num_inference_steps=2,
                           generator=torch.Generator().manual_seed(0), stop_on_repetition_cosine_threshold=-1.0)
    (res,) = two_tower_concepts(model, prompts, s)  # every concept "repeats" at cosine >= -1: stop at the 2nd
    assert res.stop_reason == STOP_REPETITION and res.embeddings.shape[0] == 1
    s.stop_on_repetition_cosine_threshold = None  # Meta's default: off
    s.generator = torch.Generator().manual_seed(0)
    (res,) = two_tower_concepts(model, prompts, s)
    assert res.stop_reason == STOP_SENTENCE_CAP and res.embeddings.shape[0] == 6 + 1 - 3


class _Tok:
    """Words <-> ids 10..; EOS 3."""

    eos_idx = 3
    words = ["Tom", "ran.", "Sam", "sat.", "End", "of", "sequence.", "Mia"]

    def encode_target(self, sents, lang):
        return [[3, 7] + [10 + self.words.index(w) for w in s.split()] + [3] for s in sents]

    def decode(self, seqs):
        return [" ".join(self.words[t - 10] for t in s) for s in seqs]


class _TokenModel(nn.Module):
    class cfg:  # noqa: N801
        prefix_len, bos_id, prepend_bos, whole_documents = 2, 1, False, False

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("ids,want", [
    ([10, 11, 3, 14, 15, 16, 3, 12, 13, 3], (["Tom ran."], STOP_END)),
    ([10, 11, 3, 12, 13, 3, 17], (["Tom ran.", "Sam sat.", "Mia"], STOP_TOKEN_CAP)),  # unterminated: kept
    ([10, 11, 3, 12, 13, 3], (["Tom ran.", "Sam sat."], STOP_TOKEN_CAP)),  # tokens ran out between sentences
    ([10, 11, 3, 12, 13, 3, 10, 11, 3, 12, 13, 3, 10, 11, 3], (["Tom ran.", "Sam sat.", "Tom ran."],
                                                                STOP_SENTENCE_CAP)),
    ([10, 11, 3, 14, 15], (["Tom ran.", "End of"], STOP_TOKEN_CAP)),
])
def test_token_llm_labels_token_cap_and_returns_the_unterminated_sentence(monkeypatch, ids, want):
    import sonar_llm.models.stories as S
    from sonar_llm.models.generate import GenerationSettings

    monkeypatch.setattr(S, "generate_token_llm", lambda model, prompts, **kw: [list(ids) for _ in prompts])
    ctx = StoryContext(GenerationSettings(eos_embedding=torch.zeros(E), max_sentences=4),
                       end_of_doc_text="End of sequence.", tokenizer=_Tok(), max_new_tokens=len(ids))
    (out,) = token_llm_stories(_TokenModel(), ctx)([["Tom ran.", "Sam sat."]])
    assert (list(out), out.stop_reason) == want


def test_protocol_records_stop_reasons_shares_and_duplicates():
    stories = [[f"P{i}a.", f"P{i}b.", f"R{i}a.", f"R{i}b.", f"R{i}c."] for i in range(4)]
    script = [StoryContinuation(["X.", "Y."], STOP_END),
              StoryContinuation(["X.", "X.", "X."], STOP_REPETITION),
              StoryContinuation(["P2a.", "Z.", "Z ."], STOP_SENTENCE_CAP),  # copies the prompt; "Z ." is not "Z."
              ["plain list."]]  # a generator that says nothing: reason unknown

    def generate(prompts):
        return script[:len(prompts)] if len(prompts) == 4 else None

    res = run_protocol(stories, generate, ProtocolConfig(num_stories=4), batch_size=4)
    assert [it["stop_reason"] for it in res["items"]] == [STOP_END, STOP_REPETITION, STOP_SENTENCE_CAP, None]
    m = res["metrics"]
    assert m["stop_end"] == m["stop_repetition"] == m["stop_sentence_cap"] == pytest.approx(1 / 3)
    assert m["stop_token_cap"] == 0.0
    # duplicates counted by hand: X. X. (2 of story 2), P2a. (story 3: in its prompt) -> 3 of 9 sentences
    assert m["duplicate_sentence_rate"] == pytest.approx(3 / 9)
    # near-duplicates (difflib 2M/T >= 0.8), by hand: the 3 exact ones, and "Z ." after "Z." (M = 2 of 2 + 3
    # characters: 0.8); "Y." after "X." is 2 x 1 / 4 = 0.5 -> 4 of 9
    assert m["near_duplicate_sentence_rate"] == pytest.approx(4 / 9)
    assert m["mean_reference_sentences"] == 3.0 and m["mean_generated_sentences"] == pytest.approx(9 / 4)


def test_near_duplicates_count_loops_that_vary_a_word():
    """2M/T by hand: "Tom ran to the park." / "Tom ran to the barn." share "Tom ran to the " (15), "ar" and "."
    -> 2 x 18 / 40 = 0.9; a different sentence stays below 0.8; white space runs are one space."""
    stories = [["P a.", "P b.", "R a.", "R b."]]

    def rate(generation):
        res = run_protocol(stories, lambda prompts: [StoryContinuation(generation, STOP_END)],
                           ProtocolConfig(num_stories=1), batch_size=1)
        return res["metrics"]["near_duplicate_sentence_rate"], res["metrics"]["duplicate_sentence_rate"]

    assert rate(["Tom ran to the park.", "Tom ran to the barn."]) == (0.5, 0.0)
    assert rate(["Tom ran to the park.", "Sam sat under a big tree."]) == (0.0, 0.0)
    assert rate(["Tom ran to  the park.", "Tom ran to the park."]) == (0.5, 0.5)
