"""Every code block in README.md and docs/*.md has a language and runs in CI, unless its fence carries a
skip tag whose reason its code shows (tests/e2e/test_docs_snippets.py runs the rest)."""

import re

import pytest

from tests.docs_snippets import CODE_IN_TEXT, LANGUAGES, SKIP_TAGS, blocks, pages

ALL = [b for p in pages() for b in blocks(p)]


def test_there_are_pages_and_blocks():
    names = {p.name for p in pages()}
    assert {"README.md", "CONTRIBUTING.md", "getting-started.md", "choosing-a-method.md", "writing-a-reward.md",
            "writing-an-objective.md", "configuration.md"} <= names
    assert sum(1 for b in ALL if not b.skip_tag) >= 20


@pytest.mark.parametrize("block", ALL, ids=lambda b: f"{b.page}:{b.line}")
def test_block_has_a_language_and_only_known_tags(block):
    assert block.language in LANGUAGES, f"{block.page}:{block.line}: fence language {block.language!r} (use one of {sorted(LANGUAGES)})"
    if block.language == "text":
        assert not re.search(CODE_IN_TEXT, block.code), f"{block.page}:{block.line}: code in a text block; mark it as code"
    unknown = [t for t in block.tags if t not in SKIP_TAGS]
    assert not unknown, f"{block.page}:{block.line}: unknown fence tag(s) {unknown}; skip tags are {sorted(SKIP_TAGS)}"


@pytest.mark.parametrize("block", [b for b in ALL if b.skip_tag], ids=lambda b: f"{b.page}:{b.line}")
def test_a_skipped_block_shows_why(block):
    reason, pattern = SKIP_TAGS[block.skip_tag]
    assert re.search(pattern, block.code), (
        f"{block.page}:{block.line} is tagged {block.skip_tag} ({reason}) but its code shows no such need; "
        "remove the tag so the block runs in CI")


def test_the_getting_started_page_runs_python_and_shell():
    gs = [b for b in ALL if b.page.endswith("getting-started.md") and not b.skip_tag]
    assert {"python", "bash", "yaml"} <= {b.language for b in gs}
