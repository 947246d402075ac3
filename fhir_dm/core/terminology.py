"""Decide which of the project's value sets a coding or concept belongs to.

Matching is by exact code, by ICD prefix, by a site-local code, and (only for value sets that
list synonyms, i.e. antibodies) by a whole-word synonym in the text, compared as normalised
words (`normalise_name`: labs print "TIF-1 gamma", "TIF-1γ", "PM-Scl100"). Displays never decide.
A system sent under another URI (ICD-10-CM under its OID) matches as its configured URL, and
ICD-10 codes match with or without their dot, as real exports send them.

SNOMED CT has no hierarchy offline. An edge with a terminology server may pass a
`TerminologyOverlay` (what the server said about codes the offline lists do not hold) per
request; `Matcher.with_overlay` consults it, and `server_findings` reports codes it could not
check, whose facts stay unknown. The core itself never does I/O.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_dm.knowledge.models import Terminology
from fhir_dm.knowledge.names import normalise_name as normalise_name


@dataclass(frozen=True, slots=True)
class Match:
    """The value sets a concept belongs to, and how it was recognised."""

    value_sets: frozenset[str]
    by_text: bool = False


NO_MATCH = Match(frozenset())

Code = tuple[str, str]
"""A (system, code) pair: the system as configured (aliases resolved), the code as sent."""

# The resource types whose codes a terminology server may place in a value set.
SERVER_CHECKED_TYPES = ("Condition", "FamilyMemberHistory")


@dataclass(frozen=True, slots=True)
class TerminologyOverlay:
    """A terminology server's answers for the codes of one request (built by an edge).

    `members`: the value sets the server placed a code in. `unchecked`: codes it could not
    (fully) check, each with a short reason that holds no patient data. A code in neither was
    checked and belongs to no further value set.
    """

    members: Mapping[Code, frozenset[str]] = field(default_factory=dict)
    unchecked: Mapping[Code, str] = field(default_factory=dict)


def server_concepts(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The CodeableConcepts of a resource that a terminology server may help recognise."""
    kind = resource.get("resourceType")
    if kind == "Condition":
        concepts = [resource.get("code")]
    elif kind == "FamilyMemberHistory":
        concepts = [
            c.get("code") for c in resource.get("condition") or [] if isinstance(c, Mapping)
        ]
    else:
        return []
    return [c for c in concepts if isinstance(c, Mapping)]


class Matcher:
    """Pre-indexed value sets for fast membership tests (built once per Knowledge)."""

    def __init__(self, terminology: Terminology) -> None:
        self._aliases = {
            uri: terminology.system_url(alias) for uri, alias in terminology.system_aliases.items()
        }
        self._dotless = frozenset(terminology.system_url(a) for a in terminology.dotless_systems)
        # Terminology-server checks (server.yaml): which systems a server may be asked about.
        checks = terminology.server_checks.values()
        self._server_systems = frozenset(
            terminology.system_url(root.system) for c in checks for root in c.descendants_of
        )
        self._server_any_system = any(c.expansions for c in checks)
        self._overlay: TerminologyOverlay | None = None
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, list[tuple[str, str]]] = {}
        synonyms: list[tuple[str, str]] = []
        for vs_id, vs in terminology.value_sets.items():
            for entry in vs.include:
                system = terminology.system_url(entry.system)
                if entry.code is not None:
                    exact.setdefault((system, self._key(system, entry.code)), set()).add(vs_id)
                else:
                    assert entry.prefix is not None
                    prefixes.setdefault(system, []).append((self._key(system, entry.prefix), vs_id))
            synonyms.extend((f" {normalise_name(w)} ", vs_id) for w in vs.synonyms)
        for mapping in terminology.mappings:
            system = self._aliases.get(mapping.system, mapping.system)
            exact.setdefault((system, self._key(system, mapping.code)), set()).add(
                mapping.value_set
            )
        self._exact = {key: frozenset(value) for key, value in exact.items()}
        self._prefixes = prefixes
        self._synonyms = synonyms
        # One pass over a text says whether any synonym can match (most texts name none).
        words = sorted({w.strip() for w, _ in synonyms}, key=len, reverse=True)
        self._any_synonym = re.compile(
            rf"(?<![^ ])(?:{'|'.join(re.escape(w) for w in words) or '(?!x)x'})(?![^ ])"
        )

    def code(self, system: str | None, code: str | None) -> frozenset[str]:
        """Value sets containing one system/code pair."""
        if not system or not code:
            return frozenset()
        system = self._aliases.get(system, system)
        key = self._key(system, code)
        found = self._exact.get((system, key), frozenset())
        for prefix, vs_id in self._prefixes.get(system, ()):
            if key.startswith(prefix):
                found = found | {vs_id}
        if self._overlay is not None:
            found = found | self._overlay.members.get((system, code.strip()), frozenset())
        return found

    def with_overlay(self, overlay: TerminologyOverlay) -> Matcher:
        """This matcher plus one request's server answers (the shared index is not copied)."""
        clone = copy.copy(self)
        clone._overlay = overlay
        return clone

    def server_codes(self, resources: Iterable[Mapping[str, Any]]) -> frozenset[Code]:
        """The codes worth asking a terminology server about: those of the concepts in
        `SERVER_CHECKED_TYPES` that nothing offline recognises, in a system it may know."""
        if not (self._server_systems or self._server_any_system):
            return frozenset()
        found: set[Code] = set()
        for resource in resources:
            for concept in server_concepts(resource):
                if self.concept(concept).value_sets:
                    continue
                for system, code in self._coded(concept):
                    if self._server_any_system or system in self._server_systems:
                        found.add((system, code))
        return frozenset(found)

    def server_findings(
        self, resources: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> dict[str, list[str]]:
        """Why facts stay unknown: per message, the references of resources holding a code
        the server could not check (empty without an overlay)."""
        if self._overlay is None or not self._overlay.unchecked:
            return {}
        unchecked = self._overlay.unchecked
        out: dict[str, list[str]] = {}
        for ref, resource in resources:
            reasons = {
                unchecked[pair]
                for concept in server_concepts(resource)
                for pair in self._coded(concept)
                if pair in unchecked
            }
            for reason in sorted(reasons):
                message = (
                    f"code not checked with the terminology server ({reason});"
                    " the facts it may record are unknown"
                )
                out.setdefault(message, []).append(ref)
        return out

    def _coded(self, concept: Mapping[str, Any]) -> list[Code]:
        """The (system, code) pairs of a concept, system aliases resolved, blanks skipped."""
        pairs = []
        for coding in concept.get("coding") or []:
            system, code = coding.get("system"), coding.get("code")
            if isinstance(system, str) and isinstance(code, str) and code.strip():
                pairs.append((self._aliases.get(system, system), code.strip()))
        return pairs

    def _key(self, system: str, code: str) -> str:
        """The form a code is indexed and looked up in (upper case; ICD without its dot)."""
        key = code.strip().upper()
        return key.replace(".", "") if system in self._dotless else key

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
        names = [f" {normalise_name(t)} " for t in texts if t]
        names = [n for n in names if self._any_synonym.search(n)]
        by_text = frozenset(vs_id for word, vs_id in self._synonyms for n in names if word in n)
        return Match(by_text, by_text=bool(by_text))
