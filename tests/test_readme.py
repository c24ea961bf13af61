"""README.md's commands stay true: each ``python -m fwi_jax.X ...`` line parses with X's own flags.

Rules for README commands (what ``readme_commands`` extracts and ``check_command`` checks):

- every line of a fenced code block, and every inline code span with arguments, that runs
  ``python -m fwi_jax.X`` (also ``.venv/bin/python``, after ``VAR=value`` prefixes, between
  ``&&``/``;``/``|``), with backslash continuations joined and ``# comments`` dropped;
- the arguments are parsed by X's ``build_parser()``, or by its ``build_W_parser()`` when the
  first argument is W (nothing runs): an unknown flag, a missing required flag or a bad choice
  fails;
- a command is written out in full: ``...`` or ``…`` is an error (placeholders are upper-case
  words such as ``DIR``, which parse as values);
- ``--config NAME`` must name a file in ``configs/`` (or be a path that exists), and every
  ``--set KEY=VALUE`` must apply to that config.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import pathlib
import re
import shlex

import pytest

from fwi_jax.config import Config, ConfigError, apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_OPERATORS = {"&&", "||", ";", "|"}
# a module name, whole: "python -m fwi_jax.train: the loop" in a sketch is no command
MODULE = re.compile(r"fwi_jax(\.\w+)*")
MODULE_ONLY = re.compile(r"\S*python3? -m fwi_jax(\.\w+)*")


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and inline code spans elsewhere."""
    out, block, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(pending + line)
            pending = ""
        else:  # an inline span with arguments is a command; a bare `python -m fwi_jax.X` names one
            spans = re.findall(r"`([^`]+)`", line)
            out.extend(s for s in spans if not MODULE_ONLY.fullmatch(s.strip()))
    return out


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, args)`` of every ``python -m fwi_jax.X`` command in a README's text."""
    found = []
    for line in _code_lines(text):
        if "python -m fwi_jax" not in line:
            continue
        tokens = shlex.split(line, comments=True)
        for i in range(len(tokens) - 2):
            is_python = tokens[i].endswith("python") or tokens[i].endswith("python3")
            if is_python and tokens[i + 1] == "-m" and MODULE.fullmatch(tokens[i + 2]):
                rest = tokens[i + 3 :]
                end = next((j for j, t in enumerate(rest) if t in SHELL_OPERATORS), len(rest))
                found.append((tokens[i + 2], rest[:end]))
    return found


