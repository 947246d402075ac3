"""Typed, validated form of config/: the rule set, the terminology and the site settings.

The models check every cross-reference (a factor names a known antibody, a panel names known
tests, a value set cites a known source), so a bad edit fails at start-up, not mid-assessment.
"""

from __future__ import annotations

from typing import Literal, get_args

from fhir.resources.R4B.coding import Coding
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fhir_dm.knowledge.names import contains_name

# Facts the core derives from several resources; rules may name them like condition features.
DERIVED_FEATURES = (
    "refractory",
    "flare",
    "current_smoking",
    "family_history_cancer",
    "personal_history_cancer",
    "active_malignancy",
    "checkpoint_inhibitor",
)

# Unknown facts that may make a tier preliminary (clinical-logic §4): these and `antibody:<id>`.
PRELIMINARY_FACTS = ("onset_age", "sex", "subtype")
# Factor classes that count towards the tier (low-class factors are recorded and shown only).
TIER_CLASSES = ("high", "intermediate")

Evidence = Literal["guideline", "provisional", "design", "not-imacs"]
Confidence = Literal["seen-verbatim", "seen-indirect", "judgment"]
Sex = Literal["female", "male"]
TierId = str


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Sourced(_Frozen):
    evidence: Evidence
    source: str


# --- terminology ---------------------------------------------------------------------------


class CodeEntry(_Frozen):
    """One code (or code prefix) of a value set, with where it was seen."""

    system: str
    code: str | None = None
    prefix: str | None = None
    display: str
    source: str
    confidence: Confidence

    @model_validator(mode="after")
    def _one_of_code_or_prefix(self) -> CodeEntry:
        if (self.code is None) == (self.prefix is None):
            raise ValueError("give exactly one of 'code' or 'prefix'")
        return self


class ValueSet(_Frozen):
    """A concept the rules ask about, as the codes that express it."""

    title: str
    include: tuple[CodeEntry, ...] = ()
    synonyms: tuple[str, ...] = ()


class LocalCode(_Frozen):
    """A site-local code mapped onto one of the project's value sets."""

    system: str
    code: str
    value_set: str
    display: str = ""


class ServerCheck(_Frozen):
    """How an optional terminology server may widen one value set (terminology/server.yaml).

    `descendants_of`: a code the server says is one of these roots or subsumed by it
    (`CodeSystem/$subsumes`) belongs to the value set. `expansions`: canonical ValueSet URLs
    whose expansion on the server (`ValueSet/$expand`) lists members. Used only when a
    terminology server is configured, and only for codes the offline lists do not know.
    """

    descendants_of: tuple[CodeEntry, ...] = ()
    expansions: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _roots_are_codes(self) -> ServerCheck:
        if any(root.code is None for root in self.descendants_of):
            raise ValueError("descendants_of entries need a 'code', not a 'prefix'")
        return self


class ResultStrings(_Frozen):
    """Result words per meaning, found as whole words (case, spacing and width folded).

    `indeterminate` lists the equivocal words (read as unknown). `abnormal` / `normal` are read
    only in an interpretation's text, and `normal` also names a reference range's band.
    """

    positive: tuple[str, ...]
    weak_positive: tuple[str, ...]
    negative: tuple[str, ...]
    indeterminate: tuple[str, ...]
    abnormal: tuple[str, ...] = ()
    normal: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_meaning_per_word(self) -> ResultStrings:
        seen: dict[str, str] = {}
        for name in ("positive", "weak_positive", "negative", "indeterminate", "abnormal"):
            for word in getattr(self, name):
                key = " ".join(word.casefold().split())
                if seen.setdefault(key, name) != name:
                    raise ValueError(f"'{word}' is listed under {seen[key]} and {name}")
        return self


