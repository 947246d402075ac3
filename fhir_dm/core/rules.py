"""Apply the rule set to a patient's facts: scope, risk factors, tier, preliminary flag.

Predicates are evaluated in three values (true, false, unknown), so an unknown fact never
counts as negative; the tier is computed as recorded and as it could become if the unknowns
that matter were positive, which is what makes a tier preliminary.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from fhir_dm.core.dates import add_months
from fhir_dm.core.facts import UNKNOWN, PatientFacts
from fhir_dm.knowledge.models import Knowledge, Predicate, RuleSet, ScopeId, TierRule

Tri = bool | None  # None = unknown


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A predicate's value and the facts (labels, resource references) that made it so."""

    value: Tri
    facts: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FiredRule:
    """A rule that applies to the patient, with everything needed to explain it."""

    id: str
    kind: str
    label: str
    evidence: str
    source: str
    facts: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a clinician must read with the plan (e.g. a possible paraneoplastic picture)."""

    id: str
    text: str
    evidence: str
    source: str
    sources: tuple[str, ...] = ()
    # A notice that must be read before the plan: said first, in the headline (e.g. a possible
    # cancer the rules could not read).
    headline: str = ""


# The scope of an assessment (the names config uses for it).
ScopeStatus = ScopeId
# Statuses whose patients still get rounds prompted by events (red flags, flare): the guideline
# applies to them or did, and a red flag prompts screening whatever the timing.
EVENT_ROUND_SCOPES = frozenset({"in-scope", "window-closed", "late-diagnosis"})
# Scopes that get a plan of some kind (rule set 1.2.0): the guideline's, the safety net outside
# it (late diagnosis, excluded subtypes such as IBM), the lung programme (juvenile-onset too).
PLAN_SCOPES = EVENT_ROUND_SCOPES | {"excluded-subtype", "juvenile"}


@dataclass(frozen=True, slots=True)
class Assessment:
    """The result of the rules for one patient, before any plan is made."""

    facts: PatientFacts
    ruleset: str
    now: date
    scope: ScopeStatus
    scope_reason: str
    window: tuple[date, date] | None
    tier: str | None
    preliminary: bool
    preliminary_because: tuple[str, ...]
    factors: tuple[FiredRule, ...]
    unknown_facts: tuple[str, ...]
    notices: tuple[Notice, ...]
    # The unknown facts (`tiers.preliminary_if_unknown` ids) that can raise the tier, for
    # rules that act on them (the antibody panel); `preliminary_because` words them.
    preliminary_unknowns: tuple[str, ...] = ()

    @property
    def in_scope(self) -> bool:
        return self.scope == "in-scope"

    @property
    def dates_used(self) -> tuple[str, ...]:
        """Which dates the assessment used, and where each was read from (said in outputs)."""
        iim = self.facts.iim
        if iim is None:
            return ()
        onset = f"{iim.onset} ({iim.onset_source})" if iim.onset else "unknown"
        diagnosis = f"{iim.diagnosed} ({iim.diagnosis_source})" if iim.diagnosed else "unknown"
        out = [f"symptom onset {onset}, for eligibility and age", f"diagnosis {diagnosis}"]
        if self.window is not None:
            start = "the evaluation date" if iim.diagnosed is None else "the diagnosis date"
            out.append(
                f"schedule dated from {start}: {self.window[0].isoformat()} to "
                f"{self.window[1].isoformat()}"
            )
        return tuple(out)


class Evaluator:
    """Evaluates predicates against one patient's facts."""

    def __init__(
        self,
        facts: PatientFacts,
        knowledge: Knowledge,
        *,
        tier: str | None = None,
        assume_positive: frozenset[str] = frozenset(),
    ) -> None:
        self.facts = facts
        self.knowledge = knowledge
        self.tier = tier
        self.assume_positive = assume_positive
        self.unspecified_subtypes = {s.id for s in knowledge.ruleset.subtypes if s.unspecified}
        site = knowledge.site.site
        # Documented site options that count one subtype as another (said in the output).
        self.subtype_as = {
            o.subtype: o.counts_as
            for o in knowledge.ruleset.subtype_options
            if getattr(site, o.site_flag)
        }
        self.labels = {a.id: a.label for a in knowledge.ruleset.antibodies}
        self.labels.update({f.id: f.label for f in knowledge.ruleset.features})

    def __call__(self, p: Predicate) -> Evaluation:
        if p.all is not None:
            parts = [self(child) for child in p.all]
            if any(part.value is False for part in parts):
                return Evaluation(False)
            value: Tri = True if all(part.value is True for part in parts) else None
            return _merge(value, parts)
        if p.any is not None:
            parts = [self(child) for child in p.any]
            if any(part.value is True for part in parts):
                return _merge(True, [part for part in parts if part.value is True])
            return Evaluation(False if all(part.value is False for part in parts) else None)
        if p.subtype_in is not None:
            iim = self.facts.iim
            if iim is None:
                return Evaluation(None)
            if iim.subtype in self.unspecified_subtypes:
                return Evaluation(True if "subtype" in self.assume_positive else None)
            subtype = self.subtype_as.get(iim.subtype, iim.subtype)
            return Evaluation(subtype in p.subtype_in, (self._subtype_label(),), (iim.reference,))
        if p.antibody_positive is not None:
            return self._antibodies(p.antibody_positive, want=True)
        if p.antibody_negative is not None:
            return self._antibodies(p.antibody_negative, want=False)
        if p.onset_age_gt is not None:
            return self._age_over(p.onset_age_gt)
        if p.onset_age_lt is not None:
            over = self._age_over(p.onset_age_lt - 1e-9)
            value = None if over.value is None else not over.value
            return Evaluation(value, over.facts, over.sources)
        if p.sex_is is not None:
            sex = self.facts.sex
            if sex.value is UNKNOWN:
                return Evaluation(True if "sex" in self.assume_positive else None)
            return Evaluation(sex.value in p.sex_is, (f"sex {sex.value}",), sex.sources)
        if p.feature is not None:
            return self._features(p.feature)
        if p.tier_in is not None:
            return Evaluation(self.tier in p.tier_in if self.tier else None, (f"tier {self.tier}",))
        if p.site_flag is not None:
            return Evaluation(
                bool(getattr(self.knowledge.site.site, p.site_flag)),
                (f"site setting {p.site_flag}",),
            )
        if p.regional_risk is not None:
            return self._regional(p.regional_risk)
        raise AssertionError("unreachable: predicates are validated at load time")

    def _regional(self, kind: str) -> Evaluation:
        """Raised regional risk: the site's flag, or the patient's country of birth mapped."""
        site = self.knowledge.site
        if getattr(site.site, f"{kind}_region"):
            return Evaluation(True, (f"site setting {kind}_region",))
        country = self.facts.birth_country
        if country is not None and country.casefold() in site.regional_risk.countries(kind):
            return Evaluation(
                True, (f"born in {country} (raised {kind} risk)",), (self.facts.patient_reference,)
            )
        return Evaluation(False)

    def _subtype_label(self) -> str:
        assert self.facts.iim is not None
        subtype = self.facts.iim.subtype
        return next(s.label for s in self.knowledge.ruleset.subtypes if s.id == subtype)

    def _antibodies(self, names: tuple[str, ...], *, want: bool) -> Evaluation:
        """Any-positive (want=True) or all-negative (want=False) over the named antibodies."""
        hits, unknown = [], False
        for name in names:
            fact = self.facts.antibody(name)
            if fact.value is UNKNOWN:
                if want and f"antibody:{name}" in self.assume_positive:
                    return Evaluation(True, (f"{self.labels[name]} (untested)",))
                unknown = True
                continue
            if want and fact.value is True:
                return Evaluation(True, (f"{self.labels[name]} positive",), fact.sources)
            if not want:
                if fact.value is True:
                    return Evaluation(False)
                hits.append((f"{self.labels[name]} negative", fact.sources))
        if want:
            return Evaluation(None if unknown else False)
        if unknown:
            return Evaluation(None)
        return Evaluation(True, tuple(h[0] for h in hits), tuple(s for h in hits for s in h[1]))

    def _age_over(self, threshold: float) -> Evaluation:
        span = self.facts.onset_age
        if span is None:
            return Evaluation(True if "onset_age" in self.assume_positive else None)
        # Exact age: "over 40" is true from 40 years and 1 day (rule set 1.1.0). With partial
        # dates the age is a span; it decides only when the whole span is on one side.
        youngest, oldest = span
        iim = self.facts.iim
        sources = (self.facts.patient_reference,) + ((iim.reference,) if iim else ())
        label = (
            f"age at onset {int(youngest)}"
            if int(youngest) == int(oldest)
            else f"age at onset {int(youngest)}-{int(oldest)}"
        )
        if youngest > threshold:
            return Evaluation(True, (label,), sources)
        if oldest <= threshold:
            return Evaluation(False, (label,), sources)
        return Evaluation(True if "onset_age" in self.assume_positive else None)

    def _features(self, names: tuple[str, ...]) -> Evaluation:
        unknown = False
        for name in names:
            fact = self.facts.feature(name)
            if fact.value is True:
                return Evaluation(
                    True, (self.labels.get(name, name.replace("_", " ")),), fact.sources
                )
            if fact.value is UNKNOWN:
                unknown = True
        return Evaluation(None if unknown else False)


