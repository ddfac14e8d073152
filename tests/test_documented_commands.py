"""Every documented command that runs the trainer composes and validates through the real config.

The commands are read from the files themselves (README.md code blocks and inline code,
comments of docker/*, launch/* and conf/**/*.yaml, the Dockerfiles' CMD), so a stale example
fails here, not on a user's cluster. Each command's Hydra overrides are composed with
xpar.config.store.compose_dictconfig and validated with the world size(s) its launcher gives:

  bash launch/dev.sh train ...      the --nproc-per-node in dev.sh's train branch
  torchrun --nproc-per-node N ...   N x --nnodes (also python -m torch.distributed.run)
  python -m xpar.train, xpar-train  1 (srun without options too)
  launch/torchrun.sh ...            NPROC, else the CUDA_VISIBLE_DEVICES count, else every
                                    visible GPU (GPU_COUNTS) or 2 CPU ranks
  sbatch ... launch/slurm.sbatch    nodes x (--gpus-per-node, NPROC or torchrun.sh's rule),
                                    with the overrides the batch script appends itself
  docker run IMAGE ...              the image's ENTRYPOINT/CMD (or --entrypoint); no --gpus:
                                    2 CPU ranks

A Hydra sweep (-m) is composed once per point. Placeholders are substituted only as listed
in PLACEHOLDERS (and ${hydra:job.num} by the sweep point's number); validation never reads
data files or tokenizers, so paths such as corpus/*.jsonl need not exist. A checkpoint an
earlier documented command writes (train.init_from, train.distill.teacher under outputs/)
is stood in for by tests/fixtures/ckpt_v1, a real checkpoint (PRODUCED); the dense checkpoint
an upcycling command (moe.upcycle=true) names by the run record of a dense model with the
command's own model config (what validation reads). Commands that do
not run the trainer (docker build, the benchmark, pytest) are left out; `pytest -v` lists
every command checked, and a file in EXPECTED that yields none fails.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from xpar.config.store import compose_dictconfig, load_and_validate
from xpar.errors import XparConfigError

REPO = Path(__file__).resolve().parents[1]
# Where documented commands live; files in EXPECTED must yield at least one.
SOURCES = ["README.md", "docker/*", "launch/*", "conf/**/*.yaml"]
EXPECTED = {
    "README.md",
    "docker/Dockerfile",
    "docker/Dockerfile.cpu",
    "launch/torchrun.sh",
    "launch/slurm.sbatch",
    "conf/config.yaml",
    "conf/data/files.yaml",
    "conf/experiment/tiny.yaml",
    "conf/hydra/launcher/xpar_slurm.yaml",
}
# Template text in the docs -> what is composed instead.
PLACEHOLDERS = {
    "--nproc-per-node N -m xpar.train [hydra overrides]": "--nproc-per-node 2 -m xpar.train",
}
# Checkpoints that earlier documented commands write; validation checks that they exist.
PRODUCED = ("train.init_from=outputs/", "train.distill.teacher=outputs/")
CKPT_FIXTURE = REPO / "tests" / "fixtures" / "ckpt_v1" / "step_00000002"
# "Every visible GPU": the node sizes a one-node example must work on.
GPU_COUNTS = (1, 2, 4, 8)
CPU_RANKS = 2  # launch/torchrun.sh and launch/slurm.sbatch without a GPU
SUBMITIT = "hydra/launcher=xpar_slurm"

World = tuple[int, bool]  # (world size, cuda available)


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written (after PLACEHOLDERS)
    overrides: tuple[str, ...]
    worlds: tuple[World, ...]
    multirun: bool


# --------------------------------------------------------------------------- reading the files


def _comment_snippets(text: str) -> list[tuple[int, str]]:
    """Comment lines ("# ...", not "#SBATCH"), continuation lines joined."""
    out, buf, start = [], "", 0
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*#+\s+(.*)$", line)
        if not m:
            buf = ""
            continue
        start = start if buf else i
        body = m.group(1).rstrip()
        if body.endswith("\\"):
            buf += body[:-1] + " "
            continue
        out.append((start, buf + body))
        buf = ""
    return out


def _readme_snippets(text: str) -> list[tuple[int, str]]:
    """Lines of ```bash blocks (continuations joined) and inline code in the prose."""
    out, fence, buf, start = [], None, "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is None:
            # inline code counts only with arguments: `python -m xpar.train` alone is a name
            out += [(i, s) for s in re.findall(r"`([^`]+)`", line) if len(s.split()) > 1]
        elif fence in ("bash", "sh", "shell"):
            start = start if buf else i
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            out.append((start, buf + line))
            buf = ""
    return out


def _docker_instruction(text: str, name: str) -> list[str] | None:
    m = re.search(rf"^{name} (\[.*\])\s*$", text, re.M)
    return json.loads(m.group(1)) if m else None


def _images() -> dict[str, tuple[list[str], list[str]]]:
    """image tag -> (ENTRYPOINT, CMD), from each Dockerfile's own `docker build -t` line."""
    images = {}
    for path in sorted((REPO / "docker").glob("Dockerfile*")):
        if path.suffix == ".dockerignore":
            continue
        text = path.read_text()
        for tag in re.findall(rf"docker build -f docker/{re.escape(path.name)} -t (\S+)", text):
            images[tag] = (
                _docker_instruction(text, "ENTRYPOINT") or [],
                _docker_instruction(text, "CMD") or [],
            )
    return images


# --------------------------------------------------------------------------- shell words


def _strip_comment(line: str) -> str:
    """Drop a trailing `# ...` the way bash does: outside quotes, at the start of a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _simple_commands(line: str) -> list[list[str]]:
    lex = shlex.shlex(_strip_comment(line), posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, ""
    cmds: list[list[str]] = [[]]
    for word in lex:
        if word and set(word) <= set(";&|"):
            cmds.append([])
        else:
            cmds[-1].append(word)
    return [c for c in cmds if c]


def _simple_commands_or_prose(text: str) -> list[list[str]]:
    try:
        return _simple_commands(text)
    except ValueError:  # unbalanced quotes: prose ("the node's torchrun ..."), unless it names us
        assert not re.search(r"xpar\.train|xpar-train|launch/\w|docker run", text), text
        return []


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words[0].partition("=")
        env[key], words = value, words[1:]
    return env, words


def _option(words: list[str], *names: str) -> str | None:
    """Value of `--name=V` or `--name V` among words."""
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- launchers


def _local_worlds(env: dict[str, str], gpus: bool = True) -> tuple[World, ...]:
    """launch/torchrun.sh's rank count: NPROC, visible GPUs, else 2 CPU ranks."""
    if "NPROC" in env:
        n = int(env["NPROC"])
        return ((n, False), (n, True))
    if "CUDA_VISIBLE_DEVICES" in env:
        n = len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d])
        return ((n, True),) if n else ((CPU_RANKS, False),)
    gpu = tuple((n, True) for n in GPU_COUNTS) if gpus else ()
    return ((CPU_RANKS, False), *gpu)


