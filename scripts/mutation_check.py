"""Mutation check: plant one small bug at a time in a copy of the tree and see whether the tests catch it.

This is how we judge a test (docs/design.md, "Judging a test"): a test that passes on the real code and
still passes with a planted bug in the behaviour it claims to check does not check it. Each entry of
MUTATIONS names a file, an exact text, its replacement, the behaviour the replacement breaks, and the tests
that should catch it. For each mutation the script

1. copies a snapshot of the working tree (`git ls-files --cached --others --exclude-standard`: tracked files
   as they are on disk, plus untracked files that are not ignored, plus the built native library if any)
   into a temporary folder, with the copy's source roots (`.`, `kernels/`, `train/`) first on PYTHONPATH
   (so the editable install, which maps the packages to the real tree, does not shadow the copy);
2. replaces the text in the copy (the text must occur exactly `count` times, else the mutation is STALE:
   the code moved on and the entry needs updating; nothing is silently skipped);
3. runs only the named tests there (`pytest -x --junitxml`), and reads the verdict from the JUnit XML:

   CAUGHT      at least one named test FAILED: an assertion, or an exception raised in the test body
               (a JUnit <failure>), and pytest exited 1;
   SURVIVED    pytest exited 0 and every named test id was collected and ran;
   STALE       the text to replace does not occur `count` times;
   UNRELIABLE  anything else: a collection or import error, a setup/teardown error with no failing test
               (a JUnit <error> only), a timeout, a crash, pytest exit codes 2-5 (interrupted, internal
               error, usage error such as a test id that does not exist, no tests collected), a named test
               id that was not collected, a named test that only skips here, or no readable JUnit XML.

   Nothing but a failing test counts as a catch: a broken environment makes every mutation UNRELIABLE,
   never CAUGHT.

Before mutating, a preflight checks that the copy is what the tests import (the packages resolve inside the
copy, and a canary import error planted in the copy breaks collection), and a baseline runs every named test
once on the unmutated copy: it must be green (exit 0, no failure or error) with every named test id
collected, or the run stops before planting anything. A mutation whose tests all skip in the baseline (e.g.
the native library is not built here) is UNRELIABLE without being run. Each mutation's timeout is derived
from its tests' baseline times (4x + 240 s, capped by --timeout: a
safety net for a mutation that hangs, generous for a loaded machine).

Exit status: 0 when every selected mutation is CAUGHT; 1 otherwise (SURVIVED, STALE, UNRELIABLE, a failed
preflight or baseline); 2 on bad arguments. A full run (no --only / --changed) records its results in
bench/results/mutation/<UTC date>_<commit>.{json,md} (date, commit, machine load, per-mutation status and
time). Not part of CI (minutes).

    python scripts/mutation_check.py -j 2          # all mutations, results recorded
    python scripts/mutation_check.py --list        # names, files, what each breaks, its tests
    python scripts/mutation_check.py --only NAME [--only NAME2]   (or a glob: --only 'lce-*')
    python scripts/mutation_check.py --changed HEAD~3   # only mutations in files (or of tests) changed since
    python scripts/mutation_check.py --json report.json --no-record
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import fnmatch
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One planted bug."""

    name: str  # unique, kebab-case; the area comes first (lce-, sonar-, packed-, family-, train-, data-, eval-, cli-)
    file: str  # path relative to the repository root
    old: str  # exact text to replace (must occur exactly `count` times)
    new: str  # replacement
    breaks: str  # the behaviour the replacement breaks, in words
    tests: tuple[str, ...]  # pytest node ids / paths that should catch it
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the test run, e.g. (("TRITON_INTERPRET", "1"),)
    count: int = 1  # how many occurrences of `old` to expect (all of them are replaced)


@dataclass(frozen=True)
class Project:
    """Where the mutations are planted and how the copy is checked (the real project by default)."""

    root: Path = ROOT  # the repository whose working tree is copied
    source_roots: tuple[str, ...] = (".", "kernels", "train")  # put first on the copy's PYTHONPATH
    packages: tuple[str, ...] = ("sonar_llm", "sonar_kernels", "sonar_train")  # must import from the copy
    # (file to plant an import error in, tests whose collection must then fail)
    canaries: tuple[tuple[str, str], ...] = (("sonar_llm/__init__.py", "tests/test_eval_metrics.py"),
                                             ("kernels/sonar_kernels/__init__.py", "tests/test_native.py"),
                                             ("train/sonar_train/__init__.py", "tests/test_train_optim.py"))
    results_dir: str = "bench/results/mutation"  # where a full run records its results
    # third-party modules the fork server imports once (never the project's own: each run imports its copy)
    preload: tuple[str, ...] = ("numpy", "torch", "pytest_benchmark.plugin", "pytest_timeout")


MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ SONAR modules
    Mutation(
        "sonar-encoder-pool-over-padding", "sonar_llm/sonar/encoder.py",
        "summed = (h * m[..., None]).sum(dim=1)", "summed = h.sum(dim=1)",
        "the encoder's mean pooling must skip padded positions",
        ("tests/test_sonar_models.py::test_encoder_matches_float64_reference",
         "tests/test_sonar_models.py::test_encoder_padding_does_not_change_embedding"),
    ),
    Mutation(
        "sonar-positions-off-by-one", "sonar_llm/sonar/layers.py",
        "steps = torch.arange(start_step, start_step + num_rows,",
        "steps = torch.arange(start_step + 1, start_step + 1 + num_rows,",
        "the sinusoid table's row r encodes step start_step + r (SONAR: steps from 2)",
        ("tests/test_sonar_models.py::test_sinusoid_table_matches_closed_form",
         "tests/test_sonar_models.py::test_decoder_matches_float64_reference"),
    ),
    Mutation(
        "sonar-cross-constant-drops-output-bias", "sonar_llm/sonar/layers.py",
        "return attn.output_proj(attn.v_proj(encoder_output))",
        "return F.linear(attn.v_proj(encoder_output), attn.output_proj.weight)",
        "the one-key cross-attention constant is W_o (W_v e + b_v) + b_o (incremental decoding)",
        ("tests/test_sonar_models.py::test_cross_attention_is_the_one_key_constant",
         "tests/test_sonar_models.py::test_incremental_steps_match_full_forward"),
    ),
    Mutation(
        "sonar-incremental-layer0-cross-constant", "sonar_llm/sonar/decoder.py",
        "return torch.stack([layer.cross_attention_constant(e) for layer in self.decoder.layers], dim=1)",
        "return torch.stack([layer.cross_attention_constant(e) * (i > 0) for i, layer in "
        "enumerate(self.decoder.layers)], dim=1)",
        "incremental decoding adds layer 0's cross-attention constant too",
        ("tests/test_sonar_models.py::test_cross_attention_is_the_one_key_constant",),
    ),
    Mutation(
        "sonar-decoder-eval-dropout-rescale", "sonar_llm/sonar/layers.py",
        "        x = self.pos_encoder(x, start_step, positions)\n        return F.dropout(x, self.dropout_p, self.training)",
        "        x = self.pos_encoder(x, start_step, positions)\n"
        "        return F.dropout(x, self.dropout_p, True) if self.training else x / (1.0 - self.dropout_p)",
        "eval mode is the dropout-free function (a deterministic eval-mode rescale passes dec(x) == dec(x))",
        ("tests/test_sonar_models.py::test_dropout_only_in_training",
         "tests/test_sonar_models.py::test_eval_mode_is_the_dropout_free_function"),
    ),
    # ------------------------------------------------------------------ packed decoder
    Mutation(
        "packed-layer0-cross-constant", "sonar_llm/sonar/packed_decoder.py",
        "branch = consts[:, 0].index_select(0, sid)", "branch = torch.zeros_like(resid)",
        "layer 0's cross-attention constant is added to the residual stream of the fast path",
        ("tests/test_packed_decoder.py::test_loss_and_grad_match_reference",),
    ),
    Mutation(
        "packed-positions-restart-per-sentence", "sonar_llm/sonar/packed_decoder.py",
        "positions = torch.arange(n, device=cu.device) - in_cu[:-1][sentence_ids]",
        "positions = torch.arange(n, device=cu.device)",
        "packed positions restart at 0 in every sentence (pack_targets, shared with reference_loss)",
        ("tests/test_packed_decoder.py::test_pack_targets_matches_python_loop",),
    ),
    Mutation(
        "packed-half-grad-drops-later-constants", "sonar_llm/sonar/packed_decoder.py",
        "return attn + const_next.index_select(0, prepared.sentence_ids), resid",
        "return attn + (const_next if attn.dtype in (torch.float32, torch.float64) else const_next.detach())"
        ".index_select(0, prepared.sentence_ids), resid",
        "in half precision the gradient w.r.t. the embedding flows through every layer's cross constant "
        "(the loss value is unchanged: only a gradient value check sees it)",
        ("tests/test_packed_decoder.py::test_half_precision_loss_and_grad_match_float64",),
    ),
    Mutation(
        "kernel-varlen-attention-crosses-segments", "kernels/sonar_kernels/torch_ops/varlen_attention.py",
        "(doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])", "(pos[:, None] >= pos[None, :])",
        "packed self-attention is causal inside each sentence and never crosses sentences",
        ("tests/test_decoder_ops.py::test_varlen_sdpa_matches_reference_with_grads",),
    ),
    # ------------------------------------------------------------------ the families' losses and generation
    Mutation(
        "family-base-lcm-target-row", "sonar_llm/models/base_lcm.py",
        "target = self.normalizer.normalize(embeddings.index_select(0, tgt_rows))",
        "target = self.normalizer.normalize(embeddings.index_select(0, pred_rows))",
        "Base-LCM's output at sentence k-1 is scored against sentence k (not against its own input)",
        ("tests/test_base_lcm.py::test_loss_matches_closed_form",),
    ),
    Mutation(
        "family-base-lcm-normalizer-not-fitted", "sonar_llm/models/base_lcm.py",
        "    if cfg.data_path:\n        fit_normalizer_from_data(model.normalizer",
        "    if False:\n        fit_normalizer_from_data(model.normalizer",
        "a Base-LCM built for training fits its normalizer on the training data (Meta's rule)",
        ("tests/test_train_family_wiring.py::test_trained_lcm_normalizer_holds_the_training_embeddings_statistics",),
    ),
    Mutation(
        "family-sonar-llm-target-sentences", "sonar_llm/models/sonar_llm.py",
        "tokens, tok_cu = select_segments(batch.tokens, batch.tok_cu_seqlens, tgt_rows)",
        "tokens, tok_cu = select_segments(batch.tokens, batch.tok_cu_seqlens, pred_rows)",
        "SONAR-LLM decodes sentence k's tokens from the prediction made at sentence k-1",
        ("tests/test_sonar_llm_model.py::test_fast_reference_and_independent_losses_agree_with_grads",),
    ),
    Mutation(
        "family-token-llm-crosses-documents", "sonar_llm/models/token_llm.py",
        "targets = targets.masked_fill(is_last, -100)", "targets = targets.masked_fill(is_last & False, -100)",
        "the token LLM does not predict the first token of the next stream from the last of this one",
        ("tests/test_token_llm.py::test_loss_matches_cross_entropy_on_explicit_logits",),
    ),
    Mutation(
        "family-two-tower-loss-mean-over-dims", "sonar_llm/models/two_tower.py",
        "per_pos = (pred.float() - x0).pow(2).sum(-1)", "per_pos = (pred.float() - x0).pow(2).mean(-1)",
        "the Two-Tower loss sums the squared error over the embedding dimensions",
        ("tests/test_two_tower.py::test_loss_value_and_decrease",),
    ),
    Mutation(
        "gen-sonar-llm-cosine-unnormalised", "sonar_llm/models/generate.py",
        "end = F.cosine_similarity(x, eos_embedding.float().reshape(1, -1).to(x.device), dim=-1) >= eos_threshold",
        "end = (x * eos_embedding.float().reshape(1, -1).to(x.device)).sum(-1) >= eos_threshold",
        "the end-of-document rule compares the *cosine* with the end embedding (stop_reasons, shared by the loops)",
        ("tests/test_generate.py::test_sonar_llm_stop_rule_is_a_cosine_on_unnormalised_embeddings",),
    ),
    Mutation(
        "gen-repetition-rule-off", "sonar_llm/models/generate.py",
        "    if repetition_threshold is not None:\n        rep = ", "    if False:\n        rep = ",
        "a concept whose cosine with the previous one reaches stop_on_repetition_cosine_threshold stops the story",
        ("tests/test_stop_reasons.py::test_repetition_stop_on_a_hand_made_sequence",),
    ),
    Mutation(
        "gen-repetition-compares-with-the-prompt", "sonar_llm/models/generate.py",
        "        previous = nxt\n", "        pass\n",
        "the repetition rule compares each new concept with the one generated just before it",
        ("tests/test_stop_reasons.py::test_repetition_stop_on_a_hand_made_sequence",),
    ),
    Mutation(
        "gen-sonar-llm-next-fn-skips-reencode", "sonar_llm/models/generate.py",
        "        return step_texts, enc.to(pred.device)\n", "        return step_texts, pred\n",
        "SONAR-LLM appends the re-encoded decoded sentence, not the raw prediction (shared next-step helper)",
        ("tests/test_generate.py::test_sonar_llm_cached_equals_reference_and_stops",),
    ),
    Mutation(
        "gen-two-tower-nocfg-batch-rows", "sonar_llm/models/generate_two_tower.py",
        "out = model.denoiser(z.to(dtype), t, cross).float()",
        "out = model.denoiser(z[:1].expand_as(z).to(dtype), t, cross).float()",
        "without CFG each row of a batch is denoised from its own latent (finite, right shapes, wrong values)",
        ("tests/test_two_tower.py::test_batched_no_cfg_generation_matches_uncached_reference",),
    ),
    Mutation(
        "gen-base-lcm-denormalize", "sonar_llm/models/generate.py",
        "        return None, model.normalizer.denormalize(pred)\n", "        return None, pred\n",
        "Base-LCM generation returns raw-space embeddings (denormalised predictions)",
        ("tests/test_generate.py::test_base_lcm_cached_equals_reference",),
    ),
    Mutation(
        "gen-token-llm-ragged-last-position", "sonar_llm/models/generate.py",
        "last = hidden[torch.arange(batch, device=device), lengths - 1]", "last = hidden[:, -1]",
        "the cached token-LLM loop continues each prompt from its own last token (ragged batches)",
        ("tests/test_generate.py::test_token_llm_cached_equals_uncached",),
    ),
    # ------------------------------------------------------------------ kernels (each path)
    Mutation(
        "lce-torch-backward-ignore-index", "kernels/sonar_kernels/torch_ops/linear_cross_entropy.py",
        "    g = torch.where(valid, grad_rows.to(acc_dtype), torch.zeros((), dtype=acc_dtype, device=hidden.device))\n",
        "    g = grad_rows.to(acc_dtype)\n",
        "ignored rows get no gradient in the PyTorch backward",
        ("tests/test_linear_cross_entropy.py::test_matches_float64_reference",),
    ),
    Mutation(
        "lce-torch-grad-in-forward-drops-smoothing-loss", "kernels/sonar_kernels/torch_ops/linear_cross_entropy.py",
        "            row_loss -= label_smoothing * z_mean\n", "            pass\n",
        "the gradient-in-forward PyTorch path's loss includes the label-smoothing term",
        ("tests/test_lce_grad_in_forward.py::test_grad_in_forward_matches_float64",),
    ),
    Mutation(
        "lce-triton-half-dlogits-drops-smoothing", "kernels/sonar_kernels/triton_kernels/linear_cross_entropy.py",
        "        m, v, d, _n_bucket(m), 1.0 - label_smoothing, label_smoothing / v,",
        "        m, v, d, _n_bucket(m), 1.0 - label_smoothing, (label_smoothing / v) * (hidden.dtype == torch.float32),",
        "the Triton dlogits backward keeps the uniform eps/V label-smoothing term for fp16/bf16 inputs too "
        "(a term below the old 1e-2 / 3e-3-of-the-max tolerances)",
        ("tests/test_linear_cross_entropy.py::test_half_inputs",), env=(("TRITON_INTERPRET", "1"),),
    ),
    Mutation(
        "lce-triton-bf16-dlogits-drops-smoothing", "kernels/sonar_kernels/triton_kernels/linear_cross_entropy.py",
        "        m, v, d, _n_bucket(m), 1.0 - label_smoothing, label_smoothing / v,",
        "        m, v, d, _n_bucket(m), 1.0 - label_smoothing, (label_smoothing / v) * (hidden.dtype != torch.bfloat16),",
        "the same for bf16 only: below the old 1e-2-of-the-max bf16 tolerance, caught by the bounds derived from "
        "bf16's roundoff and the problem size",
        ("tests/test_linear_cross_entropy.py::test_half_inputs",), env=(("TRITON_INTERPRET", "1"),),
    ),
    Mutation(
        "lce-torch-bf16-backward-drops-smoothing", "kernels/sonar_kernels/torch_ops/linear_cross_entropy.py",
        "        if label_smoothing:\n            z.sub_(label_smoothing / v)\n        idx = safe_target[start:stop, None]\n",
        "        if label_smoothing and hidden.dtype != torch.bfloat16:\n            z.sub_(label_smoothing / v)\n"
        "        idx = safe_target[start:stop, None]\n",
        "the PyTorch backward keeps the uniform eps/V label-smoothing term for bf16 inputs",
        ("tests/test_linear_cross_entropy.py::test_half_inputs",),
    ),
    Mutation(
        "lce-triton-atomic-drops-smoothing", "kernels/sonar_kernels/triton_kernels/linear_cross_entropy.py",
        "        n, v, d, _n_bucket(n), 1.0 - label_smoothing, label_smoothing / v,",
        "        n, v, d, _n_bucket(n), 1.0 - label_smoothing, 0.0,",
        "the Triton atomic backward keeps the uniform eps/V label-smoothing term",
        ("tests/test_linear_cross_entropy.py::test_triton_backward_strategies_match_float64",), env=(("TRITON_INTERPRET", "1"),),
    ),
    Mutation(
        "lce-native-backward-drops-smoothing", "kernels/sonar_kernels/native.py",
        "        hidden, weight, target, bias, lse, grad_rows, int(ignore_index), float(label_smoothing),",
        "        hidden, weight, target, bias, lse, grad_rows, int(ignore_index), 0.0,",
        "the native backward receives the label smoothing (host code of the native path)",
        ("tests/test_native.py::test_matches_float64_reference",),
    ),
    Mutation(
        "lce-native-library-silently-unavailable", "kernels/sonar_kernels/native.py",
        "    path = library_path()\n    if not path.is_file():\n",
        "    path = library_path()\n    if True:\n",
        "a built native library is found and used: a loader that reports it absent turns every native test "
        "into a skip, which a plain run accepts; SONAR_NATIVE_REQUIRED=1 (set here, as where the library is "
        "built for the run) makes it a failure. UNRELIABLE where the library is not built",
        ("tests/test_native.py::test_library_required_where_it_is_built_for",), env=(("SONAR_NATIVE_REQUIRED", "1"),),
    ),
    # ------------------------------------------------------------------ training loop
    Mutation(
        "train-resume-drops-optimizer-state", "train/sonar_train/checkpoint.py",
        'set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],',
        'set_state_dict(model, optimizer, model_state_dict=state["model"], '
        'optim_state_dict={"state": {}, "param_groups": state["optim"]["param_groups"]},',
        "resume restores the optimizer's moments",
        ("tests/test_train_checkpoint.py::test_kill_and_resume_is_bitwise_identical",),
    ),
    Mutation(
        "train-resume-drops-rng", "train/sonar_train/checkpoint.py",
        "    set_rng_state(extra.pop(\"rng\"), tensors, _device_of(model))\n", "    extra.pop(\"rng\")\n",
        "resume restores the RNG states (diffusion noise, dropout, CFG rows continue as uninterrupted)",
        ("tests/test_train_family_wiring.py::test_resumed_losses_equal_an_uninterrupted_run",),
    ),
    Mutation(
        "train-accumulation-unscaled", "train/sonar_train/loop.py",
        "run.scaler.scale(loss / accum).backward()", "run.scaler.scale(loss).backward()",
        "gradient accumulation averages the micro-batches' gradients",
        ("tests/test_train_loop.py::test_first_step_matches_float64_reference",),
    ),
    Mutation(
        "train-no-clipping", "train/sonar_train/loop.py",
        'max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")', 'max_norm = float("inf")',
        "gradients are clipped to optim.grad_clip",
        ("tests/test_train_loop.py::test_first_step_matches_float64_reference",),
    ),
    Mutation(
        "train-nan-step-not-skipped", "train/sonar_train/loop.py",
        '"bad_ranks": bad.double(),', '"bad_ranks": bad.double() * 0,',
        "a step with a non-finite loss or gradient norm is skipped (no update)",
        ("tests/test_train_loop.py::test_nan_steps_are_skipped_then_abort",),
    ),
    # ------------------------------------------------------------------ data
    Mutation(
        "data-shard-json-checksum-ignored", "sonar_llm/data/shards.py",
        'if entry.get("shard_json_sha256") and digest != entry["shard_json_sha256"]:',
        'if False and digest != entry["shard_json_sha256"]:',
        "a shard.json that does not match its sha256 in the manifest is refused, naming the file",
        ("tests/test_data_shards.py::test_edited_shard_json_is_named",),
    ),
    Mutation(
        "data-array-checksum-ignored", "sonar_llm/data/shards.py",
        '            if digest != rec["sha256"]:\n', "            if False:\n",
        "an array file that does not match its sha256 in shard.json is refused (verify=full)",
        ("tests/test_data_shards.py::test_flipped_byte_is_named_in_full_verification",),
    ),
    Mutation(
        "data-block-checksum-ignored", "sonar_llm/data/shards.py",
        "                            if got != want:\n", "                            if False:\n",
        "a block that does not match its per-block sha256 is refused (verify=sampled)",
        ("tests/test_data_shards.py::test_sampled_check_splits_blocks_over_ranks_and_catches_one_flipped_block",),
    ),
    Mutation(
        "data-packing-ignores-document-budget", "sonar_llm/data/loader.py",
        "if cs + s > S or ct + t > T or (D and len(cur) >= D):", "if cs + s > S or ct + t > T:",
        "a batch holds at most max_docs documents (the public recipe's documents per step)",
        ("tests/test_data_loader.py::test_document_budget",),
    ),
    Mutation(
        "data-packing-ignores-token-budget", "sonar_llm/data/loader.py",
        "if cs + s > S or ct + t > T or (D and len(cur) >= D):", "if cs + s > S or (D and len(cur) >= D):",
        "a batch of whole documents stays within max_tokens target tokens",
        ("tests/test_data_loader.py::test_packing_budgets_order_and_truncation",),
    ),
    Mutation(
        "data-segment-piece-at-the-limit", "sonar_llm/data/segment.py",
        "limit = max_sentence_chars - 1", "limit = max_sentence_chars",
        "re-split pieces are strictly shorter than max_sentence_chars",
        ("tests/test_data_segment.py::test_resplit_pieces_are_short_and_lossless",),
    ),
    # ------------------------------------------------------------------ evaluation metrics
    Mutation(
        "eval-rep4-counts-distinct", "sonar_llm/eval/metrics.py",
        "return 1.0 - len(set(grams)) / len(grams)", "return len(set(grams)) / len(grams)",
        "REP-n = 1 - distinct/total n-grams",
        ("tests/test_eval_metrics.py::test_repetition_and_overlap",),
    ),
    Mutation(
        "eval-overlap-unique-grams", "sonar_llm/eval/metrics.py",
        "return sum(g in seen for g in gen) / len(gen)", "return len(set(gen) & seen) / len(gen)",
        "OVL-n counts the generation's n-grams with multiplicity",
        ("tests/test_eval_metrics.py::test_overlap_counts_generated_ngrams_with_multiplicity",),
    ),
    Mutation(
        "eval-round-trip-l2-squared", "sonar_llm/eval/metrics.py",
        "l2 = (e - again).norm(dim=-1)", "l2 = (e - again).pow(2).sum(dim=-1)",
        "round-trip l2 is the Euclidean distance, not its square",
        ("tests/test_eval_metrics.py::test_round_trip_closed_form",),
    ),
    # ================================================================== issue 30: every feature of the last rounds
    # ------------------------------------------------------------------ public format, public objective
    Mutation(
        "public-format-swaps-gate-and-up", "sonar_llm/models/public_format.py",
        '    "mlp.gate_proj.weight": "ffn.gate_proj.weight",\n    "mlp.up_proj.weight": "ffn.inner_proj.weight",\n',
        '    "mlp.gate_proj.weight": "ffn.inner_proj.weight",\n    "mlp.up_proj.weight": "ffn.gate_proj.weight",\n',
        "the public checkpoint's gate/up projections map to ours (same shapes: only the outputs tell)",
        ("tests/test_public_checkpoint.py::test_import_matches_public_model_at_every_position",),
    ),
    Mutation(
        "public-format-export-drops-final-norm", "sonar_llm/models/public_format.py",
        "        if key in inverse_top:\n            out[inverse_top[key]] = value\n",
        "        if key in inverse_top:\n            out[inverse_top[key]] = torch.ones_like(value) if 'norm' in key "
        "else value\n",
        "exporting to the public layout writes every tensor as it is (the final norm included)",
        ("tests/test_public_checkpoint.py::test_export_round_trip_bit_exact",),
    ),
    Mutation(
        "public-objective-extra-eos-label", "sonar_llm/sonar/packed_decoder.py",
        "    labels[cu[1:] - 1] = eos_id\n", "    labels[cu[1:] - 1] = eos_id + 1\n",
        "the public objective's extra target after each sentence's last token is </s> (copying that token, or "
        "leaving the next sentence's first, would be equivalent mutants: both are </s> in target mode)",
        ("tests/test_public_objective.py::test_extra_objective_adds_one_eos_term_per_sentence",),
    ),
    Mutation(
        "public-objective-flag-not-passed", "sonar_llm/models/sonar_llm.py",
        "prepared = packed.prepare(tokens, tok_cu, extra_eos_target=extra)",
        "prepared = packed.prepare(tokens, tok_cu, extra_eos_target=False)",
        "SonarLLMConfig.extra_eos_target reaches the fast path (it must equal the reference path's public loss)",
        ("tests/test_public_objective.py::test_sonar_llm_fast_equals_reference_path",),
    ),
    # ------------------------------------------------------------------ evaluation: public scoring, judge, summaries
    Mutation(
        "eval-public-scores-whole-continuation", "sonar_llm/eval/public_scoring.py",
        "g, ref1 = _first_sentence(gen, punkt), _first_sentence(ref, punkt)", "g, ref1 = gen.strip(), ref.strip()",
        "public scoring compares only the first generated sentence with the first reference sentence",
        ("tests/test_eval_public_scoring.py::test_hand_worked_bleu_rouge_meteor",
         "tests/test_eval_public_scoring.py::test_matches_nltk_and_rouge_score_called_directly"),
    ),
    Mutation(
        "eval-public-half-prompt-rounds-up", "sonar_llm/eval/public_scoring.py",
        'k = 2 if mode == "start" else max(1, len(sents) // 2)',
        'k = 2 if mode == "start" else max(1, (len(sents) + 1) // 2)',
        "the 'half' prompt is the first n // 2 sentences (the public cut)",
        ("tests/test_eval_public_scoring.py::test_public_prompts_start_half_limit",),
    ),
    Mutation(
        "eval-judge-429-not-retried", "sonar_llm/eval/judge.py",
        "if e.code != 429 and e.code < 500:", "if e.code < 500:",
        "HTTP 429 (rate limited) is retried with backoff like a 5xx",
        ("tests/test_eval_judge_transport.py::test_429_is_retried_with_backoff_and_400_is_not",),
    ),
    Mutation(
        "eval-judge-backoff-uncapped", "sonar_llm/eval/judge.py",
        "delay = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))",
        "delay = self.cfg.backoff * 2 ** (attempt - 1)",
        "the retry delay doubles but never exceeds max_backoff",
        ("tests/test_eval_judge_transport.py::test_backoff_doubles_and_is_capped",),
    ),
    Mutation(
        "eval-judge-non-json-reply-not-retried", "sonar_llm/eval/judge.py",
        "except (ValueError, KeyError, IndexError, TypeError) as e:", "except (KeyError, IndexError, TypeError) as e:",
        "a reply that is not JSON is a bad body: retried, then reported (not an uncaught JSONDecodeError)",
        ("tests/test_eval_judge_transport.py::test_a_reply_that_is_not_a_chat_completion_is_retried_then_reported",),
    ),
    Mutation(
        "eval-judge-mark-range-unchecked", "sonar_llm/eval/judge.py",
        "        if not 1.0 <= value <= 10.0:\n", "        if False:\n",
        "a mark outside 1-10 is a problem, never a score",
        ("tests/test_eval_judge.py::test_parse_marks_like_the_public_script",),
    ),
    Mutation(
        "eval-summarization-prompt-not-cut", "sonar_llm/eval/summarization.py",
        "seg(ex.document)[: cfg.max_prompt_sentences]", "seg(ex.document)",
        "the summarization prompt keeps the document's first max_prompt_sentences sentences",
        ("tests/test_eval_summarization.py::test_prompt_cut_to_max_sentences",),
    ),
    Mutation(
        "eval-summarization-lsum-space-joined", "sonar_llm/eval/summarization.py",
        'lsum.score("\\n".join(ref), "\\n".join(pred))', 'lsum.score(" ".join(ref), " ".join(pred))',
        "ROUGE-Lsum reads the summaries' sentences joined by newlines (per-sentence LCS union)",
        ("tests/test_eval_summarization.py::test_hand_worked_rouge_lsum_reads_sentences",),
    ),
    # ------------------------------------------------------------------ data: TinyStories
    Mutation(
        "data-tinystories-holdout-from-the-front", "sonar_llm/data/tinystories.py",
        "held, prompts = (valid[-h:], valid[:-h]) if h else ([], valid)",
        "held, prompts = (valid[:h], valid[h:]) if h else ([], valid)",
        "the held-out validation shards are the split's last stories and the prompts the others (val[:-2500])",
        ("tests/test_data_tinystories.py::test_blingfire_fallback_and_resume",),
    ),
    Mutation(
        "data-tinystories-punkt-keeps-33", "sonar_llm/data/tinystories.py",
        "return [s.strip() for s in tok.tokenize(text) if s.strip()][:max_sentences]",
        "return [s.strip() for s in tok.tokenize(text) if s.strip()][:max_sentences + 1]",
        "a story is cut to its first 32 Punkt sentences before the end sentence",
        ("tests/test_data_tinystories.py::test_layouts_with_punkt",),
    ),
    # ------------------------------------------------------------------ training: trust, resume, exit codes
    Mutation(
        "train-metadata-unpickler-admits-any-global", "sonar_llm/dcp_safe.py",
        'if name in _ALLOWED.get(module, ()) or (module == "torch" and _torch_constant(name)):', "if True:",
        "the DCP .metadata unpickler refuses globals outside its allow-list (a planted payload never runs)",
        ("tests/test_train_trust.py::test_planted_payload_in_a_checkpoint_file_is_refused",),
    ),
    Mutation(
        "train-dcp-entry-unpickled-freely", "sonar_llm/dcp_safe.py",
        "obj = torch.load(value, weights_only=True)", "obj = torch.load(value, weights_only=False)",
        "a non-tensor DCP entry is read with weights_only=True",
        ("tests/test_train_trust.py::test_planted_payload_in_a_dcp_entry_is_refused",),
    ),
    Mutation(
        "train-resume-refuses-nothing", "train/sonar_train/config.py",
        "(refused if name in RESUME_FIXED else changes).append(", "(changes).append(",
        "a resume refuses a change of the model / data keys (RESUME_FIXED) and writes nothing",
        ("tests/test_train_trust.py::test_resume_applies_optimizer_changes_and_refuses_model_changes",),
    ),
    Mutation(
        "train-resume-change-not-reported", "train/sonar_train/config.py",
        "if name in _RESUME_IGNORED or key not in before or before[key] == value:",
        'if name in _RESUME_IGNORED or key not in before or before[key] == value or section == "optim":',
        "an optimizer change on resume is applied and said",
        ("tests/test_train_trust.py::test_resume_applies_optimizer_changes_and_refuses_model_changes",),
    ),
    Mutation(
        "train-exit-code-4-lost", "train/sonar_train/main.py",
        "    except CheckpointNotSaved:  # already reported by run_training\n        return 4\n",
        "    except CheckpointNotSaved:  # already reported by run_training\n        return 1\n",
        "a run whose last checkpoint could not be saved exits 4 (not 1: the work itself is done)",
        ("tests/test_train_trust.py::test_failed_last_save_exits_non_zero_naming_the_good_step",),
    ),
    Mutation(
        "train-metrics-rewind-marks-nothing", "train/sonar_train/metrics.py",
        '            rec["stale"] = True\n', '            rec["stale"] = False\n',
        "a resume marks the records of the redone steps stale",
        ("tests/test_train_trust.py::test_metrics_lines_are_whole_and_rewound",),
    ),
    Mutation(
        "train-good-after-skipped-steps", "train/sonar_train/loop.py",
        "progress = run.step == run.good_base or run.updates_since_good > 0", "progress = True",
        "a checkpoint after only skipped steps is not called good (the abort names the last good one)",
        ("tests/test_train_trust.py::test_only_good_checkpoints_are_called_good",),
    ),
    Mutation(
        "train-good-with-non-finite-weights", "train/sonar_train/loop.py",
        "good=finite and progress, reason=reason)", "good=progress, reason=reason)",
        "a checkpoint with non-finite weights is not called good",
        ("tests/test_train_trust.py::test_non_finite_weights_are_not_good_and_the_run_fails",),
    ),
    Mutation(
        "train-plan-charges-gradient-storage", "train/sonar_train/plan.py",
        "grads_bytes = sum(g.numel() * g.element_size() for g in (_local(p.grad) for p in trainable)",
        "grads_bytes = sum(g.untyped_storage().nbytes() for g in (_local(p.grad) for p in trainable)",
        "the planner charges each rank its gradient shards' own bytes, not the group-wide buffer they view",
        ("tests/test_plan.py::test_sharded_state_per_rank_is_one_shard",),
    ),
    # ------------------------------------------------------------------ kernels: z-loss, targets, autocast
    Mutation(
        "lce-z-loss-not-squared", "kernels/sonar_kernels/ops/linear_cross_entropy.py",
        "rows = torch.where(target != ignore_index, rows + z_loss * lse * lse, rows)",
        "rows = torch.where(target != ignore_index, rows + z_loss * lse, rows)",
        "the z-loss adds z_loss * lse^2 per non-ignored token (recompute path)",
        ("tests/test_lce_grad_in_forward.py::test_z_loss_value_and_gradient",),
    ),
    Mutation(
        "lce-out-of-range-target-unchecked", "kernels/sonar_kernels/ops/linear_cross_entropy.py",
        "        if bool(bad.any()):\n", "        if False:\n",
        "a target outside [0, V) that is not ignore_index raises on CPU (never read out of bounds)",
        ("tests/test_lce_grad_in_forward.py::test_out_of_range_targets_raise",),
    ),
    Mutation(
        "lce-autocast-inputs-not-cast", "kernels/sonar_kernels/functional/linear_cross_entropy.py",
        "    if not torch.is_autocast_enabled(device.type):\n", "    if True:\n",
        "under autocast, hidden and weight of different dtypes are cast to the autocast dtype (as F.linear)",
        ("tests/test_lce_grad_in_forward.py::test_autocast_mixed_dtypes_are_cast_to_the_autocast_dtype",),
    ),
    # ------------------------------------------------------------------ LCM: SFT mask, normalizer, stop rule
    Mutation(
        "family-sft-mask-no-key-padding", "sonar_llm/models/two_tower.py",
        "mask = (j <= src[:, None, None] + i) & (j <= (src + tgt)[:, None, None])",
        "mask = (j <= src[:, None, None] + i)",
        "SFT queries never see keys past their document (fairseq2's key padding mask)",
        ("tests/test_two_tower_sft.py::test_sft_mask_is_metas_tril_with_key_padding",),
    ),
    Mutation(
        "family-normalizer-true-quartiles-by-default", "sonar_llm/models/normalizer.py",
        "q_lo, q_hi = (0.0025, 0.0075) if quantile_quirk else (0.25, 0.75)", "q_lo, q_hi = (0.25, 0.75)",
        "the default fit reads quantile_range=(0.25, 0.75) in percent, as Meta's RobustScaler call does",
        ("tests/test_lcm_meta_defaults.py::test_default_fit_is_robust_scaler_with_metas_arguments",),
    ),
    Mutation(
        "family-normalizer-sample-stride-offset", "sonar_llm/models/build.py",
        "rows = torch.from_numpy(np.concatenate(pending)[::down_sample]).float()",
        "rows = torch.from_numpy(np.concatenate(pending)[down_sample - 1::down_sample]).float()",
        "the fitting sample is every 5th embedding of each batch starting at its first ([::5])",
        ("tests/test_lcm_meta_defaults.py::test_fitting_sample_follows_metas_script",),
    ),
    Mutation(
        "family-normalizer-sample-stops-at-max", "sonar_llm/models/build.py",
        "            if n_kept > max_samples:", "            if n_kept >= max_samples:",
        "the sample stops after the batch that brings the count above max samples (not at it)",
        ("tests/test_lcm_meta_defaults.py::test_fitting_sample_follows_metas_script",),
    ),
    Mutation(
        "gen-min-sentences-ignored", "sonar_llm/models/generate.py",
        "if why[j] is not None and len(appended[b]) + 1 >= min_sentences:", "if why[j] is not None:",
        "Base-LCM / SONAR-LLM generation cannot stop on the first generated concept by default (Meta)",
        ("tests/test_lcm_meta_defaults.py::test_base_lcm_cannot_stop_on_the_first_generated_concept",),
    ),
    Mutation(
        "gen-two-tower-min-sentences-ignored", "sonar_llm/models/generate_two_tower.py",
        "if why[j] is not None and len(outputs[b]) >= min_sentences:", "if why[j] is not None:",
        "the Two-Tower cannot stop on its first generated concept by default (Meta's min_gen_len)",
        ("tests/test_lcm_meta_defaults.py::test_two_tower_cannot_stop_on_the_first_generated_concept",),
    ),
    # ------------------------------------------------------------------ SONAR: sampling and decoding defaults
    Mutation(
        "sonar-sampling-top-p-drops-crossing-token", "sonar_llm/sonar/generation.py",
        "before = torch.cumsum(sorted_p, dim=-1) - sorted_p", "before = torch.cumsum(sorted_p, dim=-1)",
        "top-p keeps the token whose mass crosses p (the mass strictly before it is <= p)",
        ("tests/test_sonar_sampling.py::test_top_k_top_p_support_and_frequencies",),
    ),
    Mutation(
        "sonar-sampling-top-k-one-ignored", "sonar_llm/sonar/generation.py",
        "    if 0 < top_k < vocab:\n", "    if 1 < top_k < vocab:\n",
        "top-k 1 keeps only the most likely token (sampling == greedy)",
        ("tests/test_sonar_sampling.py::test_top_k_one_is_greedy_and_samples_are_embedding_major",),
    ),
    Mutation(
        "sonar-decoding-length-from-one-source-token", "sonar_llm/sonar/generation.py",
        "gen = int(a * width + b)", "gen = int(a * 1 + b)",
        "fairseq2's a * source_len + b length rule reads source_len as the embedding width (SONAR's default)",
        ("tests/test_sonar_decoding_defaults.py::test_max_new_tokens_rule",),
    ),
    # ------------------------------------------------------------------ this round: end sentence, exports, ops, fits
    Mutation(
        "sonar-round-trip-ignores-case", "sonar_llm/sonar/round_trip.py",
        "return self.decoded.strip() == self.text.strip()",
        "return self.decoded.strip().lower() == self.text.strip().lower()",
        "the end sentence round-trips only when it decodes to exactly itself (case included)",
        ("tests/test_end_sentence_round_trip.py::test_round_trip_exact_match_rule",),
    ),
    Mutation(
        "sonar-round-trip-never-raises", "sonar_llm/sonar/round_trip.py",
        "    if not result.exact:\n        raise RoundTripError(result, what)\n",
        "    if False:\n        raise RoundTripError(result, what)\n",
        "a SONAR that cannot decode the end sentence is refused loudly (generation could never stop)",
        ("tests/test_end_sentence_round_trip.py::test_round_trip_fails_loudly_on_a_sonar_that_cannot_decode_the_end_sentence",),
    ),
    Mutation(
        "export-checksum-unchecked", "sonar_llm/checkpoints.py",
        '    if got != rec["sha256"]:\n', "    if False:\n",
        "an exported file whose sha256 differs from model.json's record is refused, naming it",
        ("tests/test_export_integrity.py::test_flipped_bytes_are_a_checksum_mismatch",),
    ),
    Mutation(
        "export-size-unchecked", "sonar_llm/checkpoints.py",
        "    if isinstance(want, int) and size != want:\n", "    if False:\n",
        "a truncated export is named 'truncated' from its recorded size, before any hashing or parsing",
        ("tests/test_export_integrity.py::test_truncated_file_is_named_never_a_safetensor_error",),
    ),
    Mutation(
        "kernel-lce-fake-loss-shape", "kernels/sonar_kernels/ops/linear_cross_entropy.py",
        'loss = hidden.new_empty(n, dtype=acc) if reduction == "none" else hidden.new_empty((), dtype=acc)',
        "loss = hidden.new_empty(n, dtype=acc)",
        "the custom op's fake (meta) implementation gives the real output shapes (opcheck, torch.compile)",
        ("tests/test_compile.py::test_opcheck_linear_cross_entropy",),
    ),
    Mutation(
        "eval-bits-per-byte-in-nats", "sonar_llm/eval/nll.py",
        '{"bits_per_byte": total_nll / math.log(2.0) / num_bytes,', '{"bits_per_byte": total_nll / num_bytes,',
        "bits per byte = summed NLL in nats / ln 2 / bytes",
        ("tests/test_bits_per_byte.py::test_uniform_model_bits_per_byte_is_closed_form",),
    ),
    Mutation(
        "eval-bits-per-byte-drops-separators", "sonar_llm/eval/nll.py",
        'return sum(len(t.encode("utf-8")) + 1 for t in decode(ids))',
        'return sum(len(t.encode("utf-8")) for t in decode(ids))',
        "the bytes of the continuation count one separator per sentence (the text as written)",
        ("tests/test_bits_per_byte.py::test_sonar_llm_bits_per_byte",),
    ),
    Mutation(
        "eval-scaling-reports-a-at-n-ref", "sonar_llm/eval/scaling.py",
        '"A": a_ref * n_ref ** alpha,', '"A": a_ref,',
        "the fit reports A of L = E + A N^-alpha in the caller's N (not the conditioning N_ref's)",
        ("tests/test_eval_scaling.py::test_exact_points_and_three_point_fit",),
    ),
    # ------------------------------------------------------------------ every command's input validation
    Mutation(
        "cli-usage-error-exits-1", "sonar_llm/cli.py",
        "        print(f\"{getattr(e, 'label', label)} error: {_describe(e)}\", file=err, flush=True)\n        return 2\n",
        "        print(f\"{getattr(e, 'label', label)} error: {_describe(e)}\", file=err, flush=True)\n        return 1\n",
        "bad input exits 2 (1 is a failure during work), for every command run through sonar_llm.cli.run",
        ("tests/test_cli_errors.py::test_bad_input[generate-wrong_type]",),
    ),
    Mutation(
        "cli-int-flag-lower-bound-unchecked", "sonar_llm/cli.py",
        "        if value < low:\n            raise argparse.ArgumentTypeError", "        if False:\n            raise argparse.ArgumentTypeError",
        "an integer flag below its bound is refused, naming the flag (int_at_least, shared by the commands)",
        ("tests/test_cli_helpers.py::test_int_at_least_bounds",),
    ),
    Mutation(
        "cli-float-flag-range-unchecked", "sonar_llm/cli.py",
        "        if not ok:\n            raise argparse.ArgumentTypeError", "        if False:\n            raise argparse.ArgumentTypeError",
        "a float flag outside its range is refused, naming the flag (float_in)",
        ("tests/test_cli_helpers.py::test_float_in_bounds_open_and_closed",),
    ),
    Mutation(
        "cli-non-utf8-read-as-replacement-characters", "sonar_llm/cli.py",
        '        return data.decode("utf-8")\n', '        return data.decode("utf-8", errors="replace")\n',
        "a file that is not UTF-8 is refused naming the file and line (read_utf8), not read with U+FFFD",
        ("tests/test_cli_helpers.py::test_read_utf8_names_the_file_and_line",),
    ),
    Mutation(
        "cli-missing-gpu-accepted", "sonar_llm/cli.py",
        '        if not torch.cuda.is_available():\n            raise UsageError(f"{flag} {device}: no CUDA',
        '        if False:\n            raise UsageError(f"{flag} {device}: no CUDA',
        "--device cuda on a machine without CUDA is refused naming --device, before any model is loaded",
        ("tests/test_cli_helpers.py::test_check_device_without_cuda",),
    ),
    Mutation(
        "cli-train-steps-range", "train/sonar_train/config.py",
        '_require(t.steps > 0, "train.steps", "int > 0", t.steps)', '_require(t.steps >= 0, "train.steps", "int > 0", t.steps)',
        "train: train.steps 0 is a config error naming the key, before any folder",
        ("tests/test_cli_errors.py::test_bad_input[train-out_of_range]",),
    ),
    Mutation(
        "cli-export-unreadable-run-config", "train/sonar_train/export.py",
        "    except (UnicodeDecodeError, json.JSONDecodeError) as e:\n", "    except json.JSONDecodeError as e:\n",
        "export: a run whose config.json is not UTF-8 is one line naming the file (--step's own range check is "
        "redundant: a missing step is named by --step anyway)",
        ("tests/test_cli_errors.py::test_bad_input[export-non_utf8]",),
    ),
    Mutation(
        "cli-convert-head-dim-zero", "sonar_llm/convert.py",
        'p.add_argument("--head-dim", type=int_at_least(1), default=None,', 'p.add_argument("--head-dim", type=int, default=None,',
        "convert: --head-dim 0 is refused naming --head-dim",
        ("tests/test_cli_errors.py::test_bad_input[convert --from public-out_of_range]",),
    ),
    Mutation(
        "cli-generate-eos-threshold-range", "sonar_llm/generate.py",
        "        if not 0.0 <= self.eos_threshold <= 1.0:\n", "        if False:\n",
        "generate: --eos-threshold outside [0, 1] is refused naming the flag",
        ("tests/test_cli_errors.py::test_bad_input[generate-out_of_range]",),
    ),
    Mutation(
        "cli-evaluate-eos-threshold-range", "sonar_llm/eval/evaluate.py",
        "        if not 0.0 <= self.eos_threshold <= 1.0:\n", "        if False:\n",
        "evaluate: --eos-threshold outside [0, 1] is refused naming the flag",
        ("tests/test_cli_errors.py::test_bad_input[evaluate-out_of_range]",),
    ),
    Mutation(
        "cli-judge-failed-share-range", "sonar_llm/eval/judge.py",
        "        if not 0.0 <= self.max_failed_share <= 1.0:\n", "        if False:\n",
        "judge: --max-failed-share outside [0, 1] is refused naming the flag",
        ("tests/test_cli_errors.py::test_bad_input[judge-out_of_range]",),
    ),
    Mutation(
        "cli-preprocess-shard-size-zero", "sonar_llm/data/preprocess.py",
        'p.add_argument("--shard-size-docs", type=int_at_least(1), default=1000,',
        'p.add_argument("--shard-size-docs", type=int, default=1000,',
        "preprocess: --shard-size-docs 0 is refused naming the flag",
        ("tests/test_cli_errors.py::test_bad_input[preprocess-out_of_range]",),
    ),
    Mutation(
        "cli-tinystories-max-sentences-zero", "sonar_llm/data/tinystories.py",
        'p.add_argument("--max-sentences", type=int_at_least(1), default=d.max_sentences,',
        'p.add_argument("--max-sentences", type=int, default=d.max_sentences,',
        "tinystories: --max-sentences 0 is refused naming the flag",
        ("tests/test_cli_errors.py::test_bad_input[tinystories-out_of_range]",),
    ),
    Mutation(
        "cli-plan-mfu-range", "train/sonar_train/plan.py",
        "    if not 0 < args.mfu <= 1:\n", "    if False:\n",
        "plan: --mfu outside (0, 1] is refused naming the flag",
        ("tests/test_cli_helpers.py::test_plan_range_flags_are_checked_before_the_config_is_read",),
    ),
    Mutation(
        "cli-bench-report-accepts-any-json", "bench/report.py",
        '    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):\n',
        "    if False:\n",
        "bench/report.py: a JSON file that is not a pytest-benchmark result is refused naming it",
        ("tests/test_cli_errors.py::test_bad_input[bench/report.py-wrong_type]",),
    ),
    Mutation(
        "cli-scaling-points-unchecked", "sonar_llm/eval/scaling.py",
        "    if not ok:\n        raise ValueError(f'--points:", "    if False:\n        raise ValueError(f'--points:",
        "scaling: a --points file whose records are not {family, params, value} numbers is one line naming --points "
        "(the existence check before it is redundant: reading the file names it anyway)",
        ("tests/test_eval_scaling.py::test_command_bad_input_is_one_line",),
    ),
    Mutation(
        "cli-plot-out-folder-unchecked", "train/sonar_train/plot.py",
        "    if not out.parent.is_dir():\n", "    if False:\n",
        "train/plot.py: --out in a folder that does not exist is one line, nothing written",
        ("tests/test_train_plot.py::test_bad_input_is_one_line_exit_2_nothing_written",),
    ),
    Mutation(
        "cli-public-scoring-record-fields-unchecked", "sonar_llm/eval/public_scoring.py",
        "        if bad:\n            raise ValueError(f\"record {i} has no string field(s) {bad}\")\n",
        "        if False:\n            raise ValueError(f\"record {i} has no string field(s) {bad}\")\n",
        "public scoring: a record without prefix / full_text / original_text is bad input (exit 2)",
        ("tests/test_eval_public_scoring.py::test_cli_scores_a_generate_py_json",),
    ),
    Mutation(
        "cli-preprocess-tokens-max-tokens-range", "sonar_llm/data/preprocess_tokens.py",
        "if not isinstance(self.max_tokens, int) or self.max_tokens < 2:",
        "if not isinstance(self.max_tokens, int) or self.max_tokens < 1:",
        "preprocess_tokens: --max-tokens 1 is refused naming the flag, nothing written",
        ("tests/test_token_llm_text_tokenizer.py::test_preprocess_errors_are_one_line",),
    ),
    Mutation(
        "cli-default-run-goes-on-without-end-sentence", "train/sonar_train/default_pipeline.py",
        "    else:\n        raise RoundTripError(result)\n", "    else:\n        pass\n",
        "the default run stops with one line when its SONAR cannot decode the end sentence",
        ("tests/test_end_sentence_round_trip.py::test_default_pipeline_stops_with_one_line_when_the_end_sentence_is_lost",),
    ),
]


