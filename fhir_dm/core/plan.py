"""Turn an assessment into a dated plan: rounds of tests, add-ons, surveillance, "consider" items.

Rounds are dated from the diagnosis date; red-flag and flare rounds from their event, at any
time (also after the window has closed). The items depend on the facts and those dates, not on
the day the plan is computed, which is what makes write-back idempotent; the day only decides
each item's status (clinical-logic §13): upcoming, due, overdue, done, done late, or missed.

Every firm item lapses some day (`PlanItem.lapses_on`, from the round's `lapses` rule): a yearly
round when the next one opens, the last round at the window's end date + a grace, the work-up
at diagnosis at the window's end date (then one notice asks to confirm it was done). A lapsed
item is "missed": kept in the plan's history, never dropped, never ordered. "Consider" items are
never overdue and lapse with their round. The window is closed once its end date has passed and
no firm item is owed; done and missed items stay in the plan.

What has been done (clinical-logic §10) is matched to the items here: a record of the test dated
inside the item's due window, or at most the test's lookback before it opens, marks it done
(`PlanItem.done`); one dated after the window but before the item lapses marks it done late.
Each record counts for one item only. A done item stays in the plan but is not ordered again.
Only items whose round is open now (or opens within the order lead time) are ordered
(`Plan.orders_now`); later rounds and "consider" items are plan activities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Literal

from fhir_dm.core.dates import add_months
from fhir_dm.core.facts import UNKNOWN, Evidence
from fhir_dm.core.rules import (
    PLAN_SCOPES,
    Assessment,
    Evaluator,
    FiredRule,
    Notice,
    feature_label,
)
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
    # The day an undone item stops being owed ("missed" from then), and why, as said
    # ("missed: superseded by the 24 months round"; §13).
    lapses_on: date | None = None
    lapse_note: str = ""
    # A test the plan can order (a ServiceRequest), not a plan activity such as an examination.
    orderable: bool = True
    # Said with the item (an alternative such as "or PET-CT instead", an age-dependent choice).
    note: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.round_id, self.test_id)


ItemStatus = Literal["upcoming", "due", "overdue", "done", "done-late", "missed"]
# Order in which outputs list items: what needs attention first, the history last.
STATUS_ORDER: dict[str, int] = {
    "overdue": 0,
    "due": 1,
    "upcoming": 2,
    "done-late": 3,
    "done": 4,
    "missed": 5,
}
OWED_STATUSES = frozenset({"upcoming", "due", "overdue"})


@dataclass(frozen=True, slots=True)
class Plan:
    """The dated items for one patient (empty when the patient is out of scope)."""

    assessment: Assessment
    anchor: date | None
    anchor_source: str
    items: tuple[PlanItem, ...] = field(default=())
    # Orders for a round are written this many months before it opens (§13).
    order_lead_months: int = 1

    def rounds(self) -> list[tuple[str, str, date, date]]:
        """(id, label, due_start, due_end) of every round that has items, in date order."""
        seen: dict[str, tuple[str, str, date, date]] = {}
        for item in self.items:
            seen.setdefault(
                item.round_id, (item.round_id, item.round_label, item.due_start, item.due_end)
            )
        return sorted(seen.values(), key=lambda r: (r[2], r[0]))

    def status(self, item: PlanItem) -> ItemStatus:
        """The item's status on the evaluation date (clinical-logic §13)."""
        if item.done is not None:
            return "done-late" if item.done.when > item.due_end else "done"
        now = self.assessment.now
        if now < item.due_start:
            return "upcoming"
        if item.lapses_on is not None and now >= item.lapses_on:
            return "missed"
        if now <= item.due_end or item.conditional:
            # A "consider" item is never overdue: it stays open until its round lapses.
            return "due"
        return "overdue"

    def overdue(self, item: PlanItem) -> bool:
        return self.status(item) == "overdue"

    def owed(self, item: PlanItem) -> bool:
        """A firm item still owed: upcoming, due or overdue (never a "consider" item)."""
        return not item.conditional and self.status(item) in OWED_STATUSES

    def orders_now(self, item: PlanItem) -> bool:
        """Whether the item is a ServiceRequest now: a firm, orderable, undone item of a round
        that is open, or opens within the lead time (later rounds are plan activities)."""
        if not item.orderable or item.conditional or item.done is not None:
            return False
        status = self.status(item)
        if status in ("due", "overdue"):
            return True
        return status == "upcoming" and self.assessment.now >= add_months(
            item.due_start, -self.order_lead_months
        )

    def missed(self) -> tuple[PlanItem, ...]:
        """Items that lapsed undone (firm and "consider"), in plan order."""
        return tuple(i for i in self.items if self.status(i) == "missed")

    @property
    def open(self) -> bool:
        """Whether the plan still runs: its window's end date has not passed, or a firm item is
        still owed. "Consider" items never keep a plan open (clinical-logic §6, §13 rev 3)."""
        window = self.assessment.window
        if window is None or not self.items:
            return False
        return self.assessment.now <= window[1] or any(map(self.owed, self.items))


