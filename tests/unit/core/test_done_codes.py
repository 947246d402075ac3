"""Done under real codes (clinical-logic §10 rev 3): every code that shows a test done counts.

Dates are pinned: the IIM is diagnosed on 2024-03-01 (high tier), so the diagnosis round is
due 2024-03-01 to 2024-06-01; evidence is dated inside it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.facts import Evidence
from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR, load_knowledge
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.unit.core.helpers import run_one

Json = dict[str, Any]
LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
WHEN = "2024-03-20"
CT_NOTE = "CT chest/abdomen/pelvis: the neck was not imaged"

# The codes clinical-logic §10 rev 3 and the issue name, per test: each must show it done.
NAMED: dict[str, list[tuple[str, str]]] = {
    "ct-ncap": [(LOINC, "89283-6")],
    "mammography": [(LOINC, "24606-6"), (LOINC, "26175-0"), (SCT, "24623002")],
    "colonoscopy": [(SCT, "444783004"), (SCT, "73761001"), (CPT, "45378")],
    "ca125": [(LOINC, "83082-8"), (LOINC, "10334-1")],
    "cbc": [(LOINC, "57021-8"), (LOINC, "58410-2")],
    "chest-xray": [(LOINC, "42272-5"), (LOINC, "36643-5"), (SCT, "399208008")],
    "urinalysis": [(LOINC, "24357-6"), (LOINC, "24356-8")],
    "cervical-cytology": [(LOINC, "47527-7"), (LOINC, "47528-5"), (LOINC, "33717-0")],
    "spep": [(LOINC, "2862-1"), (LOINC, "33358-3"), (LOINC, "49275-1")],
    "fobt": [(LOINC, "2335-8"), (LOINC, "29771-3"), (LOINC, "80372-6")],
    "pet-ct": [(SCT, "443271005"), (CPT, "78815"), (CPT, "78816")],
    "hrct-chest": [(SCT, "16335031000119100"), (LOINC, "37441-3")],
    "pft-dlco": [(LOINC, "58477-1"), (LOINC, "19911-7"), (SCT, "36421003")],
}
CT_CAP = [(LOINC, "87869-4"), (LOINC, "72254-6"), (SCT, "1148700003")]


def patient_with(*evidence: Json) -> list[Json]:
    """A high-risk DM patient (TIF1-gamma positive, onset over 40) and the given records."""
    p = f.patient("dc-1", birth_date="1970-01-01")
    return [p, f.iim_condition(p), f.antibody(p, "tif1g"), *evidence]


def _coded(system: str, code: str) -> Json:
    return f.concept(system, code)


def report(subject: Json, system: str, code: str, status: str = "final") -> Json:
    return {
        "resourceType": "DiagnosticReport",
        "id": "rep-1",
        "status": status,
        "code": _coded(system, code),
        "subject": f.ref(subject),
        "effectiveDateTime": WHEN,
    }


def observation(subject: Json, system: str, code: str, status: str = "final") -> Json:
    return f.observation(
        subject, _coded(system, code), id="obs-1", status=status, effective=WHEN, valueString="x"
    )


def procedure(subject: Json, system: str, code: str, status: str = "completed") -> Json:
    return {
        "resourceType": "Procedure",
        "id": "proc-1",
        "status": status,
        "code": _coded(system, code),
        "subject": f.ref(subject),
        "performedDateTime": WHEN,
    }


def imaging_study(subject: Json, system: str, code: str, status: str = "available") -> Json:
    return {
        "resourceType": "ImagingStudy",
        "id": "img-1",
        "status": status,
        "subject": f.ref(subject),
        "started": WHEN,
        "procedureCode": [_coded(system, code)],
    }


def service_request(subject: Json, system: str, code: str, status: str = "completed") -> Json:
    return {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "status": status,
        "intent": "order",
        "code": _coded(system, code),
        "subject": f.ref(subject),
        "occurrenceDateTime": WHEN,
    }


KINDS: dict[str, Callable[..., Json]] = {
    "DiagnosticReport": report,
    "Observation": observation,
    "Procedure": procedure,
    "ImagingStudy": imaging_study,
    "ServiceRequest": service_request,
}


def evidence_of(engine: Engine, *records: Json) -> list[Evidence]:
    """The screening evidence the engine read (through Engine.assess and its input filter)."""
    rs = patient_with()
    result = run_one(engine, *rs, *(r(rs[0]) if callable(r) else r for r in records))
    return list(result.plan.assessment.facts.screening_evidence)


def one(engine: Engine, make: Callable[..., Json], system: str, code: str) -> list[Evidence]:
    rs = patient_with()
    result = run_one(engine, *rs, make(rs[0], system, code))
    return list(result.plan.assessment.facts.screening_evidence)


def item(result: PatientResult, test_id: str) -> Any:
    return next(i for i in result.plan.items if i.key == ("diagnosis", test_id))


def every_done_code(knowledge: Knowledge) -> list[tuple[str, str, str, bool]]:
    """(test, system URL, code, partial) of every code listed in a test's done value sets."""
    term = knowledge.terminology
    return [
        (test_id, term.system_url(e.system), e.code, done.partial)
        for test_id, test in knowledge.ruleset.tests.items()
        for done in test.done
        for e in term.value_sets[done.value_set].include
        if e.code is not None
    ]


