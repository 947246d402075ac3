"""Cards from one patient's result (pure): the screening plan to accept, or the plan on file.

Card types (stable ids the feedback endpoint counts by):

- `screening-plan`: the tier, why, and the proposed schedule, with one suggestion that creates
  the very resources the write-back produces (RiskAssessment, CarePlan, ServiceRequests and,
  by default, the Provenance).
- `plan-on-file`: an active plan of the same series (server patient, rule-set family) and
  rule-set version is already on the EHR's server, so nothing is proposed again (no nagging).
- `plan-changed`: an active plan of the same series is on file, but the record now gives
  another plan (its digest differs: another tier, other due orders): a warning naming both,
  with a suggestion to revise it when the service writes accepted suggestions.
- `not-applicable`: optional (config), for an IIM the guideline does not stratify.
- `assessment-incomplete`: a required prefetch key could not be had completely; no tier and
  no plan are given, and the card says why (an EHR shows nothing for an error answer).

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

from fhir_dm.cds.models import (
    MAX_SUMMARY_CHARS,
    Action,
    Card,
    Coding,
    Indicator,
    Link,
    Source,
    Suggestion,
)
from fhir_dm.cds.settings import CdsConfig
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import PatientResult
from fhir_dm.core.build.common import plan_definition_url
from fhir_dm.core.explain import Explanation, ScheduleRow
from fhir_dm.core.plan import STATUS_ORDER, PlanItem
from fhir_dm.knowledge.models import Knowledge

Json = dict[str, Any]

CARD_SCREENING_PLAN = "screening-plan"
CARD_PLAN_ON_FILE = "plan-on-file"
CARD_NOT_APPLICABLE = "not-applicable"
CARD_PLAN_CHANGED = "plan-changed"
CARD_INCOMPLETE = "assessment-incomplete"
CARD_TYPES = (
    CARD_SCREENING_PLAN,
    CARD_PLAN_ON_FILE,
    CARD_PLAN_CHANGED,
    CARD_NOT_APPLICABLE,
    CARD_INCOMPLETE,
)

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


# --- plan on file: what it says ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanOnFile:
    """What a stored plan says about itself: its tier (from its title) and order count."""

    reference: str
    created: str
    tier_label: str | None
    preliminary: bool
    orders: int

    def text(self) -> str:
        tier = self.tier_label or "not stratified"
        tier += " (preliminary)" if self.preliminary else ""
        return f"{tier}, {self.orders} order{'' if self.orders == 1 else 's'}"


def read_plan_on_file(plan: Mapping[str, Any], knowledge: Knowledge) -> PlanOnFile:
    """The tier and orders of a plan this service wrote (its title names the tier's label)."""
    title = str(plan.get("title") or "")
    labels = sorted((t.label for t in knowledge.ruleset.tiers.levels), key=len, reverse=True)
    tier = next((label for label in labels if label in title), None)
    orders = sum(
        1
        for activity in plan.get("activity") or []
        if isinstance(activity, Mapping)
        and str((activity.get("reference") or {}).get("reference", "")).startswith(
            ("ServiceRequest/", URN_UUID)
        )
    )
    return PlanOnFile(
        reference=f"CarePlan/{plan['id']}" if plan.get("id") else "a CarePlan",
        created=str(plan.get("created") or (plan.get("meta") or {}).get("lastUpdated") or "")[:10],
        tier_label=tier,
        preliminary="(preliminary)" in title,
        orders=orders,
    )


# --- cards ----------------------------------------------------------------------------------

TIER_KINDS = ("factor-high", "factor-intermediate")
NOW_STATUSES = ("overdue", "due")


@dataclass(frozen=True, slots=True)
class NextList:
    """The "Next" lines of a card, and how many more items the plan holds."""

    lines: tuple[str, ...]
    more: int
    overdue: int
    due: int

    def markdown(self, title: str = "Next") -> list[str]:
        if not self.lines:
            return []
        out = ["", f"**{title}**:", *(f"- {line}" for line in self.lines)]
        if self.more:
            out.append(f"- and {self.more} more (the whole schedule is in the plan)")
        return out


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
        unknown = [
            t for t in (*cards.next.plan_changing_tests, *cards.next.key_tests) if t not in rs.tests
        ]
        if unknown:
            raise KnowledgeError(f"cds.yaml: cards.next: unknown test id(s) {unknown}")
        self.factor_labels = {f.id: f.shown for f in rs.factors}
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
        revise_on_accept: bool = False,
    ) -> list[IssuedCard]:
        """The cards for one patient: [], a plan-on-file card, or the screening-plan card.

        `revise_on_accept`: the service writes accepted suggestions for this call (the
        write-back), so a changed plan's card can offer to revise it.
        """
        a = result.plan.assessment
        # A plan exists in scope, and also for red-flag / flare rounds after the window.
        if result.care_plan is None:
            if a.facts.iim is None or not self.config.cards.not_applicable_card:
                return []
            return [self._not_applicable(result, hook_instance)]
        on_file = find_plan_on_file(result, existing_plans, self.knowledge)
        if on_file is not None:
            identity = result.identity
            if _has_identifier(on_file, identity.digest_system, identity.digest_value()):
                return [self._plan_on_file(result, on_file, hook_instance)]
            return [self._plan_changed(result, on_file, hook_instance, revise_on_accept)]
        return [self._screening_plan(result, hook_instance, unavailable)]

    # --- wording ------------------------------------------------------------------------

    def _tier_text(self, result: PatientResult) -> str:
        e = result.explanation
        return (e.tier_label or "not stratified") + (" (preliminary)" if e.preliminary else "")

    def why_items(self, result: PatientResult) -> list[str]:
        """The one-line why, in clinical words: the factors that set the tier (high first)."""
        a = result.plan.assessment
        if a.tier is None:
            return [a.scope_reason.strip().rstrip(".")] if a.scope_reason.strip() else []
        factors = sorted(
            (f for f in a.factors if f.kind in TIER_KINDS), key=lambda f: TIER_KINDS.index(f.kind)
        )
        items = list(dict.fromkeys(self.factor_labels.get(f.id, f.label) for f in factors))
        if a.preliminary and a.preliminary_because:
            items.append("untested: " + ", ".join(a.preliminary_because))
        return items or ["no risk factor recorded"]

    def _titled(self, head: str, items: Sequence[str]) -> str:
        """`head: item, item +N more (label)`, as many items as the summary length allows."""
        suffix = f" ({self.config.cards.summary_label})"
        for n in range(len(items), 0, -1):
            rest = len(items) - n
            text = f"{head} — " + ", ".join(items[:n]) + (f" +{rest} more" if rest else "")
            if len(text) + len(suffix) <= MAX_SUMMARY_CHARS:
                return text + suffix
        return head + suffix

    def next_list(self, result: PatientResult) -> NextList:
        """Overdue first, then what could change the plan, then key tests, then the rest.

        Items due or overdue now; when none is, the items of the next round to open.
        """
        plan = result.plan
        a = plan.assessment
        cfg = self.config.cards.next
        tests = self.knowledge.ruleset.tests
        # "Consider" items only when the plan has nothing firm (a patient not stratified).
        firm = [i for i in plan.items if not i.conditional] or list(plan.items)
        now_items = [i for i in firm if plan.status(i) in NOW_STATUSES]
        overdue = sum(1 for i in now_items if plan.status(i) == "overdue")
        if now_items:
            pool = now_items
        else:
            upcoming = [i for i in firm if plan.status(i) == "upcoming"]
            first = min((i.due_start for i in upcoming), default=None)
            pool = [i for i in upcoming if i.due_start == first]

        def rank(item: PlanItem) -> tuple[int, int, str]:
            if plan.status(item) == "overdue":
                return (0, 0, item.due_end.isoformat())
            if item.test_id in cfg.plan_changing_tests and a.preliminary:
                return (1, cfg.plan_changing_tests.index(item.test_id), "")
            if item.test_id in cfg.key_tests:
                return (2, cfg.key_tests.index(item.test_id), "")
            return (3, 0, "")

        lines: list[str] = []
        seen: set[str] = set()
        for item in sorted(pool, key=rank):  # stable: plan order within a rank
            if item.test_id in seen:
                continue
            seen.add(item.test_id)
            status = plan.status(item)
            name = md(tests[item.test_id].display)
            if item.conditional:
                line = f"Consider {name} (" + md(item.condition_text or item.round_label) + ")"
            elif status == "overdue":
                line = f"**Overdue**: {name} (was due by {item.due_end.isoformat()})"
            elif status == "due":
                line = f"{name}: due by {item.due_end.isoformat()}"
            else:
                line = f"{name}: {md(item.round_label)}, from {item.due_start.isoformat()}"
            if item.test_id in cfg.plan_changing_tests and a.preliminary_because:
                line += "; could raise the tier (" + md(", ".join(a.preliminary_because))
                line += " untested)"
            lines.append(line)
        shown = tuple(lines[: cfg.max_items])
        return NextList(shown, len(lines) - len(shown), overdue, len(now_items) - overdue)

    def _details_line(self, result: PatientResult) -> list[str]:
        """Where the rule ids and evidence are: the app (smart link), else a detail section."""
        e = result.explanation
        if self.app_link:
            return ["", "Rules, evidence and the whole schedule: open the app (link below)."]
        a = result.plan.assessment
        rules = ", ".join(f"{f.id} ({f.evidence})" for f in a.factors)
        lines = ["", "---", "", f"*Details*: rule set {md(e.ruleset)}; {md(e.guideline)}."]
        if rules:
            lines.append(f"Rules applied (evidence level): {md(rules)}.")
        return lines

    def _unknown_lines(self, result: PatientResult, unavailable: Sequence[str]) -> list[str]:
        e = result.explanation
        lines: list[str] = []
        if e.unknown_facts:
            shown = ", ".join(e.unknown_facts[:5])
            more = len(e.unknown_facts) - 5
            shown += f" and {more} more" if more > 0 else ""
            lines += ["", "**Not recorded** (unknown, not negative): " + md(shown)]
        if unavailable:
            lines += [
                "",
                "**Not checked** (the EHR could not provide it): " + md(", ".join(unavailable)),
            ]
        return lines

    # --- the cards ------------------------------------------------------------------------

    def _screening_plan(
        self, result: PatientResult, hook_instance: str, unavailable: Sequence[str]
    ) -> IssuedCard:
        cards = self.config.cards
        e = result.explanation
        orders = len(result.service_requests)
        why = self.why_items(result)
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
        lines = [f"**{md(e.headline)}**"]
        if e.preliminary:
            lines += ["", "*Preliminary*: the tier may rise once the missing results are known."]
        lines += ["", "**Why**: " + md("; ".join(why)) + "."]
        lines += self.next_list(result).markdown()
        lines += self._unknown_lines(result, unavailable)
        made = f"{orders} proposed order{'' if orders == 1 else 's'} and " if orders else ""
        lines += [
            "",
            "A proposal for a clinician to review: accepting it creates the care plan, "
            f"{made}the risk assessment.",
        ]
        lines += self._details_line(result)
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_SCREENING_PLAN),
            summary=self._titled(f"IIM cancer screening: {self._tier_text(result)}", why),
            detail="\n".join(lines),
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
        """The plan on file says what the record gives: what is overdue and due, for 3 years."""
        on_file = read_plan_on_file(plan, self.knowledge)
        nxt = self.next_list(result)
        counts = []
        if nxt.overdue:
            counts.append(f"{nxt.overdue} overdue")
        if nxt.due:
            counts.append(f"{nxt.due} due")
        state = ", ".join(counts) or "nothing due now"
        lines = [
            f"**Plan on file: {md(self._tier_text(result))}**"
            f" ({md(on_file.reference)}"
            + (f", created {md(on_file.created)}" if on_file.created else "")
            + "). No new plan is proposed.",
            "",
            "**Why**: " + md("; ".join(self.why_items(result))) + ".",
        ]
        lines += nxt.markdown("Overdue and due" if nxt.overdue or nxt.due else "Next round")
        lines += self._details_line(result)
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_PLAN_ON_FILE),
            summary=self._summary(f"Plan on file: {self._tier_text(result)}; {state}"),
            detail="\n".join(lines),
            indicator="warning" if nxt.overdue else self.config.cards.plan_on_file_indicator,
            source=self.source,
            links=self.links,
        )
        return IssuedCard(card, CARD_PLAN_ON_FILE, result.tier, None)

    def _plan_changed(
        self,
        result: PatientResult,
        plan: Mapping[str, Any],
        hook_instance: str,
        revise_on_accept: bool,
    ) -> IssuedCard:
        """The record now gives another plan: a warning naming both, offering the revision."""
        on_file = read_plan_on_file(plan, self.knowledge)
        orders = len(result.service_requests)
        now_text = f"{self._tier_text(result)}, {orders} order{'' if orders == 1 else 's'}"
        same_tier = (on_file.tier_label, on_file.preliminary) == (
            result.explanation.tier_label,
            result.explanation.preliminary,
        )
        summary = self._summary(
            f"Plan on file: {on_file.text()}; record now gives: "
            + (now_text if same_tier else self._tier_text(result))
        )
        lines = [
            "**The record now gives a different plan than the one on file.**",
            "",
            f"- On file: {md(on_file.text())} ({md(on_file.reference)}"
            + (f", created {md(on_file.created)}" if on_file.created else "")
            + ")",
            f"- Now: {md(now_text)}",
            "",
            "**Why**: " + md("; ".join(self.why_items(result))) + ".",
        ]
        lines += self.next_list(result).markdown()
        suggestions: list[Suggestion] | None = None
        suggestion_id: str | None = None
        if revise_on_accept:
            suggestion_id = card_uuid(self.service_id, hook_instance, CARD_PLAN_CHANGED, "revise")
            suggestions = [
                Suggestion(
                    label=f"Revise the plan on file to {now_text}",
                    uuid=suggestion_id,
                    is_recommended=True,
                )
            ]
            lines += [
                "",
                "Accepting the suggestion revises the plan on file in place (the service writes"
                " it; orders no longer in the plan are revoked).",
            ]
        else:
            lines += [
                "",
                "Review the plan on file: the app (link below) revises it."
                if self.app_link
                else "Review the plan on file: a re-assessment through the service's write-back"
                " revises it.",
            ]
        lines += self._details_line(result)
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_PLAN_CHANGED),
            summary=summary,
            detail="\n".join(lines),
            indicator=self.config.cards.plan_changed_indicator,
            source=self.source,
            suggestions=suggestions,
            selection_behavior="at-most-one" if suggestions else None,
            override_reasons=self.override_reasons if suggestions else None,
            links=self.links,
        )
        return IssuedCard(card, CARD_PLAN_CHANGED, result.tier, suggestion_id)

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
            summary=self._titled("IIM cancer screening: not stratified", self.why_items(result)),
            detail=detail,
            indicator="info",
            source=self.source,
            links=self.links,
        )
        return IssuedCard(card, CARD_NOT_APPLICABLE, None, None)

    def incomplete(self, hook_instance: str, why: Sequence[str]) -> IssuedCard:
        """Data the assessment needs could not be had: say so, and why (never silence)."""
        lines = [
            "**The cancer-screening assessment is incomplete**: fhir-dm could not get all of"
            " the record it needs, so it gives no tier and no plan (an assessment on part of"
            " the record could understate the risk).",
            "",
            "**Why**:",
            *(f"- {md(reason)}" for reason in why),
            "",
            "Ask the EHR's administrator to let fhir-dm read the rest (the FHIR server on its"
            " allowed list, with an access token, or marked open), then reopen the chart.",
        ]
        card = Card(
            uuid=card_uuid(self.service_id, hook_instance, CARD_INCOMPLETE),
            summary=self._summary("IIM cancer screening: assessment incomplete, record not read"),
            detail="\n".join(lines),
            indicator=self.config.cards.incomplete_indicator,
            source=self.source,
            links=self.links,
        )
        return IssuedCard(card, CARD_INCOMPLETE, None, None)
