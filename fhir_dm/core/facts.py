"""Read the facts the rules need from one patient's FHIR resources.

Every fact is a value or UNKNOWN, with the references of the resources it came from. Absent
data is UNKNOWN, never negative. Data that cannot be used (unrecognised codes, unusable
statuses, unparseable dates) is listed in `findings`, in words that carry no patient data.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple

from fhir_dm.core.dates import DateSpan, add_months, age_span, parse_fhir_date
from fhir_dm.core.inputs import LINK_JOINED, PatientRecord, Resource, normalise_reference
from fhir_dm.core.results import Grade, ResultGrader, normalise_unit, parse_bounds
from fhir_dm.core.terminology import Matcher, normalise_name
from fhir_dm.knowledge.models import (
    Knowledge,
    Refractory,
    ResultStrings,
    SexCode,
    SexExtension,
)


class _Unknown:
    """The value of a fact nobody recorded; falsy tests on it are a bug, so it refuses bool()."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __bool__(self) -> bool:
        raise TypeError("UNKNOWN has no truth value; compare with `is UNKNOWN`")


UNKNOWN: Final = _Unknown()

FactValue = bool | str | _Unknown

# Condition statuses (terminology.hl7.org condition-clinical / condition-ver-status).
ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
INACTIVE_CLINICAL = frozenset({"inactive", "remission", "resolved"})
IGNORED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
# Records that show a screening test done (clinical-logic §10), by type and status.
DONE_STATUSES = {
    "Procedure": frozenset({"completed"}),
    "DiagnosticReport": frozenset({"final", "amended", "corrected", "appended"}),
    "ServiceRequest": frozenset({"completed"}),
    "ImagingStudy": frozenset({"available"}),
    "Observation": frozenset({"final", "amended", "corrected"}),
}
ACTIVE_MEDICATION = frozenset({"active", "on-hold"})
# DiagnosticReports whose results are not read (the results' own statuses decide otherwise).
IGNORED_REPORT_STATUSES = frozenset({"entered-in-error", "cancelled"})
EQUIVOCAL_FINDING = (
    "equivocal antibody result (equivocal, borderline, indeterminate) counted as unknown"
)
# Medication records that say a course was given (for "recently given" rules).
GIVEN_MEDICATION = frozenset({"active", "on-hold", "completed", "stopped", "in-progress"})
MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration")


@dataclass(frozen=True, slots=True)
class Fact:
    """One fact about the patient and the resources it was read from."""

    value: FactValue
    sources: tuple[str, ...] = ()
    note: str = ""
    when: date | None = None

    @property
    def known(self) -> bool:
        return self.value is not UNKNOWN

    def is_true(self) -> bool:
        return self.value is True


UNKNOWN_FACT = Fact(UNKNOWN)


@dataclass(frozen=True, slots=True)
class IimDiagnosis:
    """The IIM Condition the plan is about: subtype, symptom onset and diagnosis date.

    Symptom onset decides eligibility and the age at onset; the diagnosis date anchors the
    schedule (clinical-logic §1). Each says where it was read from.
    """

    reference: str
    subtype: str
    onset: DateSpan | None
    onset_source: str
    diagnosed: DateSpan | None = None
    diagnosis_source: str = "none"
    unconfirmed_status: str | None = None
    # Age at onset as the Condition states it (onsetAge / onsetRange), youngest and oldest
    # years: the age when the birth date is missing (clinical-logic §2, rev 3).
    stated_age: tuple[float, float] | None = None

    @property
    def confirmed(self) -> bool:
        return self.unconfirmed_status is None


@dataclass(frozen=True, slots=True)
class CkResult:
    """One creatine kinase value in U/L with its upper reference limit."""

    when: date
    value: float
    upper_limit: float
    reference: str

    @property
    def above_limit(self) -> bool:
        return self.value > self.upper_limit


@dataclass(frozen=True, slots=True)
class Evidence:
    """A record showing a screening test done: which test, the resource, its date and type.

    `partial`: the record answers only part of the test (configured per value set, `tests.<id>
    .done`); it counts as done and `note` says what it leaves out.
    """

    test_id: str
    reference: str
    when: date
    resource_type: str
    partial: bool = False
    note: str = ""


CancerOrder = Literal["before", "after", "unknown"]


@dataclass(frozen=True, slots=True)
class CancerRecord:
    """One recorded cancer and whether it came before or after the myositis began.

    The wording of the notices depends on the order (clinical-logic §6 rev 3): a cancer found
    before the myositis may recur, one found after it is the myositis's own cancer.
    """

    name: str
    reference: str
    active: bool
    order: CancerOrder
    when: date | None = None


class LabItem(NamedTuple):
    """One result to read: an Observation or a component, how outputs cite it, and its date."""

    data: Mapping[str, Any]
    ref: str
    when: DateSpan | None


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """Everything the rules may ask about one patient."""

    patient_reference: str
    patient_key: str
    sex: Fact
    birth_date: DateSpan | None
    iim: IimDiagnosis | None
    onset_age: tuple[float, float] | None
    antibodies: Mapping[str, Fact]
    features: Mapping[str, Fact]
    creatine_kinase: tuple[CkResult, ...]
    screening_done: Mapping[str, date]  # latest date per test, from screening_evidence
    findings: tuple[str, ...]
    all_sources: tuple[str, ...] = field(default=())
    deceased: Fact = field(default_factory=lambda: UNKNOWN_FACT)
    past_cancers: tuple[str, ...] = ()
    # Every record showing a screening test done, oldest first (clinical-logic §10).
    screening_evidence: tuple[Evidence, ...] = ()
    # Names of the malignancies recorded as active (a plan says which cancer it defers to).
    active_cancers: tuple[str, ...] = ()
    # Country of birth (`patient-birthPlace`), as given: sites map it to regional cancer risk.
    birth_country: str | None = None
    # Every recorded cancer (active, past, history-of), with its order to the myositis.
    cancers: tuple[CancerRecord, ...] = ()
    # Why the sex for clinical use is uncertain (records disagree, or "specified"); "" if not.
    sex_uncertain: str = ""
    # Patient.link links that joined other Patient records into this one ("Patient/old
    # replaced-by Patient/new"), and those joined records' references (clinical-logic §2 rev 3).
    patient_links: tuple[str, ...] = ()
    linked_patients: tuple[str, ...] = ()

    def feature(self, name: str) -> Fact:
        return self.features.get(name, UNKNOWN_FACT)

    def antibody(self, name: str) -> Fact:
        return self.antibodies.get(name, UNKNOWN_FACT)


# --- small readers ---------------------------------------------------------------------------


def _codes(concept: Mapping[str, Any] | None) -> list[str]:
    return [c.get("code", "") for c in (concept or {}).get("coding") or []]


