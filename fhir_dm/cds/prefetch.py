"""Prefetch templates built from config, and prefetch resolution with fallback fetching.

The EHR may satisfy any subset of the templates. Per key, a value is used as it is when it is
a resource, a complete searchset Bundle or `null` (no data). The key is fetched from the EHR's
FHIR server when it is missing, an OperationOutcome (the EHR's prefetch failed) or a paged
searchset (a `next` link): the whole query is then run again and every page followed, because
a first page is not guaranteed to agree with pages fetched later. When a required data key
cannot be had (no fhirServer, no token for a server not marked open, a server not on the allowed
list, or a failed fetch) the resolution says so (`ResolvedPrefetch.incomplete`): the web edge
answers with a card saying the assessment is incomplete and why, because an EHR shows an error
answer as no card at all ("All clear"). Only the context patient itself is still a 412.

The only I/O goes through the injected `FetcherFactory`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote

from fhir_dm.cds.models import is_safe_fhir_id
from fhir_dm.cds.settings import CodeFilter, PrefetchConfig, TemplateUse
from fhir_dm.common.errors import FhirDmError, InputError, KnowledgeError, PreconditionFailedError
from fhir_dm.knowledge.models import Knowledge

logger = logging.getLogger(__name__)

Json = dict[str, Any]

TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
# Tokens the patient-view context can fill (root-level primitives of the hook's context).
KNOWN_TOKENS = frozenset({"context.patientId", "context.userId", "context.encounterId"})
# A patient id is at most 64 characters; used to check rendered query lengths at start-up.
LONGEST_ID = "x" * 64
_READ = re.compile(r"([A-Z][A-Za-z]{1,63})/([^/?]+)")
_SEARCH = re.compile(r"([A-Z][A-Za-z]{1,63})\?(.*)")
DEFAULT_FETCH_WORKERS = 4

# Why a key had to be fetched, as the 412 answer says it.
MISSING = "missing"
INCOMPLETE = "incomplete"
ERROR_REPORTED = "error-reported"
_WHY = {
    MISSING: "is missing (not in the request's prefetch)",
    INCOMPLETE: "is incomplete (the EHR sent a first page with a next link, not the whole search)",
    ERROR_REPORTED: "holds an OperationOutcome (the EHR's own prefetch of it failed)",
}


@dataclass(frozen=True, slots=True)
class PrefetchTemplate:
    """One discovery prefetch entry: key, FHIR query with tokens, role and whether required."""

    key: str
    query: str
    use: TemplateUse
    required: bool

    @property
    def resource_type(self) -> str:
        return re.split(r"[/?]", self.query, maxsplit=1)[0]


class Fetcher(Protocol):
    """What resolution needs from a FHIR client (`fhir_dm.fhir.client.FhirClient` fits)."""

    def read(self, resource_type: str, id: str) -> Json | None: ...

    def search(
        self, resource_type: str, params: Mapping[str, str | Sequence[str]]
    ) -> list[Json]: ...

    def close(self) -> None: ...


# Returns a new fetcher for the EHR's FHIR server, or raises PreconditionFailedError saying
# why the server cannot be used (no fhirServer, no token, not allowed).
FetcherFactory = Callable[[], Fetcher]


@dataclass(frozen=True, slots=True)
class ResolvedPrefetch:
    """The data one hook call runs on, whichever way each key was obtained."""

    patient: Json
    resources: tuple[Json, ...]
    existing_plans: tuple[Json, ...]
    fetched: tuple[str, ...]
    unavailable: tuple[str, ...]
    # Why required data is missing (empty when complete), and the resource types it holds.
    incomplete: tuple[str, ...] = ()
    incomplete_types: tuple[str, ...] = ()

    def bundle(self) -> Json:
        """A collection Bundle of the patient and its data, as the core reads input."""
        entries = [{"resource": self.patient}] + [{"resource": r} for r in self.resources]
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# --- templates ------------------------------------------------------------------------------


def _filter_codes(codes: CodeFilter, knowledge: Knowledge, where: str) -> list[str]:
    """`system|code` tokens of a code filter, in a stable order, without duplicates."""
    terminology = knowledge.terminology
    rs = knowledge.ruleset
    value_sets = list(codes.value_sets)
    if codes.antibodies:
        value_sets = [a.value_set for a in rs.antibodies] + value_sets
    out: list[str] = []
    for vs_id in value_sets:
        vs = terminology.value_sets.get(vs_id)
        if vs is None:
            raise KnowledgeError(f"cds.yaml: {where}: unknown value set '{vs_id}'")
        for entry in vs.include:
            if entry.code is None:
                # A prefix cannot be a token search; the filter would silently lose data.
                raise KnowledgeError(
                    f"cds.yaml: {where}: value set '{vs_id}' matches by code prefix; "
                    "it cannot be a search filter (set codes: null on this template)"
                )
            out.append(f"{terminology.system_url(entry.system)}|{entry.code}")
        if codes.local_mappings:
            out.extend(f"{m.system}|{m.code}" for m in terminology.mappings if m.value_set == vs_id)
    if codes.tests:
        out.extend(
            f"{terminology.system_url(t.code.system)}|{t.code.code}" for t in rs.tests.values()
        )
        # ... and every code that shows a test done (clinical-logic §10 rev 3), local ones too.
        done = [d.value_set for t in rs.tests.values() for d in t.done]
        for vs_id in done:
            out.extend(
                f"{terminology.system_url(e.system)}|{e.code}"
                for e in terminology.value_sets[vs_id].include
                if e.code is not None
            )
            out.extend(f"{m.system}|{m.code}" for m in terminology.mappings if m.value_set == vs_id)
    for token in out:
        if "," in token:
            raise KnowledgeError(f"cds.yaml: {where}: code '{token}' contains a comma")
    return list(dict.fromkeys(out))


def _check_tokens(query: str, where: str) -> None:
    for token in TOKEN.findall(query):
        if token not in KNOWN_TOKENS:
            raise KnowledgeError(
                f"cds.yaml: {where}: unknown prefetch token '{{{{{token}}}}}' "
                f"(known: {', '.join(sorted(KNOWN_TOKENS))})"
            )


def build_templates(config: PrefetchConfig, knowledge: Knowledge) -> tuple[PrefetchTemplate, ...]:
    """Expand code filters into concrete templates; fail at start-up on anything unusable."""
    templates: list[PrefetchTemplate] = []
    for key, cfg in config.templates.items():
        where = f"prefetch.templates.{key}"
        _check_tokens(cfg.query, where)
        if not (_READ.fullmatch(cfg.query) or _SEARCH.fullmatch(cfg.query)):
            raise KnowledgeError(
                f"cds.yaml: {where}: not a FHIR read (Type/id) or search (Type?...)"
            )
        query = _with_page_size(cfg.query, config.page_size)
        if cfg.codes is None:
            templates.append(PrefetchTemplate(key, query, cfg.use, cfg.required))
            continue
        if "?" not in cfg.query:
            raise KnowledgeError(f"cds.yaml: {where}: a code filter needs a search template")
        codes = _filter_codes(cfg.codes, knowledge, where)
        if not codes:
            raise KnowledgeError(f"cds.yaml: {where}: the code filter selects no code")
        size = config.max_codes_per_query
        chunks = [codes[i : i + size] for i in range(0, len(codes), size)]
        for n, chunk in enumerate(chunks, start=1):
            chunk_key = key if n == 1 else f"{key}-{n}"
            chunk_query = f"{query}&{cfg.codes.param}={','.join(chunk)}"
            templates.append(PrefetchTemplate(chunk_key, chunk_query, cfg.use, cfg.required))
    keys = [t.key for t in templates]
    if len(keys) != len(set(keys)):
        raise KnowledgeError("cds.yaml: prefetch.templates: split keys collide with other keys")
    for template in templates:
        longest = TOKEN.sub(LONGEST_ID, template.query)
        if len(longest) > config.max_query_length:
            raise KnowledgeError(
                f"cds.yaml: prefetch.templates.{template.key}: query is {len(longest)} characters,"
                f" above max_query_length {config.max_query_length}; lower max_codes_per_query"
            )
    return tuple(templates)


def _with_page_size(query: str, page_size: int) -> str:
    """A search template with `_count` (kept when the template sets its own); reads as they are."""
    if "?" not in query:
        return query
    names = {name for name, _ in parse_qsl(query.split("?", 1)[1], keep_blank_values=True)}
    return query if "_count" in names else f"{query}&_count={page_size}"


def discovery_prefetch(templates: Iterable[PrefetchTemplate]) -> dict[str, str]:
    """The `prefetch` object of the discovery response."""
    return {t.key: t.query for t in templates}


def render(query: str, context: Mapping[str, Any]) -> str:
    """Replace `{{context.x}}` tokens with URL-escaped context values (primitives only)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        field = name.removeprefix("context.")
        raw = context.get(field)
        if not isinstance(raw, str | int | float) or isinstance(raw, bool) or raw == "":
            raise InputError(
                f"context.{field} is needed by a prefetch template", expression=[f"context.{field}"]
            )
        return quote(str(raw), safe="/")

    return TOKEN.sub(value, query)


