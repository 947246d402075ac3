"""Decide which of the project's value sets a coding or concept belongs to.

Matching is by exact code, by ICD prefix, by a site-local code, and (only for value sets that
list synonyms, i.e. antibodies) by a whole-word synonym in the text. Displays never decide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_dm.knowledge.models import Terminology


@dataclass(frozen=True, slots=True)
class Match:
    """The value sets a concept belongs to, and how it was recognised."""

    value_sets: frozenset[str]
    by_text: bool = False


NO_MATCH = Match(frozenset())


class Matcher:
    """Pre-indexed value sets for fast membership tests (built once per Knowledge)."""

    def __init__(self, terminology: Terminology) -> None:
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, list[tuple[str, str]]] = {}
        synonyms: list[tuple[re.Pattern[str], str]] = []
        for vs_id, vs in terminology.value_sets.items():
            for entry in vs.include:
                system = terminology.system_url(entry.system)
                if entry.code is not None:
                    exact.setdefault((system, entry.code.upper()), set()).add(vs_id)
                else:
                    assert entry.prefix is not None
                    prefixes.setdefault(system, []).append((entry.prefix.upper(), vs_id))
            for word in vs.synonyms:
                pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
                synonyms.append((pattern, vs_id))
        for mapping in terminology.mappings:
            exact.setdefault((mapping.system, mapping.code.upper()), set()).add(mapping.value_set)
        self._exact = {key: frozenset(value) for key, value in exact.items()}
        self._prefixes = prefixes
        self._synonyms = synonyms

    def code(self, system: str | None, code: str | None) -> frozenset[str]:
        """Value sets containing one system/code pair."""
        if not system or not code:
            return frozenset()
        key = code.strip().upper()
        found = self._exact.get((system, key), frozenset())
        for prefix, vs_id in self._prefixes.get(system, ()):
            if key.startswith(prefix):
                found = found | {vs_id}
        return found

    def codings(self, codings: Iterable[Mapping[str, Any]]) -> frozenset[str]:
        """Value sets containing any of the codings."""
        found: frozenset[str] = frozenset()
        for coding in codings:
            found = found | self.code(coding.get("system"), coding.get("code"))
        return found

    def concept(self, concept: Mapping[str, Any] | None, *, use_text: bool = False) -> Match:
        """Value sets of a CodeableConcept; text synonyms only when asked and nothing coded."""
        if not concept:
            return NO_MATCH
        codings = concept.get("coding") or []
        coded = self.codings(codings)
        if coded or not use_text:
            return Match(coded)
        texts = [concept.get("text") or ""] + [c.get("display") or "" for c in codings]
        by_text = frozenset(
            vs_id for pattern, vs_id in self._synonyms for t in texts if t and pattern.search(t)
        )
        return Match(by_text, by_text=bool(by_text))