# --- every code, every kind of record -------------------------------------------------------


@pytest.mark.parametrize(
    ("test_id", "system", "code"),
    [(t, s, c) for t, codes in NAMED.items() for s, c in codes],
)
def test_each_named_code_shows_its_test_done(
    engine: Engine, test_id: str, system: str, code: str
) -> None:
    found = one(engine, report, system, code)
    assert [(e.test_id, e.reference, e.partial) for e in found] == [
        (test_id, "DiagnosticReport/rep-1", False)
    ]


def test_every_configured_code_shows_exactly_its_test_done(engine: Engine) -> None:
    codes = every_done_code(engine.knowledge)
    assert len(codes) > 100
    for test_id, system, code, partial in codes:
        found = one(engine, procedure, system, code)
        assert [(e.test_id, e.partial) for e in found] == [(test_id, partial)], (system, code)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(
    ("test_id", "system", "code"),
    [
        ("colonoscopy", SCT, "444783004"),
        ("cbc", LOINC, "57021-8"),
        ("mammography", LOINC, "26175-0"),
        ("fobt", LOINC, "29771-3"),
    ],
)
def test_each_kind_of_record_counts(
    engine: Engine, kind: str, test_id: str, system: str, code: str
) -> None:
    found = one(engine, KINDS[kind], system, code)
    assert [(e.test_id, e.resource_type) for e in found] == [(test_id, kind)]


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("DiagnosticReport", "preliminary"),
        ("Observation", "preliminary"),
        ("Procedure", "in-progress"),
        ("ImagingStudy", "registered"),
        ("ServiceRequest", "active"),
    ],
)
def test_a_record_not_finished_does_not_count(engine: Engine, kind: str, status: str) -> None:
    rs = patient_with()
    result = run_one(engine, *rs, KINDS[kind](rs[0], SCT, "444783004", status))
    assert result.plan.assessment.facts.screening_evidence == ()


def test_our_own_request_under_a_done_code_does_not_count(engine: Engine) -> None:
    rs = patient_with()
    ours = service_request(rs[0], LOINC, "57021-8")
    ours["identifier"] = [
        {"system": f"{engine.knowledge.ruleset.canonical_base}/sid/plan-item", "value": "x"}
    ]
    assert run_one(engine, *rs, ours).plan.assessment.facts.screening_evidence == ()


# --- the plan ---------------------------------------------------------------------------------


