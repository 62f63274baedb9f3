"""The README's and the documentation's examples run; the site builds in strict mode.

Every ```python block of a page runs, in order, in one namespace per page, in
a temporary directory where each ```toml block whose first line is
``# NAME.toml`` has been written as that file. Docs examples cannot rot.

A block right after a line ``<!-- example: NAME -->`` is left out here: it
needs packages this suite does not have (timm, transformers), and the test that
has them runs it by name (`docs_example`; see tests/models/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?:<!-- example: ([\w-]+) -->\n)?```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced blocks, ``(language, body)``, without the named examples."""
    return [(lang, body) for name, lang, body in FENCE.findall(page.read_text()) if not name]


def docs_example(page: str, name: str) -> str:
    """The ```python blocks marked ``<!-- example: NAME -->`` on ``docs/PAGE``, in order.

    Blank lines stand for the rest of the page, so that line numbers (in
    tracebacks and warnings) are the page's own.
    """
    text = (ROOT / "docs" / page).read_text()
    code = ""
    for match in FENCE.finditer(text):
        if match[1] == name and match[2] == "python":
            code += "\n" * (text.count("\n", 0, match.start(3)) - code.count("\n")) + match[3]
    if not code:
        raise LookupError(f"docs/{page} has no ```python block marked <!-- example: {name} -->")
    return code


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" for lang, _ in _blocks(p))], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = []
    for lang, body in _blocks(page):
        first = body.splitlines()[0] if body else ""
        if lang == "toml" and re.fullmatch(r"# [\w.-]+\.toml", first):
            (tmp_path / first[2:]).write_text(body)
        elif lang == "python":
            code.append(body)
    exec(compile("\n".join(code), str(page), "exec"), {"__name__": "__docs__"})


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the 'docs' extra)")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode == 0, result.stderr
