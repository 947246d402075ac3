"""Turn an assessment into a dated plan: rounds of tests, add-ons, surveillance, "consider" items.

Rounds are dated from the diagnosis date; red-flag and flare rounds from their event, at any
time (also after the window has closed). The plan depends on the facts and those dates, not
on the day it is computed, except that a later round whose due window has closed undone is
superseded by the next one (listed in `Plan.superseded`, and said in every output; rounds at
diagnosis never are: an undone work-up at diagnosis stays, shown as overdue), and the window
closes once it is over and nothing from it is left owed. Re-running on another day therefore
gives the same items, which is what makes write-back idempotent.

What has been done (clinical-logic §10) is matched to the items here: a record of the test dated
inside the item's due window, or at most the test's lookback before it opens, marks it done
(`PlanItem.done`); each record counts for one item only. A done item stays in the plan (shown
as done with its evidence) but is not ordered again. An overdue item done late is done too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Literal

from fhir_dm.core.dates import add_months
from fhir_dm.core.facts import UNKNOWN, Evidence
from fhir_dm.core.rules import EVENT_ROUND_SCOPES, Assessment, Evaluator, FiredRule
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
    # Done this long before the window opens still counts (clinical-logic §10, per test).
    lookback_months: int = 3
    done: Evidence | None = None

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
    # Later rounds whose due window passed undone: owed, but superseded by the next round.
    superseded: tuple[PlanItem, ...] = field(default=())

    def rounds(self) -> list[tuple[str, str, date, date]]:
        """(id, label, due_start, due_end) of every round that has items, in date order."""
        seen: dict[str, tuple[str, str, date, date]] = {}
        for item in self.items:
            seen.setdefault(
                item.round_id, (item.round_id, item.round_label, item.due_start, item.due_end)
            )
        return sorted(seen.values(), key=lambda r: (r[2], r[0]))

    def overdue(self, item: PlanItem) -> bool:
        return item.done is None and item.due_end < self.assessment.now

    def status(self, item: PlanItem) -> ItemStatus:
        """done / overdue / due / upcoming, relative to the evaluation date."""
        if item.done is not None:
            return "done"
        now = self.assessment.now
        if item.due_end < now:
            return "overdue"
        return "due" if item.due_start <= now else "upcoming"


ItemStatus = Literal["done", "overdue", "due", "upcoming"]
# Order in which outputs list items that need attention first.
STATUS_ORDER: dict[str, int] = {"overdue": 0, "due": 1, "upcoming": 2, "done": 3}


class _Builder:
    def __init__(self, assessment: Assessment, knowledge: Knowledge, anchor: date) -> None:
        self.a = assessment
        self.k = knowledge
        self.rs = knowledge.ruleset
        self.anchor = anchor
        self.items: dict[tuple[str, str], PlanItem] = {}
        self.rounds: dict[str, Round] = {}
        self.anchors: dict[str, date] = {}  # rounds dated from an event, not the diagnosis

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
                self.rs.lookback_months(test_id),
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
            existing.lookback_months,
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


CANCER_SCREENING_KINDS = frozenset({"schedule", "addon", "red-flag", "flare"})


def _done_since(done_on: Mapping[str, date], test_id: str, since: date) -> bool:
    done = done_on.get(test_id)
    return done is not None and done >= since


def _match_done(
    items: list[PlanItem], evidence: tuple[Evidence, ...], used: set[tuple[str, str]]
) -> list[PlanItem]:
    """Mark items done by the earliest unused record inside [opens - lookback, due end].

    Items are taken by due end, each claiming the earliest record that fits, so that one
    record counts for one item only and no item is left undone that another choice would
    have covered (the greedy order is optimal for intervals). `used` is updated.
    """
    out = {item.key: item for item in items}
    for item in sorted(items, key=lambda i: (i.due_end, i.due_start, i.round_id)):
        if item.done is not None:
            continue
        opens = add_months(item.due_start, -item.lookback_months)
        for e in evidence:
            fits = e.test_id == item.test_id and opens <= e.when <= item.due_end
            if fits and (e.test_id, e.reference) not in used:
                used.add((e.test_id, e.reference))
                out[item.key] = replace(item, done=e)
                break
    return [out[item.key] for item in items]


def _match_late(
    items: list[PlanItem], evidence: tuple[Evidence, ...], used: set[tuple[str, str]], now: date
) -> list[PlanItem]:
    """An overdue item is done by a record dated after its window, unless a later item of the
    same test could claim that record (then it belongs to the later round)."""
    out = {item.key: item for item in items}
    for item in sorted(items, key=lambda i: (i.due_end, i.due_start, i.round_id)):
        if item.done is not None or item.due_end >= now:
            continue
        later = [
            add_months(other.due_start, -other.lookback_months)
            for other in items
            if other.test_id == item.test_id and other.due_start > item.due_end
        ]
        until = min(later) if later else None
        for e in evidence:
            if e.test_id != item.test_id or (e.test_id, e.reference) in used:
                continue
            if e.when > item.due_end and (until is None or e.when < until):
                used.add((e.test_id, e.reference))
                out[item.key] = replace(item, done=e)
                break
    return [out[item.key] for item in items]


def _guideline_items(b: _Builder, a: Assessment, knowledge: Knowledge) -> None:
    """The tier's rounds, the add-ons, antibody testing and lung surveillance."""
    rs = knowledge.ruleset
    facts = a.facts
    assert a.tier is not None
    tier_rule = _tier_rule(a, knowledge)
    for rnd in rs.schedule_rounds(a.tier):
        b.register_round(rnd)
        b.add_panels(rnd.panels, rnd, tier_rule)
        for test_id in rnd.tests:
            b.add(test_id, rnd, tier_rule)

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
    names = {x.id: x.label for x in rs.antibodies}
    if testing.when_preliminary_on_antibodies and a.preliminary:
        prelim = [p.partition(":")[2] for p in a.preliminary_unknowns]
        untested += [
            ab
            for ab in prelim
            if ab in names and ab not in untested and facts.antibody(ab).value is UNKNOWN
        ]
    if untested:
        rule = FiredRule(
            "antibody-testing",
            "missing-data",
            "Cancer-relevant myositis antibodies untested or equivocal",
            testing.evidence,
            testing.source,
            tuple(
                f"{names[x]} {'equivocal' if facts.antibody(x).note == 'equivocal' else 'untested'}"
                for x in untested
            ),
            tuple(s for x in untested for s in facts.antibody(x).sources),
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


def _red_flag_items(b: _Builder, a: Assessment, knowledge: Knowledge, closed: bool) -> None:
    """Red flags: join the diagnosis round, or a round of their own dated from the event."""
    rs = knowledge.ruleset
    facts = a.facts
    red = [f for f in rs.red_flags.facts if facts.feature(f).is_true()]
    if not red:
        return
    labels = tuple(f.replace("_", " ") for f in red)
    sources = tuple(s for f in red for s in facts.feature(f).sources)
    dates = [d for f in red if (d := facts.feature(f).when) is not None]
    latest = max(dates) if dates else None
    rule = FiredRule(
        "red-flags",
        "red-flag",
        rs.red_flags.label,
        rs.red_flags.evidence,
        rs.red_flags.source,
        labels + ((f"latest red flag {latest.isoformat()}",) if latest else ()),
        sources,
    )
    condition_text = f"{rs.red_flags.label}: {', '.join(labels)}"
    if a.scope == "in-scope" and not closed and rs.red_flags.round in b.rounds:
        rnd = b.rounds[rs.red_flags.round]
        if latest is None or latest <= b.window_for(rnd)[1]:
            b.add_panels(
                rs.red_flags.add_panels,
                rnd,
                rule,
                conditional=rs.red_flags.conditional,
                condition_text=condition_text,
            )
            return
    event = rs.red_flags.event_round
    # Dated from the red flag, never before the diagnosis (an undated one: the diagnosis).
    b.anchors[event.id] = max(latest, b.anchor) if latest else b.anchor
    since = add_months(b.anchors[event.id], -rs.red_flags.unless_done_within_months)
    for panel in rs.red_flags.add_panels:
        for test_id in rs.panels[panel].tests:
            if _done_since(facts.screening_done, test_id, since):
                continue  # done recently enough
            b.add(
                test_id,
                event,
                rule,
                conditional=rs.red_flags.conditional,
                condition_text=condition_text,
            )


def _flare_items(b: _Builder, a: Assessment, knowledge: Knowledge) -> None:
    """A flare after remission: a round dated from the flare, at any time (not IMACS)."""
    facts = a.facts
    flare = facts.feature("flare")
    if not flare.is_true():
        return
    flare_rule = knowledge.ruleset.flare
    rule = FiredRule(
        "flare",
        "flare",
        "Flare after remission: re-screen for cancer (not IMACS)",
        flare_rule.evidence,
        flare_rule.source,
        ("disease flare after remission" + (f" on {flare.when}" if flare.when else ""),),
        flare.sources,
    )
    when = flare.when or b.anchor
    b.anchors[flare_rule.round.id] = when
    since = add_months(when, -flare_rule.unless_done_within_months)
    for panel in flare_rule.add_panels:
        for test_id in knowledge.ruleset.panels[panel].tests:
            if _done_since(facts.screening_done, test_id, since):
                continue  # done recently enough
            b.add(test_id, flare_rule.round, rule, not_imacs=True)


def _oncology_items(items: list[PlanItem], a: Assessment, knowledge: Knowledge) -> list[PlanItem]:
    """With a known cancer (or a checkpoint inhibitor) cancer screening becomes "consider"."""
    rs = knowledge.ruleset
    texts = []
    if a.facts.feature("active_malignancy").is_true():
        texts.append(rs.active_malignancy.consider_text)
    if any(n.id == "checkpoint-inhibitor" for n in a.notices):
        texts.append(rs.checkpoint_inhibitor.consider_text)
    if not texts:
        return items
    out = []
    for item in items:
        if any(r.kind in CANCER_SCREENING_KINDS for r in item.rules):
            text = "; ".join(texts)
            item = replace(
                item,
                conditional=True,
                condition_text=f"{item.condition_text}; {text}" if item.conditional else text,
            )
        out.append(item)
    return out


def build_plan(assessment: Assessment, knowledge: Knowledge) -> Plan:
    """Schedule every test the rules call for; pure function of the assessment."""
    a = assessment
    if a.scope not in EVENT_ROUND_SCOPES or a.window is None:
        return Plan(a, None, "")
    rs = knowledge.ruleset
    facts = a.facts
    anchor = a.window[0]
    anchor_source = (
        facts.iim.diagnosis_source
        if facts.iim and facts.iim.diagnosed
        else ("evaluation date (diagnosis date unknown)")
    )
    b = _Builder(a, knowledge, anchor)
    if a.scope == "in-scope" and a.tier is not None:
        _guideline_items(b, a, knowledge)

    past_window = a.now > a.window[1]
    used: set[tuple[str, str]] = set()
    evidence = facts.screening_evidence
    guideline = []
    superseded = []
    for item in _match_done(list(b.items.values()), evidence, used):
        rnd = b.rounds[item.round_id]
        if item.due_start > a.window[1]:
            continue
        if item.done is None and item.due_end < a.now and rnd.offset_months > 0:
            # The next round supersedes it (work-ups at diagnosis stay, overdue); said in
            # every output, never dropped silently.
            superseded.append(item)
            continue
        guideline.append(item)
    guideline = _match_late(guideline, evidence, used, a.now)
    if past_window:
        # The window is over: what was done is no longer owed.
        guideline = [item for item in guideline if item.done is None]
    closed = a.scope == "in-scope" and past_window and not guideline
    if closed:
        a = replace(
            a,
            scope="window-closed",
            scope_reason=rs.scope.window_closed_reason.format(
                years=int(rs.scope.window_years.value), diagnosis=anchor.isoformat()
            ),
        )
        b.a = a
    b.items = {item.key: item for item in guideline}
    _red_flag_items(b, a, knowledge, closed)
    _flare_items(b, a, knowledge)

    items = _match_done(list(b.items.values()), evidence, used)
    keep = _oncology_items(items, a, knowledge)
    order = list(rs.tests)
    keep.sort(key=lambda i: (i.due_start, i.round_id, order.index(i.test_id)))
    superseded.sort(key=lambda i: (i.due_start, i.round_id, order.index(i.test_id)))
    if closed:
        superseded = []  # the window has closed: the rounds it held are no longer owed
    return Plan(a, anchor, anchor_source, tuple(keep), tuple(superseded))
