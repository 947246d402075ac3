"""Generate profiles/: FHIR conformance and knowledge artifacts derived from config/.

Everything in profiles/*.json comes from here: the project's CodeSystems and ValueSets, the
PlanDefinition and ActivityDefinitions that describe the rule set, the StructureDefinitions the
generated resources declare in ``meta.profile`` and the ``$dm-cancer-screening``
OperationDefinitions. Run from the repository root:

    python -m tools.build_profiles            # rewrite profiles/
    python -m tools.build_profiles --check    # exit 1 when profiles/ differs from config/

``build_artifacts(knowledge)`` returns ``{file name: resource}`` without writing anything (the
drift test in tests/unit/test_profiles.py compares it with the files on disk).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_dm.cds.settings import CdsConfig, load_cds_config
from fhir_dm.core.build.care_plan import DM_CATEGORY, US_CORE_ASSESS_PLAN
from fhir_dm.core.build.common import PROFILE_NAMES
from fhir_dm.core.build.service_request import CONSIDER_CODE
from fhir_dm.core.identifiers import Identity
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge, Predicate, Round, RuleSet, Test
from fhir_dm.population.config import PopulationConfig, load_population_config
from fhir_dm.population.measures import measure_resource

Json = dict[str, Any]

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
FHIR_VERSION = "4.0.1"
FHIR_CORE = "http://hl7.org/fhir/StructureDefinition"
PUBLISHER = "fhir-dm project"
CONSIDER_DISPLAY = "Consider (conditional recommendation)"
OPERATION_CODE = "dm-cancer-screening"
PLAN_DEFINITION_TYPE = "http://terminology.hl7.org/CodeSystem/plan-definition-type"
UCUM = "http://unitsofmeasure.org"
XHTML_NS = "http://www.w3.org/1999/xhtml"
RISK_PROBABILITY_VS = "http://hl7.org/fhir/ValueSet/risk-probability"

# What each profile describes (StructureDefinition.description).
RISK_ASSESSMENT_PURPOSE = (
    "The cancer-risk stratification of one adult with an idiopathic inflammatory myopathy "
    "(IMACS 2023): the tier, the guideline window, the reasons and every input resource used. "
    "Patients outside the guideline (juvenile onset, outside the window, no IIM) get a "
    "RiskAssessment without a tier and with the reason."
)
CARE_PLAN_PURPOSE = (
    "The proposed IIM cancer-screening plan: one activity per test per round (orderable tests "
    "reference their ServiceRequest, the others are activity details) and a narrative a "
    "clinician can read in any EHR."
)
SERVICE_REQUEST_PURPOSE = (
    "One proposed screening test of one round of the plan, due within the round's window; "
    "the tests of one round share a requisition. Conditional items carry asNeeded 'consider'."
)


# --- building blocks -----------------------------------------------------------------------


def camel(identifier: str) -> str:
    """A computable FHIR name (``[A-Z][A-Za-z0-9_]*``) from a kebab-case id."""
    name = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", identifier))
    return name if name[:1].isalpha() else f"X{name}"


def validated(resource: Json) -> Json:
    """Check a resource against its R4B model (raises on any invalid field) and return it."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def file_name(resource: Json) -> str:
    """``{resourceType}-{id}.json``, the usual IG layout."""
    return f"{resource['resourceType']}-{resource['id']}.json"


def render(resource: Json) -> str:
    """The exact text written for a resource: 2-space JSON, key order as built, final newline."""
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


def narrative(title: str, description: str) -> Json:
    """A minimal generated narrative (title and description), so every artifact reads in a UI."""
    head, body = escape(title, quote=False), escape(description, quote=False)
    div = f'<div xmlns="{XHTML_NS}"><p><b>{head}</b></p><p>{body}</p></div>'
    return {"status": "generated", "div": div}


def _months(n: int) -> str:
    return f"{n} month" + ("" if n == 1 else "s")


