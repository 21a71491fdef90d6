"""Every code block of the README and of ``docs/`` runs: Python blocks are executed, shell commands parsed.

Python blocks of one page run in order in one fresh interpreter (a later block may use an earlier one's names), with
the offline stand-ins of ``tests/docs_standins.py`` (small local models for Hub ids, CPU for CUDA, small sizes and
few steps). ``cached-diffusers`` command lines are parsed by the real parser, so a renamed or removed option fails.
"""

from __future__ import annotations

import importlib.util
import os
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


SLOW_PAGES = {
    "multi-gpu.md", "hunyuanimage3.md", "flux2-klein.md", "ecosystem.md", "batch-invariance.md", "README.md",
    "reference-model.md", "development.md", "bagel.md", "usage.md", "methods.md",
}
"""Pages whose blocks take over 4 s on the 2-core machine (measured with --durations, 2026-12-08; each runs in a fresh
interpreter that imports torch and diffusers): marked slow, so the fast set stays under three minutes."""


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=p.name, marks=pytest.mark.slow if p.name in SLOW_PAGES else ()) for p in pages_with("python")],
)
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


def torchrun_command(words: list[str]) -> list[str]:
    """The command line a ``torchrun ...`` line runs, as ``["cached-diffusers", ...]``, after checking with torchrun's
    own parser that what it starts exists: ``-m MODULE`` a module runnable with ``python -m``, ``--no-python NAME``
    a program on ``PATH``, else a Python file (torchrun runs no console script without ``--no-python``)."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(words[1:])
    target = parsed.training_script
    if parsed.module:
        spec = importlib.util.find_spec(target)
        assert spec is not None, f"torchrun -m {target}: no such module"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{target}.__main__") is not None, f"torchrun -m {target}: no {target}.__main__"
        assert target in ("cached_diffusers", "cached_diffusers.tools.cli"), target
    elif parsed.no_python:
        assert target == "cached-diffusers", target
    else:
        raise AssertionError(f"torchrun runs {target!r} as a Python file, which does not exist: use -m cached_diffusers")
    return ["cached-diffusers", *parsed.training_script_args]


def command_lines(page: Path) -> list[list[str]]:
    """The ``cached-diffusers ...`` commands of a page's bash blocks (``torchrun`` lines checked and unwrapped by
    :func:`torchrun_command`), continuation lines joined, comments dropped."""
    commands = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"]:
                words = torchrun_command(words)
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


def test_the_readme_torchrun_line_starts_the_command_line():
    """torchrun runs a Python file unless told otherwise: the README's line names the module (``-m cached_diffusers``),
    and the line of the old README (the console script's name as a file) is refused."""
    lines = [line for block in blocks(ROOT / "README.md", "bash") for line in block.splitlines() if line.startswith("torchrun")]
    assert lines and all(" -m cached_diffusers " in line for line in lines)
    argv = torchrun_command(shlex.split(lines[0]))
    assert build_parser().parse_args(argv[1:]).command == "generate"
    with pytest.raises(AssertionError, match="as a Python file, which does not exist"):
        torchrun_command(shlex.split("torchrun --nproc_per_node=4 cached-diffusers generate --model m --prompt p"))


@pytest.mark.slow
def test_torchrun_runs_the_command_line_on_two_processes(tmp_path):
    """The README's torchrun form, on two CPU processes (gloo, one guidance branch each) and the shipped model."""
    from cached_diffusers.tools.reference_model import REFERENCE_MODEL_DIR

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "cached_diffusers", "generate", "--model", os.fspath(REFERENCE_MODEL_DIR), "--prompt", "rocket",
               "--cfg-parallel", "--steps", "4", "--threads", "1", "--quiet", "--output", "out.png"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out.png").exists() and "rank 1: cache: teacache, 4 steps" in done.stdout


IMAGE = re.compile(r"!\[([^\]]+)\]\(([^)\s]+\.png)\)")


def test_the_readme_shows_a_picture_that_exists():
    """A markdown image GitHub renders (``![alt](relative/path.png)``), whose file is a PNG in the repository."""
    images = IMAGE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert images
    for alt, path in images:
        assert alt.strip() and not path.startswith(("/", "http")), path
        assert (ROOT / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.slow
def test_the_readme_calibrate_example_runs_on_the_shipped_model(tmp_path):
    """The README's LeMiCa calibration, as written, from the repository root's layout (the model path is relative)."""
    (line,) = [words for words in command_lines(ROOT / "README.md") if words[0] == "calibrate"]
    (tmp_path / "cached_diffusers").symlink_to(ROOT / "cached_diffusers")
    done = subprocess.run([sys.executable, "-m", "cached_diffusers", *line], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "schedules" / "lemica-b10.json").exists() and (tmp_path / "schedules" / "lemica-b7.json").exists()