def _status_code(concept: Mapping[str, Any] | None) -> str | None:
    codes = _codes(concept)
    return codes[0] if codes else None


def _observation_date(resource: Mapping[str, Any]) -> DateSpan | None:
    if "effectiveDateTime" in resource:
        return parse_fhir_date(resource["effectiveDateTime"])
    period = resource.get("effectivePeriod") or {}
    span = parse_fhir_date(period.get("end")) or parse_fhir_date(period.get("start"))
    return span or parse_fhir_date(resource.get("effectiveInstant") or resource.get("issued"))


def patient_key(patient: Mapping[str, Any], reference: str) -> str:
    """A stable, non-identifying key for a patient: hash of the first identifier, else the id."""
    identifiers = [
        f"{i.get('system', '')}|{i['value']}"
        for i in patient.get("identifier") or []
        if i.get("value")
    ]
    basis = identifiers[0] if identifiers else reference
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


class _Reader:
    """Collects facts for one patient; one instance per assessment (no shared state)."""

    def __init__(self, record: PatientRecord, knowledge: Knowledge, matcher: Matcher) -> None:
        self.record = record
        self.k = knowledge
        self.rs = knowledge.ruleset
        self.m = matcher
        self.findings: dict[str, list[str]] = {}
        self.sources: set[str] = set()
        self._lab_items: list[LabItem] | None = None
        self.cancer_names: list[str] = []
        self.active_cancer_names: list[str] = []
        self.possible_malignancy = _word_pattern(
            knowledge.terminology.possible_malignancy_words, starts=True
        )
        self.not_malignancy = _word_pattern(
            knowledge.terminology.possible_malignancy_except_words, starts=True
        )
        # Conditions that may be a cancer but are not coded as one (clinical-logic §12 rev 3).
        self.possible_malignancy_refs: list[str] = []
        self.cancers: list[CancerRecord] = []

    def note(self, message: str, ref: str | None = None) -> None:
        """Record input the rules could not use; one finding per message, refs grouped."""
        refs = self.findings.setdefault(message, [])
        if ref is not None and ref not in refs:
            refs.append(ref)

    def grouped_findings(self) -> tuple[str, ...]:
        """One line per kind of problem, naming at most a few resources (never patient data)."""
        return tuple(_group_line(message, refs) for message, refs in self.findings.items())

    def of_type(self, *types: str) -> Iterator[tuple[str, Resource]]:
        for ref, resource in self.record.resources:
            if resource["resourceType"] in types:
                yield ref, resource

    # --- conditions ---

    def usable_conditions(self) -> list[tuple[str, Resource, frozenset[str]]]:
        out = []
        for ref, cond in self.of_type("Condition"):
            if _status_code(cond.get("verificationStatus")) in IGNORED_VERIFICATION:
                self.note(
                    "condition ignored (verification status refuted or entered-in-error)", ref
                )
                continue
            value_sets = self.m.concept(cond.get("code")).value_sets
            if not value_sets:
                coded = bool((cond.get("code") or {}).get("coding"))
                text = _concept_text(cond.get("code"))
                if self.possible_malignancy.search(text) and not self.not_malignancy.search(text):
                    # Never read as a cancer (no guess), never silent either: a headline notice.
                    self.possible_malignancy_refs.append(ref)
                else:
                    self.note(
                        "condition code not recognised"
                        if coded
                        else "text-only condition not recognised (not guessed)",
                        ref,
                    )
            out.append((ref, cond, value_sets))
        return out

    def iim(
        self, conditions: Sequence[tuple[str, Resource, frozenset[str]]]
    ) -> IimDiagnosis | None:
        """The IIM diagnosis: confirmed ones first, then by subtype precedence.

        The dates are the earliest over every IIM Condition of the same standing (a myositis
        coded as PM in 2022 and as DM in 2024 was diagnosed in 2022); outputs name the Condition
        a date came from when it is not the one that gives the subtype.
        """
        unconfirmed = self.rs.scope.unconfirmed_diagnosis.statuses
        found: list[tuple[tuple[bool, int], str, Resource, str]] = []
        for ref, cond, value_sets in conditions:
            if _status_code(cond.get("clinicalStatus")) in INACTIVE_CLINICAL - {"remission"}:
                continue
            open_question = _status_code(cond.get("verificationStatus")) in unconfirmed
            ranks = [
                (rank, concept.id)
                for rank, concept in enumerate(self.rs.subtypes)
                if concept.value_set in value_sets
            ]
            if ranks:
                rank, subtype = min(ranks)
                found.append(((open_question, rank), ref, cond, subtype))
        if not found:
            return None
        best_key, best_ref, best_cond, subtype = min(found, key=lambda c: c[0])
        peers = [c for c in found if c[0][0] == best_key[0]]
        self.sources.update(c[1] for c in peers)
        onsets: list[tuple[DateSpan, str]] = []
        diagnoses: list[tuple[DateSpan, str]] = []
        ages: list[tuple[float, float]] = []
        for _, ref, cond, _ in peers:
            age = self.stated_age(cond, ref)
            if age is not None:
                ages.append(age)
            where = "" if ref == best_ref else f", {ref}"
            recorded = parse_fhir_date(cond.get("recordedDate"))
            onset, source = self.onset(cond, ref)
            if onset is None and recorded is not None:
                onset, source = recorded, "recordedDate" + (f" ({source})" if source else "")
            if onset is not None:
                onsets.append((onset, source + where))
            diagnosed, diagnosis_source = self.diagnosis_date(cond, onset, source)
            if diagnosed is not None:
                diagnoses.append((diagnosed, diagnosis_source + where))
        onset_pick = min(onsets, key=lambda d: d[0].earliest) if onsets else None
        diagnosis_pick = min(diagnoses, key=lambda d: d[0].earliest) if diagnoses else None
        status = _status_code(best_cond.get("verificationStatus"))
        return IimDiagnosis(
            best_ref,
            subtype,
            onset_pick[0] if onset_pick else None,
            onset_pick[1] if onset_pick else "none",
            diagnosis_pick[0] if diagnosis_pick else None,
            diagnosis_pick[1] if diagnosis_pick else "none",
            status if status in unconfirmed else None,
            min(ages) if ages else None,  # the earliest onset is the youngest age
        )

    def diagnosis_date(
        self, cond: Mapping[str, Any], onset: DateSpan | None, onset_source: str
    ) -> tuple[DateSpan | None, str]:
        """The date the schedule runs from, from the first configured element that has one."""
        for element in self.rs.scope.diagnosis_date.read_from:
            if element.startswith("extension:"):
                url = element.partition(":")[2]
                for ext in cond.get("extension") or []:
                    if ext.get("url") == url:
                        span = parse_fhir_date(ext.get("valueDateTime") or ext.get("valueDate"))
                        if span:
                            return span, "assertedDate extension"
            elif element == "recordedDate":
                span = parse_fhir_date(cond.get("recordedDate"))
                if span:
                    return span, "recordedDate"
            elif element == "onset" and onset is not None:
                return onset, f"symptom onset ({onset_source})"
        return None, "none"

    def onset(self, cond: Mapping[str, Any], ref: str) -> tuple[DateSpan | None, str]:
        if "onsetDateTime" in cond:
            span = parse_fhir_date(cond["onsetDateTime"])
            return (span, "onsetDateTime") if span else (None, "onsetDateTime unparseable")
        if "onsetPeriod" in cond:
            span = parse_fhir_date((cond["onsetPeriod"] or {}).get("start"))
            return (span, "onsetPeriod.start") if span else (None, "onsetPeriod without start")
        if "onsetAge" in cond or "onsetRange" in cond:
            return self.onset_from_age(cond, ref)
        if "onsetString" in cond:
            self.note("onsetString cannot be used as a date; fell back to recordedDate", ref)
            return None, "onsetString unusable"
        return None, ""

    def stated_age(self, cond: Mapping[str, Any], ref: str) -> tuple[float, float] | None:
        """The age at onset an onsetAge or onsetRange states, in years (None, and a finding
        once, when it cannot be read)."""
        element = "onsetAge" if "onsetAge" in cond else "onsetRange"
        if element not in cond:
            return None
        value = cond[element] or {}
        ages = (
            _age_years(value)
            if element == "onsetAge"
            else _range_years(value.get("low"), value.get("high"))
        )
        if ages is None:
            self.note(f"{element} without a usable age in years, months, weeks or days", ref)
        return ages

    def onset_from_age(self, cond: Mapping[str, Any], ref: str) -> tuple[DateSpan | None, str]:
        """The onset date an onsetAge / onsetRange gives with the birth date (an interval)."""
        element = "onsetAge" if "onsetAge" in cond else "onsetRange"
        birth = parse_fhir_date(self.record.patient.get("birthDate"))
        ages = self.stated_age(cond, ref)
        if ages is None:
            return None, f"{element} unusable"
        if birth is None:
            # The age still counts as the age at onset (PatientFacts.onset_age); no date.
            return None, f"{element} without birth date"
        earliest = _add_years(birth.earliest, ages[0])
        latest = _add_years(birth.latest, ages[1])
        return DateSpan(earliest, latest), element

    def condition_features(
        self, conditions: Sequence[tuple[str, Resource, frozenset[str]]]
    ) -> dict[str, Fact]:
        features: dict[str, Fact] = {}
        for feature in self.rs.features:
            present: list[str] = []
            resolved: list[str] = []
            dates: list[date] = []
            for ref, cond, value_sets in conditions:
                if feature.value_set not in value_sets:
                    continue
                status = _status_code(cond.get("clinicalStatus"))
                (resolved if status in INACTIVE_CLINICAL else present).append(ref)
                span = parse_fhir_date(cond.get("onsetDateTime")) or parse_fhir_date(
                    cond.get("recordedDate")
                )
                if span:
                    dates.append(span.latest)
            # A feature of the disease counts for cancer risk even once it has resolved.
            if present or resolved:
                note = "" if present else "recorded as resolved"
                when = max(dates) if dates else None
                features[feature.id] = Fact(True, tuple(present + resolved), note, when)
            else:
                features[feature.id] = UNKNOWN_FACT
            self.sources.update(present + resolved)
        return features

    def cancer_facts(
        self,
        conditions: Sequence[tuple[str, Resource, frozenset[str]]],
        iim: IimDiagnosis | None,
    ) -> dict[str, Fact]:
        """Active, past and family cancers; possible and implied ones.

        A cancer found after the myositis began is the myositis's own cancer, not a red flag
        for an occult one (clinical-logic §6 rev 3), so it is not a `personal_history_cancer`.
        """
        active: list[str] = []
        history: list[str] = []
        family: list[str] = []
        implied: list[str] = []
        dates: dict[str, list[date]] = {"active": [], "history": [], "family": []}
        self.cancer_names = []
        start = _myositis_start(iim)
        possible_sets = set(self.rs.possible_malignancy.value_sets)
        for ref, cond, value_sets in conditions:
            status = _status_code(cond.get("clinicalStatus"))
            day = _condition_date(cond)
            onset = _onset_span(cond)
            recorded = parse_fhir_date(cond.get("recordedDate"))
            name = _concept_name(cond.get("code"))
            if "malignancy" in value_sets:
                is_active = status not in INACTIVE_CLINICAL
                # An active cancer was recorded when found; a past one may be entered long after.
                diagnosed = onset or (recorded if is_active else None)
                order = _order(diagnosed, recorded, start)
                self.cancers.append(
                    CancerRecord(
                        name, ref, is_active, order, diagnosed.latest if diagnosed else None
                    )
                )
                if is_active:
                    active.append(ref)
                    self.active_cancer_names.append(f"{name}, {ref}")
                    if day:
                        dates["active"].append(day)
                else:
                    self.cancer_names.append(name)
                    if order != "after":
                        history.append(ref)
                        if day:
                            dates["history"].append(day)
            elif possible_sets & value_sets:
                self.possible_malignancy_refs.append(ref)
            if "history-of-cancer" in value_sets:
                order = _order(onset, recorded, start)
                self.cancers.append(
                    CancerRecord(name, ref, False, order, onset.latest if onset else None)
                )
                self.cancer_names.append(name)
                if order != "after":
                    history.append(ref)
                    if day:
                        dates["history"].append(day)
            if "family-history-cancer" in value_sets:
                family.append(ref)
                if day:
                    dates["family"].append(day)
            if self.rs.cancer_implied.value_set in value_sets:
                implied.append(ref)
        for ref, fmh in self.of_type("FamilyMemberHistory"):
            if fmh.get("status") == "entered-in-error":
                continue
            if any(
                "malignancy" in self.m.concept(c.get("code")).value_sets
                for c in fmh.get("condition") or []
            ):
                family.append(ref)
                span = parse_fhir_date(fmh.get("date"))
                if span:
                    dates["family"].append(span.latest)
        possible = list(dict.fromkeys(self.possible_malignancy_refs))
        self.sources.update(active + history + family + implied + possible)
        self.sources.update(c.reference for c in self.cancers)

        def fact(refs: list[str], kind: str) -> Fact:
            # Dated by the most recent record: a red flag's round runs from the latest event.
            when = max(dates[kind]) if dates[kind] else None
            return Fact(True, tuple(refs), when=when) if refs else UNKNOWN_FACT

        return {
            "active_malignancy": fact(active, "active"),
            "personal_history_cancer": fact(history, "history"),
            "family_history_cancer": fact(family, "family"),
            "cancer_implied": Fact(True, tuple(implied)) if implied else UNKNOWN_FACT,
            "possible_malignancy": Fact(True, tuple(possible)) if possible else UNKNOWN_FACT,
        }

    # --- observations ---

    def usable_observations(self) -> list[tuple[str, Resource]]:
        usable = self.k.site.observations.usable_statuses
        out = []
        for ref, obs in self.of_type("Observation"):
            if obs.get("status") not in usable:
                self.note(f"observation ignored (status {obs.get('status')})", ref)
                continue
            out.append((ref, obs))
        return out

    def lab_items(self, observations: Sequence[tuple[str, Resource]]) -> list[LabItem]:
        """Every result the record holds for this patient, each once: the usable Observations
        with their components and panel members (`hasMember`, bundled or contained `#id`), and
        the results of the patient's DiagnosticReports (bundled or contained; a result without
        a subject belongs to its report's subject). Anything unreachable is a finding."""
        if self._lab_items is not None:
            return self._lab_items
        items: list[LabItem] = []
        visited: set[int] = set()
        for ref, obs in observations:
            self.walk_result(obs, ref, (obs, ref), None, items, visited)
        for ref, report in self.of_type("DiagnosticReport"):
            if report.get("status") in IGNORED_REPORT_STATUSES:
                self.note(f"diagnostic report ignored (status {report.get('status')})", ref)
                continue
            when = _observation_date(report)
            for link in report.get("result") or []:
                found = self.linked_result(link, (report, ref), "report result")
                if found is not None:
                    self.walk_result(*found, when, items, visited)
        self._lab_items = items
        return items

    def walk_result(
        self,
        obs: Resource,
        ref: str,
        container: tuple[Resource, str],
        inherited: DateSpan | None,
        items: list[LabItem],
        visited: set[int],
    ) -> None:
        """One Observation, its components and its members; a member without a date takes its
        panel's (or report's) date."""
        if id(obs) in visited:
            return
        visited.add(id(obs))
        when = _observation_date(obs) or inherited
        items.append(LabItem(obs, ref, when))
        for n, component in enumerate(obs.get("component") or []):
            items.append(LabItem(component, f"{ref}#component{n}", when))
        for link in obs.get("hasMember") or []:
            found = self.linked_result(link, container, "panel member")
            if found is not None:
                self.walk_result(*found, when, items, visited)

    def linked_result(
        self, link: Mapping[str, Any], container: tuple[Resource, str], what: str
    ) -> tuple[Resource, str, tuple[Resource, str]] | None:
        """The Observation a panel or report links to, how to cite it and where its own `#id`
        links resolve; None (and a finding) when it cannot be used."""
        resource, container_ref = container
        target = link.get("reference")
        if not isinstance(target, str):
            self.note(f"{what} without a reference; not used", container_ref)
            return None
        member: Resource | None
        if target.startswith("#"):
            member = next(
                (c for c in resource.get("contained") or [] if c.get("id") == target[1:]), None
            )
            ref, inner = f"{container_ref}{target}", container
        else:
            member = self.record.resolve(target)
            ref = (
                f"Observation/{member['id']}"
                if member is not None and member.get("id")
                else normalise_reference(target)
            )
            inner = (member, ref) if member is not None else container
        if member is None:
            self.note(f"{what} not in the input", container_ref)
            return None
        if member.get("resourceType") != "Observation":
            self.note(f"{what} is not an Observation; not used", ref)
            return None
        if member.get("status") not in self.k.site.observations.usable_statuses:
            self.note(f"{what} ignored (status {member.get('status')})", ref)
            return None
        if self.record.subject_is_other(member.get("subject")):
            self.note(f"{what} is about another subject; not used", ref)
            return None
        return member, ref, inner

    def antibody_results(self, observations: Sequence[tuple[str, Resource]]) -> dict[str, Fact]:
        """Each antibody's grade from every result that names it (by code, local code or name)."""
        by_vs = {a.value_set: a.id for a in self.rs.antibodies}
        not_used = frozenset(self.k.site.antibody_results.recognised_not_used)
        weak_counts = self.k.site.antibody_results.weak_positive == "positive"
        grader = _grader(self.k.terminology.result_strings, self.m)
        name_words = frozenset(normalise_name(w) for w in self.k.terminology.antibody_name_words)
        seen: dict[str, list[tuple[date, Grade, str]]] = {}
        unread: dict[str, list[str]] = {}
        for data, ref, when in self.lab_items(observations):
            if not _has_result(data) and (data.get("hasMember") or data.get("component")):
                continue  # a panel heading: its members are read
            match = self.m.concept(data.get("code"), use_text=True)
            hits = sorted({by_vs[vs] for vs in match.value_sets if vs in by_vs})
            if not hits:
                if match.value_sets & not_used:
                    self.note("antibody result recognised but used by no rule; not used", ref)
                elif not match.value_sets and name_words & set(
                    normalise_name(_concept_text(data.get("code"))).split()
                ):
                    self.note("antibody result not recognised as a myositis antibody", ref)
                continue
            if len(hits) > 1:
                self.note("result names several antibodies; not used", ref)
                continue
            reading = grader.grade(data)
            for problem in reading.problems:
                self.note(problem, ref)
            if reading.grade is None:
                unread.setdefault(hits[0], []).append(ref)
                continue
            if reading.grade is Grade.EQUIVOCAL:
                self.note(EQUIVOCAL_FINDING, ref)
            elif reading.grade is Grade.WEAK_POSITIVE and not weak_counts:
                self.note("weak positive counted as unknown (site setting)", ref)
            day = when.latest if when else date.min
            seen.setdefault(hits[0], []).append((day, reading.grade, ref))
        return {
            a.id: self.antibody_fact(a.id, seen.get(a.id, []), unread.get(a.id, []), weak_counts)
            for a in self.rs.antibodies
        }

    def antibody_fact(
        self,
        antibody: str,
        results: Sequence[tuple[date, Grade, str]],
        unread: Sequence[str],
        weak_counts: bool,
    ) -> Fact:
        """Any positive counts (assays differ; myositis antibodies rarely disappear), else the
        latest result; equivocal (and weak positive when the site says so) is UNKNOWN, with its
        source and a note, never positive or negative."""

        def value(grade: Grade) -> FactValue:
            if grade is Grade.POSITIVE or (grade is Grade.WEAK_POSITIVE and weak_counts):
                return True
            return False if grade is Grade.NEGATIVE else UNKNOWN

        if not results:
            if not unread:
                return UNKNOWN_FACT
            self.sources.update(r.split("#")[0] for r in unread)
            return Fact(UNKNOWN, tuple(unread), "result could not be read")
        positives = [r for r in results if value(r[1]) is True]
        if positives and len(positives) < len(results):
            self.note(f"anti-{antibody}: conflicting results; the positive one is used")
        # Latest first; on the same day the less certain reading wins (equivocal over negative).
        day, grade, ref = max(
            positives or results, key=lambda r: (r[0], r[1] is not Grade.NEGATIVE)
        )
        self.sources.add(ref.split("#")[0])
        note = {Grade.EQUIVOCAL: "equivocal", Grade.WEAK_POSITIVE: "weak positive"}.get(grade, "")
        return Fact(value(grade), (ref,), note, None if day == date.min else day)

    def creatine_kinase(self, observations: Sequence[tuple[str, Resource]]) -> tuple[CkResult, ...]:
        """CK values in U/L (units matched loosely: "U/l" = "U/L"), each with its upper limit."""
        cfg = self.rs.derived.creatine_kinase
        factors = {normalise_unit(u): f for u, f in cfg.unit_factors_to_u_per_l.items()}
        out = []
        for data, ref, when in self.lab_items(observations):
            if cfg.value_set not in self.m.concept(data.get("code")).value_sets:
                continue
            quantity = data.get("valueQuantity") or {}
            factor = factors.get(normalise_unit(quantity.get("code") or quantity.get("unit")))
            value = quantity.get("value")
            if factor is None or not isinstance(value, int | float) or not when:
                self.note("creatine kinase without a usable value, unit or date", ref)
                continue
            limit = self.ck_upper_limit(data, factors, factor)
            comparator = quantity.get("comparator")
            u_per_l = value * factor
            # A bound is usable only when it settles the comparison with the limit.
            if (comparator in ("<", "<=") and u_per_l > limit) or (
                comparator in (">", ">=") and u_per_l <= limit
            ):
                self.note("creatine kinase given as a bound that does not settle the limit", ref)
                continue
            out.append(CkResult(when.latest, u_per_l, limit, ref))
            self.sources.add(ref.split("#")[0])
        return tuple(sorted(out, key=lambda r: r.when))

    def ck_upper_limit(
        self, data: Mapping[str, Any], factors: Mapping[str, float], factor: float
    ) -> float:
        """The first reference range's upper limit (structured, else its text), else the
        configured default."""
        for rng in data.get("referenceRange") or []:
            high = rng.get("high") or {}
            if isinstance(high.get("value"), int | float):
                unit = normalise_unit(high.get("code") or high.get("unit"))
                high_factor = factors.get(unit) if unit else factor
                if high_factor is not None:
                    return float(high["value"]) * high_factor
            bounds = parse_bounds(rng.get("text") or "")
            if bounds is not None and bounds[1] is not None:
                return bounds[1][0] * factor
        return self.rs.derived.creatine_kinase.default_upper_limit_u_per_l

    def smoking(
        self,
        observations: Sequence[tuple[str, Resource]],
        conditions: Sequence[tuple[str, Resource, frozenset[str]]],
    ) -> Fact:
        statuses: list[tuple[date, FactValue, str]] = []
        for ref, obs in observations:
            if "smoking-status" not in self.m.concept(obs.get("code")).value_sets:
                continue
            value_sets = self.m.concept(obs.get("valueCodeableConcept")).value_sets
            value: FactValue = (
                True
                if "smoker-current" in value_sets
                else False
                if "smoker-not-current" in value_sets
                else UNKNOWN
            )
            when = _observation_date(obs)
            if value is not UNKNOWN:
                statuses.append((when.latest if when else date.min, value, ref))
        if statuses:
            statuses.sort(key=lambda s: s[0])
            day, value, ref = statuses[-1]
            self.sources.add(ref)
            if value is True:
                # Dated from the first record of the current run of "smoker" (repeated
                # recordings at each visit do not move the red flag's date).
                for earlier, earlier_value, _ in reversed(statuses):
                    if earlier_value is not True:
                        break
                    day = earlier
            return Fact(value, (ref,), when=None if day == date.min else day)
        for ref, cond, value_sets in conditions:
            status = _status_code(cond.get("clinicalStatus"))
            if "current-smoker-condition" in value_sets and status not in INACTIVE_CLINICAL:
                self.sources.add(ref)
                return Fact(True, (ref,), when=_condition_date(cond))
            if "former-smoker-condition" in value_sets or "current-smoker-condition" in value_sets:
                self.sources.add(ref)
                return Fact(False, (ref,))
        return UNKNOWN_FACT

    # --- medications and screening ---

    def medication_text(self, med: Mapping[str, Any], ref: str) -> str:
        """The names a medication record gives, from its concept or the Medication it names."""
        concept = med.get("medicationCodeableConcept")
        if concept is None and "medicationReference" in med:
            target = (med.get("medicationReference") or {}).get("reference")
            medication = self.medication(med, target) if isinstance(target, str) else None
            if medication is None:
                self.note("medicationReference not resolved (Medication not in the input)", ref)
                return ""
            concept = medication.get("code")
        return _concept_text(concept)

    def medication(self, med: Mapping[str, Any], target: str) -> Mapping[str, Any] | None:
        """A Medication named by reference: contained (`#id`) or elsewhere in the input."""
        if target.startswith("#"):
            return next(
                (
                    c
                    for c in med.get("contained") or []
                    if c.get("resourceType") == "Medication" and c.get("id") == target[1:]
                ),
                None,
            )
        found = self.record.resolve(target)
        return found if found is not None and found["resourceType"] == "Medication" else None

    def medications(self, names_key: str) -> Iterator[tuple[str, Resource, str]]:
        """(ref, record, status) of every medication record naming one of a list's ingredients."""
        term = self.k.terminology
        names = _word_pattern(term.medication_names.get(names_key, ()))
        excluded = _word_pattern(term.medication_exclude_words)
        for ref, med in self.of_type(*MEDICATION_TYPES):
            status = med.get("status") or ""
            if status not in GIVEN_MEDICATION:
                continue
            text = self.medication_text(med, ref)
            if names.search(text) and not excluded.search(text):
                yield ref, med, status

    def immunosuppression(self) -> tuple[Fact, date | None]:
        """Active systemic immunosuppression, and its earliest recorded start."""
        found: list[str] = []
        starts: list[date] = []
        for ref, med, status in self.medications("immunosuppressant"):
            if status not in ACTIVE_MEDICATION:
                continue
            found.append(ref)
            start = _medication_start(med)
            if start:
                starts.append(start.earliest)
        if not found:
            return UNKNOWN_FACT, None
        self.sources.update(found)
        return Fact(True, tuple(found)), min(starts) if starts else None

    def checkpoint_inhibitor(self) -> Fact:
        """A checkpoint inhibitor: `note` "active", or dated by the end of its last course."""
        key = self.rs.checkpoint_inhibitor.medication_names
        active: list[str] = []
        ended: list[tuple[date | None, str]] = []
        for ref, med, status in self.medications(key):
            if status in ACTIVE_MEDICATION or status == "in-progress":
                active.append(ref)
            else:
                end = _medication_end(med)
                ended.append((end.latest if end else None, ref))
        if active:
            self.sources.update(active)
            return Fact(True, tuple(active), "active")
        if not ended:
            return UNKNOWN_FACT
        self.sources.update(ref for _, ref in ended)
        dates = [d for d, _ in ended if d is not None]
        # An ended course without an end date cannot be shown to be old: read it as recent.
        when = max(dates) if len(dates) == len(ended) else None
        return Fact(True, tuple(ref for _, ref in ended), "ended", when)

    def screening_evidence(self) -> tuple[Evidence, ...]:
        """Every record that shows a screening test done, oldest first (clinical-logic §10).

        Read by each test's code and the value sets of codes that show it done (`tests.<id>
        .done`, clinical-logic §10 rev 3; a partial match is marked with its note): completed
        ServiceRequests (not fhir-dm's own: those are proposals dated by their due window,
        closed by write-back against the real evidence), final DiagnosticReports and
        Observations, completed Procedures, available ImagingStudies (`procedureCode`).
        Undated records cannot be placed in a round: a finding.
        """
        term = self.k.terminology
        by_code = {
            (term.system_url(t.code.system), t.code.code): test_id
            for test_id, t in self.rs.tests.items()
        }
        # Value set -> (test, partial, note); the loader made each code show one test one way.
        by_value_set = {
            done.value_set: (test_id, done.partial, done.note)
            for test_id, t in self.rs.tests.items()
            for done in t.done
        }
        ours = f"{self.rs.canonical_base}/sid/plan-item"
        found: dict[tuple[str, str], Evidence] = {}
        for ref, resource in self.of_type(*DONE_STATUSES):
            resource_type = resource["resourceType"]
            if resource.get("status") not in DONE_STATUSES[resource_type]:
                continue
            if resource_type == "ServiceRequest" and any(
                i.get("system") == ours for i in resource.get("identifier") or []
            ):
                continue
            concepts = (
                resource.get("procedureCode") or []
                if resource_type == "ImagingStudy"
                else [resource.get("code")]
            )
            # Per test: a full match wins over a partial one (the note of the first partial).
            shown: dict[str, tuple[bool, str]] = {}
            for concept in concepts:
                for coding in (concept or {}).get("coding") or []:
                    system, code = coding.get("system"), coding.get("code")
                    hits = [
                        by_value_set[vs]
                        for vs in sorted(self.m.code(system, code))
                        if vs in by_value_set
                    ]
                    if (system, code) in by_code:
                        hits.append((by_code[(system, code)], False, ""))
                    for test_id, partial, note in hits:
                        if not partial or test_id not in shown:
                            shown[test_id] = (partial, note)
            if not shown:
                continue
            span = _done_date(resource)
            if span is None:
                self.note("screening test record without a date: not counted as done", ref)
                continue
            self.sources.add(ref)
            for test_id, (partial, note) in shown.items():
                found.setdefault(
                    (test_id, ref),
                    Evidence(test_id, ref, span.latest, resource_type, partial, note),
                )
        return tuple(sorted(found.values(), key=lambda e: (e.when, e.test_id, e.reference)))


