"""End to end: `python train/main.py` with no arguments (the embedded default), at a tiny budget.

Runs the real pipeline in a subprocess (corpus -> tiny SONAR -> shards -> SONAR-LLM training -> evaluation ->
printed continuation) with a 20-step tiny SONAR and 3 training steps, then runs it again to check
that the second run reuses the cached tiny SONAR and the complete shards and resumes from the checkpoint.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, tiny_steps: int = 20) -> subprocess.CompletedProcess:
    env = {**os.environ, "SONAR_LLM_CACHE": str(tmp_path / "cache"), "SONAR_LLM_DEFAULT_DIR": str(tmp_path / "run"),
           "SONAR_LLM_TINY_STEPS": str(tiny_steps), "SONAR_LLM_DEFAULT_STEPS": "3", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "train" / "main.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_default_pipeline_end_to_end_and_rerun(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in first.stdout, f"{step} missing from the output"
    run = tmp_path / "run"
    result = json.loads((run / "eval" / "protocol_start.json").read_text())
    assert result["family"] == "sonar_llm" and result["step"] == 3
    assert len(result["items"]) > 0 and all(it["prompt"] and it["reference"] for it in result["items"])
    assert set(result["metrics"]) >= {"bleu", "rouge1", "rougeL", "meteor_no_wordnet", "rep4", "ovl3", "token_nll"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite (no NaN)
    tiny = tmp_path / "cache" / "tiny_sonar"
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}

    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == mtimes  # cache hit, no retraining
    assert "[6/6]" in second.stdout

    # another tiny SONAR (one more step) under the same cache folder: the shards it did not make are rebuilt
    # with it, never reused
    third = _run(tmp_path, tiny_steps=21)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "shards were made with other settings, rebuilding them" in third.stdout
    encoder = tmp_path / "cache" / "tiny_sonar" / "tiny_sonar_encoder.pt"
    digest = hashlib.sha256(encoder.read_bytes()).hexdigest()[:16]
    for split in ("train", "valid"):
        manifest = json.loads((run / "data" / split / "manifest.json").read_text())
        assert manifest["encoder"] == f"tiny_sonar_encoder.pt (sha256 {digest})"
