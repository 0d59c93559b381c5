"""Run configuration: nested dataclasses, TOML loading, `--section.key=value` overrides, validation.

Everything is checked before any work starts; an error names the key, what was expected and what was
given, e.g. ``optim.lr: expected float > 0, got 'abc'``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    family: str = "sonar_llm"  # a name in sonar_llm.models.family.FAMILIES
    preset: str = "tiny"  # a named size in sonar_llm.models.presets
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to change


@dataclass
class DataConfig:
    path: str = ""  # preprocessed shard directory (training split)
    val_path: str = ""  # validation shards; "" = no periodic evaluation
    max_sentences: int = 1024  # per micro-batch per rank
    max_tokens: int = 65536  # target tokens per micro-batch per rank
    max_docs: int = 0  # documents per micro-batch per rank (0 = no document budget; the public recipe counts documents)
    workers: int = 0
    seed: int = 0
    verify: str = "full"  # shard check: full (sha256 of each shard when first opened) | sampled | size


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_all_params: bool = False  # True: decay every parameter, norms and biases too (the public SONAR-LLM code)
    warmup_steps: int = 100
    total_steps: int = 0  # length of the cosine schedule; 0 = train.steps
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still measured)
    fused: bool = True  # fused AdamW where supported (CUDA)
    apex: bool = False  # apex FusedAdam when importable


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp32 | fp16
    compile: bool = False  # torch.compile per transformer block and decoder layer: fullgraph=True, dynamic shapes
    activation_checkpointing: str = "none"  # none | selective | full
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 0  # 0 = never; else also at the last step
    eval_batches: int = 8
    sample_every: int = 0  # 0 = never
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 3
    out_dir: str = "runs/default"
    resume: bool = True  # continue from the latest complete checkpoint in out_dir
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    tensorboard: bool = False
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = table (GPU) or measured (CPU)


@dataclass
class ParallelConfig:
    fsdp: bool = True  # FSDP2 when a process group exists (frozen submodules are always replicated)
    reshard_after_forward: bool = True
    timeout_minutes: float = 10.0  # process-group collective timeout


@dataclass
class SonarConfig:
    decoder: str = ""  # SONAR text decoder checkpoint (.pt / .safetensors); "" = registry lookup
    encoder: str = ""  # SONAR text encoder checkpoint (sample generation only)
    tokenizer: str = ""  # sentencepiece .model
    lang: str = "eng_Latn"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sonar: SonarConfig = field(default_factory=SonarConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (the message names the key)."""

    label = "config"  # the commands print it as "config error: <message>" (sonar_llm.cli)


# keys that existed once and were removed on purpose: reading one is an error that says why
_REMOVED_KEYS = {
    "parallel.decoder_placement": "removed: frozen decoders are always replicated (SONAR-LLM's SONAR decoder "
                                  "lives outside the module tree, so sharding could never apply to it)",
}


def _section_types(section_cls) -> dict[str, Any]:
    """Field name -> resolved type of a section dataclass."""
    return typing.get_type_hints(section_cls)


def _section_classes() -> dict[str, type]:
    """Section name -> its dataclass (model -> ModelConfig, ...)."""
    return _section_types(RunConfig)


_SECTIONS = tuple(_section_classes())


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML or CLI value to the field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected string, got {value!r}")
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _parse_literal(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_t) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    raise TypeError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _parse_literal(text: str) -> Any:
    """Parse a CLI value as a TOML literal (numbers, booleans, lists, quoted strings); else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(cfg: RunConfig, dotted: str, value: Any, from_cli: bool) -> None:
    parts = dotted.split(".")
    classes = _section_classes()
    if parts[0] not in classes:
        raise ConfigError(f"{dotted}: unknown section {parts[0]!r} (known: {', '.join(classes)})")
    if len(parts) < 2:
        raise ConfigError(f"{dotted}: expected section.key")
    section = getattr(cfg, parts[0])
    types = _section_types(classes[parts[0]])
    name = parts[1]
    if f"{parts[0]}.{name}" in _REMOVED_KEYS:
        raise ConfigError(f"{parts[0]}.{name}: {_REMOVED_KEYS[parts[0] + '.' + name]}")
    if name not in types:
        raise ConfigError(f"{parts[0]}.{name}: unknown key in [{parts[0]}] (known: {', '.join(types)})")
    typ = types[name]
    if typing.get_origin(typ) is dict and len(parts) > 2:
        table = getattr(section, name)
        for p in parts[2:-1]:
            table = table.setdefault(p, {})
        table[parts[-1]] = _parse_literal(value) if from_cli and isinstance(value, str) else value
        return
    if len(parts) > 2:
        raise ConfigError(f"{dotted}: {parts[0]}.{name} is not a table")
    setattr(section, name, _coerce(dotted, value, typ))


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict (a parsed TOML file) over `base` (defaults if None)."""
    cfg = _deepcopy(base) if base is not None else RunConfig()
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a table, got {values!r}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, from_cli=False)
    return cfg


