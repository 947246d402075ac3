"""assess(): FHIR input in, per-patient assessment, plan and transaction entries out (pure)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time
from typing import Any

from fhir_dm.common.errors import InputError
from fhir_dm.core.build.bundle import conditional_create, put_by_id, transaction
from fhir_dm.core.build.care_plan import build_care_plan
from fhir_dm.core.build.common import BuildContext, Json
from fhir_dm.core.build.provenance import build_provenance
from fhir_dm.core.build.risk_assessment import build_risk_assessment
from fhir_dm.core.build.service_request import build_service_request
from fhir_dm.core.dates import PLAUSIBLE_YEARS
from fhir_dm.core.explain import Explanation, explain
from fhir_dm.core.facts import _group_line, extract_facts
from fhir_dm.core.identifiers import Identity, identity_for
from fhir_dm.core.inputs import PatientRecord, Relevance, read_patients
from fhir_dm.core.plan import Plan, build_plan
from fhir_dm.core.rules import assess_facts
from fhir_dm.core.terminology import Matcher, TerminologyOverlay
from fhir_dm.knowledge.models import Knowledge

SOFTWARE_NAME = "fhir-dm"


@dataclass(frozen=True, slots=True)
class PatientResult:
    """Everything produced for one patient."""

    plan: Plan
    explanation: Explanation
    identity: Identity
    risk_assessment: Json
    care_plan: Json | None
    service_requests: tuple[Json, ...]
    provenance: Json
    entries: tuple[Json, ...]

    @property
    def tier(self) -> str | None:
        return self.plan.assessment.tier

    @property
    def patient_reference(self) -> str:
        return self.plan.assessment.facts.patient_reference


@dataclass(frozen=True, slots=True)
class AssessmentRun:
    """The results for every patient of one input, and the transaction Bundle to write."""

    results: tuple[PatientResult, ...]

    def bundle(self) -> Json:
        return transaction(e for r in self.results for e in r.entries)


def as_moment(now: date | datetime) -> datetime:
    """The evaluation instant; a bare date means midnight UTC of that day."""
    if isinstance(now, datetime):
        return now if now.tzinfo else now.replace(tzinfo=UTC)
    return datetime.combine(now, time(0, 0), tzinfo=UTC)


class Engine:
    """The core bound to one Knowledge; build once, call `assess` per request (thread-safe)."""

    def __init__(
        self, knowledge: Knowledge, *, software_version: str = "0", validate_output: bool = False
    ) -> None:
        self.knowledge = knowledge
        self.matcher = Matcher(knowledge.terminology)
        # Only what the rules can read is validated and kept (real records are mostly claims,
        # encounters and vital signs); the rest is reported as one finding.
        self.relevance = Relevance(knowledge, self.matcher)
        self.software = f"{SOFTWARE_NAME} {software_version}"
        # Validating every generated resource through its R4B model is a safety net against
        # builder bugs; it costs about two thirds of the core's time (see bench/). The builders
        # are deterministic and every resource kind is validated by the test suite (and with
        # $validate on HAPI), and config-derived codes are checked at load time, so it is off
        # by default and available as a setting.
        self.validate_output = validate_output

    def assess(
        self,
        data: Any,
        *,
        now: date | datetime,
        terminology: TerminologyOverlay | None = None,
    ) -> AssessmentRun:
        """Assess every patient in a Bundle (any type) or a single Patient resource.

        `terminology`: a terminology server's answers for codes the offline value sets do not
        hold (`fhir_dm.core.terminology`); an edge builds it, the core only reads it.
        """
        records = read_patients(data, self.relevance)
        return self.assess_records(records, now=now, terminology=terminology)

    def assess_records(
        self,
        records: list[PatientRecord],
        *,
        now: date | datetime,
        terminology: TerminologyOverlay | None = None,
    ) -> AssessmentRun:
        moment = as_moment(now)
        low, high = PLAUSIBLE_YEARS
        if not low <= moment.year <= high:
            raise InputError(f"the evaluation date must lie between the years {low} and {high}")
        return AssessmentRun(tuple(self.assess_record(r, moment, terminology) for r in records))

    def assess_record(
        self,
        record: PatientRecord,
        moment: datetime,
        terminology: TerminologyOverlay | None = None,
    ) -> PatientResult:
        k = self.knowledge
        matcher = self.matcher if terminology is None else self.matcher.with_overlay(terminology)
        facts = extract_facts(record, k, matcher)
        # Codes the terminology server could not check: their facts stay unknown, and say so.
        unchecked = matcher.server_findings(record.resources)
        if unchecked:
            lines = tuple(_group_line(message, refs) for message, refs in unchecked.items())
            facts = replace(facts, findings=facts.findings + lines)
        assessment = assess_facts(facts, k, now=moment.date())
        plan = build_plan(assessment, k)
        explanation = explain(plan, k)
        identity = identity_for(plan, k.ruleset)
        ctx = BuildContext(k, plan, identity, moment, self.validate_output)

        risk_url = identity.full_url(identity.digest_value("risk"))
        risk = build_risk_assessment(ctx, explanation)
        entries = [conditional_create(risk_url, risk)]
        care_plan = None
        requests: list[Json] = []
        targets = [risk_url]
        if plan.items:
            plan_url = identity.full_url(identity.value("plan"))
            # Orders only for what is due now; done items are not ordered again (§10, §13).
            orderable = [i for i in plan.items if plan.orders_now(i)]
            request_urls = {
                i.key: identity.full_url(identity.item_value(i.round_id, i.test_id, i.due_start))
                for i in orderable
            }
            care_plan = build_care_plan(ctx, explanation, risk_url, request_urls)
            entries.append(conditional_create(plan_url, care_plan))
            targets.append(plan_url)
            for item in orderable:
                url = request_urls[item.key]
                request = build_service_request(ctx, item, plan_url, risk_url)
                requests.append(request)
                entries.append(conditional_create(url, request))
                targets.append(url)
        provenance = build_provenance(ctx, targets, self.software)
        entries.append(put_by_id(provenance))
        return PatientResult(
            plan,
            explanation,
            identity,
            risk,
            care_plan,
            tuple(requests),
            provenance,
            tuple(entries),
        )


def assess(data: Any, knowledge: Knowledge, *, now: date | datetime) -> AssessmentRun:
    """One-shot convenience over `Engine` (builds the terminology index each call)."""
    return Engine(knowledge).assess(data, now=now)