def _anywhere(n: int) -> tuple[World, ...]:
    return ((n, False), (n, True))


def _dev_nproc() -> int:
    text = (REPO / "launch" / "dev.sh").read_text()
    m = re.search(
        r"^\s*train\)\s*\n(?:.*\n)*?.*--nproc-per-node[ =](\d+) -m xpar\.train", text, re.M
    )
    assert m, "launch/dev.sh: no `train)` branch running torchrun --nproc-per-node N"
    return int(m.group(1))


def _sbatch_appends() -> list[str]:
    """The overrides launch/slurm.sbatch adds after the user's ("$@" ... &)."""
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    m = re.search(r'"\$@" (.+?) &\s*$', text, re.M)
    assert m, 'launch/slurm.sbatch: no srun line ending in "$@" ... &'
    return [w.replace("$RUN_DIR", "runs/xpar-1") for w in shlex.split(m.group(1))]


def _sbatch_default_nodes() -> int:
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    m = re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M)
    return int(m.group(1)) if m else 1


def _sbatch(words: list[str], env: dict[str, str]):
    i = next(i for i, w in enumerate(words) if w.endswith("launch/slurm.sbatch"))
    opts, args = words[:i], words[i + 1 :]
    nodes = int(_option(opts, "--nodes", "-N") or _sbatch_default_nodes())
    gpn = _option(opts, "--gpus-per-node")
    per_node = ((int(gpn), True),) if gpn and "NPROC" not in env else _local_worlds(env)
    worlds = tuple((nodes * n, cuda) for n, cuda in per_node)
    return [*args, *_sbatch_appends()], worlds


def _torchrun(words: list[str], env: dict[str, str]):
    i = words.index("-m") if "-m" in words else len(words)
    if words[i + 1 : i + 2] != ["xpar.train"]:
        return None  # another module (the benchmark) or a bare mention
    nproc = int(_option(words[:i], "--nproc-per-node", "--nproc_per_node") or 1)
    nnodes = int(_option(words[:i], "--nnodes") or 1)
    return words[i + 2 :], _anywhere(nproc * nnodes)


