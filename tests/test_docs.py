"""The documentation stays in step with the code: links resolve, every flag and recipe is
described."""

import argparse
import re
from pathlib import Path

import pytest

from capsnet.cli import build_parser
from conftest import CONFIGS, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_DOC = ROOT / "docs" / "cli.md"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    to hyphens, ``-1``, ``-2`` ... appended to repeats. Headings inside code blocks do not count."""
    anchors, seen, in_code = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = page.parent / path if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_heading_anchors_follow_github():
    page = ROOT / "docs" / "results.md"
    assert "the-shipped-model" in heading_anchors(page)
    assert "results" in heading_anchors(page)


def test_every_flag_is_in_the_cli_reference():
    """Each long option of each command appears in docs/cli.md. Of a boolean pair
    ``--X``/``--no-X`` one form is enough: the page says that boolean flags have both."""
    doc = CLI_DOC.read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in commands.choices.items():
        assert f"capsnet {name}" in doc, f"docs/cli.md does not describe `capsnet {name}`"
        for action in sub._actions:
            for flag in action.option_strings:
                if not flag.startswith("--") or flag == "--help":
                    continue
                pair = ("--" + flag[len("--no-"):] if flag.startswith("--no-")
                        else "--no-" + flag[2:])
                if not any(re.search(re.escape(f) + r"(?![\w-])", doc) for f in (flag, pair)):
                    missing.append(f"capsnet {name} {flag}")
    assert "Boolean flags have a `--no-` form" in doc
    assert not missing, f"not in docs/cli.md: {missing}"


def test_every_recipe_is_in_the_cli_reference():
    doc = CLI_DOC.read_text()
    recipes = [p.name for p in CONFIGS]
    assert recipes, "no configs/*.yaml"
    missing = [r for r in recipes if f"configs/{r}" not in doc]
    assert not missing, f"recipes not described in docs/cli.md: {missing}"


def test_python_api_example_runs():
    """The first example of docs/cli.md's Python API section runs as printed, and the
    parameter counts its comments state are the models' own."""
    section = CLI_DOC.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/cli.md (Python API)", "exec"), scope)
    counts = [int(c.replace(",", "")) for c in re.findall(r"# .*?([\d,]{5,}) parameters", code)]
    assert counts == [8_215_568, 161_824]
    model, efficient = scope["CapsNet"](), scope["build_model"]("efficient-capsnet")
    assert sum(p.numel() for p in model.parameters()) == counts[0]
    assert sum(p.numel() for n, p in efficient.named_parameters()
               if not n.startswith("decoder")) == counts[1]
    assert scope["out"].lengths.shape == (8, 10) and scope["meta"]["arch"] == "capsnet"
