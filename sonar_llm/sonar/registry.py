"""Where the SONAR checkpoint and SentencePiece files are: explicit paths, environment variables, or a
TOML registry file.

Asset names: ``encoder``, ``decoder``, ``finetuned_decoder``, ``tokenizer``. Lookup order:
1. an explicit path argument;
2. the environment variable ``SONAR_ENCODER`` / ``SONAR_DECODER`` / ``SONAR_FINETUNED_DECODER`` /
   ``SONAR_TOKENIZER``;
3. the registry TOML (``$SONAR_LLM_REGISTRY`` or ``~/.config/sonar_llm/registry.toml``), e.g.::

       encoder = "/data/sonar/sonar_text_encoder.pt"
       [sonar]            # a [sonar] table is accepted too
       tokenizer = "/data/sonar/sentencepiece.source.256000.model"

Relative paths in the TOML are relative to the TOML file's folder; ``~`` is expanded everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["ASSET_NAMES", "ENV_VARS", "default_registry_path", "read_registry", "resolve_asset", "resolve_assets"]

ASSET_NAMES = ("encoder", "decoder", "finetuned_decoder", "tokenizer")
ENV_VARS = {
    "encoder": "SONAR_ENCODER",
    "decoder": "SONAR_DECODER",
    "finetuned_decoder": "SONAR_FINETUNED_DECODER",
    "tokenizer": "SONAR_TOKENIZER",
}
REGISTRY_ENV = "SONAR_LLM_REGISTRY"


def default_registry_path() -> Path:
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.config/sonar_llm/registry.toml").expanduser()


def read_registry(path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Asset name -> path from a registry TOML (empty if the default file does not exist)."""
    explicit = path is not None or bool(os.environ.get(REGISTRY_ENV))
    reg = Path(path).expanduser() if path is not None else default_registry_path()
    if not reg.is_file():
        if explicit:
            raise FileNotFoundError(f"SONAR registry file not found: {reg}")
        return {}
    try:
        data: dict[str, Any] = tomllib.loads(reg.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"invalid TOML in SONAR registry {reg}: {exc}") from exc
    table = dict(data.get("sonar", {})) if isinstance(data.get("sonar"), dict) else {}
    table.update({k: v for k, v in data.items() if k != "sonar"})
    out = {}
    for name, value in table.items():
        if name not in ASSET_NAMES:
            continue
        if not isinstance(value, str):
            raise ValueError(f"SONAR registry {reg}: '{name}' must be a path string, got {type(value).__name__}")
        p = Path(value).expanduser()
        out[name] = p if p.is_absolute() else (reg.parent / p)
    return out


def resolve_asset(name: str, path: str | os.PathLike | None = None, *,
                  registry: str | os.PathLike | None = None) -> Path:
    """Existing file for asset ``name``; FileNotFoundError listing every place that was tried."""
    if name not in ASSET_NAMES:
        raise ValueError(f"unknown SONAR asset {name!r}; known: {list(ASSET_NAMES)}")
    tried = []
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"SONAR {name} file given explicitly does not exist: {p}")
    env = ENV_VARS[name]
    value = os.environ.get(env)
    if value:
        p = Path(value).expanduser()
        if p.is_file():
            return p
        tried.append(f"${env}={p} (no such file)")
    else:
        tried.append(f"${env} (unset)")
    reg_path = Path(registry).expanduser() if registry is not None else default_registry_path()
    entries = read_registry(registry) if registry is not None else read_registry()
    if name in entries:
        if entries[name].is_file():
            return entries[name]
        tried.append(f"registry {reg_path}: {name} = {entries[name]} (no such file)")
    else:
        state = "no entry" if reg_path.is_file() else "file absent"
        tried.append(f"registry {reg_path} ({state}; set ${REGISTRY_ENV} to use another)")
    raise FileNotFoundError(f"cannot find the SONAR {name} file; looked at: " + "; ".join(tried))


def resolve_assets(names=ASSET_NAMES, **paths: str | os.PathLike | None) -> dict[str, Path]:
    """Resolve several assets at once; keyword arguments give explicit paths (e.g. ``encoder=...``)."""
    bad = sorted(set(paths) - set(ASSET_NAMES))
    if bad:
        raise ValueError(f"unknown SONAR asset(s) {bad}; known: {list(ASSET_NAMES)}")
    return {n: resolve_asset(n, paths.get(n)) for n in names}