def _merge(value: Tri, parts: list[Evaluation]) -> Evaluation:
    return Evaluation(
        value,
        tuple(f for part in parts for f in part.facts),
        tuple(dict.fromkeys(s for part in parts for s in part.sources)),
    )


def tier_rule(rs: RuleSet, high: int, intermediate: int) -> TierRule | None:
    """The first tier rule these factor counts meet; None when none does (the default tier).

    The one reading of the tier rules: the tier itself and the page's "why this tier" both
    come from it.
    """
    for rule in rs.tiers.rules:
        if rule.min_high is not None and high >= rule.min_high:
            return rule
        if rule.min_intermediate is not None and intermediate >= rule.min_intermediate:
            return rule
    return None


def _tier(rs: RuleSet, high: int, intermediate: int) -> str:
    rule = tier_rule(rs, high, intermediate)
    return rs.tiers.default if rule is None else rule.tier


def _count(evaluator: Evaluator, rs: RuleSet) -> tuple[list[FiredRule], int, int]:
    fired, high, intermediate = [], 0, 0
    for factor in rs.factors:
        result = evaluator(factor.when)
        if result.value is not True:
            continue
        fired.append(
            FiredRule(
                factor.id,
                f"factor-{factor.factor_class}",
                factor.label,
                factor.evidence,
                factor.source,
                result.facts,
                result.sources,
            )
        )
        high += factor.factor_class == "high"
        intermediate += factor.factor_class == "intermediate"
    return fired, high, intermediate


