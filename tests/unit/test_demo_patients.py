"""The demo's synthetic patients: named, with an MRN, a sex and the age the rules need."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from fhir_dm.cli import demo
from fhir_dm.core.dates import years_between

TODAY = date(2026, 3, 1)


def test_every_demo_patient_has_a_name_an_mrn_a_sex_and_a_birth_date() -> None:
    patients = demo.demo_patients(TODAY)
    assert len(patients) == 6
    mrns = set()
    for p in patients:
        patient = p.resources[0]
        assert patient["resourceType"] == "Patient"
        name = patient["name"][0]
        assert name["family"] and name["given"][0]
        [mrn] = patient["identifier"]
        assert mrn["type"]["coding"] == [{"system": demo.IDENTIFIER_TYPE, "code": "MR"}]
        assert mrn["value"] == p.mrn and mrn["system"].startswith("http")
        mrns.add(p.mrn)
        assert patient["gender"] in {"male", "female"}
        assert p.name in p.label and p.mrn in p.label
    assert len(mrns) == 6


@pytest.mark.parametrize("today", [date(2026, 3, 1), date(2024, 2, 29), date(2025, 12, 31)])
def test_the_age_at_onset_is_the_age_the_yaml_gives(today: date) -> None:
    specs = yaml.safe_load((Path(demo.__file__).with_name(demo.PATIENTS_FILE)).read_text())
    onset = today - timedelta(days=demo.ONSET_DAYS_AGO)
    for spec, p in zip(specs["patients"], demo.demo_patients(today), strict=True):
        assert int(years_between(p.birth_date, onset)) == spec["age"]
        assert p.birth_date.strftime("%m-%d") == spec["birthday"]
