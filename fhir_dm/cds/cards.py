"""Cards from one patient's result (pure): the screening plan to accept, or the plan on file.

Card types (stable ids the feedback endpoint counts by):

- `screening-plan`: the tier, why, and the proposed schedule, with one suggestion that creates
  the very resources the write-back produces (RiskAssessment, CarePlan, ServiceRequests and,
  by default, the Provenance).
- `plan-on-file`: an active plan of the same series (server patient, rule-set family) and
  rule-set version is already on the EHR's server, so nothing is proposed again (no nagging).
- `not-applicable`: optional (config), for an IIM the guideline does not stratify.

Patients without an IIM get no card at all.

Suggestion actions are FHIR resources without `fullUrl`s, so intra-suggestion references use
the CDS Hooks 2.0 convention for multi-action suggestions: the client processes the actions
as one FHIR transaction with its `fhirServer` as the base of each entry's inferred full URL
(`{fhirServer}/{type}/{id}`). Every created resource therefore carries an `id` (the UUID of the
core's `urn:uuid:` fullUrl) and every reference between them is relative (`CarePlan/{id}`);
the server rewrites them to the ids it assigns, as transaction processing requires.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_dm.cds.models import Action, Card, Coding, Indicator, Link, Source, Suggestion
from fhir_dm.cds.settings import CdsConfig
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import PatientResult
from fhir_dm.core.build.common import plan_definition_url
from fhir_dm.core.explain import Explanation, ScheduleRow
from fhir_dm.core.plan import STATUS_ORDER
from fhir_dm.knowledge.models import Knowledge

Json = dict[str, Any]

CARD_SCREENING_PLAN = "screening-plan"
CARD_PLAN_ON_FILE = "plan-on-file"
CARD_NOT_APPLICABLE = "not-applicable"
CARD_TYPES = (CARD_SCREENING_PLAN, CARD_PLAN_ON_FILE, CARD_NOT_APPLICABLE)

# Namespace of card and suggestion UUIDs (uuid5 of service, hookInstance and card type).
CARD_NAMESPACE = uuid.UUID("6f1d1c52-3a57-4d0c-9a52-51c7f0a0d3e1")
URN_UUID = "urn:uuid:"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


@dataclass(frozen=True, slots=True)
class IssuedCard:
    """A card and what the feedback store needs to attribute feedback to it."""

    card: Card
    card_type: str
    tier: str | None
    suggestion_uuid: str | None


def card_uuid(service_id: str, hook_instance: str, card_type: str, part: str = "card") -> str:
    """Deterministic per call and card type: a retried call gets the same uuids."""
    return str(uuid.uuid5(CARD_NAMESPACE, f"{service_id}|{hook_instance}|{card_type}|{part}"))


# --- markdown -------------------------------------------------------------------------------


def md(text: str) -> str:
    """Escape text for GitHub-flavoured Markdown (no links, HTML or tables from data)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _bullets(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    return ["", f"**{title}**", "", *(f"- {md(i)}" for i in items)]


def _round_rows(schedule: Sequence[ScheduleRow]) -> list[str]:
    """One table row per round and due window: definite tests, then "consider" items."""
    groups: dict[tuple[str, str, str, str], list[ScheduleRow]] = {}
    # Overdue first, then due, upcoming, done and missed (clinical-logic §13); one row per status.
    for row in sorted(schedule, key=lambda r: STATUS_ORDER.get(r.status, 9)):
        key = (row.status, row.round_label, row.due_start, row.due_end)
        groups.setdefault(key, []).append(row)
    lines = ["| When | Due | Status | Tests | Consider |", "|---|---|---|---|---|"]
    for (status, label, start, end), rows in groups.items():
        due = f"{start} to {end}"
        shown = f"**{status}**" if status == "overdue" else status
        tests = "; ".join(
            md(r.test)
            + (" (not IMACS)" if r.not_imacs else "")
            + (f" (by {md(r.evidence)})" if r.evidence else "")
            for r in rows
            if not r.consider
        )
        consider = "; ".join(
            dict.fromkeys(md(r.condition or f"Consider {r.test}") for r in rows if r.consider)
        )
        lines.append(f"| {md(label)} | {due} | {shown} | {tests or '-'} | {consider or '-'} |")
    return lines


def render_detail(
    explanation: Explanation,
    *,
    max_findings: int,
    orders: int | None,
    unavailable: Sequence[str] = (),
) -> str:
    """The card detail: headline, notices, reasons, schedule, unknowns, findings, rule set."""
    e = explanation
    lines = [f"**{md(e.headline)}**"]
    if e.preliminary:
        lines.append("")
        lines.append("*Preliminary*: the tier may rise once the missing results are known.")
    lines += ["", "A proposal for a clinician to review: nothing is ordered until it is accepted."]
    lines += _bullets("Please note", e.notices)
    lines += _bullets("Why", e.reasons)
    if e.schedule:
        lines += [
            "",
            "**Proposed schedule** (" + md("; ".join(e.dates) or "dates unknown") + ")",
            "",
            *_round_rows(e.schedule),
        ]
    lines += _bullets("Missed (no longer owed)", e.missed)
    if e.unknown_facts:
        lines += [
            "",
            "**Not recorded** (unknown, not negative): " + md(", ".join(e.unknown_facts)) + ".",
        ]
    if e.findings and max_findings:
        shown = e.findings[:max_findings]
        more = len(e.findings) - len(shown)
        title = "Input not used" + (f" (first {len(shown)} of {len(e.findings)})" if more else "")
        lines += _bullets(title, shown)
    if unavailable:
        lines += [
            "",
            "**Not checked** (the EHR could not provide it): " + md(", ".join(unavailable)) + ".",
        ]
    if orders is not None:
        lines += [
            "",
            f"Accepting the suggestion creates the care plan, {orders} proposed order"
            f"{'' if orders == 1 else 's'} and the risk assessment in the record.",
        ]
    lines += ["", f"Rule set {md(e.ruleset)}; {md(e.guideline)}."]
    return "\n".join(lines)


def render_concise_detail(
    explanation: Explanation,
    factors: Sequence[tuple[str, str]],
    *,
    orders: int | None,
    unavailable: Sequence[str] = (),
    max_next: int = 3,
    max_unknown: int = 5,
    app_link: bool = False,
) -> str:
    """A short card detail: tier, why in one line, the next due items; the rest is in the app.

    `factors` are (label, evidence level) of the risk factors that set the tier.
    """
    e = explanation
    lines = [f"**{md(e.headline)}**"]
    if e.preliminary:
        lines += ["", "*Preliminary*: the tier may rise once the missing results are known."]
    why = "; ".join(f"{label} (evidence {evidence})" for label, evidence in factors)
    lines += ["", "**Why**: " + md(why or "no risk factor was recorded") + "."]
    pending = [r for r in e.attention_first() if r.status in ("overdue", "due", "upcoming")][
        :max_next
    ]
    if pending:
        lines += ["", "**Next**:"]
        lines += [f"- {md(r.test)}: {r.status} ({r.due_start} to {r.due_end})" for r in pending]
    if e.unknown_facts:
        shown = ", ".join(e.unknown_facts[:max_unknown])
        more = len(e.unknown_facts) - max_unknown
        shown += f" and {more} more" if more > 0 else ""
        lines += ["", "**Not recorded** (unknown, not negative): " + md(shown)]
    if unavailable:
        lines += [
            "",
            "**Not checked** (the EHR could not provide it): " + md(", ".join(unavailable)),
        ]
    if orders is not None:
        lines += [
            "",
            f"A proposal for a clinician to review: accepting it creates the care plan, {orders}"
            f" proposed order{'' if orders == 1 else 's'} and the risk assessment.",
        ]
    if app_link:
        lines += ["", "The whole schedule and its timeline are in the app (link below)."]
    lines += ["", f"Rule set {md(e.ruleset)}."]
    return "\n".join(lines)


# --- suggestion -----------------------------------------------------------------------------


def _rewrite_references(node: Any, ids: Mapping[str, str]) -> Any:
    """Replace `urn:uuid:` references to other suggestion resources with `Type/id`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in ids:
                out[key] = ids[value]
            else:
                out[key] = _rewrite_references(value, ids)
        return out
    if isinstance(node, list):
        return [_rewrite_references(item, ids) for item in node]
    return node


def _describe(resource: Json, explanation: Explanation, summary_label: str) -> str:
    kind = resource["resourceType"]
    if kind == "RiskAssessment":
        tier = explanation.tier_label or "not stratified"
        if explanation.preliminary:
            tier += " (preliminary)"
        return f"Record the risk assessment: {tier} ({summary_label})"
    if kind == "CarePlan":
        return f"Create the IIM cancer screening care plan ({resource.get('intent', 'proposal')})"
    if kind == "ServiceRequest":
        what = (resource.get("code") or {}).get("text") or "screening test"
        occurrence = resource.get("occurrencePeriod") or {}
        due = f", due {occurrence.get('start')} to {occurrence.get('end')}" if occurrence else ""
        return f"Propose {what}{due} ({resource.get('intent', 'proposal')})"
    if kind == "Provenance":
        return "Record where the plan came from (software, rule set, guideline, data used)"
    return f"Create a {kind}"


def suggestion_actions(
    result: PatientResult, *, include_provenance: bool, summary_label: str
) -> list[Action]:
    """One action per write-back entry: `create` for POSTs, `update` for PUTs (the Provenance).

    Resources and identifiers are exactly those of `result.entries`; only `urn:uuid:`
    references become relative references (see the module doc). A created resource gets the
    UUID of its fullUrl as `id`; a PUT keeps its own id, the one its request URL names.
    """
    ids: dict[str, str] = {}
    for entry in result.entries:
        full_url = entry.get("fullUrl", "")
        if not full_url.startswith(URN_UUID):
            continue
        if entry["request"]["method"] == "PUT":
            ids[full_url] = entry["request"]["url"]
        else:
            ids[full_url] = f"{entry['resource']['resourceType']}/{full_url.removeprefix(URN_UUID)}"
    actions: list[Action] = []
    for entry in result.entries:
        method = entry["request"]["method"]
        if entry["resource"]["resourceType"] == "Provenance" and not include_provenance:
            continue
        # A new tree (every dict and list rebuilt), so the core's resources stay untouched.
        resource: Json = _rewrite_references(entry["resource"], ids)
        if method == "POST":
            full_url = entry.get("fullUrl", "")
            if full_url in ids:
                resource["id"] = ids[full_url].split("/", 1)[1]
        actions.append(
            Action(
                type="update" if method == "PUT" else "create",
                description=_describe(resource, result.explanation, summary_label),
                resource=resource,
            )
        )
    return actions


# --- plan on file ---------------------------------------------------------------------------


def _has_identifier(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(
        isinstance(i, Mapping) and i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def find_plan_on_file(
    result: PatientResult, plans: Sequence[Mapping[str, Any]], knowledge: Knowledge
) -> Mapping[str, Any] | None:
    """An active CarePlan of the same series and rule-set version, newest first."""
    identity = result.identity
    canonical = plan_definition_url(knowledge)
    matches = [
        p
        for p in plans
        if p.get("resourceType") == "CarePlan"
        and p.get("status") == "active"
        and _has_identifier(p, identity.series_system, identity.series)
        and canonical in (p.get("instantiatesCanonical") or [])
    ]
    if not matches:
        return None
    return max(
        matches,
        key=lambda p: str(p.get("created") or (p.get("meta") or {}).get("lastUpdated") or ""),
    )


# --- cards ----------------------------------------------------------------------------------


class CardBuilder:
    """Builds the cards of one service from results; holds only configuration (thread-safe).

    Usage::

        builder = CardBuilder(knowledge, config)
        issued = builder.cards(result, hook_instance=req.hook_instance, existing_plans=plans)
    """

    def __init__(
        self, knowledge: Knowledge, config: CdsConfig, *, app_launch_url: str | None = None
    ) -> None:
        """`app_launch_url`: the SMART app's launch URL; each card links to it (type smart)."""
        self.knowledge = knowledge
        self.config = config
        cards = config.cards
        rs = knowledge.ruleset
        missing = [t.id for t in rs.tiers.levels if t.id not in cards.indicators]
        if missing:
            raise KnowledgeError(f"cds.yaml: cards.indicators: no indicator for tier(s) {missing}")
        if cards.topic.system not in knowledge.terminology.systems:
            raise KnowledgeError(
                f"cds.yaml: cards.topic.system: unknown alias '{cards.topic.system}'"
            )
        self.source = Source(
            label=cards.source_label,
            url=rs.guideline.url,
            topic=Coding(
                system=knowledge.terminology.system_url(cards.topic.system),
                code=cards.topic.code,
                display=cards.topic.display,
            ),
        )
        self.links = [Link(label=cards.guideline_link_label, url=rs.guideline.url, type="absolute")]
        if app_launch_url is not None:
            # The EHR launches the app on the card's patient (CDS Hooks `links`, type smart).
            self.links.append(Link(label=cards.app_link_label, url=app_launch_url, type="smart"))
        self.app_link = app_launch_url is not None
        reasons = config.override_reasons
        self.override_reasons = [
            Coding(system=reasons.system, code=r.code, display=r.display) for r in reasons.reasons
        ] or None

    @property
    def service_id(self) -> str:
        return self.config.service.id

    def _indicator(self, tier: str | None) -> Indicator:
        return self.config.cards.indicators.get(tier or "", "info")

    def _summary(self, text: str) -> str:
        return f"{text} ({self.config.cards.summary_label})"

    def cards(
        self,
        result: PatientResult,
        *,
        hook_instance: str,
        existing_plans: Sequence[Mapping[str, Any]] = (),
        unavailable: Sequence[str] = (),
    ) -> list[IssuedCard]:
        """The cards for one patient: [], a plan-on-file card, or the screening-plan card."""
        a = result.plan.assessment
        # A plan exists in scope, and also for red-flag / flare rounds after the window.
        if result.care_plan is None:
            if a.facts.iim is None or not self.config.cards.not_applicable_card:
                return []
            return [self._not_applicable(result, hook_instance)]
        on_file = find_plan_on_file(result, existing_plans, self.knowledge)
        if on_file is not None:
            return [self._plan_on_file(result, on_file, hook_instance)]
        return [self._screening_plan(result, hook_instance, unavailable)]

    def _tier_text(self, result: PatientResult) -> str:
        e = result.explanation
        return (e.tier_label or "not stratified") + (", preliminary" if e.preliminary else "")

    def _screening_plan(
        self, result: PatientResult, hook_instance: str, unavailable: Sequence[str]
    ) -> IssuedCard:
        cards = self.config.cards
        orders = len(result.service_requests)
        suggestion_id = card_uuid(self.service_id, hook_instance, CARD_SCREENING_PLAN, "suggestion")
        suggestion = Suggestion(
            label=f"Create the screening plan ({orders} order{'' if orders == 1 else 's'})",
            uuid=suggestion_id,
            is_recommended=True,
            actions=suggestion_actions(
                result,
                include_provenance=cards.include_provenance,
                summary_label=cards.summary_label,
            ),
        )
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_SCREENING_PLAN),
            summary=self._summary(f"IIM cancer screening: {self._tier_text(result)}"),
            detail=render_concise_detail(
                result.explanation,
                [(f.label, f.evidence) for f in result.plan.assessment.factors],
                orders=orders,
                unavailable=unavailable,
                app_link=self.app_link,
            ),
            indicator=self._indicator(result.tier),
            source=self.source,
            suggestions=[suggestion],
            selection_behavior="any",
            override_reasons=self.override_reasons,
            links=self.links,
        )
        return IssuedCard(card, CARD_SCREENING_PLAN, result.tier, suggestion_id)

    def _plan_on_file(
        self, result: PatientResult, plan: Mapping[str, Any], hook_instance: str
    ) -> IssuedCard:
        e = result.explanation
        when = str(plan.get("created") or (plan.get("meta") or {}).get("lastUpdated") or "")[:10]
        ref = f"CarePlan/{plan.get('id')}" if plan.get("id") else "a CarePlan"
        lines = [
            f"An active IIM cancer screening plan is on file ({md(ref)}"
            + (f", created {md(when)}" if when else "")
            + f"), from rule set {md(e.ruleset)}. No new plan is proposed.",
        ]
        # The plan is revised in place; its version marker says which assessment it shows.
        identity = result.identity
        same = _has_identifier(plan, identity.digest_system, identity.digest_value())
        if not same:
            lines += [
                "",
                f"**The record now gives a different result**: {md(e.headline)}. "
                "Review the plan on file; a re-assessment through the service's write-back "
                "revises it.",
            ]
        lines += ["", f"Rule set {md(e.ruleset)}; {md(e.guideline)}."]
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_PLAN_ON_FILE),
            summary=self._summary(f"IIM cancer screening plan on file: {self._tier_text(result)}"),
            detail="\n".join(lines),
            indicator=self.config.cards.plan_on_file_indicator,
            source=self.source,
            links=self.links,
        )
        return IssuedCard(card, CARD_PLAN_ON_FILE, result.tier, None)

    def _not_applicable(self, result: PatientResult, hook_instance: str) -> IssuedCard:
        e = result.explanation
        detail = "\n".join(
            [
                f"**{md(e.headline)}**",
                *_bullets("Please note", e.notices),
                "",
                f"Rule set {md(e.ruleset)}; {md(e.guideline)}.",
            ]
        )
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_NOT_APPLICABLE),
            summary=self._summary("IIM cancer screening: not applicable"),
            detail=detail,
            indicator="info",
            source=self.source,
            links=self.links,
        )
        return IssuedCard(card, CARD_NOT_APPLICABLE, None, None)