def _docker(words: list[str], env: dict[str, str]):
    """docker run [opts] IMAGE [args]: args replace CMD; --entrypoint replaces ENTRYPOINT."""
    images = _images()
    i = next((i for i, w in enumerate(words) if w in images), None)
    if words[:1] != ["run"] or i is None:
        return None
    opts, args = words[1:i], words[i + 1 :]
    entry, cmd = images[words[i]]
    flag = _option(opts, "--entrypoint")
    if flag is not None:
        entry, cmd = [flag], []
    # no --gpus: torchrun.sh in the container sees no GPU
    return _launch([*entry, *(args or cmd)], {}, gpus=_option(opts, "--gpus") is not None)


def _python(words: list[str], env: dict[str, str]):
    if words[1:3] == ["-m", "xpar.train"]:
        return words[3:], _anywhere(1)
    if words[1:3] == ["-m", "torch.distributed.run"]:
        return _torchrun(["torchrun", *words[3:]], env)
    return None


def _launch(words: list[str], env: dict[str, str], gpus: bool = True):
    """(overrides, worlds) when `words` run the trainer, else None."""
    if words[0] == "srun":
        inner = list(itertools.dropwhile(lambda w: w.startswith("-"), words[1:]))
        # one task by default; srun options would change the world: teach this test then
        assert not inner or inner == words[1:], f"srun with options: {words}"
        words = inner
    elif words[0] in ("bash", "sh", "exec"):
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if head.endswith("launch/torchrun.sh"):
        return words[1:], _local_worlds(env, gpus)
    if head.endswith("launch/dev.sh"):
        return (words[2:], _anywhere(_dev_nproc())) if words[1:2] == ["train"] else None
    if head == "sbatch" or head.endswith("launch/slurm.sbatch"):
        return _sbatch(words, env)
    if head == "xpar-train":
        return words[1:], _anywhere(1)
    if head == "torchrun":
        return _torchrun(words, env)
    if head == "docker":
        return _docker(words[1:], env)
    if re.fullmatch(r"(.*/)?python3?(\.\d+)?|\$\{?PY\}?", head):
        return _python(words, env)
    return None


def _command(where: str, text: str, words: list[str]) -> DocCommand | None:
    env, words = _split_env(words)
    found = _launch(words, env) if words else None
    if found is None:
        return None
    args, worlds = found
    multirun = any(a in ("-m", "--multirun") for a in args)
    # --help prints the config's help (tests/train/test_cli_help.py runs it); what is left
    # of the command must still compose.
    args = [a for a in args if a not in ("-m", "--multirun", "--help")]
    flags = [a for a in args if a.startswith("-")]
    assert not flags, f"{where}: {text!r}: Hydra flags {flags} are not handled by this test"
    shown = " ".join(_strip_comment(text).split())
    return DocCommand(where, shown, tuple(args), worlds, multirun)


def _snippets(rel: str) -> list[tuple[int, str]]:
    path = REPO / rel
    text = path.read_text()
    if rel == "README.md":
        return _readme_snippets(text)
    snippets = _comment_snippets(text)
    if path.name.startswith("Dockerfile"):
        image = (_docker_instruction(text, "ENTRYPOINT") or []) + (
            _docker_instruction(text, "CMD") or []
        )
        line = next((i for i, s in enumerate(text.splitlines(), 1) if s.startswith("CMD ")), 0)
        snippets.append((line, shlex.join(image)))
    return snippets


def _source_files() -> list[str]:
    files = {
        p.relative_to(REPO).as_posix()
        for pattern in SOURCES
        for p in REPO.glob(pattern)
        if p.is_file() and not p.name.endswith(".dockerignore")
    }
    return sorted(files)


def documented_commands() -> dict[str, list[DocCommand]]:
    """file -> the trainer commands it documents."""
    found: dict[str, list[DocCommand]] = {}
    for rel in _source_files():
        for line, text in _snippets(rel):
            for old, new in PLACEHOLDERS.items():
                text = text.replace(old, new)
            for words in _simple_commands_or_prose(text):
                cmd = _command(f"{rel}:{line}", text, words)
                if cmd is not None:
                    found.setdefault(rel, []).append(cmd)
    return found


