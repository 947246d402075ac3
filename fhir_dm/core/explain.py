"""Plain-language explanation of an assessment and plan, shared by every output format.

The RiskAssessment notes, the CarePlan narrative, the CLI summary and the CDS Hooks card all
render this one structure, so they never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fhir_dm.core.plan import STATUS_ORDER, Plan, PlanItem
from fhir_dm.knowledge.models import Knowledge

FACTOR_CLASS_LABELS = {
    "factor-high": "High-risk factor",
    "factor-intermediate": "Intermediate-risk factor",
    "factor-low": "Low-risk factor (recorded; does not change the tier)",
}


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One line of the schedule table."""

    round_label: str
    test: str
    due_start: str
    due_end: str
    consider: bool
    condition: str
    overdue: bool
    rules: str
    not_imacs: bool
    # upcoming / due / overdue / done / done-late / missed on the evaluation date (§13).
    status: str = "upcoming"
    # For a done item: the record that shows it, e.g. "DiagnosticReport/7 (2026-05-02)".
    evidence: str = ""
    # Said with the item: an alternative ("or PET-CT instead"), an age-dependent choice.
    note: str = ""
    # A ServiceRequest now (`Plan.orders_now`); else a CarePlan activity only (a later round,
    # a "consider" item, a test done or missed, or one that is not orderable).
    order: bool = False


@dataclass(frozen=True, slots=True)
class Explanation:
    """Everything a clinician reads about one patient's assessment."""

    headline: str
    tier_label: str | None
    preliminary: bool
    reasons: tuple[str, ...]
    notices: tuple[str, ...]
    unknown_facts: tuple[str, ...]
    findings: tuple[str, ...]
    schedule: tuple[ScheduleRow, ...]
    ruleset: str
    guideline: str
    onset: str
    dates: tuple[str, ...] = ()
    # Items that lapsed undone, one line each (kept in the history, never dropped silently).
    missed: tuple[str, ...] = ()
    # The rule ids, evidence levels and sources behind the reasons, one line per rule: kept out
    # of the reasons (clinical words) and shown where a reader asks for them.
    evidence: tuple[str, ...] = ()

    @property
    def orders(self) -> int:
        """Items that are ServiceRequests now."""
        return sum(r.order for r in self.schedule)

    @property
    def activities(self) -> int:
        """Items that are CarePlan activities only (the rest of the schedule)."""
        return len(self.schedule) - self.orders

    def counts_line(self) -> str:
        """The plan's size, orders and activities named apart so that they add up, e.g.
        "Proposed: 34 service requests and 8 care-plan activities (42 items)"."""
        if not self.schedule:
            return "Proposed: nothing."
        return (
            f"Proposed: {_n(self.orders, 'service request')} and "
            f"{_n(self.activities, 'care-plan activity', 'care-plan activities')} "
            f"({_n(len(self.schedule), 'item')})"
        )

    def attention_first(self) -> tuple[ScheduleRow, ...]:
        """The schedule with overdue items first, then due, upcoming, done, missed (stable)."""
        return tuple(sorted(self.schedule, key=lambda r: STATUS_ORDER.get(r.status, 9)))


def _n(count: int, one: str, many: str = "") -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


# A trailing note in parentheses on a rule's label says how the rule reads the record
# ("(exact age; 40 years and 1 day counts)"): for the rule's reader, not the clinician's.
_LABEL_NOTE = re.compile(r"\s*\([^()]*\)\s*$")


def clinical_label(label: str) -> str:
    """A rule's label without its trailing rule-writing note in parentheses."""
    return _LABEL_NOTE.sub("", label) or label


def factor_text(label: str, facts: tuple[str, ...]) -> str:
    """A factor in clinical words: its label, and what the record showed when that says more
    ("age at onset over 40 (age at onset 75)"); never the rule id or the sources."""
    short = clinical_label(label)
    shown = [f for f in facts if f.lower() != short.lower()]
    return f"{short} ({'; '.join(shown)})" if shown else short