# ---------------------------------------------------------------------------------------------- the copy


def tree_files(root: Path) -> list[str]:
    """The working tree's files as the tests see them: tracked (as on disk) + untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f and (root / f).is_file()]
    native = root / "kernels" / "sonar_kernels" / "_native"
    if native.is_dir():  # the optional native library is ignored by git but is part of "native if built"
        files += [str(p.relative_to(root)) for p in native.iterdir() if p.is_file() and p.suffix == ".so"]
    return sorted(set(files))


def snapshot(root: Path, dest: Path) -> None:
    """Copy the working tree's files into dest (a frozen snapshot: others may keep editing the real tree)."""
    for rel in tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def clone(snap: Path, dest: Path) -> None:
    """A cheap per-mutation copy: hard links (a mutated file is replaced, never written in place)."""
    shutil.copytree(snap, dest, symlinks=True, copy_function=os.link)


def plant(copy: Path, m: Mutation) -> str | None:
    """Apply the mutation in `copy`; returns None, or why it is STALE."""
    path = copy / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    text = path.read_text()
    n = text.count(m.old)
    if n != m.count:
        return f"expected {m.count} occurrence(s) of the text in {m.file}, found {n}"
    path.unlink()  # break the hard link to the snapshot
    path.write_text(text.replace(m.old, m.new))
    return None