def sweep_points(cmd: DocCommand) -> list[list[str]]:
    """One override list per run: a multirun's a=1,2 b=3,4 gives 4 lists."""
    if not cmd.multirun:
        return [[_produced(w) for w in cmd.overrides]]
    choices = []
    for o in OverridesParser.create().parse_overrides(list(cmd.overrides)):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    points = [list(p) for p in itertools.product(*choices)]
    return [
        [_produced(w).replace("${hydra:job.num}", str(n)) for w in p] for n, p in enumerate(points)
    ]


def _produced(override: str) -> str:
    for prefix in PRODUCED:
        if override.startswith(prefix):
            return f"{prefix.split('=')[0]}={CKPT_FIXTURE}"
    return override


UPCYCLE = "moe.upcycle=true"


def _dense_source(overrides: list[str], tmp: Path) -> list[str]:
    """The overrides with train.init_from at a stand-in dense checkpoint of their model."""
    from dataclasses import asdict

    from xpar.config.store import compose_config
    from xpar.train import checkpoint as ckpt

    rest = [o for o in overrides if o != UPCYCLE and not o.startswith("train.init_from=")]
    cfg = compose_config([*rest, "moe.every=0"], world_size=1, cuda_available=False)
    d = tmp / "dense" / "step_00000002"
    d.mkdir(parents=True, exist_ok=True)
    model = {"model": asdict(cfg.model), "moe": asdict(cfg.moe)}
    ckpt.write_client_state(d, {"step": 2, "model": model})
    return [*rest, UPCYCLE, f"train.init_from={d}"]


COMMANDS = documented_commands()
ALL = [c for cmds in COMMANDS.values() for c in cmds]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.where} {c.text}" for c in ALL])
def test_documented_command_composes_and_validates(cmd: DocCommand, tmp_path):
    if SUBMITIT in cmd.overrides:
        pytest.importorskip(
            "hydra_plugins.hydra_submitit_launcher",
            reason=f"{cmd.where}: {SUBMITIT} needs pip install 'xpar[slurm]'",
        )
    points = sweep_points(cmd)
    assert not cmd.multirun or len(points) > 1, f"{cmd.where}: -m without a sweep"
    for overrides in points:
        if UPCYCLE in overrides:
            overrides = _dense_source(overrides, tmp_path)
        cfg = compose_dictconfig(overrides)
        for world, cuda in cmd.worlds:
            try:
                load_and_validate(cfg, world, rank=0, cuda_available=cuda)
            except Exception as e:
                where = f"{cmd.where}: {cmd.text}\n  overrides {overrides}"
                raise AssertionError(f"{where}\n  world {world} cuda {cuda}: {e}") from e


def test_files_that_document_commands_still_do():
    counts = {rel: len(COMMANDS.get(rel, [])) for rel in sorted(EXPECTED | set(COMMANDS))}
    print("documented trainer commands checked:")
    for rel, n in counts.items():
        print(f"  {n:3d}  {rel}")
        for c in COMMANDS.get(rel, []):
            print(f"         {c.where.split(':')[1]}: {c.text}")
    missing = sorted(rel for rel in EXPECTED if counts[rel] == 0)
    assert not missing, f"no trainer command found in {missing}: did the extraction break?"


def test_placeholders_are_still_used():
    texts = [t for rel in _source_files() for _, t in _snippets(rel)]
    for old in PLACEHOLDERS:
        assert any(old in t for t in texts), f"placeholder {old!r} is no longer in the docs"


def test_a_stale_command_fails(tmp_path):
    # the Docker image's old default: Hydra refuses to add an experiment the defaults list has
    (cmd,) = [c for c in ALL if c.where.startswith("docker/Dockerfile:") and "docker" not in c.text]
    stale = DocCommand(cmd.where, cmd.text, ("+experiment=tiny",), cmd.worlds, False)
    with pytest.raises(XparConfigError, match="experiment"):
        test_documented_command_composes_and_validates(stale, tmp_path)


def test_extraction_reads_sweeps_and_launchers():
    words = _simple_commands("NPROC=4 launch/torchrun.sh a=1 # note && b=2; python -m x.y")
    assert words == [["NPROC=4", "launch/torchrun.sh", "a=1"]]
    sweep = DocCommand(
        "x:1", "", ("experiment=tiny", "optim.lr=1e-3,3e-3", "moe.top_k=1,2"), (), True
    )
    assert len(sweep_points(sweep)) == 4
    assert _launch(["torchrun", "--nproc-per-node", "2", "-m", "xpar.bench", "moe"], {}) is None
    args, worlds = _launch(["sbatch", "--nodes=4", "--gpus-per-node=8", "launch/slurm.sbatch"], {})
    assert worlds == ((32, True),) and "train.resume=auto" in args