class _Context:
    """The knowledge plus the canonical URLs every artifact shares."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.k = knowledge
        self.rs: RuleSet = knowledge.ruleset
        self.base = self.rs.canonical_base
        self.version = self.rs.version

    def url(self, resource_type: str, resource_id: str) -> str:
        return f"{self.base}/{resource_type}/{resource_id}"

    def system(self, alias: str) -> str:
        return self.k.terminology.system_url(alias)

    def header(self, resource_type: str, resource_id: str, title: str, description: str) -> Json:
        """The metadata every canonical resource starts with."""
        return {
            "resourceType": resource_type,
            "id": resource_id,
            "text": narrative(title, description),
            "url": self.url(resource_type, resource_id),
            "version": self.version,
            "name": camel(resource_id),
            "title": title,
            "status": "active",
            "experimental": False,
            "publisher": PUBLISHER,
            "description": description,
        }

    def test_coding(self, test: Test) -> Json:
        return {
            "system": self.system(test.code.system),
            "code": test.code.code,
            "display": test.code.display,
        }


# --- code systems --------------------------------------------------------------------------


def _code_system(
    ctx: _Context,
    resource_id: str,
    title: str,
    description: str,
    concepts: list[Json],
    value_set: str | None = None,
) -> Json:
    url = ctx.url("CodeSystem", resource_id)
    system = ctx.k.terminology.systems.get(resource_id)
    if system is not None and system != url:
        raise ValueError(f"systems.yaml: {resource_id} is {system}, expected {url}")
    cs = ctx.header("CodeSystem", resource_id, title, description)
    cs["caseSensitive"] = True
    if value_set is not None:
        cs["valueSet"] = value_set
    cs["content"] = "complete"
    cs["count"] = len(concepts)
    cs["concept"] = concepts
    return cs


def screening_code_system(ctx: _Context) -> Json:
    """dm-screening: project codes for tests without a standard code, plus 'consider'."""
    concepts: dict[str, Json] = {}
    for test_id, test in ctx.rs.tests.items():
        if test.code.system != "dm-screening":
            continue
        if test.code.code in concepts:
            continue
        concepts[test.code.code] = {
            "code": test.code.code,
            "display": test.code.display,
            "definition": f"{test.display} (rule-set test '{test_id}'; no standard code was "
            "verified for it).",
        }
    concepts[CONSIDER_CODE] = {
        "code": CONSIDER_CODE,
        "display": CONSIDER_DISPLAY,
        "definition": "The request is a conditional recommendation: consider it when the stated "
        "condition holds (used in ServiceRequest.asNeededCodeableConcept).",
    }
    return _code_system(
        ctx,
        "dm-screening",
        "IIM cancer-screening codes",
        "Codes for screening activities the rule set uses where no standard (LOINC or SNOMED CT) "
        "code was verified, and the 'consider' flag of conditional recommendations.",
        list(concepts.values()),
    )


def _tier_definition(rs: RuleSet, tier: str) -> str:
    parts = []
    for rule in rs.tiers.rules:
        if rule.tier != tier:
            continue
        terms = []
        if rule.min_high is not None:
            terms.append(
                f"at least {rule.min_high} high-risk factor" + ("s" if rule.min_high > 1 else "")
            )
        if rule.min_intermediate is not None:
            terms.append(
                f"at least {rule.min_intermediate} intermediate-risk factor"
                + ("s" if rule.min_intermediate > 1 else "")
            )
        parts.append(" and ".join(terms))
    if tier == rs.tiers.default:
        parts.append("no higher tier's rule is met")
    text = "; or ".join(parts)
    return f"{text[:1].upper()}{text[1:]} (rule set {rs.label})."


def risk_tier_code_system(ctx: _Context) -> Json:
    """dm-risk-tier: the tier levels of the rule set."""
    concepts = [
        {"code": level.id, "display": level.label, "definition": _tier_definition(ctx.rs, level.id)}
        for level in ctx.rs.tiers.levels
    ]
    return _code_system(
        ctx,
        "dm-risk-tier",
        "IIM cancer-risk tiers",
        f"Cancer-risk tiers of adults with an idiopathic inflammatory myopathy ({ctx.rs.title}). "
        "RiskAssessment.prediction.qualitativeRisk carries the tier and the matching "
        "risk-probability code.",
        concepts,
        value_set=ctx.url("ValueSet", "dm-risk-tier"),
    )


def careplan_category_code_system(ctx: _Context) -> Json:
    """dm-careplan-category: the category every generated CarePlan carries."""
    _, code, display = DM_CATEGORY
    return _code_system(
        ctx,
        "dm-careplan-category",
        "IIM cancer-screening CarePlan categories",
        "Categories of the CarePlans this project generates.",
        [
            {
                "code": code,
                "display": display,
                "definition": "A plan of cancer screening for an adult with an idiopathic "
                "inflammatory myopathy.",
            }
        ],
    )


def ruleset_code_system(ctx: _Context) -> Json:
    """dm-ruleset: the rule set named in RiskAssessment.method."""
    rs = ctx.rs
    return _code_system(
        ctx,
        "dm-ruleset",
        "IIM cancer-screening rule sets",
        "The rule sets (versioned knowledge) the service assesses with; the coding's version "
        "is the rule-set version.",
        [
            {
                "code": rs.name,
                "display": rs.title,
                "definition": f"{rs.guideline.citation} doi:{rs.guideline.doi}",
            }
        ],
    )


def override_reason_code_system(ctx: _Context, cds: CdsConfig) -> Json:
    """dm-cds-override-reason: why a clinician overrides a CDS Hooks card (config/cds.yaml)."""
    expected = ctx.url("CodeSystem", "dm-cds-override-reason")
    if cds.override_reasons.system != expected:
        raise ValueError(f"cds.yaml: override_reasons.system must be {expected}")
    return _code_system(
        ctx,
        "dm-cds-override-reason",
        "IIM cancer-screening card override reasons",
        "Reasons a clinician can give for not acting on the CDS Hooks card.",
        [{"code": r.code, "display": r.display} for r in cds.override_reasons.reasons],
    )


# --- value sets ----------------------------------------------------------------------------


def _includes(ctx: _Context, codings: Iterable[tuple[str, str, str]]) -> list[Json]:
    """compose.include per system (first-seen order), codes de-duplicated."""
    by_system: dict[str, dict[str, Json]] = {}
    for alias, code, display in codings:
        concepts = by_system.setdefault(ctx.system(alias), {})
        concepts.setdefault(code, {"code": code, "display": display})
    return [
        {"system": system, "concept": list(concepts.values())}
        for system, concepts in by_system.items()
    ]


def _value_set(
    ctx: _Context, resource_id: str, title: str, description: str, include: list[Json]
) -> Json:
    vs = ctx.header("ValueSet", resource_id, title, description)
    vs["immutable"] = False
    vs["compose"] = {"include": include}
    return vs


def antibodies_value_set(ctx: _Context) -> Json:
    """Every code of the antibody value sets of the rule set."""
    vsets = ctx.k.terminology.value_sets
    codings = [
        (e.system, e.code, e.display)
        for ab in ctx.rs.antibodies
        for e in vsets[ab.value_set].include
        if e.code is not None
    ]
    names = ", ".join(ab.label for ab in ctx.rs.antibodies)
    return _value_set(
        ctx,
        "dm-myositis-antibodies",
        "Myositis-specific and -associated antibodies",
        f"Observation codes the service reads as myositis antibody results ({names}). "
        "Site-local codes and free-text synonyms are matched too (config/terminology); they are "
        "not part of this value set.",
        _includes(ctx, codings),
    )


def subtypes_value_set(ctx: _Context) -> Json:
    """Every exact code of the IIM subtype value sets (prefix entries are named, not listed)."""
    vsets = ctx.k.terminology.value_sets
    entries = [e for st in ctx.rs.subtypes for e in vsets[st.value_set].include]
    codings = [(e.system, e.code, e.display) for e in entries if e.code is not None]
    prefixes = sorted({f"{ctx.system(e.system)} {e.prefix}*" for e in entries if e.prefix})
    labels = "; ".join(st.label for st in ctx.rs.subtypes)
    description = (
        "Condition codes that identify an idiopathic inflammatory myopathy and its subtype "
        f"({labels}). Only exact codes are listed. The service also matches every code that "
        "starts with one of these prefixes, which a ValueSet cannot enumerate: "
        + "; ".join(prefixes)
        + ". SNOMED CT descendants are not included."
    )
    return _value_set(
        ctx,
        "dm-iim-subtypes",
        "Idiopathic inflammatory myopathy subtypes",
        description,
        _includes(ctx, codings),
    )


def screening_tests_value_set(ctx: _Context) -> Json:
    """The code of every test of the rule set."""
    codings = [(t.code.system, t.code.code, t.code.display) for t in ctx.rs.tests.values()]
    return _value_set(
        ctx,
        "dm-screening-tests",
        "IIM cancer-screening tests",
        "The code of every screening test, examination and surveillance test the rule set can "
        "propose (ServiceRequest.code and CarePlan.activity.detail.code).",
        _includes(ctx, codings),
    )


def done_value_set(ctx: _Context, test_id: str, test: Test) -> Json:
    """The codes that show one test done: its own code and its `done` value sets."""
    vsets = ctx.k.terminology.value_sets
    codings = [(test.code.system, test.code.code, test.code.display)]
    partial: list[str] = []
    for done in test.done:
        entries = [e for e in vsets[done.value_set].include if e.code is not None]
        codings.extend((e.system, e.code, e.display) for e in entries if e.code is not None)
        if done.partial and entries:
            codes = ", ".join(str(e.code) for e in entries)
            partial.append(f"{codes} count as done for part of the test ({done.note})")
    description = (
        f"Codes that show '{test.display}' done when a record carries one: a completed "
        "ServiceRequest, final DiagnosticReport or Observation, completed Procedure or "
        "available ImagingStudy. Site-local codes mapped in config/terminology are matched "
        "too; they are not part of this value set."
    )
    if partial:
        description += " Partial matches: " + "; ".join(partial) + "."
    return _value_set(
        ctx,
        f"dm-done-{test_id}",
        f"{test.display}: done",
        description,
        _includes(ctx, codings),
    )


def risk_tier_value_set(ctx: _Context) -> Json:
    return _value_set(
        ctx,
        "dm-risk-tier",
        "IIM cancer-risk tiers",
        "All codes of the dm-risk-tier CodeSystem.",
        [{"system": ctx.url("CodeSystem", "dm-risk-tier")}],
    )


# --- protocol: PlanDefinition and ActivityDefinitions --------------------------------------


def _labels(ctx: _Context) -> dict[str, str]:
    rs = ctx.rs
    labels = {c.id: c.label for c in (*rs.subtypes, *rs.antibodies, *rs.features)}
    labels["refractory"] = rs.derived.refractory.label
    labels["flare"] = rs.derived.flare.label
    return labels


def describe(ctx: _Context, p: Predicate) -> str:
    """A predicate as an English condition (see config/README.md for the semantics)."""
    labels = _labels(ctx)

    def names(ids: Sequence[str]) -> str:
        return ", ".join(labels.get(i, i) for i in ids)

    if p.all is not None:
        return " and ".join(f"({describe(ctx, c)})" for c in p.all)
    if p.any is not None:
        return " or ".join(f"({describe(ctx, c)})" for c in p.any)
    if p.subtype_in is not None:
        return f"IIM subtype is one of: {names(p.subtype_in)}"
    if p.antibody_positive is not None:
        return f"positive for any of: {names(p.antibody_positive)}"
    if p.antibody_negative is not None:
        return f"negative for all of: {names(p.antibody_negative)}"
    if p.onset_age_gt is not None:
        return f"age at IIM onset over {p.onset_age_gt:g}"
    if p.feature is not None:
        return f"any of: {names(p.feature)}"
    if p.tier_in is not None:
        return "risk tier is one of: " + ", ".join(ctx.rs.tiers.level(t).label for t in p.tier_in)
    if p.site_flag is not None:
        return f"the site flag '{p.site_flag}' is set (config/site.yaml)"
    if p.onset_age_lt is not None:
        return f"age at IIM onset under {p.onset_age_lt:g}"
    if p.sex_is is not None:
        return "sex is one of: " + ", ".join(p.sex_is)
    if p.regional_risk is not None:
        return (
            f"raised {p.regional_risk} cancer risk: the site's region, or the patient's country"
            " of birth as config/site.yaml maps it"
        )
    raise ValueError("empty predicate")


def _group(action_id: str, title: str, applies_when: str, text: str, actions: list[Json]) -> Json:
    """An action grouping sub-actions; its condition is descriptive text (see module docstring).

    R4 Expression needs a computable language (text/cql, text/fhirpath, ...), so the
    applicability condition is written out in ``description`` instead of ``condition``.
    """
    return {
        "id": action_id,
        "title": title,
        "description": f"Applies when: {applies_when}. {text}",
        "action": actions,
    }


def _activity_url(ctx: _Context, test_id: str) -> str:
    return ctx.url("ActivityDefinition", test_id)


def _sex_text(test: Test) -> str:
    return (
        f"Sex for clinical use is {test.sex}; proposed as 'consider' when sex is not recorded "
        "or the records of sex disagree"
        if test.sex
        else ""
    )


def _test_actions(ctx: _Context, prefix: str, test_ids: Iterable[str]) -> list[Json]:
    actions = []
    for test_id in dict.fromkeys(test_ids):
        test = ctx.rs.tests[test_id]
        action: Json = {"id": f"{prefix}.{test_id}", "title": test.display}
        if test.sex:
            action["description"] = f"Applies when {_sex_text(test).lower()}."
        action["code"] = [{"coding": [ctx.test_coding(test)], "text": test.display}]
        action["definitionCanonical"] = _activity_url(ctx, test_id)
        actions.append(action)
    return actions


def _round_action(
    ctx: _Context,
    prefix: str,
    rnd: Round,
    *,
    anchor: str = "the IIM diagnosis",
    panels: Sequence[str] | None = None,
) -> Json:
    """A round: its due window (months after ``anchor``) and one sub-action per test."""
    start = rnd.offset_months
    end = rnd.offset_months + rnd.due_within_months
    panel_ids = rnd.panels if panels is None else tuple(panels)
    labels = [ctx.rs.panels[p].label for p in panel_ids]
    what = f" ({', '.join(labels)})" if labels else ""
    tests = [*_panel_tests(ctx.rs, panel_ids), *rnd.tests]
    return {
        "id": f"{prefix}.{rnd.id}",
        "title": rnd.label,
        "description": f"Due from {_months(start)} to {_months(end)} after {anchor}{what}.",
        "timingRange": {
            "low": {"value": start, "unit": "months", "system": UCUM, "code": "mo"},
            "high": {"value": end, "unit": "months", "system": UCUM, "code": "mo"},
        },
        "action": _test_actions(ctx, f"{prefix}.{rnd.id}", tests),
    }


def _evidence(evidence: str, source: str) -> str:
    return f"Evidence level '{evidence}': {source}."


def _tier_actions(ctx: _Context) -> list[Json]:
    rs = ctx.rs
    actions = []
    for level in rs.tiers.levels:
        schedule = rs.schedules[level.id]
        actions.append(
            _group(
                f"tier-{level.id}",
                f"{level.label} schedule",
                f"the risk tier is {level.label}",
                f"{_tier_definition(rs, level.id)} {_evidence(schedule.evidence, schedule.source)}",
                [_round_action(ctx, f"tier-{level.id}", rnd) for rnd in schedule.rounds],
            )
        )
    return actions


def _round_label(ctx: _Context, round_id: str) -> str:
    for schedule in ctx.rs.schedules.values():
        for rnd in schedule.rounds:
            if rnd.id == round_id:
                return rnd.label
    return round_id


def _addon_actions(ctx: _Context) -> list[Json]:
    actions = []
    for addon in ctx.rs.addons:
        consider = " Proposed as 'consider' (conditional)." if addon.conditional else ""
        actions.append(
            _group(
                f"addon-{addon.id}",
                addon.label,
                describe(ctx, addon.when),
                f"Added to the '{_round_label(ctx, addon.round)}' round.{consider} "
                + _evidence(addon.evidence, addon.source),
                _test_actions(ctx, f"addon-{addon.id}", addon.tests),
            )
        )
    return actions


def _panel_tests(rs: RuleSet, panels: Iterable[str]) -> list[str]:
    return [t for p in panels for t in rs.panels[p].tests]


def _other_actions(ctx: _Context) -> list[Json]:
    rs = ctx.rs
    red, flare, testing = rs.red_flags, rs.flare, rs.antibody_testing
    antibody_labels = {a.id: a.label for a in rs.antibodies}
    lung = rs.lung_surveillance
    return [
        _group(
            "red-flags",
            red.label,
            "any of: " + ", ".join(f.replace("_", " ") for f in red.facts),
            f"Whatever the tier and at any time: added to the '{_round_label(ctx, red.round)}' "
            "round when recorded by its end, otherwise a round of its own dated from the latest "
            f"red flag, due within {_months(red.event_round.due_within_months)}; a test answers "
            "it only when done on or after the red flag, and a test open in another round is "
            "not proposed twice. Also outside the guideline; juvenile-onset: a notice only."
            + (" Proposed as 'consider' (conditional). " if red.conditional else " ")
            + _evidence(red.evidence, red.source),
            _test_actions(ctx, "red-flags", _panel_tests(rs, red.add_panels)),
        ),
        _group(
            "flare",
            "Flare after remission: re-screen",
            rs.derived.flare.label,
            f"{flare.message} Each test is left out when it was done within "
            f"{_months(flare.unless_done_within_months)} before the flare; every item is "
            "'consider', and only when a high-risk antibody or a past cancer is recorded "
            "(otherwise a review notice). " + _evidence(flare.evidence, flare.source),
            [_round_action(ctx, "flare", flare.round, anchor="the flare", panels=flare.add_panels)],
        ),
        _group(
            "antibody-testing",
            "Cancer-relevant myositis antibodies untested",
            "not tested: " + ", ".join(antibody_labels[a] for a in testing.when_untested),
            f"Added to the '{_round_label(ctx, testing.round)}' round; the tier is preliminary "
            "until they are known. " + _evidence(testing.evidence, testing.source),
            _test_actions(ctx, "antibody-testing", [testing.test]),
        ),
        _group(
            "lung-surveillance",
            lung.label,
            describe(ctx, lung.when),
            _evidence(lung.evidence, lung.source),
            [_round_action(ctx, "lung-surveillance", rnd) for rnd in lung.rounds],
        ),
        *(
            [
                _group(
                    "lung-screening",
                    lung.screening.label,
                    "adult-onset IIM, except the excluded subtypes",
                    f"Once, unless done within {_months(lung.screening.unless_done_within_months)}"
                    " before the diagnosis. "
                    + _evidence(lung.screening.evidence, lung.screening.source),
                    [_round_action(ctx, "lung-screening", lung.screening.round)],
                )
            ]
            if lung.screening is not None
            else []
        ),
        _group(
            "outside-guideline",
            "Outside the guideline: national screening and clinical judgement",
            "diagnosed too late after symptom onset, or an excluded subtype",
            rs.outside_guideline.notice
            + " "
            + _evidence(rs.outside_guideline.evidence, rs.outside_guideline.source),
            _test_actions(ctx, "outside-guideline", rs.outside_guideline.round.tests),
        ),
    ]


def plan_definition(ctx: _Context) -> Json:
    """The rule set as a (descriptive) clinical protocol."""
    rs = ctx.rs
    g = rs.guideline
    pd = ctx.header(
        "PlanDefinition",
        rs.name,
        rs.title,
        f"Cancer screening of adults with an idiopathic inflammatory myopathy, rule set "
        f"{rs.label}: risk tier from high- and intermediate-risk factors, a screening schedule "
        "per tier, conditional ('consider') add-ons and lung surveillance (outside IMACS). "
        "Conditions are descriptive text; the executable rules are the service's rule set. "
        "Adults only: " + rs.scope.juvenile.reason,
    )
    pd["type"] = {
        "coding": [
            {
                "system": PLAN_DEFINITION_TYPE,
                "code": "clinical-protocol",
                "display": "Clinical Protocol",
            }
        ]
    }
    pd["relatedArtifact"] = [
        {
            "type": "citation",
            "label": "IMACS 2023",
            "display": "IMACS 2023 guideline",
            "citation": g.citation,
            "url": g.url,
        },
    ]
    if g.correction_doi:
        pd["relatedArtifact"].append(
            {
                "type": "citation",
                "display": "Author correction to the IMACS 2023 guideline",
                "url": f"https://doi.org/{g.correction_doi}",
            }
        )
    pd["action"] = [*_tier_actions(ctx), *_addon_actions(ctx), *_other_actions(ctx)]
    return pd


def activity_definition(ctx: _Context, test_id: str, test: Test) -> Json:
    """One test of the rule set; orderable tests become ServiceRequests."""
    orderable = test.kind == "order"
    how = (
        "Orderable: the service proposes it as a ServiceRequest."
        if orderable
        else "Not orderable: the service lists it as a CarePlan activity detail."
    )
    sex = f" {_sex_text(test)}." if test.sex else ""
    done = f" Done when a record carries a code of {ctx.url('ValueSet', f'dm-done-{test_id}')}."
    ad = ctx.header(
        "ActivityDefinition",
        test_id,
        test.display,
        f"{test.display} ({test.category}). {how}{sex}{done}",
    )
    if orderable:
        ad["kind"] = "ServiceRequest"
    ad["code"] = {"coding": [ctx.test_coding(test)], "text": test.display}
    ad["intent"] = "proposal"
    return ad


# --- profiles ------------------------------------------------------------------------------


def _el(path: str, slice_name: str | None = None, **fields: Any) -> Json:
    """One differential element; ``slice_name`` makes the id ``Type.elem:slice``."""
    element: Json = {"id": path if slice_name is None else f"{path}:{slice_name}", "path": path}
    if slice_name is not None:
        element["sliceName"] = slice_name
    element.update(fields)
    return element


def _sub(parent: Json, child: str, **fields: Any) -> Json:
    """A child of an element (keeps the slice name in the id)."""
    return {"id": f"{parent['id']}.{child}", "path": f"{parent['path']}.{child}", **fields}


def _ref(*targets: str) -> list[Json]:
    return [{"code": "Reference", "targetProfile": [f"{FHIR_CORE}/{t}" for t in targets]}]


def _slices_by_system(
    path: str,
    slices: Sequence[tuple[str, str, str]],
    *,
    what: str,
    children: Sequence[str] = ("value",),
    **fields: Any,
) -> list[Json]:
    """``path`` sliced by ``system``; each slice exactly once, system fixed, children required.

    Elements must follow the base resource's element order (validators reject the profile
    otherwise), so callers list them in that order.
    """
    out = [
        _el(
            path,
            slicing={
                "discriminator": [{"type": "value", "path": "system"}],
                "description": f"By {what} system",
                "ordered": False,
                "rules": "open",
            },
            **fields,
        )
    ]
    for name, system, short in slices:
        sl = _el(path, name, short=short, min=1, max="1")
        out += [sl, _sub(sl, "system", min=1, fixedUri=system)]
        out += [_sub(sl, child, min=1) for child in children]
    return out


def _identifier_slices(resource_type: str, slices: Sequence[tuple[str, str, str]]) -> list[Json]:
    """identifier sliced by system; each slice exactly once with a fixed system and a value."""
    return _slices_by_system(
        f"{resource_type}.identifier", slices, what="identifier", min=len(slices)
    )


def _structure_definition(
    ctx: _Context, resource_type: str, title: str, description: str, elements: list[Json]
) -> Json:
    sd_id = PROFILE_NAMES[resource_type]
    sd = ctx.header("StructureDefinition", sd_id, title, description)
    sd.update(
        {
            "fhirVersion": FHIR_VERSION,
            "kind": "resource",
            "abstract": False,
            "type": resource_type,
            "baseDefinition": f"{FHIR_CORE}/{resource_type}",
            "derivation": "constraint",
            "differential": {"element": [_el(resource_type, short=title), *elements]},
        }
    )
    return sd


def _qualitative_risk(ctx: _Context, path: str) -> list[Json]:
    """qualitativeRisk: the tier and its risk-probability, one coding each (sliced by system).

    The concept as a whole has a *preferred* binding (out-of-scope patients have none); each
    coding slice has a *required* binding to a value set the validator can check offline.
    """
    concept = _el(
        path,
        short="The tier and its risk-probability; absent when out of scope",
        binding={
            "strength": "preferred",
            "description": "IIM cancer-risk tier",
            "valueSet": ctx.url("ValueSet", "dm-risk-tier"),
        },
    )
    codings = _slices_by_system(
        f"{path}.coding",
        [
            ("tier", ctx.url("CodeSystem", "dm-risk-tier"), "The tier of the rule set"),
            (
                "probability",
                ctx.system("risk-probability"),
                "The tier as a risk-probability (HL7 terminology)",
            ),
        ],
        what="code",
        children=("code",),
    )
    bindings = {"tier": ctx.url("ValueSet", "dm-risk-tier"), "probability": RISK_PROBABILITY_VS}
    for element in codings:
        if element.get("sliceName") in bindings:
            element["binding"] = {
                "strength": "required",
                "valueSet": bindings[element["sliceName"]],
            }
    return [concept, *codings]


def risk_assessment_profile(ctx: _Context) -> Json:
    ra = "RiskAssessment"
    return _structure_definition(
        ctx,
        ra,
        "IIM cancer risk assessment",
        RISK_ASSESSMENT_PURPOSE,
        [
            *_identifier_slices(
                ra,
                [
                    (
                        "item",
                        Identity(ctx.base, "", "").item_system,
                        "Business identifier (series, plan digest, 'risk')",
                    )
                ],
            ),
            _el(f"{ra}.method", short="Rule set and version", min=1),
            *_slices_by_system(
                f"{ra}.method.coding",
                [
                    (
                        "ruleset",
                        ctx.url("CodeSystem", "dm-ruleset"),
                        "Rule-set name (code) and version",
                    ),
                ],
                what="code",
                children=("version", "code"),
                min=1,
            ),
            _el(f"{ra}.subject", type=_ref("Patient")),
            _el(
                f"{ra}.occurrence[x]",
                short="When the assessment was made",
                min=1,
                type=[{"code": "dateTime"}],
            ),
            _el(f"{ra}.condition", short="The IIM Condition assessed (when one was recognised)"),
            _el(f"{ra}.basis", short="Every input resource a fact came from"),
            _el(f"{ra}.prediction", min=1, max="1"),
            _el(f"{ra}.prediction.outcome", short="IIM-associated cancer", min=1),
            _el(f"{ra}.prediction.outcome.text", min=1),
            *_qualitative_risk(ctx, f"{ra}.prediction.qualitativeRisk"),
            _el(
                f"{ra}.prediction.when[x]",
                short="The guideline window (diagnosis date + years)",
                type=[{"code": "Period"}],
            ),
            _el(f"{ra}.prediction.rationale", short="Why no tier was assigned (out of scope)"),
            _el(
                f"{ra}.note", short="Plain-language reasons, unknown facts and the rule set", min=1
            ),
        ],
    )


def care_plan_profile(ctx: _Context) -> Json:
    cp = "CarePlan"
    ids = Identity(ctx.base, "", "")
    us_alias, us_code, _ = US_CORE_ASSESS_PLAN
    dm_alias, dm_code, _ = DM_CATEGORY
    return _structure_definition(
        ctx,
        cp,
        "IIM cancer-screening CarePlan",
        CARE_PLAN_PURPOSE,
        [
            _el(
                f"{cp}.text",
                short="Narrative: tier, reasons, schedule, consider items, unknowns",
                min=1,
            ),
            _el(f"{cp}.text.status", fixedCode="generated"),
            *_identifier_slices(
                cp,
                [
                    (
                        "item",
                        ids.item_system,
                        "Business identifier of this plan (series, digest, 'plan')",
                    ),
                    (
                        "series",
                        ids.series_system,
                        "The plan series (patient and rule-set family), stable across revisions",
                    ),
                ],
            ),
            _el(
                f"{cp}.instantiatesCanonical",
                short="The PlanDefinition of the rule set (with version)",
                min=1,
                max="1",
            ),
            _el(
                f"{cp}.category",
                slicing={
                    "discriminator": [{"type": "pattern", "path": "$this"}],
                    "description": "By category code",
                    "ordered": False,
                    "rules": "open",
                },
                min=2,
            ),
            _el(
                f"{cp}.category",
                "assessPlan",
                min=1,
                max="1",
                patternCodeableConcept={
                    "coding": [{"system": ctx.system(us_alias), "code": us_code}]
                },
            ),
            _el(
                f"{cp}.category",
                "screening",
                min=1,
                max="1",
                patternCodeableConcept={
                    "coding": [{"system": ctx.system(dm_alias), "code": dm_code}]
                },
            ),
            _el(f"{cp}.title", min=1),
            _el(f"{cp}.description", min=1),
            _el(f"{cp}.subject", type=_ref("Patient")),
            _el(f"{cp}.period", short="The guideline window", min=1),
            _el(f"{cp}.created", min=1),
            _el(f"{cp}.addresses", short="The IIM Condition (when one was recognised)"),
            _el(f"{cp}.supportingInfo", short="The RiskAssessment this plan follows from", min=1),
            _el(f"{cp}.activity", short="One per test per round", min=1),
        ],
    )


def service_request_profile(ctx: _Context) -> Json:
    sr = "ServiceRequest"
    ids = Identity(ctx.base, "", "")
    return _structure_definition(
        ctx,
        sr,
        "IIM cancer-screening request",
        SERVICE_REQUEST_PURPOSE,
        [
            *_identifier_slices(
                sr, [("item", ids.item_system, "Business identifier (series, digest, round, test)")]
            ),
            _el(f"{sr}.basedOn", short="The CarePlan", min=1, max="1", type=_ref("CarePlan")),
            _el(
                f"{sr}.requisition",
                short="Shared by the tests of one round",
                min=1,
                patternIdentifier={"system": ids.requisition_system},
            ),
            _el(f"{sr}.requisition.value", min=1),
            _el(f"{sr}.priority", min=1),
            _el(
                f"{sr}.code",
                short="The screening test",
                min=1,
                binding={
                    "strength": "preferred",
                    "description": "IIM cancer-screening tests",
                    "valueSet": ctx.url("ValueSet", "dm-screening-tests"),
                },
            ),
            _el(f"{sr}.subject", type=_ref("Patient")),
            _el(
                f"{sr}.occurrence[x]",
                short="The due window of the round",
                min=1,
                type=[{"code": "Period"}],
            ),
            _el(
                f"{sr}.asNeeded[x]",
                short="'consider': a conditional recommendation",
                type=[{"code": "CodeableConcept"}],
                patternCodeableConcept={
                    "coding": [{"system": ctx.system("dm-screening"), "code": CONSIDER_CODE}]
                },
            ),
            _el(f"{sr}.authoredOn", min=1),
            _el(f"{sr}.reasonReference", short="Why the test is proposed", min=1),
            _el(f"{sr}.supportingInfo", short="The inputs behind the rules that call for the test"),
            _el(f"{sr}.note", short="The rule(s) that call for the test, with evidence", min=1),
        ],
    )


# --- operations ----------------------------------------------------------------------------


def _param(name: str, use: str, min_: int, type_: str, doc: str) -> Json:
    return {"name": name, "use": use, "min": min_, "max": "1", "documentation": doc, "type": type_}


_RETURN_DOC = (
    "A collection Bundle: first an OperationOutcome with one information issue per patient "
    "(tier; preview, written or unchanged; revocations), then the generated resources (as they "
    "would be written, or with their server locations once written)."
)
_NOW_DOC = (
    "The evaluation date (the service's clock when absent); fixes which rounds are due or overdue."
)


def operation_system(ctx: _Context) -> Json:
    op = ctx.header(
        "OperationDefinition",
        OPERATION_CODE,
        "IIM cancer screening of a Bundle",
        "POST /$dm-cancer-screening: assess every patient in the posted Bundle (any type) and "
        "return the RiskAssessment, CarePlan, ServiceRequests and Provenance as a transaction "
        "Bundle (preview, the default), or write them to the configured FHIR server.",
    )
    op.update(
        {
            "kind": "operation",
            "affectsState": True,
            "code": OPERATION_CODE,
            "system": True,
            "type": False,
            "instance": False,
            "parameter": [
                _param(
                    "bundle",
                    "in",
                    1,
                    "Bundle",
                    "The patients' data: Patient, Conditions, "
                    "Observations, medications, history and screening done.",
                ),
                _param(
                    "preview",
                    "in",
                    0,
                    "boolean",
                    "true (default): return what would be written "
                    "and write nothing; false: write it, one transaction per patient.",
                ),
                _param("now", "in", 0, "date", _NOW_DOC),
                _param("return", "out", 1, "Bundle", _RETURN_DOC),
            ],
        }
    )
    return op


def operation_patient(ctx: _Context) -> Json:
    op = ctx.header(
        "OperationDefinition",
        f"Patient-{OPERATION_CODE}",
        "IIM cancer screening of one patient",
        "POST /Patient/{id}/$dm-cancer-screening: read the patient's data from the configured "
        "FHIR server, assess, and write the result back in one idempotent transaction (or "
        "return it only, with preview=true).",
    )
    op.update(
        {
            "kind": "operation",
            "affectsState": True,
            "code": OPERATION_CODE,
            "resource": ["Patient"],
            "system": False,
            "type": False,
            "instance": True,
            "parameter": [
                _param(
                    "preview",
                    "in",
                    0,
                    "boolean",
                    "false (default): write the result; true: "
                    "return what would be written and write nothing.",
                ),
                _param("now", "in", 0, "date", _NOW_DOC),
                _param("return", "out", 1, "Bundle", _RETURN_DOC),
            ],
        }
    )
    return op


# --- entry points --------------------------------------------------------------------------


def measures(ctx: _Context, population: PopulationConfig) -> list[Json]:
    """The §11 quality measures (config/population.yaml), as FHIR Measure resources."""
    out = []
    for m in population.measures:
        header = ctx.header("Measure", m.id, m.title, f"{m.title}. {m.source}")
        out.append(measure_resource(ctx.k, m, header))
    return out


def build_artifacts(
    knowledge: Knowledge | None = None,
    cds: CdsConfig | None = None,
    population: PopulationConfig | None = None,
) -> dict[str, Json]:
    """Every artifact of profiles/, as ``{file name: resource}``, validated through R4B."""
    ctx = _Context(knowledge if knowledge is not None else load_knowledge())
    if population is None:
        population = load_population_config(ctx.k)
    resources = [
        screening_code_system(ctx),
        risk_tier_code_system(ctx),
        careplan_category_code_system(ctx),
        ruleset_code_system(ctx),
        override_reason_code_system(ctx, cds if cds is not None else load_cds_config()),
        antibodies_value_set(ctx),
        subtypes_value_set(ctx),
        screening_tests_value_set(ctx),
        risk_tier_value_set(ctx),
        *(done_value_set(ctx, test_id, test) for test_id, test in ctx.rs.tests.items()),
        plan_definition(ctx),
        *(activity_definition(ctx, test_id, test) for test_id, test in ctx.rs.tests.items()),
        risk_assessment_profile(ctx),
        care_plan_profile(ctx),
        service_request_profile(ctx),
        operation_system(ctx),
        operation_patient(ctx),
        *measures(ctx, population),
    ]
    artifacts: dict[str, Json] = {}
    for resource in resources:
        name = file_name(resource)
        if name in artifacts:
            raise ValueError(f"two artifacts would be written to {name}")
        artifacts[name] = validated(resource)
    return dict(sorted(artifacts.items()))


def drift(artifacts: dict[str, Json], directory: Path) -> list[str]:
    """File names in ``directory`` that are missing, stale or not generated."""
    on_disk = {p.name for p in directory.glob("*.json")}
    problems = sorted(on_disk - artifacts.keys())
    for name, resource in artifacts.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(resource):
            problems.append(name)
    return sorted(problems)


def write_artifacts(artifacts: dict[str, Json], directory: Path) -> list[Path]:
    """Write every artifact and remove JSON files no longer generated; return what changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for stale in sorted(directory.glob("*.json")):
        if stale.name not in artifacts:
            stale.unlink()
            changed.append(stale)
    for name, resource in artifacts.items():
        path = directory / name
        text = render(resource)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write profiles/ (or only check it with --check)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.build_profiles",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="config directory")
    parser.add_argument("--out", type=Path, default=PROFILES_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    knowledge = load_knowledge(args.config)
    artifacts = build_artifacts(
        knowledge, population=load_population_config(knowledge, args.config)
    )
    if args.check:
        problems = drift(artifacts, args.out)
        for name in problems:
            print(f"out of date: {name}", file=sys.stderr)
        return 1 if problems else 0
    for path in write_artifacts(artifacts, args.out):
        print(f"wrote {path.name}" if path.exists() else f"removed {path.name}")
    print(f"{len(artifacts)} artifacts in {args.out.name}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
