"""The README and docs/ say what is true: every fenced ``python`` block runs as printed (each on its own,
in a scratch directory) unless an HTML comment just before it says why not, every tool command line
they print parses with that tool's own parser, and their links and install lines point at what exists."""
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.*?) -->")
SLOW = "<!-- slow -->"
README_MAX_LINES = 200
OPTIONAL_PACKAGES = {"transformers", "segmentation_models_pytorch", "torchvision"}  # the frameworks extra


def _blocks(page: Path):
    """(language, first code line number, code, marker line) of every fenced block of ``page``."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append((fence[1], i + 2, "\n".join(lines[i + 1:end]) + "\n", before))
        i = end + 1
    return blocks


def _python_blocks():
    for page in PAGES:
        for language, line, code, marker in _blocks(page):
            if language == "python":
                yield page, line, code, marker


def _runnable_blocks():
    params = []
    for page, line, code, marker in _python_blocks():
        if NOT_RUN.fullmatch(marker):
            continue
        marks = [pytest.mark.slow] if marker == SLOW else []
        params.append(pytest.param(page, line, code, marks=marks, id=f"{page.relative_to(REPO)}:{line}"))
    return params


def test_the_readme_is_a_front_page_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_every_python_block_runs_or_says_why_not():
    blocks = list(_python_blocks())
    assert len(blocks) >= 15
    for page, line, _, marker in blocks:
        where = f"{page.relative_to(REPO)}:{line}"
        if marker.startswith("<!--"):
            not_run = NOT_RUN.fullmatch(marker)
            assert marker == SLOW or (not_run and not_run["reason"].strip()), \
                f"{where}: the comment before a python block must be '<!-- not run: <reason> -->' or '{SLOW}'"
    assert sum(not NOT_RUN.fullmatch(m) for *_, m in blocks) >= 10  # most blocks run


def test_markers_stand_before_python_blocks():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, text in enumerate(lines):
            if NOT_RUN.fullmatch(text.strip()) or text.strip() == SLOW:
                following = next(t for t in lines[i + 1:] if t.strip())
                assert following.startswith("```python"), f"{page.name}:{i + 1}: a marker not followed by a python block"


@pytest.mark.parametrize("page, line, code", _runnable_blocks())
def test_python_block_runs(page, line, code, tmp_path, monkeypatch):
    for module in sorted(set(re.findall(r"^(?:from|import) (\w+)", code, re.M)) & OPTIONAL_PACKAGES):
        pytest.importorskip(module, reason=f"{module} is not installed (the frameworks extra)")
    monkeypatch.chdir(tmp_path)  # blocks may write files (a converted folder, save_pretrained)
    torch.manual_seed(0)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})


def _command_lines():
    """Every shell command line of the README and docs/ (indented or fenced), continuations joined."""
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for match in re.finditer(r"^(?: {4}|\t)(\S.*)$", text, re.M):
            yield page, match[1]
        for language, _, code, _ in _blocks(page):
            if language in ("bash", "sh", "shell", "console"):
                yield from ((page, line) for line in code.replace("\\\n", " ").splitlines() if line.strip())


def _tool_invocations(tool: str):
    for page, line in _command_lines():
        for command in re.split(r"\s*&&\s*", line.split("  #")[0]):
            argv = shlex.split(command)
            if any(arg.endswith(tool) for arg in argv[:2]):
                yield page, command, argv[[i for i, a in enumerate(argv) if a.endswith(tool)][0] + 1:]


def test_printed_converter_commands_parse():
    from timm_nat.convert.cli import _parser
    commands = list(_tool_invocations("tools/convert.py"))
    assert len(commands) >= 8
    for page, command, argv in commands:
        args = _parser().parse_args(argv)
        assert args.all != bool(args.source), f"{page.name}: {command}: give either a SOURCE or --all"


def test_printed_benchmark_commands_parse():
    from benchmarks.benchmark import _parser
    commands = list(_tool_invocations("benchmarks/benchmark.py"))
    assert len(commands) >= 4
    for page, command, argv in commands:
        assert _parser().parse_args(argv).command in ("models", "profile", "ops", "legacy"), f"{page.name}: {command}"


def test_set_up_path_uses_the_venv_not_console_scripts():
    # tools/setup.sh puts no console script on PATH: every command of the set-up path is .venv/bin/python ...
    for page in (REPO / "README.md", REPO / "docs" / "development.md", REPO / "docs" / "converter.md"):
        for _, line in ((p, l) for p, l in _command_lines() if p == page):
            assert not re.match(r"(timm-nat-convert|timm-nat-benchmark)\b", line), f"{page.name}: {line}"
    for page in PAGES:
        assert "timm-nat-benchmark" not in page.read_text(), f"{page.name} names the removed console script"


def test_relative_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_install_lines_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    readme = (REPO / "README.md").read_text()
    wheel = f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"
    assert f"pip install dist/{wheel}" in readme and "-w dist" in readme  # the wheel is written to dist/
    (natten,) = project["optional-dependencies"]["natten"]
    assert f'"{natten}"' in readme and "timm-nat[natten]" in readme  # NATTEN is an optional extra


@pytest.mark.parametrize("false_statement", [
    "natten>=0.20` dependency",  # NATTEN is the optional extra natten>=0.21, no dependency
    "only the cache is read and nothing is looked up",  # URL-hosted entries use torch's hub cache
    "the issue's targets",  # tables say what they measure
    "pip install timm_nat-",  # the wheel is in dist/
])
def test_no_known_false_statement(false_statement):
    for page in PAGES:
        assert false_statement.lower() not in page.read_text().lower(), f"{page.name}: {false_statement!r}"
