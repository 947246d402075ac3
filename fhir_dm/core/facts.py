"""Read the facts the rules need from one patient's FHIR resources.

Every fact is a value or UNKNOWN, with the references of the resources it came from. Absent
data is UNKNOWN, never negative. Data that cannot be used (unrecognised codes, unusable
statuses, unparseable dates) is listed in `findings`, in words that carry no patient data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final

from fhir_dm.core.dates import DateSpan, add_months, age_span, parse_fhir_date
from fhir_dm.core.inputs import PatientRecord, Resource
from fhir_dm.core.terminology import Matcher
from fhir_dm.knowledge.models import Knowledge, Refractory


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
DONE_STATUSES = {
    "Procedure": frozenset({"completed"}),
    "DiagnosticReport": frozenset({"final", "amended", "corrected", "appended"}),
    "ServiceRequest": frozenset({"completed"}),
}
ACTIVE_MEDICATION = frozenset({"active", "on-hold"})


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
    """The IIM Condition the plan is about, its subtype and onset."""

    reference: str
    subtype: str
    onset: DateSpan | None
    onset_source: str
    recorded: DateSpan | None


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
    screening_done: Mapping[str, date]
    findings: tuple[str, ...]
    all_sources: tuple[str, ...] = field(default=())

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
                self.note("condition ignored (verification status refuted or entered-in-error)", ref)
                continue
            value_sets = self.m.concept(cond.get("code")).value_sets
            if not value_sets:
                coded = bool((cond.get("code") or {}).get("coding"))
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
        best: tuple[int, str, Resource, str] | None = None
        for ref, cond, value_sets in conditions:
            if _status_code(cond.get("clinicalStatus")) in INACTIVE_CLINICAL - {"remission"}:
                continue
            for rank, concept in enumerate(self.rs.subtypes):
                if concept.value_set in value_sets and (best is None or rank < best[0]):
                    best = (rank, ref, cond, concept.id)
        if best is None:
            return None
        _, ref, cond, subtype = best
        self.sources.add(ref)
        recorded = parse_fhir_date(cond.get("recordedDate"))
        onset, source = self.onset(cond, ref)
        if onset is None and recorded is not None:
            onset, source = recorded, "recordedDate" + (f" ({source})" if source else "")
        return IimDiagnosis(ref, subtype, onset, source or "none", recorded)

    def onset(self, cond: Mapping[str, Any], ref: str) -> tuple[DateSpan | None, str]:
        if "onsetDateTime" in cond:
            span = parse_fhir_date(cond["onsetDateTime"])
            return (span, "onsetDateTime") if span else (None, "onsetDateTime unparseable")
        if "onsetPeriod" in cond:
            span = parse_fhir_date((cond["onsetPeriod"] or {}).get("start"))
            return (span, "onsetPeriod.start") if span else (None, "onsetPeriod without start")
        if "onsetAge" in cond:
            return self.onset_from_age(cond["onsetAge"], ref)
        if "onsetString" in cond:
            self.note("onsetString cannot be used as a date; fell back to recordedDate", ref)
            return None, "onsetString unusable"
        return None, ""

    def onset_from_age(self, age: Mapping[str, Any], ref: str) -> tuple[DateSpan | None, str]:
        birth = parse_fhir_date(self.record.patient.get("birthDate"))
        years = age.get("value")
        unit = age.get("code") or age.get("unit")
        if birth is None or not isinstance(years, int | float) or unit not in ("a", "yr", "years"):
            self.note("onsetAge cannot be turned into a date", ref)
            return None, "onsetAge unusable"
        whole = int(years)
        earliest = add_months(birth.earliest, 12 * whole)
        latest = add_months(birth.latest, 12 * (whole + 1))
        return DateSpan(earliest, latest), "onsetAge"

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
        self, conditions: Sequence[tuple[str, Resource, frozenset[str]]]
    ) -> dict[str, Fact]:
        active: list[str] = []
        history: list[str] = []
        family: list[str] = []
        for ref, cond, value_sets in conditions:
            status = _status_code(cond.get("clinicalStatus"))
            if "malignancy" in value_sets:
                (history if status in INACTIVE_CLINICAL else active).append(ref)
            if "history-of-cancer" in value_sets:
                history.append(ref)
            if "family-history-cancer" in value_sets:
                family.append(ref)
        for ref, fmh in self.of_type("FamilyMemberHistory"):
            if fmh.get("status") == "entered-in-error":
                continue
            if any(
                "malignancy" in self.m.concept(c.get("code")).value_sets
                for c in fmh.get("condition") or []
            ):
                family.append(ref)
        self.sources.update(active + history + family)
        return {
            "active_malignancy": Fact(True, tuple(active)) if active else UNKNOWN_FACT,
            "personal_history_cancer": Fact(True, tuple(history)) if history else UNKNOWN_FACT,
            "family_history_cancer": Fact(True, tuple(family)) if family else UNKNOWN_FACT,
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

    def antibody_results(self, observations: Sequence[tuple[str, Resource]]) -> dict[str, Fact]:
        by_vs = {a.value_set: a.id for a in self.rs.antibodies}
        seen: dict[str, list[tuple[date, bool, str]]] = {}
        for ref, obs in observations:
            when = _observation_date(obs)
            for item, item_ref in self.result_items(obs, ref):
                match = self.m.concept(item.get("code"), use_text=True)
                hits = [by_vs[vs] for vs in match.value_sets if vs in by_vs]
                if not hits:
                    continue
                if len(hits) > 1:
                    self.note("result names several antibodies; not used", item_ref)
                    continue
                result = self.read_result(item, item_ref)
                if result is None:
                    continue
                day = when.latest if when else date.min
                seen.setdefault(hits[0], []).append((day, result, item_ref))
        facts: dict[str, Fact] = {}
        for antibody in self.rs.antibodies:
            results = seen.get(antibody.id)
            if not results:
                facts[antibody.id] = UNKNOWN_FACT
                continue
            # Any positive result counts (the safer reading: assays differ and myositis
            # antibodies rarely disappear); conflicting results are reported.
            positives = [r for r in results if r[1]]
            if positives and len(positives) < len(results):
                self.note(f"anti-{antibody.id}: conflicting results; the positive one is used")
            day, positive, ref = max(positives or results, key=lambda r: r[0])
            facts[antibody.id] = Fact(positive, (ref,))
            self.sources.add(ref.split("#")[0])
        return facts

    def result_items(
        self, obs: Mapping[str, Any], ref: str
    ) -> Iterator[tuple[Mapping[str, Any], str]]:
        """The observation itself, its components, and the members of a panel."""
        yield obs, ref
        for n, component in enumerate(obs.get("component") or []):
            yield component, f"{ref}#component{n}"
        for member_ref in obs.get("hasMember") or []:
            target = member_ref.get("reference")
            member = self.record.resolve(target) if isinstance(target, str) else None
            if member is None:
                self.note("panel member not in the input", ref)
                continue
            if member.get("status") not in self.k.site.observations.usable_statuses:
                self.note(f"panel member ignored (status {member.get('status')})", ref)
                continue
            yield member, target

    def coded_answer(self, concept: Mapping[str, Any], ref: str) -> tuple[bool, bool | None]:
        """(is an answer, its value): positive True, negative False, indeterminate None."""
        value_sets = self.m.concept(concept).value_sets
        if "answer-positive" in value_sets:
            return True, True
        if "answer-negative" in value_sets:
            return True, False
        if "answer-indeterminate" in value_sets:
            self.note("indeterminate result counted as unknown", ref)
            return True, None
        return False, None

    def read_result(self, item: Mapping[str, Any], ref: str) -> bool | None:
        """Positive (True), negative (False) or unusable (None) from any result shape."""
        words = self.k.terminology.result_strings
        texts: list[str] = []
        if "valueCodeableConcept" in item:
            concept = item["valueCodeableConcept"]
            is_answer, answer = self.coded_answer(concept, ref)
            if is_answer:
                return answer
            texts.append(concept.get("text") or "")
            texts.extend(c.get("display") or "" for c in concept.get("coding") or [])
        if "valueString" in item:
            texts.append(item["valueString"])
        for text in texts:
            word = text.strip().lower()
            if word in words.positive:
                return True
            if word in words.negative:
                return False
            if word in words.weak_positive:
                if self.k.site.antibody_results.weak_positive == "positive":
                    return True
                self.note("weak positive counted as unknown (site setting)", ref)
                return None
            if word in words.indeterminate:
                self.note("indeterminate result counted as unknown", ref)
                return None
        for interpretation in item.get("interpretation") or []:
            is_answer, answer = self.coded_answer(interpretation, ref)
            if is_answer:
                return answer
        if "valueQuantity" in item:
            return self.quantity_result(item, ref)
        self.note("antibody result could not be read", ref)
        return None

    def quantity_result(self, item: Mapping[str, Any], ref: str) -> bool | None:
        value = item["valueQuantity"].get("value")
        highs = [
            r["high"]["value"]
            for r in item.get("referenceRange") or []
            if "value" in r.get("high", {})
        ]
        if not isinstance(value, int | float) or not highs:
            self.note("numeric antibody result without a reference range; not used", ref)
            return None
        comparator = item["valueQuantity"].get("comparator")
        if comparator in ("<", "<="):
            return False if value <= highs[0] else None
        return bool(value > highs[0])

    def creatine_kinase(self, observations: Sequence[tuple[str, Resource]]) -> tuple[CkResult, ...]:
        cfg = self.rs.derived.creatine_kinase
        factors = cfg.unit_factors_to_u_per_l
        out = []
        for ref, obs in observations:
            if cfg.value_set not in self.m.concept(obs.get("code")).value_sets:
                continue
            quantity = obs.get("valueQuantity") or {}
            unit = quantity.get("code") or quantity.get("unit")
            when = _observation_date(obs)
            if (
                unit not in factors
                or not isinstance(quantity.get("value"), int | float)
                or not when
            ):
                self.note("creatine kinase without a usable value, unit or date", ref)
                continue
            limit = cfg.default_upper_limit_u_per_l
            for rng in obs.get("referenceRange") or []:
                high = rng.get("high") or {}
                high_unit = high.get("code") or high.get("unit") or unit
                if isinstance(high.get("value"), int | float) and high_unit in factors:
                    limit = high["value"] * factors[high_unit]
                    break
            out.append(CkResult(when.latest, quantity["value"] * factors[unit], limit, ref))
            self.sources.add(ref)
        return tuple(sorted(out, key=lambda r: r.when))

    def smoking(
        self,
        observations: Sequence[tuple[str, Resource]],
        conditions: Sequence[tuple[str, Resource, frozenset[str]]],
    ) -> Fact:
        latest: tuple[date, FactValue, str] | None = None
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
            day = when.latest if when else date.min
            if latest is None or day >= latest[0]:
                latest = (day, value, ref)
        if latest is not None and latest[1] is not UNKNOWN:
            self.sources.add(latest[2])
            return Fact(latest[1], (latest[2],))
        for ref, cond, value_sets in conditions:
            status = _status_code(cond.get("clinicalStatus"))
            if "current-smoker-condition" in value_sets and status not in INACTIVE_CLINICAL:
                self.sources.add(ref)
                return Fact(True, (ref,))
            if "former-smoker-condition" in value_sets:
                self.sources.add(ref)
                return Fact(False, (ref,))
        return UNKNOWN_FACT

    # --- medications and screening ---

    def immunosuppression(self) -> tuple[Fact, date | None]:
        """Active systemic immunosuppression, and its earliest recorded start."""
        term = self.k.terminology
        names = _word_pattern(term.medication_names.get("immunosuppressant", ()))
        excluded = _word_pattern(term.medication_exclude_words)
        found: list[str] = []
        starts: list[date] = []
        for ref, med in self.of_type("MedicationRequest", "MedicationStatement"):
            if med.get("status") not in ACTIVE_MEDICATION:
                continue
            concept = med.get("medicationCodeableConcept") or {}
            texts = [concept.get("text") or ""] + [
                c.get("display") or "" for c in concept.get("coding") or []
            ]
            text = " ".join(texts)
            if not names.search(text) or excluded.search(text):
                continue
            found.append(ref)
            start = (
                parse_fhir_date(med.get("authoredOn"))
                or parse_fhir_date(med.get("effectiveDateTime"))
                or parse_fhir_date((med.get("effectivePeriod") or {}).get("start"))
            )
            if start:
                starts.append(start.earliest)
        if not found:
            return UNKNOWN_FACT, None
        self.sources.update(found)
        return Fact(True, tuple(found)), min(starts) if starts else None

    def screening_done(self) -> dict[str, date]:
        by_code = {
            (self.k.terminology.system_url(t.code.system), t.code.code): test_id
            for test_id, t in self.rs.tests.items()
        }
        done: dict[str, date] = {}
        for ref, resource in self.of_type(*DONE_STATUSES):
            if resource.get("status") not in DONE_STATUSES[resource["resourceType"]]:
                continue
            for coding in (resource.get("code") or {}).get("coding") or []:
                test_id = by_code.get((coding.get("system"), coding.get("code")))
                if test_id is None:
                    continue
                span = (
                    parse_fhir_date(resource.get("performedDateTime"))
                    or parse_fhir_date((resource.get("performedPeriod") or {}).get("start"))
                    or _observation_date(resource)
                    or parse_fhir_date((resource.get("occurrencePeriod") or {}).get("end"))
                    or parse_fhir_date(resource.get("occurrenceDateTime"))
                    or parse_fhir_date(resource.get("authoredOn"))
                )
                if span and (test_id not in done or span.latest > done[test_id]):
                    done[test_id] = span.latest
                    self.sources.add(ref)
        return done


MAX_REFS_PER_FINDING = 5


def _group_line(message: str, refs: list[str]) -> str:
    if not refs:
        return message
    shown = ", ".join(refs[:MAX_REFS_PER_FINDING])
    more = len(refs) - MAX_REFS_PER_FINDING
    count = f"{len(refs)} x " if len(refs) > 1 else ""
    return f"{count}{message}: {shown}" + (f" and {more} more" if more > 0 else "")


def _word_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in words) or r"(?!x)x"
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


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


def extract_facts(record: PatientRecord, knowledge: Knowledge, matcher: Matcher) -> PatientFacts:
    """Read every fact the rules need from one patient's resources."""
    reader = _Reader(record, knowledge, matcher)
    patient = record.patient
    gender = patient.get("gender")
    sex = Fact(gender, (record.reference,)) if gender in ("female", "male") else UNKNOWN_FACT
    birth = parse_fhir_date(patient.get("birthDate"))
    if birth is None:
        reader.note("Patient: birth date missing; age-dependent rules are unknown")

    conditions = reader.usable_conditions()
    iim = reader.iim(conditions)
    onset_age = None
    if iim and iim.onset and birth:
        onset_age = age_span(birth, iim.onset)

    observations = reader.usable_observations()
    features = reader.condition_features(conditions)
    features.update(reader.cancer_facts(conditions))
    features["current_smoking"] = reader.smoking(observations, conditions)
    ck = reader.creatine_kinase(observations)
    treated, since = reader.immunosuppression()
    derived = knowledge.ruleset.derived
    features["refractory"] = _refractory(
        derived.refractory,
        ck,
        treated,
        since,
        features.get(derived.refractory.or_feature, UNKNOWN_FACT),
    )
    features["flare"] = _flare(ck, features.get(derived.flare.or_feature, UNKNOWN_FACT))
    antibodies = reader.antibody_results(observations)
    done = reader.screening_done()
    return PatientFacts(
        patient_reference=record.reference,
        patient_key=patient_key(patient, record.reference),
        sex=sex,
        birth_date=birth,
        iim=iim,
        onset_age=onset_age,
        antibodies=antibodies,
        features=features,
        creatine_kinase=ck,
        screening_done=done,
        findings=reader.grouped_findings(),
        all_sources=tuple(sorted(reader.sources | {record.reference})),
    )