def test_a_real_work_up_completes_the_items_and_nothing_is_ordered_again(engine: Engine) -> None:
    rs = patient_with()
    p = rs[0]
    records = [
        {**report(p, LOINC, "57021-8"), "id": "cbc-1"},
        {**report(p, LOINC, "24357-6"), "id": "ua-1"},
        {**report(p, LOINC, "42272-5"), "id": "cxr-1"},
        {**report(p, LOINC, "26175-0"), "id": "mg-1"},
        {**report(p, LOINC, "47527-7"), "id": "pap-1"},
        {**observation(p, LOINC, "83082-8"), "id": "ca125-1"},
        {**observation(p, LOINC, "29771-3"), "id": "fit-1"},
    ]
    result = run_one(engine, *rs, *records)
    done = {i.test_id: i.done.reference for i in result.plan.items if i.done is not None}
    assert done == {
        "cbc": "DiagnosticReport/cbc-1",
        "urinalysis": "DiagnosticReport/ua-1",
        "chest-xray": "DiagnosticReport/cxr-1",
        "mammography": "DiagnosticReport/mg-1",
        "cervical-cytology": "DiagnosticReport/pap-1",
        "ca125": "Observation/ca125-1",
        "fobt": "Observation/fit-1",
    }
    ordered = {
        r["code"]["coding"][0]["code"]
        for r in result.service_requests
        if r["identifier"][0]["value"].split(".")[-3] == "diagnosis"
    }
    assert "24325-3" in ordered  # liver function tests: not in the record, still proposed
    for test_id in done:
        assert engine.knowledge.ruleset.tests[test_id].code.code not in ordered


# --- partial matches --------------------------------------------------------------------------


@pytest.mark.parametrize(("system", "code"), CT_CAP)
def test_a_ct_of_chest_abdomen_and_pelvis_answers_the_neck_to_pelvis_ct_and_says_so(
    engine: Engine, system: str, code: str
) -> None:
    rs = patient_with()
    result = run_one(engine, *rs, report(rs[0], system, code))
    [evidence] = result.plan.assessment.facts.screening_evidence
    assert (evidence.test_id, evidence.partial, evidence.note) == ("ct-ncap", True, CT_NOTE)
    ct = item(result, "ct-ncap")
    assert ct.done is not None and ct.done.reference == "DiagnosticReport/rep-1"
    assert ct.done.note == CT_NOTE
    assert "89283-6" not in {r["code"]["coding"][0]["code"] for r in result.service_requests}
    row = next(
        r
        for r in result.explanation.schedule
        if r.test == engine.knowledge.ruleset.tests["ct-ncap"].display
    )
    assert row.status == "done" and row.evidence.startswith("DiagnosticReport/rep-1 (2024-03-20)")


def test_the_partial_note_comes_from_the_rule_set(knowledge: Knowledge) -> None:
    [full, partial] = knowledge.ruleset.tests["ct-ncap"].done
    assert not full.partial and full.note == ""
    assert partial.partial and partial.note == CT_NOTE


def test_a_full_code_beside_a_partial_one_on_the_same_record_is_a_full_match(
    engine: Engine,
) -> None:
    rs = patient_with()
    both = report(rs[0], LOINC, "72254-6")
    both["code"]["coding"].append({"system": LOINC, "code": "89283-6"})
    [evidence] = run_one(engine, *rs, both).plan.assessment.facts.screening_evidence
    assert (evidence.test_id, evidence.partial, evidence.note) == ("ct-ncap", False, "")


def test_evidence_stays_backward_compatible() -> None:
    from datetime import date

    e = Evidence("cbc", "Observation/1", date(2024, 3, 20), "Observation")
    assert (e.partial, e.note) == (False, "")


# --- what does not count ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test_id", "system", "code"),
    [
        ("ct-ncap", LOINC, "24627-2"),  # CT chest alone (codes.md C1): not a partial match
        ("ct-ncap", LOINC, "44115-4"),  # CT abdomen and pelvis alone
        ("cervical-cytology", LOINC, "21440-3"),  # HPV DNA: another test
        ("mammography", SCT, "47079000"),  # breast ultrasound
        ("transvaginal-us", SCT, "24848001"),  # pelvic echography, not transvaginal
        ("pft-dlco", SCT, "127783003"),  # spirometry without DLCO
    ],
)
def test_a_related_code_that_does_not_show_the_test_done_is_not_counted(
    engine: Engine, test_id: str, system: str, code: str
) -> None:
    assert one(engine, procedure, system, code) == []


