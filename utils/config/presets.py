"""YAML preset files (configs/*.yaml): finding a file, listing its presets, reading one preset's section.

A preset file maps preset names to `train` and `eval` sections:

    default:
      train: {n_layer: 16, lr: 0.01, ...}
      eval: {tgt_len: 64, mem_len: 640, ...}

Top-level entries without such a section (YAML anchors such as `wt103`, `train`, `eval`) are building blocks,
not presets. The values of a section are checked against the schema in utils/config/cli.py.
"""
import difflib
import os
from pathlib import Path
from typing import Sequence

import yaml

from utils.io.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
SECTIONS = ("train", "eval")
DEFAULT_PRESET = "default"


def did_you_mean(word: str, candidates: Sequence[str], quote: bool = False) -> str:
    """'; did you mean X or Y?' for the closest candidates (prefix matches first), or ''."""
    prefixed = sorted((c for c in candidates if c.startswith(word) and c != word), key=len)
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    matches = list(dict.fromkeys(prefixed[:3] + close))[:3]
    if quote:
        matches = [repr(m) for m in matches]
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def resolve_config_file(name: str | os.PathLike) -> Path:
    """The preset file: the path as given, else the same name in configs/ (old command lines passed
    `--config_file wt103_base.yaml` from the reference's pytorch/ directory)."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute():
        for candidate in (CONFIG_DIR / path, CONFIG_DIR / path.name):
            if candidate.is_file():
                return candidate
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise UserError(f"config file {name} not found; the shipped preset files are in {CONFIG_DIR}: {shipped}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)  # merge keys (<<) as in the reference; a repeated << key: the later wins
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must map preset names to 'train' / 'eval' sections")
    return data


def load_presets(path: str | os.PathLike) -> dict[str, dict]:
    """The presets of a file: its top-level entries that have a 'train' and/or 'eval' section (the others,
    e.g. the anchors `wt103`, `train`, `eval`, are building blocks, not presets)."""
    path = Path(path)
    presets = {}
    for name, value in _read_yaml(path).items():
        if isinstance(value, dict) and any(key in SECTIONS for key in value):
            other = [str(key) for key in value if key not in SECTIONS]
            if other:
                raise UserError(f"preset {name!r} in {path} has unknown section(s) {', '.join(other)}; "
                                "a preset holds only 'train' and 'eval'")
            presets[str(name)] = value
    return presets


def load_preset(path: str | os.PathLike, name: str, section: str) -> dict:
    """The raw `section` mapping of preset `name` in `path`, with clear errors when it is not there."""
    path = Path(path)
    presets = load_presets(path)
    names = list(presets)
    if name not in presets:
        if name in {str(key) for key in _read_yaml(path)}:
            raise UserError(f"{name!r} in {path} is not a preset (it has no 'train' or 'eval' section); "
                            f"available presets: {', '.join(names)}")
        raise UserError(f"preset {name!r} not found in {path} (available presets: {', '.join(names)})"
                        f"{did_you_mean(name, names, quote=True)}")
    if section not in presets[name]:
        having = [n for n in names if section in presets[n]]
        raise UserError(f"preset {name!r} in {path} has no {section!r} section (it is for "
                        f"{' and '.join(presets[name])} only); presets with one: {', '.join(having)}")
    values = presets[name][section]
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} [{name}.{section}] must be a mapping of flag names to values")
    return values


def files_with_preset(name: str) -> list[str]:
    found = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            if name in load_presets(path):
                found.append(str(path.relative_to(REPO_ROOT)))
        except UserError:
            continue
    return found
