"""The population view on a real HAPI FHIR: find the IIM patients, write each once, resume, measure.

A small population (4 IIM patients of 6) is loaded with transactions built from the test
factories. Evaluation date 2026-12-02; all have dermatomyositis, aged over 40 at onset (high
risk). A: diagnosis 2024-03-01, every firm work-up test done on time; B: the same tests done
late; C: nothing done; D: diagnosis 2026-09-15, work-up due by 2026-12-15 (soon due). The
measure counts below were worked out by hand from those facts.
"""

from __future__ import annotations

import io
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.core.assess import Engine
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.locks import PatientLocks
from fhir_dm.population.config import load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import measure_report
from fhir_dm.population.run import Done, PopulationRunner, StateFile
from fhir_dm.population.worklist import worklist
from tests import factories as f
from tests.population_data import population, transactions

NOW = date(2026, 12, 2)
Json = dict[str, Any]


def _firm_workup_tests(knowledge: Knowledge) -> list[str]:
    """Basic and enhanced panel tests a woman is offered (PSA is male-only), and the antibody
    panel (asked for at diagnosis because none is recorded)."""
    rs = knowledge.ruleset
    tests = [t for p in ("basic", "enhanced") for t in rs.panels[p].tests]
    tests.append("myositis-antibodies")
    return [t for t in dict.fromkeys(tests) if rs.tests[t].sex in (None, "female")]


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge()


@pytest.fixture(scope="module")
def loaded(fhir_base_url: str, knowledge: Knowledge) -> dict[str, str]:
    """Load the population; returns {letter: patient id}."""
    tag = f"pop{uuid.uuid4().hex[:6]}"
    resources = population(tag, 6, 3)  # patients 0-2: IIM from 2024-03-01; 3-5: not IIM
    d = f.patient(
        f"{tag}-d",
        birth_date="1970-01-15",
        managingOrganization={"reference": f"Organization/{tag}-org-0"},
        generalPractitioner=[{"reference": f"Practitioner/{tag}-gp-0"}],
    )
    resources += [d, f.iim_condition(d, onset="2026-09-15", recorded="2026-09-15")]
    ids = {"A": f"{tag}-0", "B": f"{tag}-1", "C": f"{tag}-2", "D": d["id"]}
    patients = {r["id"]: r for r in resources if r["resourceType"] == "Patient"}
    for letter, when in (("A", "2024-04-01"), ("B", "2024-08-01")):
        for test in _firm_workup_tests(knowledge):
            resources.append(f.done_request(patients[ids[letter]], knowledge, test, when))
    for bundle in transactions(resources):
        response = requests.post(
            fhir_base_url,
            json=bundle,
            headers={"Content-Type": "application/fhir+json"},
            timeout=120,
        )
        assert response.status_code == 200, response.text[:500]
    ids["tag"] = tag
    return ids


def _runner(base: str, knowledge: Knowledge, tmp: Path) -> PopulationRunner:
    return PopulationRunner(
        lambda: FhirClient(base), Engine(knowledge), knowledge, PatientLocks(tmp)
    )


def _ours(found: list[str], tag: str) -> list[str]:
    """Other tests share the server: keep this population's patients."""
    return [p for p in found if p.startswith(f"{tag}-")]


def test_population_run_finds_writes_once_resumes_and_measures(
    fhir_base_url: str, knowledge: Knowledge, loaded: dict[str, str], tmp_path: Path
) -> None:
    tag = loaded["tag"]
    cfg = load_population_config(knowledge)
    with FhirClient(fhir_base_url) as client:
        found = _ours(find_iim_patients(client, iim_search_tokens(knowledge, cfg.finder)), tag)
    assert found == sorted(loaded[k] for k in "ABCD")  # exactly the IIM patients

    # An interrupted run: stopped after two patients, then resumed with the same run id.
    stop_after: list[Done] = []

    def interrupt(done: Done) -> None:
        stop_after.append(done)
        if len(stop_after) == 2:
            raise KeyboardInterrupt

    quiet = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        _runner(fhir_base_url, knowledge, tmp_path).run(
            found,
            now=NOW,
            preview=False,
            workers=1,
            run_id="first",
            state=StateFile(tmp_path, "first"),
            progress_stream=quiet,
            on_done=interrupt,
        )
    resumed: list[str] = []
    result = _runner(fhir_base_url, knowledge, tmp_path).run(
        found,
        now=NOW,
        preview=False,
        workers=2,
        run_id="first",
        state=StateFile(tmp_path, "first"),
        progress_stream=quiet,
        on_done=lambda d: resumed.append(d.patient_id),
    )
    # Two seen through, those in flight then finished and recorded; the rest resumed.
    assert result.skipped >= 2 and len(resumed) == 4 - result.skipped
    assert not set(resumed) & {d.patient_id for d in stop_after}
    assert not result.failures
    statuses = sorted((d.status, d.patient_id) for d in result.done)
    assert [s for s, _ in statuses] == ["written"] * 4, statuses  # each written once
    with FhirClient(fhir_base_url) as client:
        for patient_id in found:
            plans = client.search(
                "CarePlan", {"subject": f"Patient/{patient_id}", "status": "active"}
            )
            assert len(plans) == 1

    again = _runner(fhir_base_url, knowledge, tmp_path).run(
        found,
        now=NOW,
        preview=False,
        workers=2,
        run_id="second",
        state=StateFile(tmp_path, "second"),
        progress_stream=quiet,
    )
    assert sorted(d.status for d in again.done) == ["unchanged"] * 4  # a re-run writes nothing

    rows = again.rows
    assert {r.tier for r in rows} == {"high"}
    reports = {
        m.id: measure_report(knowledge, m, rows, (date(2024, 1, 1), NOW), subject_list=True)
        for m in cfg.measures
    }

    def counts(measure_id: str) -> list[int]:
        return [p["count"] for p in reports[measure_id]["group"][0]["population"]]

    def numerator(measure_id: str) -> list[str]:
        lst = next(c for c in reports[measure_id]["contained"] if c["id"] == "numerator-subjects")
        return sorted(e["item"]["reference"] for e in lst.get("entry", []))

    # Work-up: D's round has not closed; A on time, B late, C not done.
    assert counts("dm-workup-at-diagnosis") == [4, 3, 1]
    assert numerator("dm-workup-at-diagnosis") == [f"Patient/{loaded['A']}"]
    assert counts("dm-enhanced-panel") == [4, 3, 1]
    # Yearly rounds (2025, 2026) closed undone for A, B and C; D has none closed yet.
    assert counts("dm-yearly-rounds-high") == [4, 3, 0]
    # Overdue: A, B and C (their yearly rounds); D is only due.
    assert counts("dm-any-overdue") == [4, 4, 3]
    tier = reports["dm-workup-at-diagnosis"]["group"][0]["stratifier"][0]
    assert [
        (s["value"]["text"], [p["count"] for p in s["population"]]) for s in tier["stratum"]
    ] == [("high", [4, 3, 1])]

    items = worklist(rows, NOW, cfg.worklist.soon_due_days)
    soon = {w.patient for w in items if w.status == "due soon"}
    overdue = {w.patient for w in items if w.status == "overdue"}
    assert soon == {f"Patient/{loaded['D']}"}
    assert overdue == {f"Patient/{loaded[k]}" for k in "ABC"}
    assert items[0].status == "overdue" and items[-1].status == "due soon"
