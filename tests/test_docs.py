"""The documentation is tested, so it cannot drift from the code: README.md and every guide in docs/.

- every fenced ```python block runs (placeholder paths ``path/to/model``, ``path/to/run``, ``path/to/shards`` become a
  tiny model folder, a run folder and shards built here; any other ``path/to/NAME`` a fresh folder for output); a
  block that cannot run is marked by a ``<!-- doc-test: skip (reason) -->`` line just above it and reported as skipped;
- every ``--flag`` written after ``launch/X.py`` or ``lfzh-X`` (``deepspeed launch/pretrain.py`` included; a command
  continued with ``\\`` is one command) is an option of that script's argument parser, and so is every flag in a table
  marked ``<!-- doc-test: flags of launch/X.py -->``;
- every table of DeepSpeed configs (a first column of ``ds_configs/`` file names, and any of the columns in
  CONFIG_COLUMNS) gives the numbers the file holds;
- every repository path the docs name exists, every relative link leads to a file, and every dotted name
  ``lfzh_ds.x.y`` / ``data_service.x.y`` imports.

Each failure names the doc file and line.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pretrain_phases import in_process, pretrain, setup  # noqa: F401 (fixtures, and the in-process run)

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->")
FLAGS_MARK = re.compile(r"<!--\s*doc-test:\s*flags of\s+(launch/\w+\.py|lfzh-\w+)\s*-->")
PLACEHOLDER = re.compile(r"path/to/[\w.-]+")
REPO_PATH = re.compile(r"(?<![\w./-])(?:lfzh_ds|data_service|benchmarks|ds_configs|launch|tests)/[\w./*-]*")
DOTTED_NAME = re.compile(r"(?<![\w./-])(?:lfzh_ds|data_service)(?:\.\w+)+")
SCRIPT = re.compile(r"(?<![\w./-])(?:launch/(\w+)\.py|lfzh-(\w+))")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
COMMAND_END = re.compile(r"&&|\|\||[|;]|(?<!\S)#|(?<!\S)\d?>")  # the next command, a comment or a redirection


def where(doc: Path, line: int) -> str:
    return f"{doc.relative_to(REPO)}:{line}"


# ---------------------------------------------------------------------------------------------- reading the docs

@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason given in a doc-test: skip comment above the block


def fenced_blocks(doc: Path) -> list[Block]:
    blocks, lines, i = [], doc.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = re.match(r"\s*```(\w*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP_MARK.search(above)
        blocks.append(Block(doc, i + 1, opening[1], "\n".join(lines[i + 1:end]) + "\n", skip and skip[1]))
        i = end + 1
    return blocks


def every_line():
    """(doc, line number, text) of every line of every doc, fenced blocks included."""
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            yield doc, number, line


def prose_lines(doc: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced blocks."""
    out, inside = [], False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            inside = not inside
        elif not inside:
            out.append((number, line))
    return out


def commands(doc: Path) -> list[tuple[int, str]]:
    """Every command the doc writes: each logical line of a shell block (``\\`` continuations joined) and each inline
    code span, with the line it starts on."""
    found = []
    for block in fenced_blocks(doc):
        if block.lang not in ("bash", "sh", "shell", "console", ""):
            continue
        pending, start = "", None
        for offset, line in enumerate(block.text.splitlines(), 1):
            start = start or block.line + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((start, pending + line))
            pending, start = "", None
    for number, line in prose_lines(doc):
        found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return found


# ---------------------------------------------------------------------------------------------- the scripts' parsers

class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def console_scripts() -> dict[str, str]:
    """lfzh-X -> X for every console script the installed package declares (lfzh-X runs launch/X.py's main)."""
    scripts = importlib.metadata.entry_points(group="console_scripts")
    return {s.name: s.name.removeprefix("lfzh-") for s in scripts if s.value.startswith("launch.cli:")}


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def parser_of(script: str) -> argparse.ArgumentParser:
    """launch/<script>.py's argument parser: its build_parser(), or the parser its parse_args/main would parse with."""
    if script not in _PARSERS:
        module = importlib.import_module(f"launch.{script}")
        if hasattr(module, "build_parser"):
            _PARSERS[script] = module.build_parser()
        else:
            def capture(parser, *args, **kwargs):
                raise _Captured(parser)

            original = argparse.ArgumentParser.parse_args
            argparse.ArgumentParser.parse_args = capture
            try:
                (getattr(module, "parse_args", None) or module.main)([])
            except _Captured as captured:
                _PARSERS[script] = captured.parser
            finally:
                argparse.ArgumentParser.parse_args = original
    return _PARSERS[script]