def _scope(
    facts: PatientFacts, knowledge: Knowledge, now: date
) -> tuple[ScopeStatus, str, tuple[date, date] | None]:
    scope = knowledge.ruleset.scope
    iim = facts.iim
    deceased = facts.deceased
    if deceased.is_true() and (deceased.when is None or deceased.when <= now):
        return "deceased", scope.deceased_reason, None
    if iim is None:
        return "no-iim", scope.no_iim_reason, None
    years = int(scope.window_years.value)
    # The schedule runs from the diagnosis date; without one, from the evaluation date. Out of
    # the guideline's scope, it still dates the lung programme and the safety net (1.2.0).
    start = iim.diagnosed.earliest if iim.diagnosed else now
    window = (start, add_months(start, 12 * years))
    if iim.subtype in scope.juvenile.subtypes:
        return "juvenile", scope.juvenile.reason, window
    if facts.onset_age is not None and facts.onset_age[1] < scope.adult_onset_min_age.value:
        return (
            "juvenile",
            f"Onset before age {scope.adult_onset_min_age.value:.0f}. {scope.juvenile.reason}",
            window,
        )
    for excluded in scope.excluded_subtypes:
        if iim.subtype == excluded.subtype:
            return "excluded-subtype", excluded.reason, window
    delay = int(scope.max_diagnosis_delay_years.value)
    if (
        iim.onset is not None
        and iim.diagnosed is not None
        and not iim.diagnosis_source.startswith("symptom onset")
        and add_months(iim.onset.latest, 12 * delay) < iim.diagnosed.earliest
    ):
        return "late-diagnosis", scope.late_diagnosis_reason.format(years=delay), window
    # Whether the window has closed depends on what is still due: decided with the plan.
    return "in-scope", "", window


def _unknown_labels(facts: PatientFacts, knowledge: Knowledge) -> tuple[str, ...]:
    rs = knowledge.ruleset
    out = []
    if facts.onset_age is None:
        out.append("age at onset")
    if facts.sex.value is UNKNOWN:
        out.append("sex")
    for ab in rs.antibodies:
        fact = facts.antibody(ab.id)
        if fact.value is UNKNOWN:
            # An equivocal result is known to be neither positive nor negative: say so.
            out.append(f"{ab.label} antibody" + (f" ({fact.note})" if fact.note else ""))
    feature_labels = {f.id: f.label for f in rs.features}
    for name in [f.id for f in rs.features] + [
        "refractory",
        "current_smoking",
        "family_history_cancer",
    ]:
        if name.endswith("_condition"):
            continue
        if facts.feature(name).value is UNKNOWN:
            out.append(feature_labels.get(name, name.replace("_", " ")))
    return tuple(out)


