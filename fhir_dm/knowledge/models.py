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
# The scopes an assessment can have (fhir_dm.core.rules), as config names them.
ScopeId = Literal[
    "in-scope",
    "no-iim",
    "juvenile",
    "excluded-subtype",
    "late-diagnosis",
    "window-closed",
    "deceased",
]
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


class SexCode(_Frozen):
    """A code a sex extension may carry, and the sex it gives for clinical use.

    `undetermined`: the record says a plain female/male reading does not apply ("specified");
    `unknown`: nothing recorded, the next source is read.
    """

    system: str | None = None  # alias; a bare `valueCode` matches on the code alone
    code: str
    sex: Literal["female", "male", "undetermined", "unknown"]
    display: str
    source: str
    confidence: Confidence


class SexExtension(_Frozen):
    """A Patient extension that records sex, read in the order listed (first one that tells)."""

    url: str
    label: str
    # Complex extensions carry the value in a sub-extension (Gender Harmony: `value`).
    value_in: str | None = None
    source: str


class ClinicalSexSources(_Frozen):
    """Where sex for clinical use is read from, before `Patient.gender` (clinical-logic §2)."""

    extensions: tuple[SexExtension, ...]
    codes: tuple[SexCode, ...]


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
    # Word starts that, in the same text, mean it is not a possible cancer ("benign").
    possible_malignancy_except_words: tuple[str, ...] = ()
    # Words that mark an Observation name as an antibody result (unrecognised ones are reported).
    antibody_name_words: tuple[str, ...] = ()
    # Value sets an optional terminology server may widen (server.yaml); unused without one.
    server_checks: dict[str, ServerCheck] = {}
    # Sex for clinical use: the Patient extensions read before `gender` (patient.yaml).
    clinical_sex: ClinicalSexSources | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> Terminology:
        for vs_id, vs in self.value_sets.items():
            for i, entry in enumerate(vs.include):
                where = f"value_sets.{vs_id}.include.{i}"
                if entry.system not in self.systems:
                    raise ValueError(f"{where}: unknown system alias '{entry.system}'")
                if entry.source not in self.sources:
                    raise ValueError(f"{where}: unknown source key '{entry.source}'")
        if self.clinical_sex is not None:
            for i, ext in enumerate(self.clinical_sex.extensions):
                if ext.source not in self.sources:
                    raise ValueError(
                        f"clinical_sex.extensions.{i}: unknown source key '{ext.source}'"
                    )
            for i, sex_code in enumerate(self.clinical_sex.codes):
                where = f"clinical_sex.codes.{i}"
                if sex_code.system is not None and sex_code.system not in self.systems:
                    raise ValueError(f"{where}: unknown system alias '{sex_code.system}'")
                if sex_code.source not in self.sources:
                    raise ValueError(f"{where}: unknown source key '{sex_code.source}'")
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
    onset_age_lt: float | None = None
    sex_is: tuple[Sex, ...] | None = None
    feature: tuple[str, ...] | None = None
    tier_in: tuple[TierId, ...] | None = None
    site_flag: Literal["npc_region"] | None = None
    # Raised regional cancer risk for the site, or for the patient by country of birth (1.2.0).
    regional_risk: Literal["npc", "gastric"] | None = None

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

    def reads(self) -> tuple[str, ...]:
        """The facts it reads that may be unknown, in order: `antibody:<id>`, `onset_age`,
        `sex`, `subtype` (what can make a tier preliminary, clinical-logic §4)."""
        out: list[str] = []
        for p in self.walk():
            antibodies = (*(p.antibody_positive or ()), *(p.antibody_negative or ()))
            out.extend(f"antibody:{a}" for a in antibodies)
            if p.onset_age_gt is not None or p.onset_age_lt is not None:
                out.append("onset_age")
            if p.sex_is is not None:
                out.append("sex")
            if p.subtype_in is not None:
                out.append("subtype")
        return tuple(dict.fromkeys(out))


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
    # How a clinician reads the factor (cards): `label` may carry rule-writing notes.
    clinical_label: str | None = None
    when: Predicate

    @property
    def shown(self) -> str:
        """The clinical wording: `clinical_label`, else `label`."""
        return self.clinical_label or self.label

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