# UCUM codes (and the words labs send in `unit`) of an Age, in years per unit.
AGE_UNITS = {
    "a": 1.0,
    "yr": 1.0,
    "y": 1.0,
    "year": 1.0,
    "years": 1.0,
    "mo": 1 / 12,
    "month": 1 / 12,
    "months": 1 / 12,
    "wk": 7 / 365.25,
    "week": 7 / 365.25,
    "weeks": 7 / 365.25,
    "d": 1 / 365.25,
    "day": 1 / 365.25,
    "days": 1 / 365.25,
}


def _age_years(age: Any) -> tuple[float, float] | None:
    """An Age as youngest and oldest years: "52 a" is 52 up to 53 (the age in whole units)."""
    if not isinstance(age, Mapping) or age.get("comparator"):
        return None
    value = age.get("value")
    unit = age.get("code") or age.get("unit")
    factor = AGE_UNITS.get(unit.strip().lower()) if isinstance(unit, str) else None
    if factor is None or not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        return None
    upper = value + 1 if float(value).is_integer() else value
    return value * factor, upper * factor


def _range_years(low: Any, high: Any) -> tuple[float, float] | None:
    """An onsetRange as youngest and oldest years: both ends needed, low not above high."""
    youngest, oldest = _age_years(low), _age_years(high)
    if youngest is None or oldest is None or youngest[0] > oldest[1]:
        return None
    return youngest[0], oldest[1]


