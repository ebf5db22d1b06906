"""The docs stay true to the code and to each other (principle 14: docs in layers).

- every relative link of README.md, ARCHITECTURE.md, RELIABILITY.md and docs/*.md resolves: the
  file exists and an ``#anchor`` names a heading of it, by GitHub's slug rules;
- every option ``python launch.py --help`` and ``python launch.py report --help`` print is
  written somewhere in README.md or docs/*.md;
- every registered method has its line in README.md;
- the README stays a five-minute read.

Fast and without Ray: the parsers are built in-process, nothing runs.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
LINKED_FILES = [README, ROOT / "ARCHITECTURE.md", ROOT / "RELIABILITY.md", *DOC_PAGES]
README_MAX_LINES = 170

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target), with an optional "title"; text may hold `code`
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, in_fence = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lower-cased, punctuation but ``-`` and
    ``_`` removed, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``, duplicates numbered -1, -2, ..."""
    seen: Counter[str] = Counter()
    result = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        result.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    found = []
    for number, line in prose_lines(path):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link of ``path`` that does not resolve, naming the file, line and why."""
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue  # external links are not checked
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: [..]({target})"
        if not linked.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor:
            if linked.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(linked):
                valid = ", ".join(sorted(anchors(linked)))
                problems.append(f"{where}: no heading of {linked.relative_to(root)} has the anchor "
                                f"#{anchor}; its anchors: {valid}")
    return problems


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_checker_sees_a_broken_link_and_a_wrong_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with `code`\n\n## A section: with code\n")
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-section-with-code) [duplicate](other.md#a-section-with-code-1) [self](#page)\n"
        "[gone](missing.md) [wrong anchor](other.md#nowhere) [web](https://example.com/x.md#y)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md does not exist" in problems[0]
    assert "#nowhere" in problems[1]


def test_github_slugs():
    assert slug("5. Load the dataset (in-cluster Job)") == "5-load-the-dataset-in-cluster-job"
    assert slug("`--address`") == "--address"
    assert slug("Set-up: two commands") == "set-up-two-commands"
    assert slug("MLflow: comparing runs") == "mlflow-comparing-runs"


def documented_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [README, *DOC_PAGES])


def cli_parsers():
    """Every parser ``launch.py`` answers with: the launch's and each subcommand's.

    ``launch.py`` dispatches on its first word (``report``) rather than through argparse
    subparsers, so the subcommands are listed here; a new subcommand's parser joins them."""
    from timematch.runner.cli import launch_parser, report_parser

    return {"launch.py": launch_parser(), "launch.py report": report_parser()}


def test_every_cli_option_is_documented():
    text = documented_text()
    missing = []
    for prog, parser in cli_parsers().items():
        # the options --help prints (argparse's own -h/--help included)
        for action in parser._actions:
            for option in action.option_strings:
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                    missing.append(f"{prog} {option}")
    assert not missing, ("options that --help prints but neither README.md nor docs/*.md mentions "
                         f"(add them to docs/running.md): {missing}")


@pytest.mark.parametrize("argv, prog", [(["--help"], "launch.py"), (["report", "--help"], "launch.py report")])
def test_the_parsers_checked_are_the_ones_launch_py_answers_with(argv, prog, capsys):
    from timematch.runner.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out == cli_parsers()[prog].format_help()


def test_every_registered_method_has_a_line_in_the_readme():
    from timematch.methods import method_names

    lines = README.read_text(encoding="utf-8").splitlines()
    missing = [name for name in method_names()
               if not any(re.match(rf"\s*[-*]\s+`{re.escape(name)}`", line) for line in lines)]
    assert not missing, f"registered methods without a '- `name`: ...' line in README.md's Methods: {missing}"


def test_the_readme_stays_a_five_minute_read():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the depth to a page under docs/")
