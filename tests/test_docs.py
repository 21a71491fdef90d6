"""Every code block of the README and of ``docs/`` runs: Python blocks are executed, shell commands parsed.

Python blocks of one page run in order in one fresh interpreter (a later block may use an earlier one's names), with
the offline stand-ins of ``tests/docs_standins.py`` (small local models for Hub ids, CPU for CUDA, small sizes and
few steps). ``cached-diffusers`` command lines are parsed by the real parser, so a renamed or removed option fails.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cached_diffusers.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text(encoding="utf-8")) if lang == language]


def pages_with(language: str) -> list[Path]:
    return [page for page in PAGES if blocks(page, language)]


def test_every_fenced_block_names_a_language():
    """A block is ``python`` (executed), ``bash`` (parsed) or ``text`` (output shown, not run)."""
    for page in PAGES:
        languages = {lang for lang, _ in FENCE.findall(page.read_text(encoding="utf-8"))}
        assert languages <= {"python", "bash", "text"}, (page.name, languages)


TORCHRUN = re.compile(r"^<!-- test_docs: torchrun --nproc_per_node=(\d+) -->$", re.M)
"""A page whose Python is a script for several processes says so; its blocks then run under ``torchrun`` (gloo)."""


@pytest.mark.parametrize("page", pages_with("python"), ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    code = "\n\n".join(block.replace('"cuda"', '"cpu"') for block in blocks(page, "python"))
    prelude = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import docs_standins; docs_standins.install()\n"
    processes = TORCHRUN.search(page.read_text(encoding="utf-8"))
    if processes:
        (tmp_path / "page.py").write_text(prelude + code, encoding="utf-8")
        nproc = processes.group(1)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "page.py"]
    else:
        command = [sys.executable, "-c", prelude + code]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"


def command_lines(page: Path) -> list[list[str]]:
    """The ``cached-diffusers ...`` commands of a page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"] and "cached-diffusers" in words:  # torchrun's options, then the command
                words = words[words.index("cached-diffusers") :]
            if words[:1] == ["cached-diffusers"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("page", pages_with("bash"), ids=lambda p: p.name)
def test_shell_commands_parse(page):
    parser = build_parser()
    for argv in command_lines(page):
        if "--help" in argv:
            continue
        args = parser.parse_args(argv)
        assert args.command == argv[0]