def _is_unknown(name: str, facts: PatientFacts, rs: RuleSet) -> bool:
    """Whether a `preliminary_if_unknown` fact is open (an age span may still straddle a
    threshold: the evaluation decides that)."""
    if name == "sex":
        return facts.sex.value is UNKNOWN
    if name == "subtype":
        unspecified = {s.id for s in rs.subtypes if s.unspecified}
        return facts.iim is not None and facts.iim.subtype in unspecified
    if name.startswith("antibody:"):
        return facts.antibody(name.partition(":")[2]).value is UNKNOWN
    return name == "onset_age"


def _preliminary_label(name: str, facts: PatientFacts, knowledge: Knowledge) -> str:
    """How outputs name an unknown that can raise the tier (never patient data)."""
    if name == "onset_age":
        birth = facts.birth_date
        if birth is None:
            return "age at onset (birth date missing)"
        if facts.onset_age is None:
            return "age at onset (symptom onset date missing)"
        if not birth.exact:
            precision = "year" if birth.earliest.month != birth.latest.month else "month"
            return f"age at onset (birth date known only to the {precision})"
        return "age at onset (symptom onset date not exact)"
    if name == "sex":
        return "sex"
    if name == "subtype":
        return "IIM subtype"
    antibody = name.partition(":")[2]
    label = next(a.label for a in knowledge.ruleset.antibodies if a.id == antibody)
    fact = facts.antibody(antibody)
    return f"{label} antibody" + (f" ({fact.note})" if fact.note else "")


def _raising_unknowns(facts: PatientFacts, knowledge: Knowledge, tier: str) -> tuple[str, ...]:
    """The unknown facts some value of which would give a higher tier: each one that belongs to
    a smallest set of unknowns which, all positive, raise it (clinical-logic §4). An untested
    intermediate antibody cannot lift a moderate tier held by one high factor, so it is not
    named. Empty when no unknown can raise the tier (not preliminary)."""
    rs = knowledge.ruleset
    weight = {
        f.id: (int(f.factor_class == "high"), int(f.factor_class == "intermediate"))
        for f in rs.factors
    }
    mentions = {f.id: frozenset(f.when.reads()) for f in rs.factors}
    recorded, _, _ = _count(Evaluator(facts, knowledge), rs)
    base = frozenset(r.id for r in recorded)

    def fired(assume: frozenset[str]) -> frozenset[str]:
        """The factors that fire with these unknowns positive (only those naming one of them
        are evaluated again: the others cannot change)."""
        evaluate = Evaluator(facts, knowledge, assume_positive=assume)
        return base | {
            f.id
            for f in rs.factors
            if not assume.isdisjoint(mentions[f.id]) and evaluate(f.when).value is True
        }

    def counts(ids: Iterable[str]) -> tuple[int, int]:
        return sum(weight[i][0] for i in ids), sum(weight[i][1] for i in ids)

    @functools.cache
    def tier_rank(high: int, intermediate: int) -> int:
        return rs.tiers.rank(_tier(rs, high, intermediate))

    def rank(ids: frozenset[str]) -> int:
        return tier_rank(*counts(ids))

    names = [n for n in rs.tiers.preliminary_if_unknown if _is_unknown(n, facts, rs)]
    current = rs.tiers.rank(tier)
    best = rank(fired(frozenset(names)))
    if best <= current:
        return ()
    gains = {n: g for n in names if (g := fired(frozenset({n})) - base)}
    keys = list(gains)
    if rank(base.union(*gains.values())) < best:
        # A factor needs several unknowns at once: every unknown that can count is named.
        return tuple(names)
    # The factors each subset of unknowns fires (built from the subset without its lowest
    # member), whether it raises the tier, and so which unknowns can: k is in a smallest raising
    # set exactly when adding k to some set of the others turns "not raised" into "raised".
    fired_by = [base]
    tally = [counts(base)]
    for mask in range(1, 1 << len(keys)):
        low = mask & -mask
        before = fired_by[mask ^ low]
        added = gains[keys[low.bit_length() - 1]] - before
        fired_by.append(before | added)
        high, intermediate = counts(added)
        tally.append((tally[mask ^ low][0] + high, tally[mask ^ low][1] + intermediate))
    raises = [tier_rank(*t) > current for t in tally]
    named = {
        key
        for i, key in enumerate(keys)
        if any(raises[m | 1 << i] and not raises[m] for m in range(len(raises)) if not m >> i & 1)
    }
    return tuple(n for n in names if n in named)