def test_env(project: Project, copy: Path, extra=()) -> dict[str, str]:
    env = dict(os.environ)
    roots = [str((copy / r).resolve()) for r in project.source_roots]
    env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(dict(extra))
    return env


# ---------------------------------------------------------------------------------------------- one pytest run


@dataclass
class Case:
    """One test case as the JUnit XML reports it."""

    nodeid: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str = ""


@dataclass
class Run:
    """One pytest run: exit code, the cases from its JUnit XML (None: no readable XML), output tail."""

    rc: int
    cases: list[Case] | None
    tail: str
    seconds: float
    timed_out: bool = False


def _nodeid(tc: ET.Element) -> str:
    """pytest's node id of a JUnit (xunit1) test case: file::Class::name."""
    file = tc.get("file") or ""
    classname = tc.get("classname") or ""
    name = tc.get("name") or ""
    module = file[:-3].replace("/", ".") if file.endswith(".py") else ""
    parts = [file] if file else []
    if module and classname.startswith(module + "."):
        parts += classname[len(module) + 1:].split(".")
    elif not file:  # no file attribute (should not happen with xunit1): keep what there is
        parts += [classname]
    return "::".join(parts + [name])


def parse_junit(path: Path) -> list[Case] | None:
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return None
    cases = []
    for tc in tree.iter("testcase"):
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[0][:200] if child.get("message") else ""
                if outcome != "skipped":
                    break  # a failure (call) outranks an error in teardown only if it comes first: keep the first
        cases.append(Case(_nodeid(tc), outcome, float(tc.get("time") or 0.0), message))
    return cases


