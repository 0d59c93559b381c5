"""The embedded story corpus, as the data pipeline sees it.

The generator lives in `sonar_llm.sonar.story_corpus` (the lowest layer that needs it: the tiny SONAR
trains on it); this module re-exports its public functions for the data side (default pipeline, tests).
"""
from sonar_llm.sonar.story_corpus import (  # noqa: F401
    MAX_SENTENCES,
    MIN_SENTENCES,
    generate_stories,
    generate_story_sentences,
    split_stories,
    write_corpus,
)

__all__ = ["generate_story_sentences", "generate_stories", "split_stories", "write_corpus", "MIN_SENTENCES",
           "MAX_SENTENCES"]
