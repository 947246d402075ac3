"""Rules: scope, every risk factor, every tier, the preliminary flag and notices."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_dm.core.assess import Engine
from tests import factories as f
from tests.unit.core.helpers import run_one

YOUNG = "1994-01-01"  # 30 at the default onset: age-over-40 does not apply
# Antibodies of high or intermediate class: untested ones can make a tier preliminary.
ALL_CANCER_ANTIBODIES = ("tif1g", "nxp2", "sae1", "hmgcr", "mi2", "mda5")


def fired(result: object) -> set[str]:
    return {r.id for r in result.plan.assessment.factors}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("factor", "extra"),
    [
        ("ab-tif1g", lambda p: [f.antibody(p, "tif1g")]),
        ("ab-nxp2", lambda p: [f.antibody(p, "nxp2")]),
        ("ab-sae1", lambda p: [f.antibody(p, "sae1")]),
        ("ab-hmgcr", lambda p: [f.antibody(p, "hmgcr")]),
        ("dysphagia", lambda p: [f.condition(p, f.concept(f.SCT, "40739000"))]),
        ("skin-necrosis", lambda p: [f.condition(p, f.concept(f.ICD10CM, "L98.491"))]),
        ("refractory", lambda p: [f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-REFRACTORY"))]),
        ("ab-antisynthetase", lambda p: [f.antibody(p, "jo1")]),
        ("ild", lambda p: [f.condition(p, f.concept(f.SCT, "233703007"))]),
        ("raynaud", lambda p: [f.condition(p, f.concept(f.ICD10CM, "I73.00"))]),
        ("arthritis", lambda p: [f.condition(p, f.concept(f.ICD10CM, "M06.4"))]),
    ],
)
def test_each_factor_fires(engine: Engine, factor: str, extra: object) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p), *extra(p))  # type: ignore[operator]
    assert factor in fired(result)


def test_subtype_and_age_factors(engine: Engine) -> None:
    p = f.patient(birth_date="1960-01-01")
    result = run_one(engine, p, f.iim_condition(p))
    assert {"subtype-dm", "age-over-40"} <= fired(result)


def test_age_exactly_40_is_not_over_40(engine: Engine) -> None:
    p = f.patient(birth_date="1984-03-01")  # 40 on the onset day 2024-03-01
    assert "age-over-40" not in fired(run_one(engine, p, f.iim_condition(p)))


def test_imnm_of_any_serology_is_intermediate(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    for serology in ("negative", "positive"):
        result = run_one(
            engine,
            p,
            f.iim_condition(p, code="715863001"),
            f.antibody(p, "srp", serology),
        )
        assert "subtype-pm-imnm" in fired(result)


def test_tier_high_with_two_high_factors(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "tif1g"))
    assert result.tier == "high"
    assert not result.plan.assessment.preliminary


def test_tier_moderate_with_one_high_factor_and_all_antibodies_known(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1")]
    result = run_one(engine, p, f.iim_condition(p), *negatives)
    assert result.tier == "moderate"
    assert not result.plan.assessment.preliminary


def test_tier_moderate_with_two_intermediate_factors(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="715863001"),
        f.antibody(p, "sae1"),
        f.antibody(p, "hmgcr"),
        f.antibody(p, "tif1g", "negative"),
        f.antibody(p, "nxp2", "negative"),
    )
    assert result.tier == "moderate"


def test_tier_standard(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [f.antibody(p, ab, "negative") for ab in ALL_CANCER_ANTIBODIES]
    result = run_one(engine, p, f.iim_condition(p, code="31384009"), *negatives)
    assert result.tier == "standard"
    assert fired(result) == {"subtype-pm-imnm"}  # one intermediate factor
    assert not result.plan.assessment.preliminary


def test_low_factors_do_not_lower_the_tier(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(
        engine,
        p,
        f.iim_condition(p),
        f.antibody(p, "tif1g"),
        f.antibody(p, "jo1"),
        f.condition(p, f.concept(f.SCT, "233703007")),
    )
    assert result.tier == "high"
    assert {"ab-antisynthetase", "ild"} <= fired(result)


def test_preliminary_when_cancer_antibodies_untested(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p))
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("moderate", True)
    # Only a second high factor lifts a moderate tier held by DM: intermediate antibodies
    # (SAE1, HMGCR, Mi-2, MDA5) cannot change it, so they are not named (rev 3).
    assert a.preliminary_because == ("anti-TIF1-gamma antibody", "anti-NXP2 antibody")
    assert a.preliminary_unknowns == ("antibody:tif1g", "antibody:nxp2")
    assert result.risk_assessment["status"] == "preliminary"


def test_preliminary_when_age_unknown(engine: Engine) -> None:
    p = f.patient(birth_date=None)
    negatives = [f.antibody(p, ab, "negative") for ab in ALL_CANCER_ANTIBODIES]
    result = run_one(engine, p, f.iim_condition(p), *negatives)
    assert result.plan.assessment.preliminary
    assert result.plan.assessment.preliminary_because == ("age at onset (birth date missing)",)


def test_high_is_never_preliminary(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    result = run_one(engine, p, f.iim_condition(p))
    assert result.tier == "high"
    assert not result.plan.assessment.preliminary


def test_juvenile_by_code(engine: Engine) -> None:
    p = f.patient(birth_date="2012-01-01")
    result = run_one(engine, p, f.iim_condition(p, system=f.ICD10CM, code="M33.03"))
    assert result.plan.assessment.scope == "juvenile"
    # No cancer screening; no ILD, anti-MDA5 or antisynthetase antibody: no lung plan either.
    assert result.tier is None and result.service_requests == () and result.care_plan is None
    assert result.plan.items == ()
    # The scope reason is said even though a juvenile patient has a window (1.2.0).
    assert "Juvenile" in result.risk_assessment["prediction"][0]["rationale"]


def test_juvenile_with_anti_mda5_gets_the_lung_plan_and_still_the_scope_reason(
    engine: Engine,
) -> None:
    p = f.patient(birth_date="2012-01-01")
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "mda5"))
    assert (result.plan.assessment.scope, result.tier) == ("juvenile", None)
    assert result.plan.items and all(i.round_id.startswith("lung-") for i in result.plan.items)
    assert result.care_plan is not None
    prediction = result.risk_assessment["prediction"][0]
    assert "qualitativeRisk" not in prediction
    assert "Juvenile" in prediction["rationale"] and "whenPeriod" in prediction


def test_juvenile_by_onset_age(engine: Engine) -> None:
    p = f.patient(birth_date="2010-01-01")
    result = run_one(engine, p, f.iim_condition(p))
    assert result.plan.assessment.scope == "juvenile"
    assert result.service_requests == ()


def test_window_closes_once_nothing_is_left_due(engine: Engine) -> None:
    """Diagnosis + 3 years passed and the work-up at diagnosis was done: window closed; the
    plan stays, completed, with what was done (clinical-logic §13)."""
    p = f.patient(birth_date=YOUNG)
    negatives = [
        f.antibody(p, ab, "negative", effective="2019-01-10") for ab in ALL_CANCER_ANTIBODIES
    ]
    basic = engine.knowledge.ruleset.panels["basic"].tests
    done = [f.done_request(p, engine.knowledge, t, "2019-02-01") for t in basic]
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="445187004", onset="2019-01-01"),
        *negatives,
        *done,
        now=date(2024, 4, 15),
    )
    a = result.plan.assessment
    assert a.scope == "window-closed"
    assert "2019-01-01" in a.scope_reason
    assert result.service_requests == ()
    assert result.care_plan is not None and result.care_plan["status"] == "completed"
    done = {i.test_id for i in result.plan.items if i.done is not None}
    assert set(basic) <= done  # the done items stay in the plan
    outcomes = [a for a in result.care_plan["activity"] if "outcomeReference" in a]
    assert len(outcomes) == len(done)
    assert all(a["detail"]["status"] == "completed" for a in outcomes)


def test_undone_work_up_lapses_into_one_notice_after_the_window(engine: Engine) -> None:
    """The work-up at diagnosis was never done: overdue (and ordered) until the window's end
    date, then missed, with one notice to confirm it was done and no order (§13)."""
    p = f.patient(birth_date=YOUNG)
    negatives = [
        f.antibody(p, ab, "negative", effective="2019-01-10") for ab in ALL_CANCER_ANTIBODIES
    ]
    resources = [
        p,
        f.iim_condition(p, code="445187004", onset="2019-01-01"),
        *negatives,
        *f.lung_screened(p, "2018-12-01"),  # no ILD screening round: only the cancer plan
    ]
    before = run_one(engine, *resources, now=date(2021, 12, 1))
    assert before.plan.assessment.scope == "in-scope"
    assert {i.round_id for i in before.plan.items} == {"diagnosis"}
    assert all(before.plan.overdue(i) for i in before.plan.items)
    assert before.service_requests
    assert not any(n.id == "workup-not-recorded" for n in before.plan.assessment.notices)

    result = run_one(engine, *resources, now=date(2024, 4, 15))
    a = result.plan.assessment
    assert a.scope == "window-closed"
    assert {i.round_id for i in result.plan.items} == {"diagnosis"}  # kept as history
    assert all(result.plan.status(i) == "missed" for i in result.plan.items)
    assert result.service_requests == ()
    [notice] = [n for n in a.notices if n.id == "workup-not-recorded"]
    assert notice.text.startswith("No record of the work-up at diagnosis (")
    assert notice.text.endswith("): confirm it was done.")


def test_diagnosed_long_after_onset(engine: Engine) -> None:
    p = f.patient()
    result = run_one(
        engine,
        p,
        f.iim_condition(p, onset="2019-01-01", recorded="2023-06-01"),
        now=date(2023, 7, 1),
    )
    a = result.plan.assessment
    assert (a.scope, result.tier) == ("late-diagnosis", None)
    # No IMACS rounds; the ILD screening (not IMACS) is ordered, and the safety net is one
    # "consider" item for national screening with its notice, never a silent nothing (1.2.0).
    assert {r[0] for r in result.plan.rounds()} == {"lung-baseline", "outside-guideline"}
    ordered = {r["identifier"][0]["value"].split(".")[-3] for r in result.service_requests}
    assert ordered == {"lung-baseline"}
    [net] = [i for i in result.plan.items if i.round_id == "outside-guideline"]
    assert (net.test_id, net.conditional) == ("national-screening", True)
    assert any(n.id == "outside-guideline" for n in a.notices)
    assert "outside the guideline" in result.risk_assessment["prediction"][0]["rationale"]


def test_ibm_is_not_stratified(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    result = run_one(engine, p, f.iim_condition(p, code="72315009"))
    assert result.plan.assessment.scope == "excluded-subtype"
    assert result.tier is None and result.service_requests == ()
    assert "Inclusion body myositis" in result.explanation.headline


def test_no_iim(engine: Engine) -> None:
    p = f.patient()
    result = run_one(engine, p, f.condition(p, f.concept(f.SCT, "40739000")))
    assert result.plan.assessment.scope == "no-iim"
    assert result.service_requests == ()


def test_active_malignancy_still_tiers_and_says_coordinate_with_oncology(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    result = run_one(engine, p, f.iim_condition(p), f.condition(p, f.concept(f.ICD10CM, "C34.90")))
    assert result.tier == "high"
    assert any("oncology" in n for n in result.explanation.notices)


def test_unspecified_subtype_is_unknown_not_negative(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [f.antibody(p, ab, "negative") for ab in ALL_CANCER_ANTIBODIES]
    result = run_one(engine, p, f.iim_condition(p, code="702380008"), *negatives)
    a = result.plan.assessment
    assert (result.tier, a.preliminary, a.preliminary_because) == (
        "standard",
        True,
        ("IIM subtype",),
    )


def test_age_over_40_is_exact_age(engine: Engine) -> None:
    p = f.patient(birth_date="1983-11-01")  # 40 years 4 months at onset 2024-03-01
    assert "age-over-40" in fired(run_one(engine, p, f.iim_condition(p)))
    q = f.patient(birth_date="1984-02-29")  # 40 years and 1 day at onset 2024-03-01
    assert "age-over-40" in fired(run_one(engine, q, f.iim_condition(q)))
    r = f.patient(birth_date="1984-03-02")  # one day short of 40
    assert "age-over-40" not in fired(run_one(engine, r, f.iim_condition(r)))