def parse_query(rendered: str) -> tuple[str, str | None, dict[str, list[str]]]:
    """(resource type, id for a read or None, search parameters) of a rendered template."""
    read = _READ.fullmatch(rendered)
    if read:
        if not is_safe_fhir_id(read.group(2)):
            raise InputError(
                "a prefetch read template rendered to an id that is not a FHIR id"
                " (or is '.' or '..')",
                expression=["context"],
            )
        return read.group(1), read.group(2), {}
    search = _SEARCH.fullmatch(rendered)
    if not search:
        raise InputError("a prefetch template did not render to a FHIR read or search")
    params: dict[str, list[str]] = {}
    for name, val in parse_qsl(search.group(2), keep_blank_values=True):
        params.setdefault(name, []).append(val)
    return search.group(1), None, params


# --- resolution -----------------------------------------------------------------------------


def _has_next_link(bundle: Mapping[str, Any]) -> bool:
    links = bundle.get("link")
    return isinstance(links, list) and any(
        isinstance(link, Mapping) and link.get("relation") == "next" for link in links
    )


def _bundle_resources(bundle: Mapping[str, Any], key: str) -> list[Json]:
    """Matches and includes of a searchset; `outcome` entries (search warnings) are dropped."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InputError(
            f"prefetch.{key}: Bundle.entry is not a list", expression=[f"prefetch.{key}"]
        )
    out: list[Json] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise InputError(
                f"prefetch.{key}: a Bundle entry is not an object", expression=[f"prefetch.{key}"]
            )
        resource = entry.get("resource")
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, Mapping) else None
        if mode == "outcome" or not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "OperationOutcome":
            continue
        out.append(resource)
    return out


def _classify(value: Any, template: PrefetchTemplate) -> tuple[list[Json] | None, str]:
    """(resources, "") when the value can be used, (None, reason) when the key must be fetched."""
    key = template.key
    if value is None:
        return [], ""
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise InputError(
            f"prefetch.{key} is neither a FHIR resource nor null", expression=[f"prefetch.{key}"]
        )
    kind = value["resourceType"]
    if kind == "OperationOutcome":
        return None, ERROR_REPORTED
    if kind == "Bundle":
        if _has_next_link(value):
            return None, INCOMPLETE
        return _bundle_resources(value, key), ""
    return [value], ""


def _fetch(template: PrefetchTemplate, context: Mapping[str, Any], fetcher: Fetcher) -> list[Json]:
    resource_type, resource_id, params = parse_query(render(template.query, context))
    if resource_id is not None:
        resource = fetcher.read(resource_type, resource_id)
        return [] if resource is None else [resource]
    # `_count` is what the EHR is asked for; the service's own fetches page by its own setting.
    params.pop("_count", None)
    return fetcher.search(resource_type, params)


def _fetch_all(
    templates: Sequence[PrefetchTemplate],
    context: Mapping[str, Any],
    factory: FetcherFactory,
    workers: int,
) -> dict[str, list[Json] | FhirDmError]:
    """Fetch several keys (in parallel, one client per worker); errors are returned per key."""

    def one(template: PrefetchTemplate) -> list[Json] | FhirDmError:
        try:
            fetcher = factory()
        except FhirDmError as exc:
            return exc
        try:
            return _fetch(template, context, fetcher)
        except FhirDmError as exc:
            return exc
        finally:
            fetcher.close()

    if workers <= 1 or len(templates) == 1:
        return {t.key: one(t) for t in templates}
    with ThreadPoolExecutor(max_workers=min(workers, len(templates))) as pool:
        return dict(zip((t.key for t in templates), pool.map(one, templates), strict=True))


def _incomplete_message(
    failed: Sequence[tuple[str, FhirDmError]],
    reasons: Mapping[str, str],
    templates: Sequence[PrefetchTemplate],
    given: Mapping[str, Any],
) -> str:
    """Which required keys, why each had to be fetched, why fetching failed, what was sent."""
    keys = "; ".join(f"prefetch key '{key}' {_WHY[reasons[key]]}" for key, _ in failed)
    causes = list(dict.fromkeys(exc.message for _, exc in failed))
    sent = [t.key for t in templates if t.key in given]
    not_sent = [t.key for t in templates if t.key not in given]
    what = f"the request's prefetch had {len(sent)} of {len(templates)} keys"
    if not_sent:
        what += f" (not sent: {', '.join(not_sent)})"
    return (
        f"{keys}. fhir-dm could not fetch it from the EHR's FHIR server: "
        f"{'; '.join(causes)}. Sent: {what}."
    )


def resolve_prefetch(
    templates: Sequence[PrefetchTemplate],
    prefetch: Mapping[str, Any] | None,
    context: Mapping[str, Any],
    fetcher_factory: FetcherFactory,
    *,
    workers: int = DEFAULT_FETCH_WORKERS,
) -> ResolvedPrefetch:
    """Everything the templates ask for, from the prefetch or else from the FHIR server."""
    given = prefetch or {}
    usable: dict[str, list[Json]] = {}
    to_fetch: list[PrefetchTemplate] = []
    reasons: dict[str, str] = {}
    for template in templates:
        if template.key not in given:
            found: list[Json] | None = None
            reason = MISSING
        else:
            found, reason = _classify(given[template.key], template)
        if found is None:
            logger.info("CDS prefetch %s: %s; fetching from the FHIR server", template.key, reason)
            to_fetch.append(template)
            reasons[template.key] = reason
        else:
            usable[template.key] = found

    unavailable: list[str] = []
    failed: list[tuple[str, FhirDmError]] = []
    if to_fetch:
        for key, outcome in _fetch_all(to_fetch, context, fetcher_factory, workers).items():
            template = next(t for t in to_fetch if t.key == key)
            if isinstance(outcome, FhirDmError):
                if template.required:
                    failed.append((key, outcome))
                    continue
                logger.warning(
                    "CDS prefetch %s: optional data unavailable (%s)", key, outcome.message
                )
                unavailable.append(key)
                continue
            usable[key] = outcome
    incomplete: tuple[str, ...] = ()
    if failed:
        message = _incomplete_message(failed, reasons, templates, given)
        if any(t.use == "patient" for t in templates if t.key in dict(failed)):
            raise PreconditionFailedError(
                message, expression=[f"prefetch.{key}" for key, _ in failed]
            ) from failed[0][1]
        logger.warning("CDS prefetch incomplete: %s", ", ".join(key for key, _ in failed))
        incomplete = (message,)

    patient_id = context.get("patientId")
    patient: Json | None = None
    resources: dict[tuple[str, str], Json] = {}
    anonymous: list[Json] = []
    plans: list[Json] = []
    for template in templates:
        for resource in usable.get(template.key, ()):
            kind = resource.get("resourceType")
            if template.use == "patient":
                if kind == "Patient":
                    patient = resource
                continue
            if template.use == "existing-plans":
                if kind == "CarePlan":
                    plans.append(resource)
                continue
            if kind == "Patient":
                continue  # `_include`d or stray patients: only the context patient is assessed
            rid = resource.get("id")
            if isinstance(rid, str) and isinstance(kind, str):
                resources.setdefault((kind, rid), resource)
            else:
                anonymous.append(resource)
    if patient is None:
        raise PreconditionFailedError(
            "the context patient is not available (prefetch null, or not found on the FHIR server)"
        )
    if patient.get("id") != patient_id:
        raise InputError(
            "prefetch patient does not match context.patientId", expression=["prefetch"]
        )
    return ResolvedPrefetch(
        patient=patient,
        resources=(*resources.values(), *anonymous),
        existing_plans=tuple(plans),
        fetched=tuple(t.key for t in to_fetch if t.key in usable),
        unavailable=tuple(unavailable),
        incomplete=incomplete,
        incomplete_types=tuple(
            dict.fromkeys(t.resource_type for t in templates if t.key in dict(failed))
        ),
    )
