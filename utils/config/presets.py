"""YAML preset files (configs/*.yaml): finding a file, listing its presets, reading one preset's section.

A preset file maps preset names to `train` and `eval` sections:

    default:
      train: {n_layer: 16, lr: 0.01, ...}
      eval: {tgt_len: 64, mem_len: 640, ...}

Top-level entries without such a section (YAML anchors such as `wt103`, `train`, `eval`) are building blocks,
not presets. The values of a section are checked against the schema in utils/config/cli.py.

A preset file is user input and is read defensively, so that a hostile or broken file fails at once, in bounded
time and memory, with one line: files over MAX_PRESET_BYTES are refused before they are read, text must be
UTF-8, and a document whose aliases would expand to more than MAX_PRESET_NODES nodes (a "billion laughs" file,
or merge keys that multiply) is refused before any Python object is built from it. Anchors, aliases and merge
keys (`<<: *train`) as the shipped files use them stay well inside these bounds.
"""
import difflib
import os
from pathlib import Path
from typing import Sequence

import yaml

from utils.io.errors import UserError

# The shipped files are under 6 KB and expand to under 2,000 nodes; these bounds leave room for far larger
# hand-written files while keeping a hostile one from costing more than a fraction of a second.
MAX_PRESET_BYTES = 1 << 20
MAX_PRESET_NODES = 100_000

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


# libyaml's parser is about five times faster than the pure-Python one and caps nesting at 1000 levels, so a
# file at the size limit is parsed well within a second; the constructor (the part that builds Python objects,
# merge keys included) is the same Python code either way.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _AliasBomb(Exception):
    """A document whose aliases expand beyond the node budget, or refer to themselves."""


def _expanded_size(root: yaml.Node, budget: int) -> int:
    """The number of nodes of the document with every alias replaced by a copy of its anchor's node (what
    construction and printing cost), counted without expanding: each distinct node is sized once. Raises
    _AliasBomb past `budget` or on an anchor that contains itself."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    open_nodes: set[int] = set()
    while stack:                                # iterative: a thousand levels of nesting must not hit Python's
        node, children_done = stack.pop()       # recursion limit
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > budget:
                raise _AliasBomb(f"its aliases expand to more than {budget:,} values")
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _AliasBomb("an anchor contains an alias of itself")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _BoundedLoader(_BaseLoader):
    """A safe loader that sizes the composed node graph (where aliases are still shared references) before
    constructing it, so alias and merge-key bombs are refused in time and memory proportional to the file."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, MAX_PRESET_NODES)
        return self.construct_document(node)


def _read_yaml(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_PRESET_BYTES:
            raise UserError(f"config file {path} is {size:,} bytes, over the limit of {MAX_PRESET_BYTES:,} bytes "
                            "for a preset file; pass a preset file (configs/*.yaml), not a data file")
        with open(path, "rb") as f:
            raw = f.read(MAX_PRESET_BYTES + 1)  # bounded even where stat cannot tell (a pipe, a growing file)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_PRESET_BYTES:
        raise UserError(f"config file {path} is over the limit of {MAX_PRESET_BYTES:,} bytes for a preset file; "
                        "pass a preset file (configs/*.yaml), not a data file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); save it as UTF-8") from None
    try:
        # merge keys (<<) as in the reference; a repeated << key: the later wins
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {_short(exc)}") from None
    except _AliasBomb as exc:
        raise UserError(f"config file {path} is refused: {exc}; a preset file holds a few hundred values") from None
    except ValueError as exc:   # a value the safe constructor cannot convert: a 13th month, 5000 digits
        raise UserError(f"config file {path} holds a value that cannot be read: {_short(exc)}; "
                        "fix it, or quote it if it is text") from None
    except RecursionError:      # the pure-Python parser (no libyaml) on deeply nested brackets
        raise UserError(f"config file {path} is nested too deeply to be a preset file") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must map preset names to 'train' / 'eval' sections")
    return data


def _short(exc: BaseException, limit: int = 300) -> str:
    """An error's text on one line, cut to `limit` characters (a YAML error quotes the offending text)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


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