def _notices(facts: PatientFacts, knowledge: Knowledge, now: date) -> list[Notice]:
    """What a clinician must read with the plan, each with its evidence and sources."""
    rs = knowledge.ruleset
    out = []
    possible = facts.feature("possible_malignancy")
    if possible.is_true():
        rule_pm = rs.possible_malignancy
        out.append(
            Notice(
                "possible-malignancy",
                rule_pm.message.format(conditions=", ".join(possible.sources)),
                rule_pm.evidence,
                rule_pm.source,
                possible.sources,
                headline=rule_pm.headline,
            )
        )
    active = facts.feature("active_malignancy")
    if active.is_true():
        rule = rs.active_malignancy
        names = ", ".join(facts.active_cancers) or "cancer named in the record"
        out.append(
            Notice(
                "active-malignancy",
                rule.message.format(cancer=names),
                rule.evidence,
                rule.source,
                active.sources,
            )
        )
    out += _cancer_order_notices(facts, knowledge)
    implied = facts.feature("cancer_implied")
    if implied.is_true() and not facts.cancers:
        rule_i = rs.cancer_implied
        out.append(
            Notice(
                "cancer-implied",
                rule_i.message.format(conditions=", ".join(implied.sources)),
                rule_i.evidence,
                rule_i.source,
                implied.sources,
            )
        )
    if facts.sex_uncertain:
        rule_s = rs.clinical_sex
        out.append(
            Notice(
                "sex-for-clinical-use",
                rule_s.message.format(reason=facts.sex_uncertain),
                rule_s.evidence,
                rule_s.source,
                facts.sex.sources,
            )
        )
    if checkpoint_inhibitor_recent(facts, knowledge, now):
        rule_c = rs.checkpoint_inhibitor
        out.append(
            Notice(
                "checkpoint-inhibitor",
                rule_c.message,
                rule_c.evidence,
                rule_c.source,
                facts.feature("checkpoint_inhibitor").sources,
            )
        )
    iim = facts.iim
    if iim is not None:
        for option in rs.subtype_options:
            if getattr(knowledge.site.site, option.site_flag) and iim.subtype == option.subtype:
                out.append(
                    Notice(
                        f"site-option-{option.site_flag}",
                        option.notice,
                        option.evidence,
                        option.source,
                        (iim.reference,),
                    )
                )
        if not iim.confirmed:
            rule_u = rs.scope.unconfirmed_diagnosis
            out.append(
                Notice(
                    "diagnosis-unconfirmed",
                    rule_u.reason.format(status=iim.unconfirmed_status),
                    rule_u.evidence,
                    rule_u.source,
                    (iim.reference,),
                )
            )
    flare = facts.feature("flare")
    if flare.is_true():
        out.append(
            Notice("flare", rs.flare.message, rs.flare.evidence, rs.flare.source, flare.sources)
        )
    return out


def feature_label(knowledge: Knowledge, name: str) -> str:
    """A feature as outputs name it ("unexplained weight loss"), derived ones by their name."""
    labels = {f.id: f.label for f in knowledge.ruleset.features}
    return labels.get(name, name.replace("_", " "))


def red_flag_notice(facts: PatientFacts, knowledge: Knowledge, scope: str) -> Notice | None:
    """A red flag is always shown, naming it and its date (rule set 1.2.0)."""
    rs = knowledge.ruleset
    red = [f for f in rs.red_flags.facts if facts.feature(f).is_true()]
    if not red:
        return None
    dates = [d for f in red if (d := facts.feature(f).when) is not None]
    since = f" (since {max(dates).isoformat()})" if dates else ""
    flags = ", ".join(feature_label(knowledge, f) for f in red)
    template = rs.red_flags.juvenile_notice if scope == "juvenile" else rs.red_flags.notice
    return Notice(
        "red-flags",
        template.format(flags=flags, since=since),
        rs.red_flags.evidence,
        rs.red_flags.source,
        tuple(s for f in red for s in facts.feature(f).sources),
    )