# pytest runs in a forked copy of one warm interpreter: the imports every run shares (torch, numpy, pytest and
# its plugins: ~2 of the ~3 CPU seconds a trivial run costs) are paid once per job slot, not once per run.
# Nothing of the project is imported before the fork, so each run imports the copy it is pointed at (the
# preflight's canary proves it), and each run is a fresh child of the same clean parent.
_FORK_SERVER = r"""
import json, os, signal, sys, time, traceback
import pytest
for _name in json.loads(sys.argv[1]):
    try:
        __import__(_name)
    except ImportError:
        pass
_base = [p for p in sys.path if p not in ("", os.getcwd())]
_reply = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_RDONLY)
for _line in sys.stdin:
    req = json.loads(_line)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(_null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.path[:] = [""] + req["roots"] + _base
            code = pytest.main(req["args"])
        except BaseException:
            traceback.print_exc()
            code = 70
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code))
    deadline = time.monotonic() + req["timeout"]
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    try:  # whatever the run left in its process group (a test's subprocesses)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
    _reply.flush()
"""


class ForkServers:
    """`jobs` warm interpreters (one per job slot), each running one pytest at a time in a forked child."""

    def __init__(self, jobs: int, preload: tuple[str, ...]):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.idle: list[subprocess.Popen] = []
        self.all: list[subprocess.Popen] = []
        self.lock = threading.Condition()
        for _ in range(max(1, jobs)):
            p = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, json.dumps(list(preload))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env, cwd=tempfile.gettempdir())
            self.idle.append(p)
            self.all.append(p)

    def run(self, cwd: Path, args: list[str], env: dict[str, str], roots: list[str], timeout: float,
            log: Path) -> tuple[int, bool]:
        with self.lock:
            while not self.idle:
                self.lock.wait()
            server = self.idle.pop()
        try:
            req = {"cwd": str(cwd), "args": args, "env": env, "roots": roots, "timeout": timeout, "log": str(log)}
            server.stdin.write(json.dumps(req) + "\n")
            server.stdin.flush()
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("the fork server died")
            reply = json.loads(line)
            return int(reply["rc"]), bool(reply["timed_out"])
        finally:
            with self.lock:
                self.idle.append(server)
                self.lock.notify()

    def close(self) -> None:
        for p in self.all:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                p.kill()


