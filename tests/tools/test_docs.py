"""The README and docs/api.md work as written: every ```python block marked runnable (an HTML comment starting with
``<!-- runnable`` on the line before it) runs on a tiny random LLaVA (``model``, ``inputs`` from tests/tiny.py),
the blocks of one page in order, in one namespace; and the README's front-door facts match the registry."""

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vtprune

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import tiny  # noqa: E402

PAGES = ["README.md", "docs/api.md"]
RUNNABLE = re.compile(r"^( *)<!-- runnable[^\n]*-->\n\1```python\n(.*?)^\1```", re.S | re.M)


def runnable_blocks(page: str) -> list[str]:
    """The runnable blocks of a page, in order (a block indented under a list item is dedented)."""
    return [
        textwrap.dedent(
            "".join(line[len(indent) :] if line.startswith(indent) else line for line in code.splitlines(keepends=True))
        )
        for indent, code in RUNNABLE.findall((REPO / page).read_text())
    ]


@pytest.mark.parametrize("page", PAGES)
def test_runnable_blocks_run(page, monkeypatch):
    monkeypatch.chdir(REPO)  # preset paths such as configs/methods/todre.yaml are relative to the repository
    blocks = runnable_blocks(page)
    assert blocks, f"{page} has no runnable block"
    model = tiny.build("llava")
    namespace = {
        "__name__": "docs",
        "model": model,
        "inputs": tiny.make_inputs(model, "llava", [(3, 1, 4)]),
        "tiny": tiny,
        "torch": torch,
    }
    for i, block in enumerate(blocks):
        with torch.no_grad():
            exec(compile(block, f"{page}[runnable block {i}]", "exec"), namespace)
    with pytest.raises(ValueError):  # every block leaves the model unpatched: it can be patched again
        vtprune.patch(model, "no-such-method", keep=4)
    vtprune.patch(model, "random", keep=4)
    vtprune.unpatch(model)


def test_api_page_marks_the_promised_examples_runnable():
    text = "\n".join(runnable_blocks("docs/api.md"))
    for call in ("vtprune.patch(", "vtprune.patched(", "vtprune.stats(", "vtprune.list_methods(", ".stages"):
        assert call in text, call


def test_readme_list_methods_comments_match_the_registry():
    """`vtprune.list_methods(...)  # [...]` lines of the runnable blocks show what the registry returns."""
    for page in PAGES:
        for block in runnable_blocks(page):
            for call, shown in re.findall(r"^(vtprune\.list_methods\([^)]*\))\s+# (\[.*?\])", block, re.M):
                assert eval(call, {"vtprune": vtprune}) == eval(shown), (page, call)


def test_readme_methods_table_has_a_row_per_vlm_method():
    text = (REPO / "README.md").read_text()
    table = text.split("## Methods x model families")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)`", table, re.M)
    assert rows == sorted(vtprune.list_methods(host="vlm"))
    for name in vtprune.list_methods(host="vit"):
        assert f"`{name}`" in table, name


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md points at a file that exists, and every #anchor at a heading."""

    def anchors(path: Path) -> set[str]:
        heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    bad = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for url in re.findall(r"\]\(([^)\s]+)\)", text):
            if url.startswith(("http://", "https://", "mailto:")):
                continue
            target, _, anchor = url.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                bad.append(f"{page.name}: {url}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                bad.append(f"{page.name}: {url} (no such heading)")
    assert not bad, bad