def test_a_code_of_another_test_does_not_count_for_this_one(engine: Engine) -> None:
    rs = patient_with()
    result = run_one(engine, *rs, report(rs[0], LOINC, "26175-0"))  # a mammogram
    assert item(result, "mammography").done is not None
    assert item(result, "ct-ncap").done is None
    assert item(result, "cervical-cytology").done is None


# --- the input filter -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code"), [(s, c) for codes in [*NAMED.values(), CT_CAP] for s, c in codes]
)
def test_the_input_filter_keeps_reports_and_observations_with_a_done_code(
    engine: Engine, system: str, code: str
) -> None:
    p = f.patient("dc-2")
    assert engine.relevance.keeps(report(p, system, code))
    assert engine.relevance.keeps(observation(p, system, code))


def test_the_input_filter_still_drops_unrelated_reports(engine: Engine) -> None:
    p = f.patient("dc-3")
    assert not engine.relevance.keeps(report(p, LOINC, "24627-2"))  # CT chest: no test's code
    assert not engine.relevance.keeps(observation(p, LOINC, "8867-4"))  # heart rate


# --- site-local codes and the loader's checks ---------------------------------------------------


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, target)
    return target


def _edit(path: Path, change: Callable[[Any], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_site_local_code_mapped_onto_a_done_value_set_counts(config_copy: Path) -> None:
    local = {
        "system": "http://hospital.example.org/lab-codes",
        "code": "SPEP",
        "value_set": "done-spep",
    }
    _edit(config_copy / "terminology/local-codes.yaml", lambda d: d["mappings"].append(local))
    engine = Engine(load_knowledge(config_copy), software_version="test")
    found = one(engine, report, local["system"], "SPEP")
    assert [(e.test_id, e.partial) for e in found] == [("spep", False)]
    assert engine.relevance.keeps(report(f.patient("dc-4"), local["system"], "SPEP"))


def _tests(d: Any) -> Any:
    return d["tests"]


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            "terminology/screening-done.yaml",
            lambda d: d["value_sets"]["done-cbc"]["include"].append(
                {**d["value_sets"]["done-ct-ncap"]["include"][0]}
            ),
            "shows two tests done ('ct-ncap' and 'cbc')",
        ),
        (
            "terminology/screening-done.yaml",
            lambda d: d["value_sets"]["done-ct-cap"]["include"].append(
                {**d["value_sets"]["done-ct-ncap"]["include"][0]}
            ),
            "is both a full and a partial match of 'ct-ncap'",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: _tests(d)["ct-ncap"]["done"][1].pop("note"),
            "a partial match needs a 'note'",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: _tests(d)["cbc"].update(done=[{"value_set": "done-nothing"}]),
            "tests.cbc.done.0: unknown value set 'done-nothing'",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: _tests(d)["lft"].update(done=[{"value_set": "done-cbc"}]),
            "value set 'done-cbc' is named twice",
        ),
        (
            "terminology/screening-done.yaml",
            lambda d: d["value_sets"]["done-cbc"]["include"][0].update(system="lonic"),
            "value_sets.done-cbc.include.0: unknown system alias 'lonic'",
        ),
        (
            "terminology/screening-done.yaml",
            lambda d: d["value_sets"]["done-cbc"]["include"].append(
                {
                    "system": "loinc",
                    "prefix": "58",
                    "display": "x",
                    "source": "VSAC24",
                    "confidence": "judgment",
                }
            ),
            "include.2 is a prefix",
        ),
    ],
)
def test_bad_done_codes_stop_the_load_with_a_clear_message(
    config_copy: Path, file: str, change: Callable[[Any], None], message: str
) -> None:
    _edit(config_copy / file, change)
    with pytest.raises(KnowledgeError) as exc:
        load_knowledge(config_copy)
    assert message in str(exc.value)
