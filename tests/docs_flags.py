"""The `--flags` that README.md and docs/*.md mention, each with the program it is given to, and the flags each
of our programs accepts: tests/test_docs_flags.py checks that the docs name no flag that does not exist.

A flag inside a command (a code block or an inline code span; backslash line ends joined) belongs to the
program before it on that command: train.py, eval.py, generate.py (their parsers, built from the schema),
scripts/*.py and utils/**/*.py run with -m (the `add_argument` calls in their source). A flag of another tool
(torchrun, srun, docker, ...) is not ours to check. A flag in prose, or in a command of no known program, must
exist in one of our programs or be one of the other tools' flags listed in EXTERNAL_FLAGS; under a heading
that names train.py, eval.py or generate.py ("## Flags (train.py and eval.py)") it must be a flag of the first
one named, unless its own line names a program (prose such as "a checkpoint written at `--tp 2` evaluates in
eval.py" speaks of several). After a
bare `--` the flags go to another program (e.g. train.py through a benchmark script): they are checked like
prose. Placeholders with capitals (`--X`, `--no_X`) and prefixes (`--no_`) are not flags; a doc can exempt a
word it shows on purpose (an abbreviation that is refused) with `<!-- docs-flags: not a flag: --max -->`.
"""
import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# programs whose flags are not ours; a command that starts with one of them is skipped up to our program
EXTERNAL_PROGRAMS = {"torchrun", "srun", "sbatch", "salloc", "docker", "tensorboard", "pip", "pip3", "pytest",
                     "nvidia-smi", "git", "scontrol", "sacct", "nsys", "numactl", "bash", "sh"}
# the other tools' flags that prose mentions (torchrun, Slurm, docker, tensorboard, pytest)
EXTERNAL_FLAGS = {"nproc_per_node", "nnodes", "standalone", "max-restarts", "rdzv_id", "rdzv_endpoint",
                  "rdzv_backend", "node_rank", "master_addr", "master_port",                      # torchrun
                  "ntasks-per-node", "gpus-per-node", "nodes", "kill-on-bad-exit", "signal", "requeue",
                  "cpu-bind", "ntasks", "time", "partition", "exclusive", "dependency",            # Slurm
                  "build-arg", "gpus", "ipc", "rm", "shm-size", "ulimit",                          # docker
                  "logdir",                                                                        # tensorboard
                  "help"}
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
_SEPARATORS = {"|", "||", "&&", ";", "&"}