_SERVERS: ForkServers | None = None  # set by main() for the run; None: a plain subprocess per pytest run


def run_pytest(project: Project, copy: Path, tests, env_extra=(), timeout: float = 1800.0,
               stop_first: bool = False) -> Run:
    """Run the named tests in the copy and read their JUnit XML."""
    xml = copy / ".mutation_check-junit.xml"
    log = copy / ".mutation_check-pytest.log"
    for f in (xml, log):
        if f.exists():
            f.unlink()
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "junit_family=xunit1", f"--junitxml={xml}", "-rfE"]
    if importlib.util.find_spec("pytest_benchmark") is not None:
        args.append("--benchmark-disable")
    if stop_first:
        args.append("-x")
    args += list(tests)
    env = test_env(project, copy, env_extra)
    t0 = time.perf_counter()
    if _SERVERS is not None:
        roots = [str((copy / r).resolve()) for r in project.source_roots]
        rc, timed_out = _SERVERS.run(copy, args, env, roots, timeout, log)
    else:
        with open(log, "w") as out:
            p = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=copy, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc, timed_out = p.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                rc, timed_out = -9, True
            try:  # the run and anything it started
                os.killpg(p.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
    secs = time.perf_counter() - t0
    out = log.read_text(errors="replace") if log.exists() else ""
    if timed_out:
        out, rc = out + f"\n[timeout after {timeout:.0f} s]", -9
    cases = None if timed_out else parse_junit(xml)
    return Run(rc, cases, out[-3000:], secs, timed_out)


def matches(named: str, nodeid: str) -> bool:
    """Whether a collected node id is (inside) a named test: a path, a folder, a node id or its parametrizations."""
    named = named.rstrip("/")
    return (nodeid == named or nodeid.startswith(named + "::") or nodeid.startswith(named + "[")
            or nodeid.startswith(named + "/"))


def uncollected(tests, cases: list[Case]) -> list[str]:
    return [t for t in tests if not any(matches(t, c.nodeid) for c in cases)]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def verdict(tests, run: Run) -> tuple[str, list[str], str]:
    """(status, failing named tests, detail) of a mutated run: CAUGHT only for a failing test."""
    if run.timed_out:
        return "UNRELIABLE", [], f"timeout after {run.seconds:.0f} s"
    if run.rc not in (0, 1):
        return "UNRELIABLE", [], f"pytest exit code {run.rc} (not a test failure): {_last_line(run.tail)}"
    if run.cases is None:
        return "UNRELIABLE", [], f"no readable JUnit XML (pytest rc={run.rc}): {_last_line(run.tail)}"
    failed = [c for c in run.cases if c.outcome == "failed" and any(matches(t, c.nodeid) for t in tests)]
    errors = [c for c in run.cases if c.outcome == "error"]
    if run.rc == 1:
        if failed:
            return "CAUGHT", [c.nodeid for c in failed], ""
        what = "; ".join(f"{c.nodeid}: {c.message}" for c in errors[:3]) or _last_line(run.tail)
        return "UNRELIABLE", [], f"pytest failed with no failing test (errors only): {what}"
    missing = uncollected(tests, run.cases)
    if missing:
        return "UNRELIABLE", [], f"named test(s) not collected: {missing}"
    if run.cases and all(c.outcome == "skipped" for c in run.cases):
        return "UNRELIABLE", [], "every named test skipped"
    return "SURVIVED", [], _last_line(run.tail)


# ---------------------------------------------------------------------------------------------- checks


def preflight(project: Project, snap: Path, work: Path, jobs: int = 1) -> list[str]:
    """The copy is what gets imported, and a canary import error planted in it breaks collection."""
    problems = []
    probe = work / "preflight-clean"
    clone(snap, probe)
    code = "; ".join(f"import {p}; print({p}.__file__)" for p in project.packages)
    p = subprocess.run([sys.executable, "-c", code], cwd=probe, env=test_env(project, probe), capture_output=True,
                       text=True)
    if p.returncode != 0:
        problems.append(f"importing from the copy failed: {p.stderr.strip()[-500:]}")
    else:
        for line in p.stdout.split():
            if not Path(line).resolve().is_relative_to(probe.resolve()):
                problems.append(f"the copy is shadowed: a module resolves to {line}, outside {probe}")
    shutil.rmtree(probe, ignore_errors=True)

    def canary(rel_tests):
        rel, probe_tests = rel_tests
        copy = work / f"preflight-canary-{rel.replace('/', '-')}"
        clone(snap, copy)
        _plant_canary(copy / rel)
        try:
            run = run_pytest(project, copy, ["--collect-only", probe_tests], timeout=600)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        status = verdict([probe_tests], run)[0]
        if run.rc == 0 or "mutation_check canary" not in run.tail or status == "CAUGHT":
            return (f"a canary planted in {rel} of the copy did not break collection (rc={run.rc}, "
                    f"verdict {status}): the tests are not importing the copy")
        return None

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        problems += [p for p in ex.map(canary, project.canaries) if p]
    return problems


def _plant_canary(path: Path) -> None:
    text = path.read_text()
    path.unlink()
    path.write_text('raise ImportError("mutation_check canary")\n' + text)


@dataclass
class Result:
    name: str
    status: str  # CAUGHT | SURVIVED | STALE | UNRELIABLE
    caught_by: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def check_one(project: Project, snap: Path, work: Path, m: Mutation, timeout: float) -> Result:
    copy = work / f"m-{m.name}"
    clone(snap, copy)
    try:
        stale = plant(copy, m)
        if stale:
            return Result(m.name, "STALE", detail=stale)
        run = run_pytest(project, copy, list(m.tests), m.env, timeout, stop_first=True)
        status, failed, detail = verdict(m.tests, run)
        return Result(m.name, status, failed, run.seconds, detail)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@dataclass
class Baseline:
    ok: bool
    problems: list[str]
    cases: list[Case]
    seconds: float  # wall time


def _chunks(tests: list[str], n: int) -> list[list[str]]:
    """Split test ids into n groups of whole files (one pytest process each), largest files first."""
    by_file: dict[str, list[str]] = {}
    for t in tests:
        by_file.setdefault(t.split("::")[0], []).append(t)
    groups: list[list[str]] = [[] for _ in range(max(1, n))]
    for f in sorted(by_file, key=lambda f: -len(by_file[f])):
        min(groups, key=len).extend(by_file[f])
    return [g for g in groups if g]


def baseline(project: Project, snap: Path, work: Path, muts: list[Mutation], timeout: float, jobs: int) -> Baseline:
    """Run every selected mutation's tests once on the unmutated copy: all must be collected and pass."""
    env_groups: dict[tuple, list[str]] = {}
    for m in muts:
        lst = env_groups.setdefault(m.env, [])
        lst += [t for t in m.tests if t not in lst]
    jobs_list = [(env, chunk) for env, tests in env_groups.items() for chunk in _chunks(tests, jobs)]
    t0 = time.perf_counter()

    def one(i_env_chunk):
        i, (env, chunk) = i_env_chunk
        copy = work / f"baseline-{i}"
        clone(snap, copy)
        try:
            return chunk, run_pytest(project, copy, chunk, env, timeout)
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    problems, cases = [], []
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for chunk, run in ex.map(one, enumerate(jobs_list)):
            if run.timed_out or run.cases is None or run.rc != 0:
                bad = [f"{c.nodeid} ({c.outcome}: {c.message})" for c in (run.cases or [])
                       if c.outcome in ("failed", "error")]
                problems.append(f"pytest rc={run.rc}{' (timeout)' if run.timed_out else ''} on {len(chunk)} "
                                f"test id(s); failing: {bad or _last_line(run.tail)}")
            if run.cases is not None:
                cases += run.cases
                missing = uncollected(chunk, run.cases)
                if missing:
                    problems.append(f"named test id(s) not collected: {missing}")
    return Baseline(not problems, problems, cases, time.perf_counter() - t0)


def expected_seconds(m: Mutation, cases: list[Case]) -> float:
    return sum(c.seconds for c in cases if any(matches(t, c.nodeid) for t in m.tests))


def only_skipped(m: Mutation, cases: list[Case]) -> bool:
    mine = [c for c in cases if any(matches(t, c.nodeid) for t in m.tests)]
    return bool(mine) and all(c.outcome == "skipped" for c in mine)


# ---------------------------------------------------------------------------------------------- selection, report


def changed_files(root: Path, rev: str) -> set[str]:
    """Files that differ from `rev` in the working tree (committed since, staged or not), plus untracked ones."""
    diff = subprocess.run(["git", "diff", "--name-only", rev, "--"], cwd=root, capture_output=True, text=True)
    if diff.returncode != 0:
        raise ValueError(diff.stderr.strip().splitlines()[0] if diff.stderr.strip() else f"bad revision {rev}")
    new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root, capture_output=True,
                         text=True, check=True)
    return set(diff.stdout.split()) | set(new.stdout.split())