def _plan_notices(facts: PatientFacts, knowledge: Knowledge, scope: str) -> list[Notice]:
    """Notices of rule set 1.2.0: red flags, the safety net, lung, conditional notices."""
    rs = knowledge.ruleset
    out: list[Notice] = []
    evaluator = Evaluator(facts, knowledge)
    if scope in rs.outside_guideline.scopes:
        net = rs.outside_guideline
        out.append(Notice("outside-guideline", net.notice, net.evidence, net.source))
    red = red_flag_notice(facts, knowledge, scope)
    if red is not None:
        out.append(red)
    flare = facts.feature("flare")
    targeted = rs.flare.targeted_when
    if flare.is_true() and targeted is not None and evaluator(targeted).value is not True:
        out.append(
            Notice(
                "flare-review",
                rs.flare.review_notice,
                rs.flare.evidence,
                rs.flare.source,
                flare.sources,
            )
        )
    lung = rs.lung_surveillance
    monitored = evaluator(lung.when)
    if monitored.value is True and lung.notice:
        out.append(Notice("lung-hrct", lung.notice, lung.evidence, lung.source, monitored.sources))
    early = lung.early
    if early is not None and (hit := evaluator(early.when)).value is True:
        out.append(Notice("lung-early", early.notice, early.evidence, early.source, hit.sources))
    for cond in rs.conditional_notices:
        hit = evaluator(cond.when)
        if hit.value is True:
            out.append(Notice(cond.id, cond.text, cond.evidence, cond.source, hit.sources))
    return out


def _cancer_order_notices(facts: PatientFacts, knowledge: Knowledge) -> list[Notice]:
    """Cancer-associated myositis, or a past cancer that may recur, by which came first
    (clinical-logic §6 rev 3): "recurrence" is said only of a cancer found before the myositis."""
    rs = knowledge.ruleset
    prior = rs.prior_malignancy
    kinds = (
        ("cancer-associated", rs.cancer_associated, rs.cancer_associated.message, "after", True),
        ("prior-malignancy", prior, prior.message, "before", False),
        ("prior-malignancy-order-unknown", prior, prior.order_unknown_message, "unknown", False),
    )
    out = []
    for notice_id, rule, template, order, with_active in kinds:
        cancers = [c for c in facts.cancers if c.order == order and (with_active or not c.active)]
        if cancers:
            names = ", ".join(dict.fromkeys(c.name for c in cancers))
            refs = tuple(dict.fromkeys(c.reference for c in cancers))
            text = template.format(cancer=names)
            out.append(Notice(notice_id, text, rule.evidence, rule.source, refs))
    return out


def checkpoint_inhibitor_recent(facts: PatientFacts, knowledge: Knowledge, now: date) -> bool:
    """A checkpoint inhibitor active, or given within the configured months before `now`."""
    fact = facts.feature("checkpoint_inhibitor")
    if not fact.is_true():
        return False
    if fact.note == "active" or fact.when is None:
        return True
    months = knowledge.ruleset.checkpoint_inhibitor.recent_months
    return add_months(fact.when, months) >= now


def assess_facts(facts: PatientFacts, knowledge: Knowledge, *, now: date) -> Assessment:
    """Scope, factors, tier and preliminary flag for one patient."""
    rs = knowledge.ruleset
    scope, reason, window = _scope(facts, knowledge, now)
    notices = _notices(facts, knowledge, now) if scope in EVENT_ROUND_SCOPES else []
    if scope in PLAN_SCOPES:
        notices += _plan_notices(facts, knowledge, scope)
    if facts.patient_links:
        # Whatever the scope: the reader must know whose records were read as one.
        rule_l = rs.patient_link
        notices.append(
            Notice(
                "patient-link",
                rule_l.message.format(links="; ".join(facts.patient_links)),
                rule_l.evidence,
                rule_l.source,
                facts.linked_patients,
            )
        )
    fired, high, intermediate = _count(Evaluator(facts, knowledge), rs)
    tier: str | None = None
    preliminary = False
    because: tuple[str, ...] = ()
    unknowns: tuple[str, ...] = ()
    if scope == "in-scope":
        tier = _tier(rs, high, intermediate)
        if tier != rs.tiers.levels[-1].id:
            unknowns = _raising_unknowns(facts, knowledge, tier)
            preliminary = bool(unknowns)
            because = tuple(_preliminary_label(n, facts, knowledge) for n in unknowns)
        if facts.iim is not None and not facts.iim.confirmed:
            # An open diagnosis makes any tier preliminary (clinical-logic §1).
            preliminary = True
            because = (*because, "diagnosis not confirmed")
    return Assessment(
        facts,
        rs.label,
        now,
        scope,
        reason,
        window,
        tier,
        preliminary,
        because,
        tuple(fired),
        _unknown_labels(facts, knowledge),
        tuple(notices),
        unknowns,
    )