def _add_years(day: date, years: float) -> date:
    """A date plus a (fractional) number of years, to the day."""
    whole = int(years)
    start = add_months(day, 12 * whole)
    return start + timedelta(days=round((years - whole) * 365.25))


def _done_date(resource: Mapping[str, Any]) -> DateSpan | None:
    """When a test was done: performed, effective, started, or (a request) when it was due."""
    return (
        parse_fhir_date(resource.get("performedDateTime"))
        or parse_fhir_date((resource.get("performedPeriod") or {}).get("start"))
        or parse_fhir_date(resource.get("started"))
        or _observation_date(resource)
        or parse_fhir_date((resource.get("occurrencePeriod") or {}).get("end"))
        or parse_fhir_date(resource.get("occurrenceDateTime"))
        or parse_fhir_date(resource.get("authoredOn"))
    )


def latest_done(evidence: Sequence[Evidence]) -> dict[str, date]:
    """The latest date each test was done (for "not repeated within N months" rules)."""
    done: dict[str, date] = {}
    for e in evidence:
        if e.test_id not in done or e.when > done[e.test_id]:
            done[e.test_id] = e.when
    return done


MAX_REFS_PER_FINDING = 5


@lru_cache(maxsize=8)
def _grader(words: ResultStrings, matcher: Matcher) -> ResultGrader:
    """One compiled grader per knowledge base (the word lists become regular expressions)."""
    return ResultGrader(words, matcher)