def select_changed(muts: list[Mutation], files: set[str]) -> list[Mutation]:
    """Mutations planted in a changed file, or judged by a changed test file."""
    return [m for m in muts if m.file in files or any(t.split("::")[0] in files for t in m.tests)]


def list_mutations(muts: list[Mutation]) -> None:
    for i, m in enumerate(muts, 1):
        print(f"{i:2d}. {m.name}  [{m.file}]")
        print(f"    breaks: {m.breaks}")
        print(f"    tests:  {' '.join(m.tests)}" + (f"  env: {dict(m.env)}" if m.env else ""))


STATUSES = ("CAUGHT", "SURVIVED", "STALE", "UNRELIABLE")


def counts_of(results: list[Result]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in STATUSES}


def print_table(results: list[Result]) -> None:
    if not results:
        return
    w = max(len(r.name) for r in results)
    print(f"\n{'mutation':<{w}}  {'status':<10}  {'time':>7}  caught by / detail")
    print(f"{'-' * w}  {'-' * 10}  {'-' * 7}  {'-' * 40}")
    for r in results:
        by = ", ".join(t.replace("tests/", "") for t in r.caught_by) if r.caught_by else r.detail
        print(f"{r.name:<{w}}  {r.status:<10}  {r.seconds:6.1f}s  {by}")
    print("\n" + ", ".join(f"{k.lower()}: {v}" for k, v in counts_of(results).items()) + f"  (of {len(results)})")


