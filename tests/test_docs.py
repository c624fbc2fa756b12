"""The project's documentation: its links resolve inside the repository, it cites nothing outside it, and the
README's Python examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}
OUTSIDE = re.compile(r"\bshared/|\breference/\w+\.md|\bDESIGN\.md|\bENVIRONMENT\.md")


def project_text_files() -> list[Path]:
    folders = ["src", "docs", "tests", "examples", "benchmarks", "scripts"]
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile"]
    for folder in folders:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and "egg-info" not in str(p)]
    return files


def test_nothing_points_outside_the_repository():
    """Docs, docstrings, comments and recipes cite papers and upstream repositories, never a file of ours outside
    the repository."""
    found = []
    for path in project_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == []
    assert OUTSIDE.search("see shared/reference/mcl.md") and OUTSIDE.search("DESIGN.md")  # the scan can fail


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            broken.append(target)
    assert broken == []


def readme_python() -> list[str]:
    """The Python code blocks of the README's "From Python" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """Each block of "From Python" is executed as written, in order, in one namespace (runs go under tmp_path)."""
    blocks = readme_python()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    assert 0.0 <= namespace["results"]["knn_top1"] <= 100.0 and namespace["results"]["steps"] == 20
    assert "kNN top-1" in capsys.readouterr().out
    assert (tmp_path / "runs" / "notebook" / "results.json").is_file()


def test_make_tests_numerics_pass_collects_every_file_with_a_numerics_test(request):
    """`make test` runs the tests marked `numerics` in a pass that collects only the files the Makefile finds by
    grepping for the marker: a test marked another way would run in neither pass."""
    from conftest import NUMERICS_FILES

    marked = request.config.stash[NUMERICS_FILES]  # seen before -m deselected them
    if not marked:
        pytest.skip("this session collected no test marked numerics")
    pattern = re.search(r"grep -l '(.+?)' tests/test_\*\.py", (ROOT / "Makefile").read_text())
    assert pattern, "the Makefile no longer finds the numerics files with grep -l '...' tests/test_*.py"
    found = {p.resolve() for p in (ROOT / "tests").glob("test_*.py") if re.search(pattern[1], p.read_text())}
    assert marked <= found, sorted(map(str, marked - found))