class _Builder:
    def __init__(self, assessment: Assessment, knowledge: Knowledge, anchor: date) -> None:
        self.a = assessment
        self.k = knowledge
        self.rs = knowledge.ruleset
        self.anchor = anchor
        self.items: dict[tuple[str, str], PlanItem] = {}
        self.rounds: dict[str, Round] = {}
        self.anchors: dict[str, date] = {}  # rounds dated from an event, not the diagnosis
        # The rounds of each series (the tier's schedule, the lung rounds), for lapse dates.
        self.series: dict[str, tuple[Round, ...]] = {}

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
            uncertain = self.a.facts.sex_uncertain
            if uncertain:
                # The records disagree on sex (clinical-logic §2 rev 3): every sex-specific
                # test is "consider", whichever sex it is for, and says why.
                conditional = True
                why = self.rs.clinical_sex.consider_text.format(test_sex=test.sex, reason=uncertain)
                condition_text = f"{condition_text}; {why}" if condition_text else why
            elif sex is UNKNOWN:
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
        # Merged into the existing item: what was matched to it (done, lapse) stays.
        self.items[key] = replace(
            existing,
            conditional=not firm,
            condition_text=""
            if firm
            else "; ".join(
                dict.fromkeys(t for t in (existing.condition_text, condition_text) if t)
            ),
            rules=existing.rules
            + tuple(r for r in (rule,) if r.id not in {x.id for x in existing.rules}),
            labelled_not_imacs=existing.labelled_not_imacs and not_imacs,
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
    """An undone item is done late by a record dated after its window and before it lapses,
    unless a later item of the same test could claim that record (it belongs to that round)."""
    out = {item.key: item for item in items}
    for item in sorted(items, key=lambda i: (i.due_end, i.due_start, i.round_id)):
        if item.done is not None or item.due_end >= now:
            continue
        limits = [
            add_months(other.due_start, -other.lookback_months)
            for other in items
            if other.test_id == item.test_id and other.due_start > item.due_end
        ]
        if item.lapses_on is not None:
            limits.append(item.lapses_on)
        until = min(limits) if limits else None
        for e in evidence:
            if e.test_id != item.test_id or (e.test_id, e.reference) in used:
                continue
            if e.when > item.due_end and (until is None or e.when < until):
                used.add((e.test_id, e.reference))
                out[item.key] = replace(item, done=e)
                break
    return [out[item.key] for item in items]


def _round_tests(b: _Builder, rnd: Round) -> set[str]:
    return {t for panel in rnd.panels for t in b.rs.panels[panel].tests} | set(rnd.tests)


def _with_lapse(items: list[PlanItem], b: _Builder, window_end: date) -> list[PlanItem]:
    """Date when each item stops being owed, by its round's `lapses` rule (§13)."""
    grace = b.rs.plan_life.overdue_grace_months
    out = []
    for item in items:
        rnd = b.rounds[item.round_id]
        rule = rnd.lapses or "next-round"
        lapses_on: date | None = None
        note = ""
        if rule == "next-round":
            # The next round of the series that repeats this test supersedes it (never before
            # the item's own window has ended).
            series = next((s for s in b.series.values() if rnd in s), ())
            later = sorted(
                (
                    r
                    for r in series
                    if r.offset_months > rnd.offset_months and item.test_id in _round_tests(b, r)
                ),
                key=lambda r: r.offset_months,
            )
            if later:
                opens = b.window_for(later[0])[0]
                lapses_on = max(opens, item.due_end + timedelta(days=1))
                note = f"missed: superseded by the {later[0].label} round"
            else:
                rule = "due-end-grace"
        if rule == "window-end":
            lapses_on, note = window_end, "missed: window closed"
        elif rule == "window-end-grace":
            lapses_on, note = add_months(window_end, grace), "missed: window closed"
        elif rule == "due-end-grace":
            lapses_on, note = add_months(item.due_end, grace), "missed: its round has passed"
        elif rule == "never":
            lapses_on, note = None, ""
        orderable = b.rs.tests[item.test_id].kind == "order"
        out.append(replace(item, lapses_on=lapses_on, lapse_note=note, orderable=orderable))
    return out


def _guideline_items(b: _Builder, a: Assessment, knowledge: Knowledge) -> None:
    """The tier's rounds, the add-ons and antibody testing."""
    rs = knowledge.ruleset
    facts = a.facts
    assert a.tier is not None
    tier_rule = _tier_rule(a, knowledge)
    b.series["schedule"] = rs.schedule_rounds(a.tier)
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


def _lung_items(b: _Builder, a: Assessment, knowledge: Knowledge) -> None:
    """The lung programme (not IMACS, ACR/CHEST 2023), whatever the cancer scope: screening at
    diagnosis for every adult IIM but the excluded subtypes; monitoring for ILD, anti-MDA5 or an
    antisynthetase antibody (juvenile-onset too), anti-MDA5 with an earlier first PFT."""
    rs = knowledge.ruleset
    lung = rs.lung_surveillance
    evaluator = Evaluator(a.facts, knowledge)
    monitored = evaluator(lung.when)
    if monitored.value is True:
        rule = FiredRule(
            "lung-surveillance",
            "surveillance",
            lung.label,
            lung.evidence,
            lung.source,
            monitored.facts,
            monitored.sources,
        )
        rounds = list(lung.rounds)
        early = lung.early
        if early is not None and evaluator(early.when).value is True:
            rounds = [early.round if r.id == early.replaces else r for r in rounds]
        b.series["lung"] = tuple(rounds)
        for rnd in rounds:
            for test_id in rnd.tests:
                b.add(test_id, rnd, rule, not_imacs=True)
        return
    screening = lung.screening
    if screening is None or a.scope not in screening.scopes:
        return
    rule = FiredRule(
        "lung-screening",
        "surveillance",
        screening.label,
        screening.evidence,
        screening.source,
        ("adult-onset IIM",),
        (a.facts.iim.reference,) if a.facts.iim else (),
    )
    # Done in the months before the diagnosis: not screened again. Done since: the round's own
    # item, shown done (its order completed), not dropped.
    since = add_months(b.anchor, -screening.unless_done_within_months)
    for test_id in screening.round.tests:
        before = [
            e
            for e in a.facts.screening_evidence
            if e.test_id == test_id and since <= e.when < b.anchor
        ]
        if not before:
            b.add(test_id, screening.round, rule, not_imacs=True)


def _outside_guideline_items(b: _Builder, a: Assessment, knowledge: Knowledge) -> None:
    """Outside the guideline: never a silent "nothing" (one "consider" item, with the notice)."""
    net = knowledge.ruleset.outside_guideline
    if a.scope not in net.scopes:
        return
    rule = FiredRule(
        "outside-guideline",
        "outside-guideline",
        net.label,
        net.evidence,
        net.source,
        (a.scope_reason.strip(),),
        (a.facts.iim.reference,) if a.facts.iim else (),
    )
    for test_id in net.round.tests:
        b.add(test_id, net.round, rule, conditional=True, condition_text=net.notice)


def _red_flags(a: Assessment, knowledge: Knowledge, anchor: date) -> tuple[list[str], date | None]:
    """The red flags present and the latest dated one (never the date of a cancer found after
    the myositis: that is cancer-associated myositis, not a red flag; §6 rev 3)."""
    facts = a.facts
    red = []
    dates = []
    for name in knowledge.ruleset.red_flags.facts:
        fact = facts.feature(name)
        if not fact.is_true():
            continue
        if name == "personal_history_cancer":
            if fact.when is not None and fact.when > anchor:
                continue
            red.append(name)  # a past cancer counts from the diagnosis, not its own date
            continue
        red.append(name)
        if fact.when is not None:
            dates.append(fact.when)
    return red, max(dates) if dates else None


def _red_flag_items(
    b: _Builder, a: Assessment, knowledge: Knowledge, closed: bool, open_tests: set[str]
) -> None:
    """Red flags: join the diagnosis round, or a round of their own dated from the event.

    Whatever the tier, after the window and outside the guideline (juvenile-onset: the notice
    only). A test answers a red flag only when done on or after its date; a test already open
    in another round is not proposed twice (§6, §13)."""
    rs = knowledge.ruleset
    facts = a.facts
    if a.scope in rs.red_flags.notice_only_scopes:
        return  # the notice only (rules.py)
    red, latest = _red_flags(a, knowledge, b.anchor)
    if not red:
        return
    labels = tuple(feature_label(knowledge, f) for f in red)
    sources = tuple(s for f in red for s in facts.feature(f).sources)
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
    since = b.anchors[event.id]
    for panel in rs.red_flags.add_panels:
        for test_id in rs.panels[panel].tests:
            if _done_since(facts.screening_done, test_id, since) or test_id in open_tests:
                continue  # answered (done on or after the red flag), or open elsewhere
            b.add(
                test_id,
                event,
                rule,
                conditional=rs.red_flags.conditional,
                condition_text=condition_text,
            )


def _flare_items(b: _Builder, a: Assessment, knowledge: Knowledge, open_tests: set[str]) -> None:
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
    targeted = flare_rule.targeted_when
    if targeted is not None and Evaluator(facts, knowledge)(targeted).value is not True:
        return  # no high-risk antibody or past cancer: the review notice only (rules.py)
    when = flare.when or b.anchor
    b.anchors[flare_rule.round.id] = when
    since = add_months(when, -flare_rule.unless_done_within_months)
    for panel in flare_rule.add_panels:
        for test_id in knowledge.ruleset.panels[panel].tests:
            if _done_since(facts.screening_done, test_id, since) or test_id in open_tests:
                continue  # done recently enough, or open in another round
            b.add(
                test_id,
                flare_rule.round,
                rule,
                conditional=flare_rule.conditional,
                condition_text=flare_rule.consider_text,
                not_imacs=True,
            )


def _with_notes(items: list[PlanItem], a: Assessment, knowledge: Knowledge) -> list[PlanItem]:
    """Alternatives (an add-on that may replace a test) and configured notes on items."""
    rs = knowledge.ruleset
    evaluator = Evaluator(a.facts, knowledge, tier=a.tier)
    present = {i.test_id for i in items}
    notes: dict[str, list[str]] = {}
    for addon in rs.addons:
        if addon.alternative_to and set(addon.tests) & present:
            fired = any(r.id == addon.id for i in items for r in i.rules)
            if fired:
                for test_id in addon.alternative_to:
                    notes.setdefault(test_id, []).append(addon.alternative_note)
    for item_note in rs.item_notes:
        if item_note.test in present and evaluator(item_note.when).value is True:
            notes.setdefault(item_note.test, []).append(item_note.note)
    if not notes:
        return items
    return [
        replace(i, note="; ".join(notes[i.test_id])) if i.test_id in notes else i for i in items
    ]


IMACS_ROUND_KINDS = frozenset({"schedule", "addon"})


def _cancer_associated(
    items: list[PlanItem], a: Assessment, knowledge: Knowledge, anchor: date
) -> list[PlanItem]:
    """A cancer recorded after the myositis diagnosis (active or in remission) ends the IMACS
    occult-cancer rounds: they answered their question (§6 rev 3). Rounds after it are not
    planned; undone items of earlier ones end on its date (said, never silently dropped); done
    items stay. Lung surveillance and antibody testing are unaffected."""
    found = min(
        (c.when for c in a.facts.cancers if c.when is not None and c.when > anchor),
        default=None,
    )
    if found is None:
        return items
    note = knowledge.ruleset.plan_life.ended_by_cancer.format(date=found.isoformat())
    out = []
    for item in items:
        if not any(r.kind in IMACS_ROUND_KINDS for r in item.rules) or item.done is not None:
            out.append(item)
        elif item.due_start <= found:
            out.append(replace(item, lapses_on=found, lapse_note=note))
    return out


def _oncology_items(items: list[PlanItem], a: Assessment, knowledge: Knowledge) -> list[PlanItem]:
    """With a known, implied or possible cancer (or a checkpoint inhibitor) cancer screening
    becomes "consider"."""
    rs = knowledge.ruleset
    notices = {n.id for n in a.notices}
    texts = []
    if "possible-malignancy" in notices:
        texts.append(rs.possible_malignancy.consider_text)
    if a.facts.feature("active_malignancy").is_true():
        texts.append(rs.active_malignancy.consider_text)
    elif "cancer-associated" in notices:
        texts.append(rs.cancer_associated.consider_text)
    if "cancer-implied" in notices:
        texts.append(rs.cancer_implied.consider_text)
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
    if a.scope not in PLAN_SCOPES or a.window is None:
        return Plan(a, None, "")
    rs = knowledge.ruleset
    facts = a.facts
    anchor = a.window[0]
    window_end = a.window[1]
    anchor_source = (
        facts.iim.diagnosis_source
        if facts.iim and facts.iim.diagnosed
        else ("evaluation date (diagnosis date unknown)")
    )
    b = _Builder(a, knowledge, anchor)
    if a.scope == "in-scope" and a.tier is not None:
        _guideline_items(b, a, knowledge)
    _lung_items(b, a, knowledge)

    used: set[tuple[str, str]] = set()
    evidence = facts.screening_evidence
    guideline = [
        item
        for item in _with_lapse(list(b.items.values()), b, window_end)
        if item.due_start <= window_end
    ]
    guideline = _match_done(guideline, evidence, used)
    guideline = _match_late(guideline, evidence, used, a.now)
    draft = Plan(a, anchor, anchor_source, tuple(guideline))
    # The window closes once its end date has passed and no firm item is owed (§13).
    closed = a.scope == "in-scope" and a.now > window_end and not any(map(draft.owed, guideline))
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
    # Tests open in a round now (due or overdue, not done): not proposed a second time.
    open_tests = {i.test_id for i in guideline if draft.status(i) in ("due", "overdue")}
    _red_flag_items(b, a, knowledge, closed, open_tests)
    _flare_items(b, a, knowledge, open_tests)
    _outside_guideline_items(b, a, knowledge)

    fresh = [item for item in b.items.values() if item.lapses_on is None]
    lapsed = _with_lapse(fresh, b, window_end)
    b.items.update((item.key, item) for item in lapsed)
    items = _match_done(list(b.items.values()), evidence, used)
    items = _match_late(items, evidence, used, a.now)
    items = _cancer_associated(items, a, knowledge, anchor)
    keep = _with_notes(_oncology_items(items, a, knowledge), a, knowledge)
    order = list(rs.tests)
    keep.sort(key=lambda i: (i.due_start, i.round_id, order.index(i.test_id)))
    plan = Plan(a, anchor, anchor_source, tuple(keep), rs.plan_life.order_lead_months)
    workup = [
        i
        for i in plan.missed()
        if not i.conditional and b.rounds[i.round_id].lapses == "window-end"
    ]
    if workup:
        # The work-up at diagnosis lapses into one notice, never orders years later (§13).
        life = rs.plan_life
        tests = ", ".join(rs.tests[i.test_id].display for i in workup)
        notice = Notice(
            "workup-not-recorded",
            life.workup_not_recorded.format(tests=tests),
            life.evidence,
            life.source,
        )
        plan = replace(plan, assessment=replace(a, notices=(*a.notices, notice)))
    return plan