class DoneCodes(_Frozen):
    """A terminology value set whose codes show a test done (clinical-logic §10 rev 3).

    `partial`: the record answers only part of the test (a CT of chest, abdomen and pelvis for
    a CT of neck, chest, abdomen and pelvis); it counts as done and `note` says what is missing.
    """

    value_set: str
    partial: bool = False
    note: str = ""

    @model_validator(mode="after")
    def _partial_says_why(self) -> DoneCodes:
        if self.partial and not self.note.strip():
            raise ValueError("a partial match needs a 'note' saying what it leaves out")
        return self


class Test(_Frozen):
    display: str
    kind: Literal["order", "activity"]
    category: Literal["laboratory", "imaging", "procedure"]
    sex: Sex | None = None
    code: CodeRef
    # Overrides the rule set's `done_lookback_months` for this test (clinical-logic §10).
    done_lookback_months: int | None = Field(default=None, ge=0)
    # Value sets of the codes that show the test done, besides `code` itself (§10 rev 3).
    done: tuple[DoneCodes, ...] = ()


class Panel(_Sourced):
    label: str
    tests: tuple[str, ...]


# When a round's undone firm items stop being owed (clinical-logic §13): when the next round
# of its series opens; at the window's end date (the work-up at diagnosis); at the window's end
# + the grace (the last yearly round); or at its own due end + the grace (event rounds, the last
# lung round). Unset: the next round of the series, else its due end + the grace.
# `never`: a "consider" item that stays open (the safety net outside the guideline).
Lapse = Literal["next-round", "window-end", "window-end-grace", "due-end-grace", "never"]


class Round(_Frozen):
    id: str
    label: str
    offset_months: int = Field(ge=0)
    due_within_months: int = Field(ge=1)
    panels: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    lapses: Lapse | None = None


class PlanLife(_Sourced):
    """How a plan lives over its window (clinical-logic §13): lapse grace, order lead time."""

    # The last round's items stay overdue this long after the window's end date.
    overdue_grace_months: int = Field(ge=0, le=24)
    # Orders for a round are written this long before it opens (future rounds are activities).
    order_lead_months: int = Field(ge=0, le=3)
    # The one notice that replaces the work-up items at diagnosis once they lapse; `{tests}`.
    workup_not_recorded: str
    # Why undone IMACS items end when a cancer is found after the diagnosis; `{date}`.
    ended_by_cancer: str


class Schedule(_Sourced):
    rounds: tuple[Round, ...]


class Addon(_Sourced):
    id: str
    label: str
    tests: tuple[str, ...]
    round: str
    when: Predicate
    conditional: bool = True
    # When it fires, these tests' items say "or <this test> instead" (an alternative).
    alternative_to: tuple[str, ...] = ()
    alternative_note: str = ""


class RedFlags(_Sourced):
    facts: tuple[str, ...]
    add_panels: tuple[str, ...]
    # Red flags present by the end of this round's due window join it ...
    round: str
    # ... later ones get a round of their own, dated from the red flag.
    event_round: Round
    conditional: bool = True
    label: str
    # Always shown: `{flags}`, `{since}` (" since <date>" of the latest, when dated).
    notice: str
    juvenile_notice: str
    # Scopes where a red flag is a notice only, with no items (juvenile-onset).
    notice_only_scopes: tuple[ScopeId, ...] = ()


class ItemNote(_Sourced):
    """A note on one test's items when a predicate holds (e.g. an age-dependent alternative)."""

    test: str
    when: Predicate
    note: str


class ConditionalNotice(_Sourced):
    id: str
    when: Predicate
    text: str


class CohortRates(_Sourced):
    text: str


class OutsideGuideline(_Sourced):
    """The safety net for patients outside the guideline: a notice and "consider" items."""

    scopes: tuple[ScopeId, ...]
    label: str
    notice: str
    round: Round


class ActiveMalignancy(_Sourced):
    # `{cancer}` is replaced by the names of the active malignancies.
    message: str
    # Every cancer-screening item becomes a "consider" item with this condition text.
    consider_text: str


class PriorMalignancy(_Sourced):
    # `{cancer}` is replaced by the names of the cancers diagnosed before the myositis began.
    message: str
    # Past cancers whose date does not place them before or after the myositis.
    order_unknown_message: str


class CancerAssociated(_Sourced):
    """A cancer found after the myositis began (clinical-logic §6 rev 3): never "recurrence"."""

    # `{cancer}` is replaced by the names of those cancers.
    message: str
    # Cancer-screening items become "consider" with this text (when no cancer is active).
    consider_text: str


class CancerImplied(_Sourced):
    """A code that says the myositis is due to a neoplasm (ICD-10 M36.0) with no cancer recorded."""

    value_set: str
    # `{conditions}` is replaced by the Conditions that carry the code.
    message: str
    consider_text: str