def options_of(parser: argparse.ArgumentParser, subcommand: str | None) -> set[str]:
    """The parser's option strings, plus those of ``subcommand`` (or of every subcommand when it is None)."""
    options = {o for action in parser._actions for o in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if subcommand in (None, name):
                    options |= options_of(sub, None)
    return options


def subcommands_of(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def script_name(match: re.Match) -> str | None:
    """launch/X.py -> X; lfzh-X -> X when pyproject.toml has that console script (None for a script without flags)."""
    if match[1]:
        return match[1]
    return console_scripts().get(f"lfzh-{match[2]}", f"missing console script lfzh-{match[2]}")


def flag_problems(doc: Path, line: int, command: str) -> list[str]:
    problems = []
    for match in SCRIPT.finditer(command):
        script = script_name(match)
        rest = command[match.end():]
        rest = rest[:m.start()] if (m := COMMAND_END.search(rest)) else rest
        rest = rest[:m.start()] if (m := SCRIPT.search(rest)) else rest  # the next script's flags are its own
        flags = FLAG.findall(rest)
        if not flags:
            continue
        if script.startswith("missing console script"):
            problems.append(f"{where(doc, line)}: {script} in pyproject.toml: {command.strip()}")
            continue
        if not (REPO / "launch" / f"{script}.py").is_file():
            problems.append(f"{where(doc, line)}: launch/{script}.py does not exist: {command.strip()}")
            continue
        parser = parser_of(script)
        words = rest.split()
        subcommand = words[0] if words and words[0] in subcommands_of(parser) else None
        known = options_of(parser, subcommand)
        shown = f"launch/{script}.py" + (f" {subcommand}" if subcommand else "")
        problems += [f"{where(doc, line)}: {flag} is not an option of {shown}: {command.strip()[:160]}"
                     for flag in flags if flag.split("=")[0] not in known]
    return problems


def flag_table_problems(doc: Path) -> list[str]:
    """Flags in the table after a ``<!-- doc-test: flags of launch/X.py -->`` line are options of X."""
    problems, lines = [], doc.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        mark = FLAGS_MARK.search(line)
        if not mark:
            continue
        match = SCRIPT.search(mark[1])
        table = []
        for later, row in enumerate(lines[number:], number + 1):
            if row.strip().startswith("|"):
                table.append((later, row))
            elif table:
                break
        assert table, f"{where(doc, number)}: a doc-test flags comment with no table after it"
        for later, row in table:
            problems += flag_problems(doc, later, f"{match[0]} {row.split('|')[1]}")
    return problems


# ---------------------------------------------------------------------------------------------- DeepSpeed config tables

def _number(text: str) -> float:
    return float(text.replace(",", "").replace("_", ""))


def _precision(config: dict) -> str:
    return "fp16" if config.get("fp16", {}).get("enabled") else "bf16" if config.get("bf16", {}).get("enabled") else "fp32"


CONFIG_COLUMNS = {  # column header -> (what the file holds, how to read the cell)
    "sequences per step": (lambda c: c["train_batch_size"], _number),
    "micro-batch": (lambda c: c["train_micro_batch_size_per_gpu"], _number),
    "learning rate": (lambda c: c["optimizer"]["params"]["lr"], _number),
    "warm-up steps": (lambda c: c["scheduler"]["params"]["warmup_num_steps"], _number),
    "schedule ends": (lambda c: c["scheduler"]["params"]["total_num_steps"],
                      lambda cell: cell if cell == "auto" else _number(cell)),
    "precision": (_precision, str),
    "zero stage": (lambda c: c["zero_optimization"]["stage"], _number),
}


def table_rows(doc: Path):
    """Each markdown table as (line of its header, header cells, [(line, cells)])."""
    rows, tables = [], []
    for number, line in prose_lines(doc) + [(0, "")]:
        if line.strip().startswith("|"):
            rows.append((number, [cell.strip() for cell in line.strip().strip("|").split("|")]))
        elif rows:
            if len(rows) > 2:
                tables.append((rows[0][0], [c.lower() for c in rows[0][1]], rows[2:]))
            rows = []
    return tables


def config_table_problems(doc: Path) -> tuple[int, list[str]]:
    checked, problems = 0, []
    for header_line, header, rows in table_rows(doc):
        columns = [(i, CONFIG_COLUMNS[name]) for i, name in enumerate(header) if name in CONFIG_COLUMNS]
        if not header or header[0] != "config" or not columns:
            continue
        for line, cells in rows:
            name = cells[0].strip("`").removeprefix("ds_configs/")
            path = REPO / "ds_configs" / name
            if not path.is_file():
                problems.append(f"{where(doc, line)}: ds_configs/{name} does not exist")
                continue
            config = json.loads(path.read_text())
            for i, (read, parse) in columns:
                cell = cells[i].strip("`")
                try:
                    given = parse(cell)
                except ValueError:
                    problems.append(f"{where(doc, line)}: {header[i]} of {name}: {cell!r} is not a value")
                    continue
                actual = read(config)
                checked += 1
                if given != actual:
                    problems.append(f"{where(doc, line)}: the table gives {header[i]} {cell} for ds_configs/{name}, "
                                    f"the file holds {actual}")
    return checked, problems


# ---------------------------------------------------------------------------------------------- the tests

def test_the_docs_exist_and_are_found():
    names = {doc.name for doc in DOCS}
    assert {"README.md", "data-service.md", "pretraining.md", "model.md", "finetuning.md", "evaluation.md",
            "performance.md", "recipe.md", "troubleshooting.md"} <= names


def test_troubleshooting_names_every_kind_of_user_error_and_every_exit_status():
    """docs/troubleshooting.md lists every UserError class the package defines and every exit status of the training
    commands: a new kind of mistake or status must be documented."""
    import data_service.pipeline  # noqa: F401 (these import every module that defines an error class)
    import lfzh_ds.finetuning  # noqa: F401
    from lfzh_ds.errors import UserError
    from lfzh_ds.training import distributed

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    kinds = {c.__name__ for c in subclasses(UserError) if c.__module__.startswith(("lfzh_ds", "data_service"))}
    assert {"ConfigError", "ShardError", "JobConflict", "RayUnavailable"} <= kinds
    assert not [k for k in sorted(kinds) if f"`{k}`" not in text], "docs/troubleshooting.md does not name these"
    statuses = {v for k, v in vars(distributed).items() if k.startswith("EXIT_")}
    assert statuses == {0, 2, 3, 4}
    table = [line for line in text.splitlines() if re.match(r"\| \d \|", line)]
    assert {int(line[2]) for line in table} >= statuses | {1}, "docs/troubleshooting.md: the exit-status table"


def test_every_flag_the_docs_write_is_an_option_of_its_script():
    problems, checked = [], 0
    for doc in DOCS:
        for line, command in commands(doc):
            if SCRIPT.search(command):
                checked += 1
                problems += flag_problems(doc, line, command)
        problems += flag_table_problems(doc)
    assert checked > 20, f"only {checked} commands found in the docs"
    assert not problems, "\n".join(problems)


def test_every_deepspeed_config_table_gives_the_files_numbers():
    problems, checked = [], 0
    for doc in DOCS:
        count, found = config_table_problems(doc)
        checked, problems = checked + count, problems + found
    assert checked >= 20, f"only {checked} config numbers found in the docs' tables"
    assert not problems, "\n".join(problems)


def test_every_repository_path_and_link_in_the_docs_exists():
    problems = []
    for doc, number, line in every_line():
        for path in REPO_PATH.findall(line):
            path = path.rstrip(".,:;")
            if not glob.glob(str(REPO / path)):
                problems.append(f"{where(doc, number)}: {path} does not exist")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", line):
            if not re.match(r"\w+://", target) and not (doc.parent / target).exists():
                problems.append(f"{where(doc, number)}: the link to {target} leads nowhere")
    assert not problems, "\n".join(problems)


def resolves(name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_name_in_the_docs_imports():
    problems = []
    for doc, number, line in every_line():
        for name in DOTTED_NAME.findall(line):
            name = name.rstrip(".")
            if name.endswith(".py") or not resolves(name):
                problems.append(f"{where(doc, number)}: {name} does not import")
    assert not problems, "\n".join(problems)


PYTHON_BLOCKS = [block for doc in DOCS for block in fenced_blocks(doc) if block.lang == "python"]


@pytest.fixture
def doc_folders(setup, in_process, tmp_path):  # noqa: F811
    """path/to/NAME -> a folder: the run, model and shards the docs' examples use, built when first asked for."""
    from lfzh_ds.loading import load_model, save_model_folder

    work, shards, _ = setup
    built = {"shards": shards}

    def folder(name: str) -> Path:
        if name in ("run", "model") and "run" not in built:
            built["run"] = work / "run"
            assert pretrain(work, shards, built["run"], "--max-steps", "2") == 0
            built["model"] = save_model_folder(load_model(built["run"]), work / "model")
        return built.get(name) or tmp_path / "out" / name

    return folder


def test_every_python_block_in_the_docs_runs(doc_folders, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    problems, ran = [], 0
    for block in PYTHON_BLOCKS:
        if block.skip:
            continue
        code = PLACEHOLDER.sub(lambda m: str(doc_folders(m[0].removeprefix("path/to/"))), block.text)
        try:
            exec(compile(code, where(block.doc, block.line), "exec"), {"__name__": "__doc_example__"})
            ran += 1
        except Exception as err:  # noqa: BLE001 (every failure is reported with its doc line)
            last = traceback.extract_tb(err.__traceback__)[-1]
            problems.append(f"{where(block.doc, block.line)}: the python block fails: {type(err).__name__}: {err} "
                            f"(at {last.filename}:{last.lineno})")
    skipped = [block for block in PYTHON_BLOCKS if block.skip]
    with capsys.disabled():
        print(f"\n{ran} python blocks of the docs ran, {len(skipped)} skipped"
              + "".join(f"\n  skipped {where(b.doc, b.line)}: {b.skip}" for b in skipped))
    assert ran >= 5, f"only {ran} python blocks in the docs"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b.skip], ids=lambda b: where(b.doc, b.line))
def test_a_python_block_marked_skip_says_why(block):
    pytest.skip(f"{where(block.doc, block.line)}: {block.skip}")