def _git(root: Path, *args: str) -> str:
    p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""


def record(project: Project, results: list[Result], muts: list[Mutation], info: dict) -> Path:
    """Write <results_dir>/<UTC date>_<commit>.json and .md; returns the JSON path."""
    out = project.root / project.results_dir
    out.mkdir(parents=True, exist_ok=True)
    commit = info["commit"] or "nocommit"
    stem = f"{info['date'].replace('-', '').replace(':', '').replace('T', '-')[:15]}_{commit[:12]}"
    by_name = {m.name: m for m in muts}
    doc = dict(info, counts=counts_of(results), results=[
        dict(asdict(r), file=by_name[r.name].file, breaks=by_name[r.name].breaks, tests=list(by_name[r.name].tests))
        for r in results])
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    c = doc["counts"]
    lines = [f"# Mutation check {info['date']}", "",
             f"- commit `{info['commit']}`" + (f" + {len(info['dirty'])} uncommitted file(s)" if info["dirty"] else ""),
             f"- {len(results)} mutations: " + ", ".join(f"{v} {k}" for k, v in c.items()),
             f"- wall time {info['total_seconds']:.0f} s with -j {info['jobs']} on {info['cpus']} CPU(s); "
             f"baseline {info['baseline_seconds']:.0f} s; load average at start {info['load_start']}, "
             f"at end {info['load_end']}",
             f"- `{info['command']}`", "",
             "| mutation | file | status | s | caught by / detail |", "|---|---|---|---:|---|"]
    for r in results:
        by = ", ".join(r.caught_by) if r.caught_by else r.detail
        lines.append(f"| {r.name} | {by_name[r.name].file} | {r.status} | {r.seconds:.1f} | "
                     f"{by.replace('|', '/')[:200]} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out / f"{stem}.json"


# ---------------------------------------------------------------------------------------------- main


def _fail(msg: str) -> int:
    print(f"mutation_check: {msg}", file=sys.stderr)
    return 2


def main(argv=None, mutations: list[Mutation] | None = None, project: Project | None = None) -> int:
    """Command line; `mutations` and `project` replace MUTATIONS and the real project (tests of this script)."""
    project = project or Project()
    all_muts = MUTATIONS if mutations is None else mutations
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="a mutation name or glob (repeatable)")
    ap.add_argument("--changed", metavar="REV",
                    help="only mutations planted in files changed since git revision REV (or whose tests changed)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="most seconds for one mutation's pytest run")
    ap.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    ap.add_argument("--no-record", action="store_true", help=f"a full run does not write {project.results_dir}/")
    ap.add_argument("--no-fork-server", action="store_true",
                    help="start every pytest run as a new interpreter (slower; the fork server needs os.fork)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        return _fail(f"-j/--jobs must be >= 1, got {args.jobs}")
    if not args.timeout > 0:
        return _fail(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.json is not None and not args.json.parent.is_dir():
        return _fail(f"--json: folder {args.json.parent} does not exist")

    names = [m.name for m in all_muts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        return _fail(f"duplicate mutation names: {dup}")
    muts = list(all_muts)
    if args.only:
        unknown = [p for p in args.only if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unknown:
            return _fail(f"--only: no mutation matches {unknown}; see --list")
        muts = [m for m in muts if any(fnmatch.fnmatchcase(m.name, pat) for pat in args.only)]
    if args.changed:
        try:
            files = changed_files(project.root, args.changed)
        except ValueError as e:
            return _fail(f"--changed {args.changed}: {e}")
        muts = select_changed(muts, files)
    full = not args.only and not args.changed
    print(f"{len(muts)} mutation(s):")
    list_mutations(muts)
    if args.list or not muts:
        return 0

    t_start = time.perf_counter()
    info = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                commit=_git(project.root, "rev-parse", "HEAD"),
                dirty=[ln[3:] for ln in _git(project.root, "status", "--porcelain", "--untracked-files=no").splitlines()],
                command="python scripts/mutation_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                jobs=args.jobs, cpus=os.cpu_count(), python=platform.python_version(),
                runner="subprocess" if args.no_fork_server or not hasattr(os, "fork") else "fork server",
                load_start=[round(x, 2) for x in os.getloadavg()])
    global _SERVERS
    if not args.no_fork_server and hasattr(os, "fork"):
        _SERVERS = ForkServers(args.jobs, project.preload)
    try:
        return _run(project, args, muts, full, info, t_start)
    finally:
        if _SERVERS is not None:
            _SERVERS.close()
            _SERVERS = None


def _run(project: Project, args, muts: list[Mutation], full: bool, info: dict, t_start: float) -> int:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mutation_check-") as tmp:
        work = Path(tmp)
        snap = work / "snapshot"
        snapshot(project.root, snap)
        problems = preflight(project, snap, work, args.jobs)
        if problems:
            print("\nPREFLIGHT FAILED (nothing planted):\n  " + "\n  ".join(problems))
            return 1
        print("\npreflight: the copy is imported (" + ", ".join(project.packages)
              + ") and a planted import error breaks collection (not a catch)")
        base = baseline(project, snap, work, muts, args.timeout * 2, args.jobs)
        if not base.ok:
            print(f"\nBASELINE FAILED ({base.seconds:.0f} s; nothing planted):\n  " + "\n  ".join(base.problems))
            return 1
        print(f"baseline (unmutated copy, {base.seconds:.0f} s): every named test collected and passing")
        todo = []
        for m in muts:
            if only_skipped(m, base.cases):
                results.append(Result(m.name, "UNRELIABLE", detail="its tests skip here (baseline): cannot catch"))
            else:
                todo.append(m)
        todo.sort(key=lambda m: -expected_seconds(m, base.cases))  # longest first: the jobs end together
        lock = threading.Lock()
        with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
            futs = [ex.submit(check_one, project, snap, work, m,
                              min(args.timeout, 4 * expected_seconds(m, base.cases) + 240)) for m in todo]
            for fut in cf.as_completed(futs):
                r = fut.result()
                with lock:
                    results.append(r)
                print(f"  {r.status:<10} {r.name} ({r.seconds:.1f} s)" + (f"  {r.detail}" if r.status != "CAUGHT" else ""),
                      flush=True)
    order = {m.name: i for i, m in enumerate(muts)}
    results.sort(key=lambda r: order[r.name])
    print_table(results)
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s (baseline {base.seconds:.0f} s), -j {args.jobs}, load average "
          f"{os.getloadavg()[0]:.2f}")
    info.update(total_seconds=round(total, 1), baseline_seconds=round(base.seconds, 1),
                load_end=[round(x, 2) for x in os.getloadavg()])
    if args.json:
        args.json.write_text(json.dumps(dict(info, counts=counts_of(results), results=[asdict(r) for r in results],
                                             mutations=[asdict(m) for m in muts]), indent=1))
    if full and not args.no_record:
        print(f"recorded: {record(project, results, muts, info)}")
    return 0 if all(r.status == "CAUGHT" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