def _row(plan: Plan, item: PlanItem, knowledge: Knowledge) -> ScheduleRow:
    test = knowledge.ruleset.tests[item.test_id]
    return ScheduleRow(
        round_label=item.round_label,
        test=test.display,
        due_start=item.due_start.isoformat(),
        due_end=item.due_end.isoformat(),
        consider=item.conditional,
        condition=item.condition_text,
        overdue=plan.overdue(item),
        rules=", ".join(r.id for r in item.rules),
        not_imacs=item.labelled_not_imacs,
        status=plan.status(item),
        evidence=evidence_text(item),
        note=item.note,
        order=plan.orders_now(item),
    )


def evidence_text(item: PlanItem) -> str:
    """How outputs name the record that shows an item done (and what it covered)."""
    if item.done is None:
        return ""
    note = item.done.note
    shown = f"{item.done.reference} ({item.done.when.isoformat()})"
    return f"{shown}: {note}" if note else shown


def _missed_line(item: PlanItem, knowledge: Knowledge) -> str:
    test = knowledge.ruleset.tests[item.test_id].display
    kind = "consider item " if item.conditional else ""
    return (
        f"{item.round_label}: {kind}{test} (due {item.due_start.isoformat()} to "
        f"{item.due_end.isoformat()}) was not done; {item.lapse_note}"
    )


def explain(plan: Plan, knowledge: Knowledge) -> Explanation:
    """Build the explanation of one patient's plan."""
    a = plan.assessment
    rs = knowledge.ruleset
    tier_label = rs.tiers.level(a.tier).label if a.tier else None
    if a.in_scope and tier_label:
        headline = f"{tier_label} of IIM-associated cancer" + (
            " (preliminary)" if a.preliminary else ""
        )
    elif a.scope == "window-closed" and tier_label:
        headline = f"{tier_label} of IIM-associated cancer; the screening window has closed"
    else:
        headline = f"Not stratified: {a.scope_reason}"
    # Notices that must be read before the plan come first, in the headline too (§12 rev 3).
    first = [n.headline for n in a.notices if n.headline]
    if first:
        headline = ". ".join([*first, headline])
    notices = sorted(a.notices, key=lambda n: not n.headline)
    reasons = []
    evidence = []
    for f in a.factors:
        label = FACTOR_CLASS_LABELS.get(f.kind, f.kind)
        reasons.append(f"{label}: {factor_text(f.label, f.facts)}")
        evidence.append(f"{f.label}: rule {f.id}; evidence {f.evidence}: {f.source}")
    if a.in_scope and not a.factors:
        reasons.append("No risk factor was recorded.")
    if a.scope == "window-closed":
        reasons.append(a.scope_reason)
    if a.preliminary:
        reasons.append(
            "Preliminary: the tier could rise once these are known: "
            + ", ".join(a.preliminary_because)
            + "."
        )
    for item_rules in {
        r.id: r
        for i in plan.items
        for r in i.rules
        if r.kind in ("red-flag", "flare", "missing-data")
    }.values():
        reasons.append(f"{clinical_label(item_rules.label)}: {'; '.join(item_rules.facts)}")
        evidence.append(
            f"{item_rules.label}: rule {item_rules.id}; evidence {item_rules.evidence}"
            + (f": {item_rules.source}" if item_rules.source else "")
        )
    if a.tier is not None and rs.cohort_rates is not None:
        # Cohort figures to support shared decisions, never a prediction for this patient.
        reasons.append(rs.cohort_rates.text)
    iim = a.facts.iim
    onset = "unknown"
    if iim and iim.onset:
        onset = f"{iim.onset} (from {iim.onset_source})"
    return Explanation(
        headline=headline,
        tier_label=tier_label,
        preliminary=a.preliminary,
        reasons=tuple(reasons),
        notices=tuple(n.text for n in notices),
        unknown_facts=a.unknown_facts,
        findings=a.facts.findings,
        schedule=tuple(_row(plan, item, knowledge) for item in plan.items),
        ruleset=rs.label,
        guideline=f"{rs.title} (doi:{rs.guideline.doi})",
        onset=onset,
        dates=a.dates_used,
        missed=tuple(_missed_line(i, knowledge) for i in plan.missed()),
        evidence=tuple(evidence),
    )