@lru_cache(maxsize=None)
def cli_flags(cli: str) -> frozenset:
    """The flags of train / eval / generate, as their parsers accept them (--no_X of booleans included)."""
    from utils.config.cli import build_parser
    parser = build_parser(cli)
    return frozenset(opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--"))


def _names(arg: ast.expr, loops: dict) -> list[str]:
    """The strings an add_argument name can be: a constant, or an f-string over loop variables that run
    through constant tuples (`for split in ("valid", "test"): add_argument(f"--{split}_docs")`)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if not isinstance(arg, ast.JoinedStr):
        return []
    names = [""]
    for part in arg.values:
        if isinstance(part, ast.Constant):
            names = [n + str(part.value) for n in names]
        elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in loops:
            names = [n + str(v) for n in names for v in loops[part.value.id]]
        else:
            return []
    return names


@lru_cache(maxsize=None)
def source_flags(path: Path) -> frozenset:
    """The flags a script declares with `add_argument("--flag", ...)` (read from its source, not run), and those
    of the script a module-level `FLAGS_ALSO_OF = "scripts/x.py"` names (a script that passes the rest of its
    command line to that one's parser)."""
    flags = set()

    def visit(node, loops):
        constant_loop = (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
                         and isinstance(node.iter, (ast.Tuple, ast.List))
                         and all(isinstance(e, ast.Constant) for e in node.iter.elts))
        if constant_loop:
            loops = {**loops, node.target.id: [e.value for e in node.iter.elts]}
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(n[2:] for arg in node.args for n in _names(arg, loops) if n.startswith("--"))
        for child in ast.iter_child_nodes(node):
            visit(child, loops)

    tree = ast.parse(path.read_text(encoding="utf-8"))
    visit(tree, {})
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FLAGS_ALSO_OF" for t in node.targets) \
                and isinstance(node.value, ast.Constant):
            flags |= source_flags(REPO / node.value.value)
    return frozenset(flags | {"help"})


def program_of(token: str):
    """('cli', name) for train/eval/generate.py, ('script', path) for a Python file of the repository,
    ('external', name) for another tool, None for anything else."""
    name = Path(token).name
    if name in ("train.py", "eval.py", "generate.py"):
        return ("cli", name[:-3])
    if token.endswith(".py") and (REPO / token).is_file():
        return ("script", REPO / token)
    if name in EXTERNAL_PROGRAMS:
        return ("external", name)
    return None


def module_program(module: str):
    path = REPO / (module.replace(".", "/") + ".py")
    return ("script", path) if path.is_file() else ("external", module)


def known_flags(program) -> frozenset:
    kind, what = program
    if kind == "cli":
        return cli_flags(what)
    return source_flags(what)


@lru_cache(maxsize=None)
def all_our_flags() -> frozenset:
    flags = set()
    for cli in ("train", "eval", "generate"):
        flags |= cli_flags(cli)
    for path in [*(REPO / "scripts").glob("*.py"), *(REPO / "utils").rglob("*.py")]:
        if "add_argument" in path.read_text(encoding="utf-8"):
            flags |= source_flags(path)
    return frozenset(flags)


def _code_texts(text: str):
    """(line number, code) of each code block line (continuations joined) and each inline code span."""
    lines = text.splitlines()
    in_block, pending, start = False, "", 0
    prose = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""
        else:
            prose.append((number, line))
    for number, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            yield number, span


def _prose_flags(text: str):
    """(line number, flag) of each flag outside code spans and code blocks."""
    in_block = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            for flag in _FLAG.findall(re.sub(r"`[^`]+`", " ", line)):
                yield number, flag


def _tokens(code: str) -> list[str]:
    code = code.split(" # ")[0]
    try:
        return shlex.split(code, comments=False)
    except ValueError:                       # an unbalanced quote in an excerpt: plain words
        return code.split()


def mentions(text: str):
    """(line number, flag, program or None) for every flag of a markdown text."""
    for number, code in _code_texts(text):
        program = None
        tokens = _tokens(code)
        for i, token in enumerate(tokens):
            if token in _SEPARATORS or token.startswith(">") or token == "--":
                program = None
                continue
            if token == "-m" and i + 1 < len(tokens) and program is not None and program[0] == "external" \
                    and program[1].startswith("python"):
                program = module_program(tokens[i + 1])
                continue
            if token in ("python", "python3"):
                program = ("external", "python")
                continue
            found = program_of(token)
            if found is not None:
                # `torchrun ... train.py`: our program takes over; `bash run.sh`: the shell script is no program
                if program is None or found[0] != "external":
                    program = found
                continue
            name = token.split("=")[0]
            if re.fullmatch(r"--[A-Za-z][\w-]*", name):
                yield number, name[2:], program
    for number, flag in _prose_flags(text):
        yield number, flag, None


_NAMED = re.compile(r"(?<![\w/])(train|eval|generate)\.py\b")


def named_programs(text: str) -> dict:
    """{line number: ((programs), named on the line itself)}: the programs of train/eval/generate the line names,
    else the first one the heading of its section names; None when neither names one."""
    out, heading, in_block = {}, None, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        named = _NAMED.findall(line)
        if not in_block and line.startswith("#"):
            heading = named[0] if named else None
        out[number] = (tuple(named), True) if named else ((heading,), False) if heading else None
    return out


def unknown_flags(text: str, where: str = "") -> list[str]:
    """'where:line: --flag (program)' for each flag of `text` that its program does not accept."""
    problems = []
    exempt = set(re.findall(r"<!-- docs-flags: not a flag: --([\w-]+)", text))
    named = named_programs(text)
    for number, flag, program in mentions(text):
        if flag.endswith(("_", "-")) or flag != flag.lower() or flag in exempt:   # `--no_`, `--X`
            continue
        if program is None and named.get(number) and not named[number][1]:
            cli = named[number][0][0]
            if flag not in cli_flags(cli):
                problems.append(f"{where}:{number}: --{flag} is not a flag of {cli}.py (named in the heading of its "
                                "section)")
        elif program is None or program == ("external", "python"):
            if flag not in all_our_flags() and flag not in EXTERNAL_FLAGS:
                problems.append(f"{where}:{number}: --{flag} is not a flag of train.py, eval.py, generate.py or "
                                "a script")
        elif program[0] == "external":
            continue
        elif flag not in known_flags(program):
            name = program[1] if program[0] == "cli" else program[1].relative_to(REPO)
            shown = f"{name}.py" if program[0] == "cli" else name
            problems.append(f"{where}:{number}: --{flag} is not a flag of {shown}")
    return problems