class PossibleMalignancy(_Sourced):
    """A Condition that names a cancer the rules cannot read as one (clinical-logic §12 rev 3)."""

    # Value sets read as "possible malignancy" (e.g. neoplasms of uncertain behaviour); a
    # Condition no value set knows whose text names a cancer counts too.
    value_sets: tuple[str, ...] = ()
    # Said first in every output, before the tier.
    headline: str
    # `{conditions}` is replaced by the Conditions concerned.
    message: str
    consider_text: str


class ClinicalSexRule(_Sourced):
    """Sex-specific tests when the sex for clinical use is uncertain (clinical-logic §2 rev 3)."""

    # `{reason}` says which records disagree (or that the record says "specified").
    message: str
    # Condition text of every sex-specific test; `{test_sex}` and `{reason}` are filled in.
    consider_text: str


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
    conditional: bool = True
    # The panels only when this holds (a high-risk antibody or a past cancer); else the notice.
    targeted_when: Predicate | None = None
    review_notice: str = ""
    # The condition text of the flare round's "consider" items.
    consider_text: str = ""


class LungScreening(_Sourced):
    label: str
    round: Round
    unless_done_within_months: int = Field(ge=0)
    # The scopes screened (adults in or past the guideline's window, or diagnosed late).
    scopes: tuple[ScopeId, ...]


class LungEarly(_Sourced):
    when: Predicate
    replaces: str
    round: Round
    notice: str


class LungSurveillance(_Sourced):
    label: str
    when: Predicate
    rounds: tuple[Round, ...]
    notice: str = ""
    screening: LungScreening | None = None
    early: LungEarly | None = None


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
    cancer_associated: CancerAssociated
    cancer_implied: CancerImplied
    possible_malignancy: PossibleMalignancy
    clinical_sex: ClinicalSexRule
    patient_link: PatientLink
    checkpoint_inhibitor: CheckpointInhibitor
    subtype_options: tuple[SubtypeOption, ...] = ()
    flare: FlareRule
    lung_surveillance: LungSurveillance
    outside_guideline: OutsideGuideline
    item_notes: tuple[ItemNote, ...] = ()
    conditional_notices: tuple[ConditionalNotice, ...] = ()
    cohort_rates: CohortRates | None = None
    antibody_testing: AntibodyTesting
    # A test done at most this many months before a round opens counts for it (§10).
    done_lookback_months: Valued
    plan_life: PlanLife

    def tier_facts(self) -> tuple[str, ...]:
        """The unknowns that can raise a tier, read off the high- and intermediate-class factors
        (clinical-logic §4): their antibodies (`antibody:<id>`), age at onset, sex, subtype."""
        read = [
            name
            for factor in self.factors
            if factor.factor_class in TIER_CLASSES
            for name in factor.when.reads()
        ]
        antibodies = [n for n in read if n.startswith("antibody:")]
        return (*dict.fromkeys(antibodies), *(f for f in PRELIMINARY_FACTS if f in read))

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
        # Every high-class antibody is proposed when untested: added here, so a new high-risk
        # antibody needs no second edit; the file lists the others (intermediate by design).
        listed = self.antibody_testing.when_untested
        untested = tuple(dict.fromkeys((*self.factor_antibodies("high"), *listed)))
        if untested != listed:
            object.__setattr__(
                self,
                "antibody_testing",
                self.antibody_testing.model_copy(update={"when_untested": untested}),
            )
        problems = [
            f"antibody_testing.when_untested: '{a}' is in no high or intermediate factor"
            for a in listed
            if f"antibody:{a}" not in derived
        ]
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
        lung = self.lung_surveillance
        if lung.screening is not None:
            check_tests("lung_surveillance.screening.round.tests", lung.screening.round.tests)
        if lung.early is not None:
            check_predicate("lung_surveillance.early.when", lung.early.when)
            check_tests("lung_surveillance.early.round.tests", lung.early.round.tests)
            if lung.early.replaces not in {r.id for r in lung.rounds}:
                problems.append(
                    f"lung_surveillance.early.replaces: unknown round '{lung.early.replaces}'"
                )
        for i, addon in enumerate(self.addons):
            check_tests(f"addons.{i}.alternative_to", addon.alternative_to)
        for i, item_note in enumerate(self.item_notes):
            check_predicate(f"item_notes.{i}.when", item_note.when)
            check_tests(f"item_notes.{i}.test", (item_note.test,))
        for i, cond in enumerate(self.conditional_notices):
            check_predicate(f"conditional_notices.{i}.when", cond.when)
        check_tests("outside_guideline.round.tests", self.outside_guideline.round.tests)
        if self.flare.targeted_when is not None:
            check_predicate("flare.targeted_when", self.flare.targeted_when)
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
    # Raised gastric cancer risk region (e.g. Japan, Korea): upper GI endoscopy to consider at
    # diagnosis for moderate and high risk, deviating from IMACS.
    gastric_region: bool = False
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