def _has_result(item: Mapping[str, Any]) -> bool:
    """Whether an Observation or component states a result (a value, a flag or its absence)."""
    return (
        "interpretation" in item
        or "dataAbsentReason" in item
        or any(key.startswith("value") for key in item)
    )


def _condition_date(cond: Mapping[str, Any]) -> date | None:
    span = (
        parse_fhir_date(cond.get("onsetDateTime"))
        or parse_fhir_date((cond.get("onsetPeriod") or {}).get("start"))
        or parse_fhir_date(cond.get("recordedDate"))
    )
    return span.latest if span else None


def _onset_span(cond: Mapping[str, Any]) -> DateSpan | None:
    return parse_fhir_date(cond.get("onsetDateTime")) or parse_fhir_date(
        (cond.get("onsetPeriod") or {}).get("start")
    )


def _myositis_start(iim: IimDiagnosis | None) -> DateSpan | None:
    """When the myositis began: symptom onset, else the diagnosis date."""
    if iim is None:
        return None
    return iim.onset or iim.diagnosed


def _order(
    diagnosed: DateSpan | None, known_by: DateSpan | None, start: DateSpan | None
) -> CancerOrder:
    """Whether a cancer came before or after the myositis began; unknown when dates overlap.

    A cancer found on the day the myositis began counts as after (found with it, not before
    it). `known_by` (a recordedDate) only bounds a cancer from above: recorded before the
    myositis began, it came before.
    """
    if start is None:
        return "unknown"
    if diagnosed is not None:
        if diagnosed.latest < start.earliest:
            return "before"
        if diagnosed.earliest >= start.latest:
            return "after"
        return "unknown"
    if known_by is not None and known_by.latest < start.earliest:
        return "before"
    return "unknown"