def _deepcopy(cfg: RunConfig) -> RunConfig:
    import copy

    return copy.deepcopy(cfg)


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    if not text.strip():
        raise ConfigError(f"{p}: the config file is empty (a run config has [model], [data], ... sections)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ["--train.steps=10", "--optim.lr", "1e-3"] into [("train.steps", "10"), ("optim.lr", "1e-3")]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"{a}: expected --section.key=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{a}: missing value")
            k, v = a[2:], args[i + 1]
            i += 1
        out.append((k, v))
        i += 1
    return out


def apply_overrides(cfg: RunConfig, overrides: list[tuple[str, str]]) -> RunConfig:
    cfg = _deepcopy(cfg)
    for key, value in overrides:
        _set(cfg, key, value, from_cli=True)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                check_paths: bool = True, check_model: bool = True) -> RunConfig:
    """Defaults <- TOML file (if any) <- CLI overrides, then validate()."""
    cfg = from_dict(load_toml(path)) if path is not None else RunConfig()
    cfg = apply_overrides(cfg, parse_overrides(list(overrides or [])))
    validate(cfg, check_paths=check_paths, check_model=check_model)
    return cfg


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def validate(cfg: RunConfig, check_paths: bool = True, check_model: bool = True) -> None:
    """Check every value; raise ConfigError / FileNotFoundError naming the key. `check_model`: the family
    and preset must be names in the library's registries (False for a custom model factory)."""
    # types first (catches values set programmatically, bypassing _coerce)
    for section, cls in _section_classes().items():
        obj = getattr(cfg, section)
        if not isinstance(obj, cls):
            raise ConfigError(f"{section}: expected {cls.__name__}, got {type(obj).__name__}")
        for name, typ in _section_types(cls).items():
            key, value = f"{section}.{name}", getattr(obj, name)
            if isinstance(value, str) and typ is not str:  # strings are only parsed from the CLI
                raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
            coerced = _coerce(key, value, typ)
            if typ is int and isinstance(value, float):
                raise ConfigError(f"{key}: expected int, got {value!r}")
            setattr(obj, name, coerced)
    m, d, o, t, p = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.parallel
    _require(bool(m.family), "model.family", "a family name", m.family)
    _require(bool(m.preset), "model.preset", "a preset name", m.preset)
    if check_model:
        from sonar_llm.models.family import FAMILIES
        from sonar_llm.models.presets import PRESETS

        _require(m.family in FAMILIES, "model.family", f"one of {', '.join(sorted(FAMILIES))}", m.family)
        _require(m.preset in PRESETS, "model.preset", f"one of {', '.join(sorted(PRESETS))}", m.preset)
    _require(d.verify in ("full", "sampled", "size"), "data.verify", "one of full, sampled, size", d.verify)
    _require(d.max_sentences > 0, "data.max_sentences", "int > 0", d.max_sentences)
    _require(d.max_tokens > 0, "data.max_tokens", "int > 0", d.max_tokens)
    _require(d.max_docs >= 0, "data.max_docs", "int >= 0 (0 = no document budget)", d.max_docs)
    _require(d.workers >= 0, "data.workers", "int >= 0", d.workers)
    _require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", "float > 0", o.lr)
    _require(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas",
             "two floats in [0, 1)", o.betas)
    _require(o.eps > 0, "optim.eps", "float > 0", o.eps)
    _require(o.weight_decay >= 0, "optim.weight_decay", "float >= 0", o.weight_decay)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "int >= 0", o.warmup_steps)
    _require(o.total_steps >= 0, "optim.total_steps", "int >= 0", o.total_steps)
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "float in [0, 1]", o.min_lr_ratio)
    _require(o.grad_clip >= 0, "optim.grad_clip", "float >= 0", o.grad_clip)
    _require(t.steps > 0, "train.steps", "int > 0", t.steps)
    _require(t.grad_accum > 0, "train.grad_accum", "int > 0", t.grad_accum)
    _require(t.precision in ("bf16", "fp32", "fp16"), "train.precision", "one of bf16, fp32, fp16", t.precision)
    _require(t.activation_checkpointing in ("none", "selective", "full"), "train.activation_checkpointing",
             "one of none, selective, full", t.activation_checkpointing)
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", "one of auto, cpu, cuda", t.device)
    for k in ("log_every", "eval_every", "sample_every", "checkpoint_every"):
        _require(getattr(t, k) >= 0, f"train.{k}", "int >= 0", getattr(t, k))
    _require(t.log_every > 0, "train.log_every", "int > 0", t.log_every)
    _require(t.eval_batches > 0, "train.eval_batches", "int > 0", t.eval_batches)
    _require(t.keep_last > 0, "train.keep_last", "int > 0", t.keep_last)
    _require(t.max_bad_steps > 0, "train.max_bad_steps", "int > 0", t.max_bad_steps)
    _require(bool(t.out_dir), "train.out_dir", "a directory path", t.out_dir)
    _require(t.peak_flops >= 0, "train.peak_flops", "float >= 0", t.peak_flops)
    _require(p.timeout_minutes > 0, "parallel.timeout_minutes", "float > 0", p.timeout_minutes)
    if check_paths:
        _require(bool(d.path), "data.path", "a shard directory", d.path)
        for key, value in (("data.path", d.path), ("data.val_path", d.val_path), ("sonar.decoder", cfg.sonar.decoder),
                           ("sonar.encoder", cfg.sonar.encoder), ("sonar.tokenizer", cfg.sonar.tokenizer)):
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{key}: path does not exist: {value}")
        check_environment(cfg, check_model)


