"""README and docs/: every link resolves, the README stays short and shows the real versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fhir_dm.knowledge.models import Knowledge
from tools import settings_docs

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 70  # two screens


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def _links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code is not links
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):
            continue  # https:, mailto: ... are not checked offline
        target_text, _, anchor = link.partition("#")
        target = (page.parent / target_text).resolve() if target_text else page
        if not target.exists() or (
            anchor and target.suffix == ".md" and anchor not in _anchors(target)
        ):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_the_readme_links_every_docs_page() -> None:
    linked = {
        (ROOT / link.partition("#")[0]).resolve()
        for link in _links(README)
        if link.startswith("docs/")
    }
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from README.md: {sorted(p.name for p in pages - linked)}"


def test_the_readme_fits_on_two_screens() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_readme_and_changelog_show_the_real_versions(knowledge: Knowledge) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    readme = README.read_text(encoding="utf-8")
    assert f"**{knowledge.ruleset.label}**" in readme
    assert f"package {version}" in readme
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    # The first released entry (an "Unreleased" section may come before it).
    headings = re.findall(r"^## (.+)$", changelog, flags=re.MULTILINE)
    released = [h for h in headings if h != "Unreleased"]
    assert released, "CHANGELOG.md has no released entry"
    assert released[0] == f"{version} (rule set {knowledge.ruleset.label})"


def test_the_settings_tables_are_what_the_generator_writes_now() -> None:
    page = settings_docs.PAGE.read_text(encoding="utf-8")
    tables = settings_docs.render_tables(settings_docs.load_meanings())
    assert settings_docs.render_page(page, tables) == page, "run: python -m tools.settings_docs"


def test_the_settings_tables_name_every_field_and_variable() -> None:
    tables = settings_docs.render_tables(settings_docs.load_meanings())
    assert "| `fhir.base_url` | `FHIR_DM_FHIR__BASE_URL` | string | required |" in tables
    assert "| `cds.state.redis_url` | `FHIR_DM_CDS__STATE__REDIS_URL` | secret" in tables


def test_a_field_without_a_meaning_is_an_error() -> None:
    meanings = settings_docs.load_meanings()
    del meanings["FhirServerConfig.page_size"]
    meanings["Settings.no_such_setting"] = "stale"
    with pytest.raises(ValueError, match=r"FhirServerConfig\.page_size") as exc:
        settings_docs.render_tables(meanings)
    assert "Settings.no_such_setting" in str(exc.value)