class RegionalRisk(_Frozen):
    """Patients at raised regional cancer risk whatever the site, by country of birth
    (`patient-birthPlace` address country, compared case-insensitively; codes or names)."""

    npc_birth_countries: tuple[str, ...] = ()
    gastric_birth_countries: tuple[str, ...] = ()

    def countries(self, kind: str) -> frozenset[str]:
        given = self.npc_birth_countries if kind == "npc" else self.gastric_birth_countries
        return frozenset(c.strip().casefold() for c in given)


class IdentifierType(_Frozen):
    """A coding of Identifier.type: which of a Patient's identifiers is the one shown."""

    system: str
    code: str


class PatientDisplay(_Frozen):
    # The medical record number shown on the app's page: the identifier of this type.
    mrn_identifier_type: IdentifierType = IdentifierType(
        system="http://terminology.hl7.org/CodeSystem/v2-0203", code="MR"
    )


class Site(_Frozen):
    """config/site.yaml: how this installation reads data and what it writes."""

    site: SiteFlags = SiteFlags()
    patient_display: PatientDisplay = PatientDisplay()
    regional_risk: RegionalRisk = RegionalRisk()
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
            f"cancer_implied.value_set:{rs.cancer_implied.value_set}",
            *(f"possible_malignancy.value_sets:{vs}" for vs in rs.possible_malignancy.value_sets),
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
        problems = self._done_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _done_problems(self) -> list[str]:
        """The done value sets exist, list codes (not prefixes), and each code shows one test
        done one way: a record with a code of two tests, or of a test fully and partly, would
        be read by guess."""
        term = self.terminology
        problems: list[str] = []
        owner: dict[tuple[str, str], tuple[str, bool]] = {}
        named: set[str] = set()

        dotless = {term.system_url(a) for a in term.dotless_systems}

        def key(system_url: str, code: str) -> tuple[str, str]:
            code = code.strip().upper()
            return system_url, code.replace(".", "") if system_url in dotless else code

        def claim(where: str, code_key: tuple[str, str], test_id: str, partial: bool) -> None:
            seen = owner.setdefault(code_key, (test_id, partial))
            if seen == (test_id, partial):
                return
            code = f"{code_key[0]}|{code_key[1]}"
            problems.append(
                f"{where}: code {code} shows two tests done ('{seen[0]}' and '{test_id}'):"
                " list it once"
                if seen[0] != test_id
                else f"{where}: code {code} is both a full and a partial match of"
                f" '{test_id}': list it once"
            )

        for test_id, test in self.ruleset.tests.items():
            claim(
                f"tests.{test_id}.code",
                key(term.system_url(test.code.system), test.code.code),
                test_id,
                False,
            )
        for test_id, test in self.ruleset.tests.items():
            for i, done in enumerate(test.done):
                where = f"tests.{test_id}.done.{i}"
                vs = term.value_sets.get(done.value_set)
                if vs is None:
                    problems.append(f"{where}: unknown value set '{done.value_set}'")
                    continue
                if done.value_set in named:
                    problems.append(f"{where}: value set '{done.value_set}' is named twice")
                    continue
                named.add(done.value_set)
                for n, entry in enumerate(vs.include):
                    if entry.code is None:
                        problems.append(
                            f"{where}: value set '{done.value_set}' include.{n} is a prefix;"
                            " done codes are listed one by one"
                        )
                        continue
                    code_key = key(term.system_url(entry.system), entry.code)
                    claim(f"{where} ({done.value_set})", code_key, test_id, done.partial)
                for mapping in term.mappings:
                    if mapping.value_set == done.value_set:
                        alias = term.system_aliases.get(mapping.system)
                        system = term.system_url(alias) if alias else mapping.system
                        claim(
                            f"{where} (local code)",
                            key(system, mapping.code),
                            test_id,
                            done.partial,
                        )
        return problems
