"""Tests of the embedded story corpus generator (sonar_llm/data/stories.py)."""
import json
import re
import time
from collections import Counter

import pytest

from sonar_llm.data.stories import (
    MAX_SENTENCES,
    MIN_SENTENCES,
    generate_stories,
    generate_story_sentences,
    split_stories,
    write_corpus,
)


@pytest.fixture(scope="module")
def corpus():
    return generate_story_sentences(4000, seed=0)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = generate_stories(200, seed=3)
    b = generate_stories(200, seed=3)
    c = generate_stories(200, seed=4)
    assert a == b
    assert len(c) == 200 and sum(x == y for x, y in zip(a, c)) < 5


def test_generation_is_fast():
    t0 = time.perf_counter()
    generate_stories(4000, seed=1)
    # the brief asks < 3 s; leave headroom for a CPU shared with other jobs
    assert time.perf_counter() - t0 < 6.0


def test_story_lengths_within_bounds_and_spread(corpus):
    lens = Counter(len(s) for s in corpus)
    assert min(lens) >= MIN_SENTENCES and max(lens) <= MAX_SENTENCES
    assert len(lens) >= 10, f"story lengths not varied enough: {sorted(lens)}"
    assert all(len(s.split()) >= 3 for story in corpus for s in story)


def test_variety(corpus):
    sents = [s for story in corpus for s in story]
    vocab = {w.lower() for s in sents for w in re.findall(r"[A-Za-z']+", s)}
    assert len(set(sents)) > 20_000, len(set(sents))
    assert len(vocab) > 600, len(vocab)
    assert len(set(" ".join(story) for story in corpus)) == len(corpus)  # no duplicate stories
    lengths = Counter(len(s.split()) for s in sents)
    assert len(lengths) >= 12  # sentence lengths vary
    assert sum('"' in s for s in sents) > 0.05 * len(sents)  # dialogue lines present


def test_coherence_hero_recurs(corpus):
    # the hero named in the first sentence is mentioned again later in most stories
    names = re.compile(r"named (\w+)|called (\w+)|^(\w+) was a")
    recurs = total = 0
    for story in corpus[:500]:
        m = names.search(story[0])
        if not m:
            continue
        name = next(g for g in m.groups() if g)
        total += 1
        recurs += sum(name in s for s in story[1:]) >= 2
    assert total > 300 and recurs / total > 0.95


def test_sentences_split_back_with_blingfire(corpus):
    blingfire = pytest.importorskip("blingfire")
    for story in corpus[:400]:
        assert blingfire.text_to_sentences(" ".join(story)).split("\n") == story


def test_stories_are_joined_sentences():
    assert generate_stories(20, seed=5) == [" ".join(s) for s in generate_story_sentences(20, seed=5)]


def test_split_is_disjoint_and_complete():
    stories = generate_stories(300, seed=2)
    train, valid = split_stories(stories, held_out_fraction=0.1, seed=7)
    assert len(valid) == 30 and len(train) == 270
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(stories)
    assert split_stories(stories, 0.1, seed=7) == (train, valid)
    assert split_stories(stories, 0.1, seed=8)[1] != valid
    assert split_stories(stories, 0.0) == (stories, [])
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_stories(stories, 1.0)


def test_write_corpus_jsonl(tmp_path):
    stories = generate_stories(25, seed=9)
    path = write_corpus(tmp_path / "sub" / "stories.jsonl", stories)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines] == stories
    assert [p.name for p in path.parent.iterdir()] == ["stories.jsonl"]  # no temp file left
    with pytest.raises(TypeError, match=r"stories\[1\]"):
        write_corpus(tmp_path / "bad.jsonl", ["ok", 3])
    assert not (tmp_path / "bad.jsonl").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_stories"):
        generate_stories(-1)


def test_every_story_closes_with_one_closing_line_then_ends(corpus):
    """CORPUS_VERSION 2: the last sentence of every story is a closing line and no other sentence is one, so
    after a closing line the end of the document always follows (what a concept model must learn to stop)."""
    from sonar_llm.sonar.story_corpus import ENDINGS

    # each closing template as a regex: its {placeholders} are free words
    closings = [re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$") for t in ENDINGS]

    def is_closing(s: str) -> bool:
        return any(c.match(s) for c in closings)

    assert all(is_closing(story[-1]) for story in corpus)
    inner = [s for story in corpus for s in story[:-1]]
    # the free pattern "{H} learned that {lesson}." can match a plot sentence in principle; none does here
    assert sum(map(is_closing, inner)) == 0, [s for s in inner if is_closing(s)][:5]