def _concept_text(concept: Mapping[str, Any] | None) -> str:
    concept = concept or {}
    texts = [concept.get("text") or ""] + [
        c.get("display") or "" for c in concept.get("coding") or []
    ]
    return " ".join(t for t in texts if t)


def _concept_name(concept: Mapping[str, Any] | None) -> str:
    """A readable name for a coded concept: its text, else its first display."""
    concept = concept or {}
    if concept.get("text"):
        return str(concept["text"])
    displays = [c.get("display") for c in concept.get("coding") or [] if c.get("display")]
    return str(displays[0]) if displays else "a cancer (name not recorded)"


def _medication_start(med: Mapping[str, Any]) -> DateSpan | None:
    return (
        parse_fhir_date(med.get("authoredOn"))
        or parse_fhir_date(med.get("effectiveDateTime"))
        or parse_fhir_date((med.get("effectivePeriod") or {}).get("start"))
    )


def _medication_end(med: Mapping[str, Any]) -> DateSpan | None:
    validity = ((med.get("dispenseRequest") or {}).get("validityPeriod") or {}).get("end")
    return (
        parse_fhir_date((med.get("effectivePeriod") or {}).get("end"))
        or parse_fhir_date(validity)
        or parse_fhir_date(med.get("effectiveDateTime"))
        or _medication_start(med)
    )


