"""Turn an assessment into a dated plan: rounds of tests, add-ons, surveillance, "consider" items.

The plan depends on the facts and the onset date, not on the day it is computed, except that
rounds whose due window has already closed are dropped (rounds at diagnosis never are: an
undone work-up at diagnosis stays, shown as overdue). Re-running on another day therefore gives the
same plan, which is what makes write-back idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from fhir_dm.core.dates import add_months
from fhir_dm.core.facts import UNKNOWN
from fhir_dm.core.rules import Assessment, Evaluator, FiredRule
from fhir_dm.knowledge.models import Knowledge, Round


@dataclass(frozen=True, slots=True)
class PlanItem:
    """One test in one round, with why it is there."""

    test_id: str
    round_id: str
    round_label: str
    due_start: date
    due_end: date
    conditional: bool
    condition_text: str
    rules: tuple[FiredRule, ...]
    labelled_not_imacs: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.round_id, self.test_id)


@dataclass(frozen=True, slots=True)
class Plan:
    """The dated items for one patient (empty when the patient is out of scope)."""

    assessment: Assessment
    anchor: date | None
    anchor_source: str
    items: tuple[PlanItem, ...] = field(default=())

    def rounds(self) -> list[tuple[str, str, date, date]]:
        """(id, label, due_start, due_end) of every round that has items, in date order."""
        seen: dict[str, tuple[str, str, date, date]] = {}
        for item in self.items:
            seen.setdefault(
                item.round_id, (item.round_id, item.round_label, item.due_start, item.due_end)
            )
        return sorted(seen.values(), key=lambda r: (r[2], r[0]))

    def overdue(self, item: PlanItem) -> bool:
        return item.due_end < self.assessment.now


class _Builder:
    def __init__(self, assessment: Assessment, knowledge: Knowledge, anchor: date) -> None:
        self.a = assessment
        self.k = knowledge
        self.rs = knowledge.ruleset
        self.anchor = anchor
        self.items: dict[tuple[str, str], PlanItem] = {}
        self.rounds: dict[str, Round] = {}
        self.anchors: dict[str, date] = {}  # rounds dated from another event than onset

    def window_for(self, rnd: Round) -> tuple[date, date]:
        start = add_months(self.anchors.get(rnd.id, self.anchor), rnd.offset_months)
        return start, add_months(start, rnd.due_within_months)

    def register_round(self, rnd: Round) -> None:
        self.rounds.setdefault(rnd.id, rnd)

    def add(
        self,
        test_id: str,
        rnd: Round,
        rule: FiredRule,
        *,
        conditional: bool = False,
        condition_text: str = "",
        not_imacs: bool = False,
    ) -> None:
        self.register_round(rnd)
        test = self.rs.tests[test_id]
        sex = self.a.facts.sex.value
        if test.sex is not None:
            if sex is UNKNOWN:
                conditional = True
                condition_text = (
                    condition_text or f"if appropriate ({test.sex}-specific test; sex not recorded)"
                )
            elif sex != test.sex:
                return
        start, end = self.window_for(rnd)
        key = (rnd.id, test_id)
        existing = self.items.get(key)
        if existing is None:
            self.items[key] = PlanItem(
                test_id,
                rnd.id,
                rnd.label,
                start,
                end,
                conditional,
                condition_text if conditional else "",
                (rule,),
                not_imacs,
            )
            return
        firm = not existing.conditional or not conditional
        self.items[key] = PlanItem(
            test_id,
            rnd.id,
            rnd.label,
            start,
            end,
            not firm,
            "" if firm else existing.condition_text,
            existing.rules
            + tuple(r for r in (rule,) if r.id not in {x.id for x in existing.rules}),
            existing.labelled_not_imacs and not_imacs,
        )

    def add_panels(
        self,
        panels: tuple[str, ...],
        rnd: Round,
        rule: FiredRule,
        *,
        conditional: bool = False,
        condition_text: str = "",
    ) -> None:
        for panel in panels:
            for test_id in self.rs.panels[panel].tests:
                self.add(test_id, rnd, rule, conditional=conditional, condition_text=condition_text)

    def round_named(self, round_id: str) -> Round:
        if round_id in self.rounds:
            return self.rounds[round_id]
        tier_rounds = self.rs.schedule_rounds(self.a.tier or self.rs.tiers.default)
        return next((r for r in tier_rounds if r.id == round_id), tier_rounds[0])


def _tier_rule(a: Assessment, knowledge: Knowledge) -> FiredRule:
    rs = knowledge.ruleset
    schedule = rs.schedules[a.tier or rs.tiers.default]
    facts = tuple(f.label for f in a.factors if f.kind in ("factor-high", "factor-intermediate"))
    sources = tuple(dict.fromkeys(s for f in a.factors for s in f.sources))
    label = f"{rs.tiers.level(a.tier or rs.tiers.default).label} schedule"
    return FiredRule(
        f"schedule-{a.tier}",
        "schedule",
        label,
        schedule.evidence,
        schedule.source,
        facts or ("no high- or intermediate-risk factor recorded",),
        sources,
    )


def build_plan(assessment: Assessment, knowledge: Knowledge) -> Plan:
    """Schedule every test the rules call for; pure function of the assessment."""
    a = assessment
    facts = a.facts
    if not a.in_scope or a.tier is None or a.window is None:
        return Plan(a, None, "")
    rs = knowledge.ruleset
    anchor = a.window[0]
    anchor_source = (
        facts.iim.onset_source
        if facts.iim and facts.iim.onset
        else "evaluation date (onset unknown)"
    )
    b = _Builder(a, knowledge, anchor)

    tier_rule = _tier_rule(a, knowledge)
    for rnd in rs.schedule_rounds(a.tier):
        b.register_round(rnd)
        b.add_panels(rnd.panels, rnd, tier_rule)
        for test_id in rnd.tests:
            b.add(test_id, rnd, tier_rule)

    red = [f for f in rs.red_flags.facts if facts.feature(f).is_true()]
    if red:
        labels = tuple(f.replace("_", " ") for f in red)
        sources = tuple(s for f in red for s in facts.feature(f).sources)
        rule = FiredRule(
            "red-flags",
            "red-flag",
            rs.red_flags.label,
            rs.red_flags.evidence,
            rs.red_flags.source,
            labels,
            sources,
        )
        b.add_panels(
            rs.red_flags.add_panels,
            b.round_named(rs.red_flags.round),
            rule,
            conditional=rs.red_flags.conditional,
            condition_text=f"{rs.red_flags.label}: {', '.join(labels)}",
        )

    flare = facts.feature("flare")
    if flare.is_true():
        flare_rule = rs.flare
        rule = FiredRule(
            "flare",
            "flare",
            "Flare after remission: re-screen for cancer (not IMACS)",
            flare_rule.evidence,
            flare_rule.source,
            ("disease flare after remission" + (f" on {flare.when}" if flare.when else ""),),
            flare.sources,
        )
        b.anchors[flare_rule.round.id] = flare.when or a.now
        for panel in flare_rule.add_panels:
            for test_id in rs.panels[panel].tests:
                done = facts.screening_done.get(test_id)
                if done and add_months(done, flare_rule.unless_done_within_months) >= a.now:
                    continue  # done recently enough
                b.add(test_id, flare_rule.round, rule, not_imacs=True)

    evaluator = Evaluator(facts, knowledge, tier=a.tier)
    for addon in rs.addons:
        result = evaluator(addon.when)
        if result.value is not True:
            continue
        rule = FiredRule(
            addon.id,
            "addon",
            addon.label,
            addon.evidence,
            addon.source,
            result.facts,
            result.sources,
        )
        for test_id in addon.tests:
            b.add(
                test_id,
                b.round_named(addon.round),
                rule,
                conditional=addon.conditional,
                condition_text=addon.label,
            )

    testing = rs.antibody_testing
    untested = [ab for ab in testing.when_untested if facts.antibody(ab).value is UNKNOWN]
    if untested:
        names = {x.id: x.label for x in rs.antibodies}
        rule = FiredRule(
            "antibody-testing",
            "missing-data",
            "Cancer-relevant myositis antibodies untested",
            testing.evidence,
            testing.source,
            tuple(f"{names[x]} untested" for x in untested),
            (),
        )
        b.add(testing.test, b.round_named(testing.round), rule)

    lung = rs.lung_surveillance
    result = evaluator(lung.when)
    if result.value is True:
        rule = FiredRule(
            "lung-surveillance",
            "surveillance",
            lung.label,
            lung.evidence,
            lung.source,
            result.facts,
            result.sources,
        )
        for rnd in lung.rounds:
            for test_id in rnd.tests:
                b.add(test_id, rnd, rule, not_imacs=True)

    keep = []
    for item in b.items.values():
        if item.due_end < a.now and b.rounds[item.round_id].offset_months > 0:
            continue  # a later round has superseded it; work-ups at diagnosis stay, overdue
        if item.due_start > a.window[1]:
            continue
        keep.append(item)
    keep.sort(key=lambda i: (i.due_start, i.round_id, list(rs.tests).index(i.test_id)))
    return Plan(a, anchor, anchor_source, tuple(keep))
