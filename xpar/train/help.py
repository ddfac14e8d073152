"""The trainer's --help page: usage, the config groups and their options, every key with
its default and the one line the schema gives it (a trailing comment or its docstring).

Hydra's generic page names internal schema entries; this one is read from conf/ and the
typed schema. `--hydra-help` is still Hydra's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xpar.config.store import CONFIG_DIR, GROUP_SCHEMA_NAME, GROUP_SCHEMAS

HELP_FLAGS = ("--help", "-h")
# The root config's nodes, in the order the page lists them.
NODES = ("model", "moe", "data", "optim", "parallel", "logger", "train")
_WIDTH = 120


def help_text() -> str:
    """The trainer's --help page: usage, groups and their options, every key with its line."""
    from xpar.config.schema import TrainConfig

    schemas = {**GROUP_SCHEMAS, "train": TrainConfig}
    lines = [
        "usage: python -m xpar.train [GROUP=OPTION ...] [KEY=VALUE ...]",
        "       torchrun --standalone --nproc-per-node 2 -m xpar.train [...]",
        "",
        "Trains xpar's MoE Transformer. Arguments are Hydra overrides, e.g.",
        "  python -m xpar.train experiment=tiny train.steps=20 moe=switch",
        "",
        "groups (GROUP=OPTION; * the default):",
        *_group_lines(),
        "",
        "keys (KEY=VALUE; the default shown):",
    ]
    for node in NODES:
        lines += ["", f"{node}: {_first_sentence(inspect.getdoc(schemas[node]) or '')}"]
        lines += _key_lines(node, schemas[node])
    lines += [
        "",
        "more: --cfg job prints the composed config; --hydra-help is Hydra's own help;",
        "train.print_config=true prints the config at start (it is always in <out_dir>/config.yaml);",
        "train.verbose=true lets other libraries' messages through to the console.",
    ]
    return "\n".join(lines)


def _group_lines() -> list[str]:
    defaults = _defaults()
    out = []
    for group in [*GROUP_SCHEMAS, "experiment"]:
        out.append(f"  {group}:")
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            if path.stem == GROUP_SCHEMA_NAME:
                continue
            mark = "*" if defaults.get(group) == path.stem else " "
            out.append(_clip(f"   {mark}{path.stem:<14} {_yaml_summary(path)}"))
    out.append("  hydra/launcher:")
    out.append("    xpar_slurm     one Slurm job per sweep point (with -m/--multirun)")
    return out


def _defaults() -> dict[str, str]:
    # {group: option} from conf/config.yaml's defaults list
    out = {}
    for entry in OmegaConf.load(CONFIG_DIR / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig):
            for k, v in entry.items():
                out[str(k)] = str(v)
    return out


def _yaml_summary(path: Path) -> str:
    # the first sentence of the file's opening comment (after any "# @package" line)
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            text.append(line.lstrip("#").strip())
    return _first_sentence(" ".join(text))


def _key_lines(node: str, schema: type) -> list[str]:
    docs = field_docs(schema)
    out = []
    for f in dataclasses.fields(schema):
        key = f"{node}.{f.name}={_default(f)}"
        doc = docs.get(f.name, "")
        out.append(_clip(f"  {key:<34} {doc}".rstrip()))
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_docs(schema: type) -> dict[str, str]:
    """One line per field of a config dataclass, from what its source says about it: the
    comment on (or just above) the field's line, else the docstring's sentence or
    `name: ...` entry that starts with the field's name."""
    names = [f.name for f in dataclasses.fields(schema)]
    docs = _docstring_entries(inspect.getdoc(schema) or "", names)
    docs.update(_comments(schema))
    return docs


def _comments(schema: type) -> dict[str, str]:
    source = inspect.getsource(schema)
    rows = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for stmt in ast.parse(source).body[0].body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, row = [], stmt.lineno - 1
        while row in comments and rows[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        text = comments.get(stmt.lineno) or " ".join(above)
        if text:
            out[stmt.target.id] = _first_sentence(text)
    return out


def _docstring_entries(doc: str, names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n|\n(?=\w+: )", doc)]
    for para in paragraphs:
        for sentence in re.split(r"(?<=[.;])\s+(?=[a-z_]+[ =:])", para):
            m = re.match(r"([a-z_]+)(=| is | names | means |: )", sentence)
            if m and m.group(1) in names and m.group(1) not in out:
                # "name: text" entries drop the name (the key column shows it)
                text = sentence[m.end() :] if m.group(2) == ": " else sentence
                out[m.group(1)] = text.rstrip(";")
    return out


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=[.!?])\s", text)
    return text[: m.start()] if m else text


def _clip(line: str) -> str:
    return line if len(line) <= _WIDTH else line[: _WIDTH - 3].rstrip() + "..."