def check_environment(cfg: RunConfig, check_model: bool) -> None:
    """What the real run needs from this machine, checked by --dry-run too: the CUDA device of
    train.device = "cuda", and the frozen SONAR decoder a family like SONAR-LLM loads when sonar.decoder is
    empty (the registry / $SONAR_DECODER must then name one)."""
    if cfg.train.device == "cuda":
        import torch

        _require(torch.cuda.is_available(), "train.device", "a CUDA device on this machine (none is available; "
                 "use train.device = \"cpu\" or \"auto\")", cfg.train.device)
    if check_model and not cfg.sonar.decoder:
        from sonar_llm.models.family import get_family
        from sonar_llm.sonar.registry import resolve_asset

        if get_family(cfg.model.family).needs_decoder:
            try:
                resolve_asset("decoder", None)
            except FileNotFoundError as e:
                raise ConfigError(f"sonar.decoder: empty, and the {cfg.model.family} family needs the frozen SONAR "
                                  f"decoder: {e}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: RunConfig, run_dir: str | os.PathLike) -> None:
    """Write the resolved config as config.toml and config.json into the run directory (atomically), and
    inputs.json: what its data and SONAR decoder are, so that a moved run folder can resume (`run_inputs`)."""
    from sonar_train.run_inputs import record_inputs

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("config.toml", to_toml(cfg)), ("config.json", json.dumps(cfg.to_dict(), indent=2))):
        tmp = run_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    record_inputs(cfg.to_dict(), run_dir)


# keys a resumed run may not change: they define the weights' shapes or the data stream the checkpoint is in
RESUME_FIXED = ("model.family", "model.preset", "model.overrides", "data.path", "data.max_sentences",
                "data.max_tokens", "data.max_docs", "data.seed", "data.workers", "sonar.decoder")
_RESUME_IGNORED = ("train.out_dir", "train.resume")


def resume_changes(cfg: RunConfig, elsewhere: str = "use another train.out_dir") -> list[str]:
    """Compare `cfg` with the config of the run it would resume (`<out_dir>/config.json`, when the run has a
    complete checkpoint and `train.resume`). Returns the changed keys as "key: old -> new" (they are applied:
    optimizer, schedule, cadence...); raises ConfigError naming the first key in RESUME_FIXED that changed.
    `data.path` and `sonar.decoder` may change to a path with the same content as recorded in the run's
    inputs.json (a moved or copied run). `elsewhere`: how the refusal tells the user to train in another folder.
    Reads only: nothing is written into the run folder."""
    from sonar_train.run_inputs import KEYS as IDENTIFIED, same_content

    run_dir = Path(cfg.train.out_dir)
    path = run_dir / "config.json"
    if not cfg.train.resume or not path.is_file() or not any((run_dir / "checkpoints").glob("step_*/COMPLETE")):
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable config of the run to resume ({e})") from e
    changes, refused = [], []
    for section, values in cfg.to_dict().items():
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in _RESUME_IGNORED or key not in before or before[key] == value:
                continue
            change = f"{name}: {before[key]!r} -> {value!r}"
            same = same_content(name, value, run_dir) if name in IDENTIFIED else None
            if same:
                changes.append(f"{change} ({same})")
            elif name in RESUME_FIXED:
                refused.append((name, change))
            else:
                changes.append(change)
    if refused:
        name, change = refused[0]
        moved = ("; a path to the same content would be accepted, but this one's content differs from the one "
                 "recorded in inputs.json, or none was recorded") if name in IDENTIFIED else ""
        raise ConfigError(f"{change} differs from the run being resumed in {run_dir}; this key cannot change "
                          f"on resume{moved} ({elsewhere}, or train.resume=false to start over)")
    return changes
