"""sonar_llm: SONAR-LLM and the Large Concept Model baselines on one backbone, in plain PyTorch."""

__version__ = "0.1.0"
