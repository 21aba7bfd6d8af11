"""The README and docs cite only what is in the repo (issue 14, item 15): paths, commands, options, demo words."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from t2iadapter.cli import build_parser
from t2iadapter.demo.world import VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("benchmarks/", "configs/", "docs/", "scripts/", "src/", "tests/", "examples/")


def code_blocks(text: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in ("", "bash", "sh", "console")]


def commands(text: str) -> list[list[str]]:
    """Every `t2iadapter ...` command line of the code blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("t2iadapter "):
                out.append(shlex.split(line)[1:])
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_paths_exist(doc):
    text = doc.read_text()
    cited = {m for m in re.findall(r"\]\(([^)#\s]+)\)", text) if not m.startswith(("http://", "https://"))}
    cited = {str((doc.parent / m).relative_to(ROOT)) if not (ROOT / m).exists() else m for m in cited}
    cited |= {m for m in re.findall(r"`([^`\s]+)`", text) if m.startswith(TOP) and not re.search(r"[{}…<>*]|NNN", m)}
    missing = [m for m in sorted(cited) if not (ROOT / m).exists()]
    assert not missing, f"{doc.name} cites {missing}"


def options_of() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_commands_and_options_exist(doc):
    known = options_of()
    for argv in commands(doc.read_text()):
        assert argv[0] in known, f"{doc.name}: no command {argv[0]!r}"
        for arg in argv[1:]:
            if arg.startswith("--"):
                assert arg.split("=")[0] in known[argv[0]], f"{doc.name}: `t2iadapter {argv[0]}` has no {arg}"


def test_readme_examples_do_not_collide_on_file_names():
    text = (ROOT / "README.md").read_text()
    written = re.findall(r"\.save\(\"([^\"]+)\"\)", text)
    for argv in commands(text):
        if "--out" in argv:
            written.append(argv[argv.index("--out") + 1])
        if argv[0] == "extract" and len(argv) >= 4 and not argv[3].startswith("-"):
            written.append(argv[3])
    assert written and len(written) == len(set(written)), written


def test_readme_says_which_words_the_demo_knows():
    text = (ROOT / "README.md").read_text()
    assert "VOCABULARY" in text
    assert all(w in text for w in VOCABULARY)
