"""Find every patient with an IIM Condition: one indexed search, never a scan of all patients.

The search is `Condition?code=<system|code,...>&_elements=subject` over the rule set's IIM
subtype value sets, every page followed, so the server reads only those Conditions (an index
look-up) and the answer carries only their subjects. Codes are sent under every system URI
the knowledge accepts (the canonical URL and its aliases, e.g. the ICD-10-CM OID) and, for
dotless systems, with and without the dot, as senders write them.
"""

from __future__ import annotations

from collections.abc import Iterable

from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import FinderConfig

# Codes per request: keeps the query line well under common 8 KB URL limits.
CODES_PER_SEARCH = 60


def _variants(code: str, dotless: bool) -> list[str]:
    return [code, code.replace(".", "")] if dotless and "." in code else [code]


def iim_search_tokens(knowledge: Knowledge, finder: FinderConfig) -> list[str]:
    """Every `system|code` token that names an IIM subtype Condition, de-duplicated, in order."""
    terminology = knowledge.terminology
    expansions: dict[tuple[str, str], tuple[str, ...]] = {
        (e.system, e.prefix): e.codes for e in finder.prefix_codes
    }
    uris: dict[str, list[str]] = {
        alias: [url] + [uri for uri, a in terminology.system_aliases.items() if a == alias]
        for alias, url in terminology.systems.items()
    }
    tokens: dict[str, None] = {}
    for subtype in knowledge.ruleset.subtypes:
        for entry in terminology.value_sets[subtype.value_set].include:
            if entry.code is not None:
                codes: Iterable[str] = (entry.code,)
            else:
                assert entry.prefix is not None
                codes = (entry.prefix, *expansions.get((entry.system, entry.prefix), ()))
            dotless = entry.system in terminology.dotless_systems
            for code in codes:
                for variant in _variants(code, dotless):
                    for uri in uris[entry.system]:
                        tokens.setdefault(f"{uri}|{variant}")
    return list(tokens)


def unexpanded_prefixes(knowledge: Knowledge, finder: FinderConfig) -> list[str]:
    """Prefix entries with no listed codes: only the prefix itself is searched (said in output)."""
    listed = {(e.system, e.prefix) for e in finder.prefix_codes}
    out: dict[str, None] = {}
    for subtype in knowledge.ruleset.subtypes:
        for entry in knowledge.terminology.value_sets[subtype.value_set].include:
            if entry.prefix is not None and (entry.system, entry.prefix) not in listed:
                out.setdefault(f"{entry.system} {entry.prefix}*")
    return list(out)


def patient_id_of(reference: str) -> str | None:
    """`Patient/123` (relative or absolute, no history) -> `123`; anything else -> None."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def find_iim_patients(client: FhirClient, tokens: list[str]) -> list[str]:
    """The ids of every Patient that is the subject of a Condition with one of `tokens`, sorted."""
    found: set[str] = set()
    for start in range(0, len(tokens), CODES_PER_SEARCH):
        chunk = tokens[start : start + CODES_PER_SEARCH]
        for condition in client.search(
            "Condition", {"code": ",".join(chunk), "_elements": "subject"}
        ):
            reference = (condition.get("subject") or {}).get("reference")
            if isinstance(reference, str):
                patient_id = patient_id_of(reference)
                if patient_id is not None:
                    found.add(patient_id)
    return sorted(found)
