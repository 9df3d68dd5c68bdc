"""The documentation's links, and the alerts' runbook URLs, lead somewhere.

Every link in README.md and docs/*.md to a file of this repository (relative, or an absolute URL
to the repository on GitHub) names a file that exists, and its `#anchor`, if any, is the slug
GitHub gives one of the target's headings. Links to other sites are not fetched. Every alert in
deploy/prometheus/signalwire.alerts.yml has a `runbook_url` to its own heading in
docs/runbooks.md. README.md lists every page of docs/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RUNBOOKS = DOCS / "runbooks.md"
ALERTS = ROOT / "deploy" / "prometheus" / "signalwire.alerts.yml"
DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]

# Absolute links into the repository's main branch, checked like relative ones.
REPOSITORY = "https://github.com/signalwire-exporter/signalwire-exporter/"
REPOSITORY_FILE = re.compile(re.escape(REPOSITORY) + r"(?:blob|tree)/main/([^#?]*)(?:#(.*))?")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title" after the target.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines of a Markdown text outside fenced code blocks, numbered from 1."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        found = FENCE.match(line)
        if fence is None and found:
            fence = found[1][0] * len(found[1])
            continue
        if fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            continue
        yield number, line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading, before duplicates are numbered.

    The rendered text (code spans, emphasis and links reduced to their text), lower case, every
    character other than a letter, a digit, `-`, `_` or a space removed, spaces made `-`.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_slugs(text: str) -> set[str]:
    """Every anchor of a Markdown text's headings: the second `Intro` is `intro-1`, and so on."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for _, line in prose_lines(text):
        found = HEADING.match(line)
        if not found:
            continue
        base = slug(found[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


@cache
def anchors_of(path: Path) -> frozenset[str]:
    return frozenset(heading_slugs(path.read_text(encoding="utf-8")))


def links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every inline link and autolink outside code."""
    for number, line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        for found in INLINE_LINK.finditer(line):
            yield number, found[1]
        for found in AUTOLINK.finditer(line):
            yield number, found[1]


def broken_link(source: Path, target: str) -> str | None:
    """Why `target`, linked from `source`, does not resolve; None when it does or is elsewhere."""
    in_repository = REPOSITORY_FILE.fullmatch(target)
    if in_repository:
        path_part, anchor = in_repository[1], in_repository[2]
        path = ROOT / path_part
    elif re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
        return None  # another site (or mailto:): not fetched
    else:
        path_part, _, anchor = target.partition("#")
        path = source.parent / path_part if path_part else source
        anchor = anchor if "#" in target else None
    if not path.exists():
        return f"{path_part}: no such file"
    if not path.resolve().is_relative_to(ROOT):
        return f"{path_part}: outside the repository"
    if anchor is None:
        return None
    if path.is_dir() or path.suffix != ".md":
        return f"#{anchor}: {path_part} has no headings"
    if anchor not in anchors_of(path):
        shown = path.relative_to(ROOT).as_posix()
        return f"#{anchor}: no such heading in {shown}"
    return None


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- the checker itself --------------------------------------------------------------------------


def test_slugs_are_githubs() -> None:
    text = "\n".join(
        [
            "# Counting",
            "## The start point (`start_from`)",
            "## Web configuration: TLS and basic auth",
            "### SignalWireExporterDown",
            "## Late records",
            "## Late records",
            "```sh",
            "# Not a heading",
            "```",
            "## Late records",
            "## See [Metrics](metrics.md) -- here",
        ]
    )
    assert heading_slugs(text) == {
        "counting",
        "the-start-point-start_from",
        "web-configuration-tls-and-basic-auth",
        "signalwireexporterdown",
        "late-records",
        "late-records-1",
        "late-records-2",
        "see-metrics----here",
    }


def test_links_are_found_outside_code_only() -> None:
    text = "\n".join(
        [
            "See [a](a.md#x), ![img](img.png) and <https://example.com/>.",
            "Not `[b](b.md)` nor:",
            "```",
            "[c](c.md)",
            "```",
            '[d](d.md "title") and [e [f]](e.md)',
        ]
    )
    assert list(links(text)) == [
        (1, "a.md#x"),
        (1, "img.png"),
        (1, "https://example.com/"),
        (6, "d.md"),
        (6, "e.md"),
    ]


def test_broken_links_are_told_apart() -> None:
    main = f"{REPOSITORY}blob/main/"
    assert broken_link(README, "docs/runbooks.md#signalwireexporterdown") is None
    assert broken_link(README, f"{main}docs/runbooks.md#signalwireexporterdown") is None
    assert broken_link(README, "https://signalwire.com/docs/no/such/page#anywhere") is None
    assert broken_link(README, "#quick-start") is None
    assert broken_link(README, "docs/") is None
    assert broken_link(README, "docs/no-such-page.md") == "docs/no-such-page.md: no such file"
    assert broken_link(README, "docs/runbooks.md#no-such-alert") == (
        "#no-such-alert: no such heading in docs/runbooks.md"
    )
    assert broken_link(README, f"{main}README.md#nowhere") == (
        "#nowhere: no such heading in README.md"
    )
    assert broken_link(README, "#nowhere") == "#nowhere: no such heading in README.md"
    assert broken_link(DOCS / "runbooks.md", "../config.yaml#keys") == (
        "#keys: ../config.yaml has no headings"
    )


# --- the documentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_link_resolves(document: Path) -> None:
    problems = []
    for number, target in links(document.read_text(encoding="utf-8")):
        problem = broken_link(document, target)
        if problem:
            problems.append(f"{document.relative_to(ROOT)}:{number}: ({target}) {problem}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_lists_every_page_of_docs() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for _, target in links(README.read_text(encoding="utf-8"))
        if target.startswith("docs/")
    }
    missing = [path.name for path in sorted(DOCS.glob("*.md")) if path.resolve() not in linked]
    assert missing == [], "docs pages the README does not link"


def test_every_alert_has_a_runbook_where_its_url_points() -> None:
    rules = alerts()
    assert rules, f"no alerts in {ALERTS}"
    runbooks = anchors_of(RUNBOOKS)
    problems = []
    for rule in rules:
        name = rule["alert"]
        url = rule.get("annotations", {}).get("runbook_url")
        expected = f"{REPOSITORY}blob/main/docs/runbooks.md#{name.lower()}"
        if url != expected:
            problems.append(f"{name}: runbook_url {url}, not {expected}")
        if name.lower() not in runbooks:
            problems.append(f"{name}: no '### {name}' in docs/runbooks.md")
        elif url and broken_link(ALERTS, url):
            problems.append(f"{name}: {broken_link(ALERTS, url)}")
    assert not problems, "\n".join(problems)