def _group_line(message: str, refs: list[str]) -> str:
    if not refs:
        return message
    shown = ", ".join(refs[:MAX_REFS_PER_FINDING])
    more = len(refs) - MAX_REFS_PER_FINDING
    count = f"{len(refs)} x " if len(refs) > 1 else ""
    return f"{count}{message}: {shown}" + (f" and {more} more" if more > 0 else "")


@functools.lru_cache(maxsize=32)
def _word_pattern(words: tuple[str, ...], *, starts: bool = False) -> re.Pattern[str]:
    """Whole words (or, with `starts`, word starts), compiled once per configured word list."""
    alternatives = "|".join(re.escape(w) for w in words) or r"(?!x)x"
    end = "" if starts else r"(?!\w)"
    return re.compile(rf"(?<!\w)(?:{alternatives}){end}", re.IGNORECASE)


def _refractory(
    rule: Refractory, ck: Sequence[CkResult], treated: Fact, since: date | None, coded: Fact
) -> Fact:
    """CK above the limit on enough measurements, far enough apart, while on treatment."""
    if coded.is_true():
        return coded
    if rule.requires_active_immunosuppression and not treated.is_true():
        # Not known to be treated: "refractory despite treatment" cannot be judged.
        return UNKNOWN_FACT
    on_treatment = [r for r in ck if since is None or r.when >= since]
    high = [r for r in on_treatment if r.above_limit]
    if len(high) >= rule.ck_above_uln_count:
        first, last = high[0], high[-1]
        if add_months(first.when, rule.min_months_apart) <= last.when:
            sources = tuple(r.reference for r in high) + treated.sources
            return Fact(True, sources, "derived from CK on treatment")
    if not on_treatment:
        return UNKNOWN_FACT
    return Fact(
        False, tuple(r.reference for r in on_treatment), "CK on treatment does not meet the rule"
    )


def _flare(ck: Sequence[CkResult], coded: Fact) -> Fact:
    """A coded flare, or CK above the limit again after it had normalised (dated by the rise)."""
    if coded.is_true():
        return coded
    was_high = was_normal_after = False
    for r in ck:
        if r.above_limit and was_normal_after:
            return Fact(
                True,
                tuple(x.reference for x in ck),
                "CK above the limit again after normalising",
                when=r.when,
            )
        if r.above_limit:
            was_high = True
        elif was_high:
            was_normal_after = True
    return Fact(False, tuple(r.reference for r in ck)) if len(ck) >= 2 else UNKNOWN_FACT


def _deceased(patient: Mapping[str, Any], reference: str) -> Fact:
    """Deceased (True, dated when a date is given), alive (False) or not recorded."""
    if patient.get("deceasedBoolean") is True:
        return Fact(True, (reference,))
    span = parse_fhir_date(patient.get("deceasedDateTime"))
    if span is not None:
        return Fact(True, (reference,), when=span.earliest)
    if patient.get("deceasedBoolean") is False:
        return Fact(False, (reference,))
    return UNKNOWN_FACT