def parser_of(module: str, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The argparse parser of ``python -m module ARGS`` (a package's ``__main__``), not run, and
    the arguments it parses: a command whose first word W has its own ``build_W_parser()``
    (``python -m fwi_jax.synth calibrate ...``) is parsed by that, without W."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise AssertionError(f"python -m {module}: {e}") from None
    if hasattr(mod, "__path__"):  # a package: python -m runs its __main__
        mod = importlib.import_module(f"{module}.__main__")
    if args and hasattr(mod, f"build_{args[0]}_parser"):
        return getattr(mod, f"build_{args[0]}_parser")(), args[1:]
    if not hasattr(mod, "build_parser"):
        raise AssertionError(f"{module} has no build_parser(): its README flags cannot be checked")
    return mod.build_parser(), args


def check_command(module: str, args: list[str]) -> None:
    """Raise AssertionError naming the command if it would not parse or names a missing config."""
    shown = f"python -m {module} {' '.join(args)}"
    if any(a in ("...", "…") or "…" in a for a in args):
        raise AssertionError(f"{shown}: a README command must be complete (no '...')")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser, rest = parser_of(module, args)
            ns = parser.parse_args(rest)
    except SystemExit:
        raise AssertionError(f"{shown}: {stderr.getvalue().strip()}") from None
    config = getattr(ns, "config", None)
    if config is not None:
        try:
            load_config(config, getattr(ns, "set", []) or [])
        except ConfigError as e:
            raise AssertionError(f"{shown}: {e}") from None


def test_readme_commands_parse():
    commands = readme_commands(README.read_text())
    # the README covers every command a user runs; losing one from the extraction is a test bug
    modules = {m for m, _ in commands}
    expected = {
        "fwi_jax.demo",
        "fwi_jax.data",
        "fwi_jax.train",
        "fwi_jax.infer",
        "fwi_jax.convert",
        "fwi_jax.synth",
    }
    assert expected <= modules, f"commands for {sorted(modules)}, expected {sorted(expected)}"
    errors = []
    for module, args in commands:
        try:
            check_command(module, args)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "README commands that do not parse:\n" + "\n".join(errors)


SAMPLE = """
Run it:

```bash
XLA_FLAGS=--x .venv/bin/python -m fwi_jax.train --config tiny_s8 --data DIR \\
    --workdir runs/a --set train.lr=1e-4   # a comment --bogus
python -m venv .venv && .venv/bin/python -m fwi_jax.demo
```

Then `python -m fwi_jax.plots curves runs/a/metrics.jsonl out.png` plots it.
"""


def test_extraction_joins_lines_and_splits_shell():
    assert readme_commands(SAMPLE) == [
        (
            "fwi_jax.train",
            [
                "--config",
                "tiny_s8",
                "--data",
                "DIR",
                "--workdir",
                "runs/a",
                "--set",
                "train.lr=1e-4",
            ],
        ),
        ("fwi_jax.demo", []),
        ("fwi_jax.plots", ["curves", "runs/a/metrics.jsonl", "out.png"]),
    ]
    for module, args in readme_commands(SAMPLE):
        check_command(module, args)


@pytest.mark.parametrize(
    "module, args, message",
    [
        (
            "fwi_jax.train",
            ["--config", "tiny_s8", "--no-such-flag"],
            "unrecognized arguments: --no-such-flag",
        ),
        ("fwi_jax.infer", ["--data", "d", "--out", "o.npz"], "required"),
        (
            "fwi_jax.data",
            ["split", "--first", "a", "--out", "b", "--bogus"],
            "unrecognized arguments",
        ),
        ("fwi_jax.synth", ["--n", "3", "--out", "s", "--family", "nope"], "invalid choice"),
        ("fwi_jax.train", ["--config", "no_such_config"], "unknown config"),
        (
            "fwi_jax.convert",
            ["w.pth", "--config", "base_s6", "--out", "c", "--set", "train.nope=1"],
            "train.nope",
        ),
        ("fwi_jax.train", ["--config", "base_s6", "..."], "must be complete"),
        ("fwi_jax.trian", ["--config", "base_s6"], "No module named"),
        (
            "fwi_jax.synth",
            ["calibrate", "--data", "d", "--seed", "3"],
            "unrecognized arguments: --seed",
        ),
    ],
)
def test_check_command_rejects(module, args, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(module, args)


def test_config_docstring_commands_parse():
    """The commands in each config's docstring follow the same rules as the README's."""
    errors, n = [], 0
    for path in sorted((ROOT / "configs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for module, args in readme_commands(f"```\n{doc}\n```"):
            n += 1
            try:
                check_command(module, args)
            except AssertionError as e:
                errors.append(f"{path.name}: {e}")
    assert n >= 4, "each reference config's docstring shows its command"
    assert not errors, "config docstring commands that do not parse:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "doc", ["README.md", "docs/reference.md", "docs/performance.md", "docs/uncertainty.md"]
)
def test_docs_name_files_and_tests_that_exist(doc):
    """Paths in backticks (fwi_jax/, tests/, scripts/, configs/, docs/) exist, placeholders aside,
    and every test a document cites by name (`test_...`) is defined in tests/."""
    text = (ROOT / doc).read_text()
    paths = re.findall(r"`((?:fwi_jax|tests|scripts|configs|docs)/[\w./-]*)", text)
    placeholder = re.compile(r"\*|\b[A-Z]{2,}\b")  # a glob, or an upper-case word like NAME
    missing = [p for p in paths if not placeholder.search(p) and not (ROOT / p).exists()]
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", sources, flags=re.MULTILINE))
    cited = set(re.findall(r"`(test_\w+)`", text))
    assert paths, f"{doc} names no repository path"
    assert not missing, f"{doc} names paths that do not exist: {missing}"
    assert cited <= defined, f"{doc} cites tests that do not exist: {sorted(cited - defined)}"


# `train.lr`, `model.dtype=bfloat16`; not a module path (`fwi_jax.data.io`) or a file name
CONFIG_KEY = re.compile(
    r"(?<![\w./])((?:geometry|model|data|synth|train)"
    r"\.(?!(?:safetensors|npy|npz|json|jsonl|txt|py|pth)\b)\w+)"
    r"(?:=([^\s|`,;)]+))?"
)


@pytest.mark.parametrize(
    "doc", ["README.md", "docs/reference.md", "docs/performance.md", "docs/uncertainty.md"]
)
def test_docs_name_config_keys_that_exist(doc):
    """Every config key a document names in inline code (`train.lr`, `model.dtype=bfloat16`) is a
    field of the config, and a value given with it parses as that field's type."""
    text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.DOTALL)  # prose only
    errors, n = [], 0
    for span in re.findall(r"`([^`]+)`", text):
        for key, value in CONFIG_KEY.findall(span):
            n += 1
            try:  # a key without a value is checked with its current value
                cfg = Config()
                shown = value or json.dumps(cfg.to_dict()[key.split(".")[0]][key.split(".")[1]])
                apply_overrides(cfg, [f"{key}={shown.strip(chr(34))}"])
            except (ConfigError, KeyError) as e:
                errors.append(f"`{span}`: {e!r}")
    assert not errors, f"{doc} names config keys that do not exist:\n" + "\n".join(errors)