class Terminology(_Frozen):
    """Everything in config/terminology/, merged."""

    systems: dict[str, str]
    sources: dict[str, str]
    value_sets: dict[str, ValueSet]
    result_strings: ResultStrings
    medication_names: dict[str, tuple[str, ...]]
    medication_exclude_words: tuple[str, ...] = ()
    mappings: tuple[LocalCode, ...] = ()
    # Other URIs for a configured system (URI -> alias), e.g. ICD-10-CM under its HL7 OID.
    system_aliases: dict[str, str] = {}
    # Aliases of systems whose codes match with or without the dot (ICD-10 codes).
    dotless_systems: tuple[str, ...] = ()
    # Word starts that mark an unrecognised Condition as a possible malignancy (reported only).
    possible_malignancy_words: tuple[str, ...] = ()
    # Words that mark an Observation name as an antibody result (unrecognised ones are reported).
    antibody_name_words: tuple[str, ...] = ()
    # Value sets an optional terminology server may widen (server.yaml); unused without one.
    server_checks: dict[str, ServerCheck] = {}

    @model_validator(mode="after")
    def _references_resolve(self) -> Terminology:
        for vs_id, vs in self.value_sets.items():
            for i, entry in enumerate(vs.include):
                where = f"value_sets.{vs_id}.include.{i}"
                if entry.system not in self.systems:
                    raise ValueError(f"{where}: unknown system alias '{entry.system}'")
                if entry.source not in self.sources:
                    raise ValueError(f"{where}: unknown source key '{entry.source}'")
        for uri, alias in self.system_aliases.items():
            if alias not in self.systems:
                raise ValueError(f"system_aliases.{uri}: unknown system alias '{alias}'")
        for alias in self.dotless_systems:
            if alias not in self.systems:
                raise ValueError(f"dotless_systems: unknown system alias '{alias}'")
        for i, mapping in enumerate(self.mappings):
            if mapping.value_set not in self.value_sets:
                raise ValueError(f"mappings.{i}: unknown value set '{mapping.value_set}'")
        for vs_id, check in self.server_checks.items():
            if vs_id not in self.value_sets:
                raise ValueError(f"server_checks.{vs_id}: unknown value set")
            for i, root in enumerate(check.descendants_of):
                where = f"server_checks.{vs_id}.descendants_of.{i}"
                if root.system not in self.systems:
                    raise ValueError(f"{where}: unknown system alias '{root.system}'")
                if root.source not in self.sources:
                    raise ValueError(f"{where}: unknown source key '{root.source}'")
        return self

    @model_validator(mode="after")
    def _names_do_not_overlap(self) -> Terminology:
        """A synonym found inside another value set's name would read that result as this one
        ("SAE" inside "SAE2"): refused, so each lab name has one meaning."""
        problems = [
            f"value_sets.{vs_id}.synonyms: '{word}' also matches '{name}' of {other_id}"
            for vs_id, vs in self.value_sets.items()
            for word in vs.synonyms
            for other_id, other in self.value_sets.items()
            if other_id != vs_id
            for name in other.synonyms
            if contains_name(name, word)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def system_url(self, alias: str) -> str:
        """Resolve a system alias; unknown aliases are already rejected at load time."""
        return self.systems[alias]


# --- rule set ------------------------------------------------------------------------------


class Predicate(_Frozen):
    """A condition over patient facts; exactly one field is set (see config/README.md)."""

    all: tuple[Predicate, ...] | None = None
    any: tuple[Predicate, ...] | None = None
    subtype_in: tuple[str, ...] | None = None
    antibody_positive: tuple[str, ...] | None = None
    antibody_negative: tuple[str, ...] | None = None
    onset_age_gt: float | None = None
    sex_is: tuple[Sex, ...] | None = None
    feature: tuple[str, ...] | None = None
    tier_in: tuple[TierId, ...] | None = None
    site_flag: Literal["npc_region"] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Predicate:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a predicate has exactly one key, got {given or 'none'}")
        return self

    def walk(self) -> list[Predicate]:
        """This predicate and every nested one, for reference checks."""
        out = [self]
        for child in (self.all or ()) + (self.any or ()):
            out.extend(child.walk())
        return out


class Valued(_Sourced):
    value: float


class ExcludedSubtype(_Sourced):
    subtype: str
    reason: str


class Juvenile(_Sourced):
    subtypes: tuple[str, ...]
    reason: str


class DiagnosisDate(_Sourced):
    """Where the diagnosis date that anchors the schedule is read from, in order of preference."""

    # Condition elements: "extension:<url>" (a dateTime extension), "recordedDate", "onset".
    read_from: tuple[str, ...] = Field(min_length=1)


class Unconfirmed(_Sourced):
    """IIM Conditions whose verification status leaves the diagnosis open."""

    statuses: tuple[str, ...]
    reason: str


class Scope(_Frozen):
    adult_onset_min_age: Valued
    window_years: Valued
    max_diagnosis_delay_years: Valued
    diagnosis_date: DiagnosisDate
    unconfirmed_diagnosis: Unconfirmed
    excluded_subtypes: tuple[ExcludedSubtype, ...] = ()
    juvenile: Juvenile
    no_iim_reason: str
    late_diagnosis_reason: str
    window_closed_reason: str
    deceased_reason: str


class Concept(_Frozen):
    """A named concept (subtype, antibody, feature) and the value set that identifies it."""

    id: str
    label: str
    value_set: str
    unspecified: bool = False


class Refractory(_Sourced):
    label: str
    ck_above_uln_count: int = Field(ge=1)
    min_months_apart: int = Field(ge=0)
    requires_active_immunosuppression: bool
    # Coded features that establish it directly (e.g. refractory cutaneous disease, normal CK).
    or_features: tuple[str, ...]


class FlareDerivation(_Sourced):
    label: str
    or_feature: str


class CreatineKinase(_Frozen):
    value_set: str
    default_upper_limit_u_per_l: float = Field(gt=0)
    unit_factors_to_u_per_l: dict[str, float]


class Derived(_Frozen):
    refractory: Refractory
    flare: FlareDerivation
    creatine_kinase: CreatineKinase


class Factor(_Sourced):
    id: str
    factor_class: Literal["high", "intermediate", "low"] = Field(alias="class")
    label: str
    when: Predicate

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TierLevel(_Frozen):
    id: TierId
    label: str
    risk_probability: Literal["high", "moderate", "low"]


class TierRule(_Frozen):
    tier: TierId
    min_high: int | None = None
    min_intermediate: int | None = None


class Tiers(_Sourced):
    levels: tuple[TierLevel, ...]
    rules: tuple[TierRule, ...]
    default: TierId
    # Derived from the factors when left out (`RuleSet.tier_facts`); checked when given.
    preliminary_if_unknown: tuple[str, ...] = ()
    low_factors_lower_tier: bool = False

    def level(self, tier_id: TierId) -> TierLevel:
        """The level of a tier id (ids are checked at load time)."""
        return next(level for level in self.levels if level.id == tier_id)

    def rank(self, tier_id: TierId) -> int:
        """Position of a tier, lowest first, so tiers can be compared."""
        return [level.id for level in self.levels].index(tier_id)


class CodeRef(_Frozen):
    system: str
    code: str
    display: str
    source: str


class Test(_Frozen):
    display: str
    kind: Literal["order", "activity"]
    category: Literal["laboratory", "imaging", "procedure"]
    sex: Sex | None = None
    code: CodeRef
    # Overrides the rule set's `done_lookback_months` for this test (clinical-logic §10).
    done_lookback_months: int | None = Field(default=None, ge=0)


class Panel(_Sourced):
    label: str
    tests: tuple[str, ...]


class Round(_Frozen):
    id: str
    label: str
    offset_months: int = Field(ge=0)
    due_within_months: int = Field(ge=1)
    panels: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()


class Schedule(_Sourced):
    rounds: tuple[Round, ...]


class Addon(_Sourced):
    id: str
    label: str
    tests: tuple[str, ...]
    round: str
    when: Predicate
    conditional: bool = True


class RedFlags(_Sourced):
    facts: tuple[str, ...]
    add_panels: tuple[str, ...]
    # Red flags present by the end of this round's due window join it ...
    round: str
    # ... later ones get a round of their own, dated from the red flag.
    event_round: Round
    unless_done_within_months: int = Field(ge=0)
    conditional: bool = True
    label: str


class ActiveMalignancy(_Sourced):
    # `{cancer}` is replaced by the names of the active malignancies.
    message: str
    # Every cancer-screening item becomes a "consider" item with this condition text.
    consider_text: str


class PriorMalignancy(_Sourced):
    # `{cancer}` is replaced by the names of the recorded cancers.
    message: str


class PatientLink(_Sourced):
    """The notice shown when Patient records joined by Patient.link are assessed as one."""

    # `{links}` is replaced by the links ("Patient/old replaced-by Patient/new").
    message: str


class CheckpointInhibitor(_Sourced):
    """Myositis on an immune checkpoint inhibitor: likely an immune-related adverse event."""

    medication_names: str  # key of terminology medication_names
    recent_months: int = Field(ge=0)
    message: str
    consider_text: str


class SubtypeOption(_Sourced):
    """A documented site option that counts one subtype as another (a deviation, said so)."""

    site_flag: Literal["cadm_as_dm"]
    subtype: str
    counts_as: str
    notice: str


class FlareRule(_Sourced):
    message: str
    add_panels: tuple[str, ...]
    unless_done_within_months: int
    round: Round


class LungSurveillance(_Sourced):
    label: str
    when: Predicate
    rounds: tuple[Round, ...]


class AntibodyTesting(_Sourced):
    when_untested: tuple[str, ...]
    when_preliminary_on_antibodies: bool = False
    test: str
    round: str


class Guideline(_Frozen):
    citation: str
    doi: str
    url: str
    correction_doi: str | None = None


class RuleSet(_Frozen):
    """One versioned rule set (config/ruleset/<name>.yaml)."""

    name: str
    version: str
    title: str
    canonical_base: str
    guideline: Guideline
    evidence_levels: dict[str, str]
    scope: Scope
    subtypes: tuple[Concept, ...]
    antibodies: tuple[Concept, ...]
    features: tuple[Concept, ...]
    derived: Derived
    factors: tuple[Factor, ...]
    tiers: Tiers
    tests: dict[str, Test]
    panels: dict[str, Panel]
    schedules: dict[TierId, Schedule]
    addons: tuple[Addon, ...]
    red_flags: RedFlags
    active_malignancy: ActiveMalignancy
    prior_malignancy: PriorMalignancy
    patient_link: PatientLink
    checkpoint_inhibitor: CheckpointInhibitor
    subtype_options: tuple[SubtypeOption, ...] = ()
    flare: FlareRule
    lung_surveillance: LungSurveillance
    antibody_testing: AntibodyTesting
    # A test done at most this many months before a round opens counts for it (§10).
    done_lookback_months: Valued

    def tier_facts(self) -> tuple[str, ...]:
        """The unknowns that can raise a tier, read off the high- and intermediate-class factors
        (clinical-logic §4): their antibodies (`antibody:<id>`), age at onset, sex, subtype."""
        antibodies: list[str] = []
        others: set[str] = set()
        for factor in self.factors:
            if factor.factor_class not in TIER_CLASSES:
                continue
            for p in factor.when.walk():
                antibodies.extend(f"antibody:{a}" for a in p.antibody_positive or ())
                if p.onset_age_gt is not None:
                    others.add("onset_age")
                if p.sex_is is not None:
                    others.add("sex")
                if p.subtype_in is not None:
                    others.add("subtype")
        return (*dict.fromkeys(antibodies), *(f for f in PRELIMINARY_FACTS if f in others))

    def factor_antibodies(self, factor_class: str) -> tuple[str, ...]:
        """The antibodies whose being positive is a factor of this class, in factor order."""
        return tuple(
            dict.fromkeys(
                a
                for factor in self.factors
                if factor.factor_class == factor_class
                for p in factor.when.walk()
                for a in p.antibody_positive or ()
            )
        )

    def _derive_lists(self) -> None:
        """The lists that follow from the factors are derived or checked against them, so a
        factor added or reclassed cannot leave them out of step (after the reference checks)."""
        derived = self.tier_facts()
        given = self.tiers.preliminary_if_unknown
        if not given:
            # Frozen model: the derived list is filled in once, here, at load time.
            object.__setattr__(
                self, "tiers", self.tiers.model_copy(update={"preliminary_if_unknown": derived})
            )
        elif set(given) != set(derived):
            missing = sorted(set(derived) - set(given))
            extra = sorted(set(given) - set(derived))
            raise ValueError(
                "tiers.preliminary_if_unknown: out of step with the factors"
                f" (missing {missing}, not a high or intermediate factor {extra});"
                " leave it out to derive it"
            )
        untested = set(self.antibody_testing.when_untested)
        problems = [
            f"antibody_testing.when_untested: high-class antibody '{a}' missing"
            for a in self.factor_antibodies("high")
            if a not in untested
        ]
        problems.extend(
            f"antibody_testing.when_untested: '{a}' is in no high or intermediate factor"
            for a in self.antibody_testing.when_untested
            if f"antibody:{a}" not in derived
        )
        if problems:
            raise ValueError("; ".join(problems))

    def lookback_months(self, test_id: str) -> int:
        """How long before a round opens a test of this kind still counts as done for it."""
        override = self.tests[test_id].done_lookback_months
        return override if override is not None else int(self.done_lookback_months.value)

    @model_validator(mode="after")
    def _references_resolve(self) -> RuleSet:
        subtypes = {s.id for s in self.subtypes}
        antibodies = {a.id for a in self.antibodies}
        features = {f.id for f in self.features} | set(DERIVED_FEATURES)
        tiers = {level.id for level in self.tiers.levels}
        problems: list[str] = []

        def check_predicate(where: str, predicate: Predicate) -> None:
            for p in predicate.walk():
                for name, known in (
                    ("subtype_in", subtypes),
                    ("antibody_positive", antibodies),
                    ("antibody_negative", antibodies),
                    ("feature", features),
                    ("tier_in", tiers),
                ):
                    for ref in getattr(p, name) or ():
                        if ref not in known:
                            problems.append(f"{where}: unknown {name} reference '{ref}'")

        def check_tests(where: str, test_ids: tuple[str, ...]) -> None:
            problems.extend(f"{where}: unknown test '{t}'" for t in test_ids if t not in self.tests)

        def check_panels(where: str, panel_ids: tuple[str, ...]) -> None:
            problems.extend(
                f"{where}: unknown panel '{p}'" for p in panel_ids if p not in self.panels
            )

        for i, factor in enumerate(self.factors):
            check_predicate(f"factors.{i}.when", factor.when)
        for i, addon in enumerate(self.addons):
            check_predicate(f"addons.{i}.when", addon.when)
            check_tests(f"addons.{i}.tests", addon.tests)
        check_predicate("lung_surveillance.when", self.lung_surveillance.when)
        for name, panel in self.panels.items():
            check_tests(f"panels.{name}.tests", panel.tests)
        for tier, schedule in self.schedules.items():
            if tier not in tiers:
                problems.append(f"schedules.{tier}: unknown tier")
            for i, rnd in enumerate(schedule.rounds):
                check_panels(f"schedules.{tier}.rounds.{i}.panels", rnd.panels)
                check_tests(f"schedules.{tier}.rounds.{i}.tests", rnd.tests)
        for i, rnd in enumerate(self.lung_surveillance.rounds):
            check_tests(f"lung_surveillance.rounds.{i}.tests", rnd.tests)
        problems.extend(
            f"tiers.levels: tier '{t}' has no schedule" for t in tiers if t not in self.schedules
        )
        for i, rule in enumerate(self.tiers.rules):
            if rule.tier not in tiers:
                problems.append(f"tiers.rules.{i}: unknown tier '{rule.tier}'")
        if self.tiers.default not in tiers:
            problems.append(f"tiers.default: unknown tier '{self.tiers.default}'")
        for fact in self.tiers.preliminary_if_unknown:
            kind, _, ref = fact.partition(":")
            if not (fact in PRELIMINARY_FACTS or (kind == "antibody" and ref in antibodies)):
                problems.append(f"tiers.preliminary_if_unknown: unknown fact '{fact}'")
        check_panels("red_flags.add_panels", self.red_flags.add_panels)
        problems.extend(
            f"red_flags.facts: unknown feature '{f}'"
            for f in self.red_flags.facts
            if f not in features
        )
        check_panels("flare.add_panels", self.flare.add_panels)
        check_tests("red_flags.event_round.tests", self.red_flags.event_round.tests)
        for i, option in enumerate(self.subtype_options):
            for ref in (option.subtype, option.counts_as):
                if ref not in subtypes:
                    problems.append(f"subtype_options.{i}: unknown subtype '{ref}'")
        problems.extend(
            f"derived.refractory.or_features: unknown feature '{f}'"
            for f in self.derived.refractory.or_features
            if f not in features
        )
        check_tests("antibody_testing.test", (self.antibody_testing.test,))
        problems.extend(
            f"antibody_testing.when_untested: unknown antibody '{a}'"
            for a in self.antibody_testing.when_untested
            if a not in antibodies
        )
        problems.extend(
            f"scope.juvenile.subtypes: unknown subtype '{s}'"
            for s in self.scope.juvenile.subtypes
            if s not in subtypes
        )
        for excluded in self.scope.excluded_subtypes:
            if excluded.subtype not in subtypes:
                problems.append(f"scope.excluded_subtypes: unknown subtype '{excluded.subtype}'")
        for level in self.evidence_levels:
            if level not in get_args(Evidence):
                problems.append(f"evidence_levels: unknown level '{level}'")
        if problems:
            raise ValueError("; ".join(problems))
        self._derive_lists()
        return self

    @property
    def label(self) -> str:
        """Name and version, as every output states it."""
        return f"{self.name} {self.version}"

    def schedule_rounds(self, tier: TierId) -> tuple[Round, ...]:
        """The rounds of a tier's schedule."""
        return self.schedules[tier].rounds


# --- site ----------------------------------------------------------------------------------


class SiteFlags(_Frozen):
    npc_region: bool = False
    # Count clinically amyopathic DM as DM (high risk), deviating from IMACS (intermediate).
    cadm_as_dm: bool = False


class AntibodyResults(_Frozen):
    weak_positive: Literal["positive", "unknown"] = "positive"
    # Antibody value sets the service recognises but no rule uses (reported, never a factor).
    recognised_not_used: tuple[str, ...] = ()


class ObservationSettings(_Frozen):
    usable_statuses: tuple[str, ...] = ("final", "amended", "corrected")


class Orders(_Frozen):
    service_request_intent: Literal["proposal", "plan", "order"] = "proposal"
    service_request_status: Literal["active", "draft"] = "active"
    care_plan_intent: Literal["proposal", "plan", "order"] = "proposal"
    priority: Literal["routine", "urgent", "asap", "stat"] = "routine"


class Site(_Frozen):
    """config/site.yaml: how this installation reads data and what it writes."""

    site: SiteFlags = SiteFlags()
    antibody_results: AntibodyResults = AntibodyResults()
    observations: ObservationSettings = ObservationSettings()
    orders: Orders = Orders()
    ruleset: str


class Knowledge(_Frozen):
    """The rule set, terminology and site settings one assessment runs with."""

    ruleset: RuleSet
    terminology: Terminology
    site: Site

    @model_validator(mode="after")
    def _value_sets_exist(self) -> Knowledge:
        known = self.terminology.value_sets
        rs = self.ruleset
        refs = [
            *(f"subtypes.{c.id}:{c.value_set}" for c in rs.subtypes),
            *(f"antibodies.{c.id}:{c.value_set}" for c in rs.antibodies),
            *(f"features.{c.id}:{c.value_set}" for c in rs.features),
            f"derived.creatine_kinase:{rs.derived.creatine_kinase.value_set}",
            *(
                f"site.antibody_results.recognised_not_used:{vs}"
                for vs in self.site.antibody_results.recognised_not_used
            ),
        ]
        missing = [r for r in refs if r.rpartition(":")[2] not in known]
        for test_id, test in rs.tests.items():
            if test.code.system not in self.terminology.systems:
                missing.append(f"tests.{test_id}.code.system:{test.code.system}")
            if test.code.source not in self.terminology.sources:
                missing.append(f"tests.{test_id}.code.source:{test.code.source}")
        if missing:
            raise ValueError("unknown value set, system or source: " + ", ".join(missing))
        bad = []
        for test_id, test in rs.tests.items():
            coding = {
                "system": self.terminology.system_url(test.code.system),
                "code": test.code.code,
                "display": test.code.display,
            }
            try:
                Coding.model_validate(coding)
            except ValidationError as exc:
                bad.append(f"tests.{test_id}.code: {exc.errors()[0]['msg']}")
        if bad:
            raise ValueError("; ".join(bad))
        return self