def _sex_values(
    patient: Mapping[str, Any],
    ext_def: SexExtension,
    codes: Sequence[SexCode],
    systems: Mapping[str, str],
) -> tuple[set[str], list[str]]:
    """The sexes one kind of extension gives (female, male, undetermined, unknown), and the
    codes it carries that the configuration does not know."""
    found = [e for e in patient.get("extension") or [] if e.get("url") == ext_def.url]
    if ext_def.value_in is not None:
        # Gender Harmony: several, each with a period; the current ones, else the latest.
        current = [e for e in found if not _sub(e, "period", "valuePeriod").get("end")]
        if current:
            found = current
        elif found:
            found = [max(found, key=lambda e: str(_sub(e, "period", "valuePeriod").get("end")))]
        holders = [
            sub
            for e in found
            for sub in e.get("extension") or []
            if sub.get("url") == ext_def.value_in
        ]
    else:
        holders = found
    sexes: set[str] = set()
    unknown_codes: list[str] = []
    for holder in holders:
        codings: list[tuple[str | None, str]] = []
        if isinstance(holder.get("valueCode"), str):
            codings.append((None, holder["valueCode"]))
        if isinstance(holder.get("valueCoding"), dict):
            codings.append(
                (holder["valueCoding"].get("system"), holder["valueCoding"].get("code", ""))
            )
        for c in (holder.get("valueCodeableConcept") or {}).get("coding") or []:
            codings.append((c.get("system"), c.get("code", "")))
        for system, code in codings:
            match = next(
                (
                    k.sex
                    for k in codes
                    if k.code == code
                    and (system is None or k.system is None or systems.get(k.system) == system)
                ),
                None,
            )
            if match is None:
                unknown_codes.append(code)
            else:
                sexes.add(match)
    return sexes, unknown_codes


def _sub(ext: Mapping[str, Any], url: str, key: str) -> Mapping[str, Any]:
    for sub in ext.get("extension") or []:
        if sub.get("url") == url and isinstance(sub.get(key), dict):
            return dict(sub[key])
    return {}


def clinical_sex(
    patient: Mapping[str, Any], reference: str, knowledge: Knowledge, reader: _Reader | None = None
) -> tuple[Fact, str]:
    """Sex for clinical use, and why it is uncertain ("" when it is not).

    The first configured extension that gives female or male (or "specified") decides, else
    `Patient.gender` (clinical-logic §2 rev 3). When the records that give a sex disagree,
    gender included, the reason names them: every sex-specific test then becomes "consider".
    """
    sources = knowledge.terminology.clinical_sex
    gender = patient.get("gender")
    said: list[tuple[str, str]] = []  # (label, female/male) for every record that gives one
    decided: tuple[str, str] | None = None  # (sex or "undetermined", label)
    extensions, codes = (sources.extensions, sources.codes) if sources else ((), ())
    for ext_def in extensions:
        sexes, unknown_codes = _sex_values(patient, ext_def, codes, knowledge.terminology.systems)
        if unknown_codes and reader is not None:
            reader.note(
                f"Patient: {ext_def.label} value not recognised ({', '.join(unknown_codes)})"
            )
        binary = sexes & {"female", "male"}
        said += [(ext_def.label, sex) for sex in sorted(binary)]
        if decided is None:
            if "undetermined" in sexes or len(binary) > 1:
                decided = ("undetermined", ext_def.label)
            elif binary:
                decided = (next(iter(binary)), ext_def.label)
    if gender in ("female", "male"):
        said.append(("administrative gender", str(gender)))
        if decided is None:
            decided = (str(gender), "administrative gender")
    if decided is None:
        return UNKNOWN_FACT, ""
    sex, label = decided
    if sex == "undetermined":
        reason = f"{label} says a plain female or male reading does not apply"
        if said:
            reason += " (" + ", ".join(f"{lbl} {value}" for lbl, value in said) + ")"
        return Fact(UNKNOWN, (reference,), note=label), reason
    disagree = len({value for _, value in said}) > 1
    reason = ", ".join(f"{lbl} {value}" for lbl, value in said) if disagree else ""
    return Fact(sex, (reference,), note=label), reason


def extract_facts(record: PatientRecord, knowledge: Knowledge, matcher: Matcher) -> PatientFacts:
    """Read every fact the rules need from one patient's resources."""
    reader = _Reader(record, knowledge, matcher)
    patient = record.patient
    sex, sex_uncertain = clinical_sex(patient, record.reference, knowledge, reader)
    birth = parse_fhir_date(patient.get("birthDate"))

    conditions = reader.usable_conditions()
    iim = reader.iim(conditions)
    onset_age = None
    if iim and iim.onset and birth:
        onset_age = age_span(birth, iim.onset)
    elif iim and iim.stated_age and birth is None:
        # Without a birth date the Condition's own age at onset is the age (rev 3).
        onset_age = iim.stated_age
    if birth is None:
        reader.note(
            "Patient: birth date missing; age at onset read from the Condition's onsetAge or"
            " onsetRange"
            if onset_age is not None
            else "Patient: birth date missing; age-dependent rules are unknown"
        )

    observations = reader.usable_observations()
    features = reader.condition_features(conditions)
    features.update(reader.cancer_facts(conditions, iim))
    features["current_smoking"] = reader.smoking(observations, conditions)
    ck = reader.creatine_kinase(observations)
    treated, since = reader.immunosuppression()
    derived = knowledge.ruleset.derived
    coded = [features.get(f, UNKNOWN_FACT) for f in derived.refractory.or_features]
    features["refractory"] = _refractory(
        derived.refractory,
        ck,
        treated,
        since,
        next((f for f in coded if f.is_true()), UNKNOWN_FACT),
    )
    features["checkpoint_inhibitor"] = reader.checkpoint_inhibitor()
    features["flare"] = _flare(ck, features.get(derived.flare.or_feature, UNKNOWN_FACT))
    antibodies = reader.antibody_results(observations)
    evidence = reader.screening_evidence()
    unused = record.unused_summary()
    if unused:
        reader.note(unused)
    links = tuple(ref for message, ref in record.joined if message == LINK_JOINED)
    for message, ref in (*record.joined, *record.unattributed):
        if message != LINK_JOINED:  # joined records are a notice, not unused input
            reader.note(message, ref)
    return PatientFacts(
        deceased=_deceased(patient, record.reference),
        past_cancers=tuple(dict.fromkeys(reader.cancer_names)),
        patient_reference=record.reference,
        patient_key=patient_key(patient, record.reference),
        sex=sex,
        birth_date=birth,
        iim=iim,
        onset_age=onset_age,
        antibodies=antibodies,
        features=features,
        creatine_kinase=ck,
        screening_done=latest_done(evidence),
        screening_evidence=evidence,
        active_cancers=tuple(dict.fromkeys(reader.active_cancer_names)),
        cancers=tuple(reader.cancers),
        sex_uncertain=sex_uncertain,
        patient_links=links,
        linked_patients=record.linked_references,
        findings=reader.grouped_findings(),
        all_sources=tuple(sorted(reader.sources | {record.reference})),
        birth_country=birth_country(patient),
    )


BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"


def birth_country(patient: Mapping[str, Any]) -> str | None:
    """`Patient.extension[patient-birthPlace].valueAddress.country`, trimmed, if given."""
    for ext in patient.get("extension") or []:
        if isinstance(ext, Mapping) and ext.get("url") == BIRTH_PLACE:
            country = (ext.get("valueAddress") or {}).get("country")
            if isinstance(country, str) and country.strip():
                return country.strip()
    return None
