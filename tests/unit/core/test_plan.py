"""Plans: rounds and due windows per tier, sex-specific tests, add-ons, red flags, surveillance."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_dm.core.assess import Engine
from tests import factories as f
from tests.unit.core.helpers import planned_tests, run_one

YOUNG = "1994-01-01"
BASIC_ORDERS = {"cbc", "lft", "esr", "crp", "spep", "urinalysis", "chest-xray"}
FEMALE_ONLY = {"cervical-cytology", "mammography", "transvaginal-us", "abdominal-us"}


def high_risk(gender: str | None = "female", *extra_fn: object) -> list[dict[str, object]]:
    p = f.patient(birth_date=YOUNG, gender=gender)
    return [p, f.iim_condition(p), f.antibody(p, "tif1g"), *(fn(p) for fn in extra_fn)]  # type: ignore[operator]


def test_high_tier_rounds_and_due_windows(engine: Engine) -> None:
    rs = high_risk()  # lungs screened before the diagnosis: only the cancer rounds are planned
    result = run_one(engine, *rs, *f.lung_screened(rs[0]))
    rounds = [(r[0], r[2], r[3]) for r in result.plan.rounds()]
    assert rounds == [
        ("diagnosis", date(2024, 3, 1), date(2024, 6, 1)),
        ("year-1", date(2025, 3, 1), date(2025, 6, 1)),
        ("year-2", date(2026, 3, 1), date(2026, 6, 1)),
        ("year-3", date(2027, 3, 1), date(2027, 6, 1)),
    ]
    for round_id in ("year-1", "year-2", "year-3"):
        assert set(planned_tests(result, round_id)) == BASIC_ORDERS | {
            "history-exam",
            "national-screening",
        }


def test_one_service_request_per_test_per_round_with_shared_requisition(engine: Engine) -> None:
    # A month before the 12-month round opens: the (overdue) diagnosis round and it are ordered.
    result = run_one(engine, *high_risk(), now=date(2025, 2, 5))
    keys = [
        (r["requisition"]["value"], r["code"]["coding"][0]["code"]) for r in result.service_requests
    ]
    assert len(keys) == len(set(keys))
    by_round: dict[str, set[str]] = {}
    for r in result.service_requests:
        round_id = r["identifier"][0]["value"].split(".")[-3]
        by_round.setdefault(round_id, set()).add(r["requisition"]["value"])
    assert set(by_round) == {"diagnosis", "year-1"}
    assert all(len(values) == 1 for values in by_round.values())
    assert by_round["year-1"].pop().endswith(".year-1.20250301")


def test_moderate_has_no_repeat_rounds(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1")]
    result = run_one(engine, p, f.iim_condition(p), *negatives, *f.lung_screened(p))
    assert result.tier == "moderate"
    assert {r[0] for r in result.plan.rounds()} == {"diagnosis"}
    assert {"ct-ncap", "ca125", "fobt"} <= set(planned_tests(result))


def test_standard_has_basic_panel_only(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [
        f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1", "hmgcr", "mi2", "mda5")
    ]
    screened = f.lung_screened(p)  # no ILD screening round: only the cancer plan
    result = run_one(engine, p, f.iim_condition(p, code="31384009"), *negatives, *screened)
    assert result.tier == "standard"
    assert set(planned_tests(result)) == BASIC_ORDERS | {"history-exam", "national-screening"}


def test_male_gets_psa_and_no_female_tests(engine: Engine) -> None:
    result = run_one(engine, *high_risk("male"))
    tests = set(planned_tests(result))
    assert "psa" in tests
    assert not tests & FEMALE_ONLY


def test_female_gets_female_tests_and_no_psa(engine: Engine) -> None:
    tests = set(planned_tests(run_one(engine, *high_risk("female"))))
    assert tests >= FEMALE_ONLY
    assert "psa" not in tests


def test_unknown_sex_makes_sex_specific_tests_conditional(engine: Engine) -> None:
    result = run_one(engine, *high_risk(None))
    specific = {i.test_id: i for i in result.plan.items if i.test_id in FEMALE_ONLY | {"psa"}}
    assert set(specific) == FEMALE_ONLY | {"psa"}
    assert all(i.conditional for i in specific.values())
    assert "sex" in result.plan.assessment.unknown_facts


def test_pet_ct_and_gi_endoscopy_are_consider_activities_for_high(engine: Engine) -> None:
    result = run_one(engine, *high_risk())
    items = {i.test_id: i for i in result.plan.items if i.round_id == "diagnosis"}
    for test_id in ("pet-ct", "upper-gi-endoscopy", "colonoscopy"):
        assert items[test_id].conditional
        assert not result.plan.orders_now(items[test_id])
    # "Consider" items are CarePlan activities, never orders (clinical-logic §13).
    codes = {r["code"]["coding"][0]["code"] for r in result.service_requests}
    assert "443271005" not in codes and "89283-6" in codes
    assert result.care_plan is not None
    [pet] = [
        a["detail"]
        for a in result.care_plan["activity"]
        if "detail" in a and a["detail"]["code"]["coding"][0]["code"] == "443271005"
    ]
    assert pet["status"] == "not-started"
    assert pet["scheduledPeriod"] == {"start": "2024-03-01", "end": "2024-06-01"}
    assert "Consider: " in pet["description"]


def test_pet_ct_tif1g_single_investigation_rule(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    result = run_one(
        engine,
        p,
        f.iim_condition(p),
        f.antibody(p, "tif1g"),
        f.condition(p, f.concept(f.SCT, "40739000")),
    )
    pet = next(i for i in result.plan.items if i.test_id == "pet-ct")
    assert {r.id for r in pet.rules} == {"pet-ct-negative-workup", "pet-ct-tif1g"}


def test_pet_ct_tif1g_rule_needs_a_clinical_feature(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "tif1g"))
    pet = next(i for i in result.plan.items if i.test_id == "pet-ct")
    assert {r.id for r in pet.rules} == {"pet-ct-negative-workup"}


def test_nasoendoscopy_only_in_npc_region(engine: Engine) -> None:
    assert "nasoendoscopy" not in planned_tests(run_one(engine, *high_risk()))
    k = engine.knowledge
    npc = k.model_copy(
        update={
            "site": k.site.model_copy(
                update={"site": k.site.site.model_copy(update={"npc_region": True})}
            )
        }
    )
    assert "nasoendoscopy" in planned_tests(run_one(Engine(npc), *high_risk()))


def test_red_flag_adds_enhanced_panel_to_standard_tier(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    negatives = [f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1", "srp")]
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="31384009"),
        *negatives,
        f.condition(p, f.concept(f.SCT, "422868009")),
    )
    assert result.tier == "standard"
    ct = next(i for i in result.plan.items if i.test_id == "ct-ncap")
    assert [r.id for r in ct.rules] == ["red-flags"]
    assert "weight loss" in ct.rules[0].facts[0]
    assert ct.conditional and "red flags" in ct.condition_text


def test_antibody_panel_proposed_when_untested(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p))
    assert "myositis-antibodies" in planned_tests(result, "diagnosis")


def test_antibody_panel_not_proposed_when_tested(engine: Engine) -> None:
    assert "myositis-antibodies" not in planned_tests(
        run_one(
            engine,
            *high_risk(
                "female",
                lambda p: f.antibody(p, "nxp2", "negative"),
                lambda p: f.antibody(p, "sae1", "negative"),
            ),
        )
    )


def test_lung_surveillance_for_mda5(engine: Engine) -> None:
    result = run_one(engine, *high_risk("female", lambda p: f.antibody(p, "mda5")))
    lung = [i for i in result.plan.items if i.round_id.startswith("lung")]
    # ACR/CHEST 2023 (rule set 1.2.0): PFTs every 3 months in the first year (anti-MDA5: the
    # first at 1-3 months), a desaturation test every 6 months, then PFTs every 6 months.
    every_6_months = ("lung-6m", "lung-12m", "lung-18m", "lung-24m", "lung-30m", "lung-36m")
    assert {(i.round_id, i.test_id) for i in lung} == {
        ("lung-baseline", "hrct-chest"),
        ("lung-baseline", "pft-dlco"),
        ("lung-1m", "pft-dlco"),
        ("lung-9m", "pft-dlco"),
        *((r, t) for r in every_6_months for t in ("pft-dlco", "desaturation-test")),
    }
    assert "lung-early" in {n.id for n in result.plan.assessment.notices}  # check ferritin
    assert all(i.labelled_not_imacs for i in lung)
    request = next(
        r for r in result.service_requests if r["code"]["coding"][0]["code"] == "58477-1"
    )
    assert any("Not part of the IMACS" in n["text"] for n in request["note"])


def test_flare_adds_enhanced_panel_unless_recently_done(engine: Engine) -> None:
    # Anti-TIF1-gamma positive, diagnosed in 2020 (window closed): a flare in December 2024
    # proposes the enhanced panel to consider (1.2.0: only with a high-risk antibody or a past
    # cancer; without, a review notice only, see test_ruleset_1_2).
    p = f.patient(birth_date=YOUNG)
    base = [p, f.iim_condition(p, onset="2020-03-01"), f.antibody(p, "tif1g"), *f.lung_screened(p)]
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2024-12-20")
    result = run_one(engine, *base, flare, now=date(2025, 1, 10))
    assert result.plan.assessment.scope == "window-closed"
    ct = next(i for i in result.plan.items if i.key == ("flare", "ct-ncap"))
    assert (ct.due_start, ct.labelled_not_imacs, ct.conditional) == (date(2024, 12, 20), True, True)
    assert "fobt" in planned_tests(result, "flare")
    assert any("flare" in n for n in result.explanation.notices)
    done_ct = {
        "resourceType": "Procedure",
        "id": "ct-1",
        "status": "completed",
        "subject": f.ref(p),
        "code": f.concept(f.LOINC, "89283-6"),
        "performedDateTime": "2024-11-01",
    }
    again = run_one(engine, *base, flare, done_ct, now=date(2025, 1, 10))
    assert "ct-ncap" not in planned_tests(again, "flare")  # done in the 12 months before
    assert "fobt" in planned_tests(again, "flare")  # each test is skipped on its own


def test_flare_derived_from_ck_series(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    cks = [
        f.ck(p, 3000, effective="2024-03-05"),
        f.ck(p, 150, effective="2024-06-01"),
        f.ck(p, 2200, effective="2024-10-01"),
    ]
    result = run_one(engine, p, f.iim_condition(p), *cks, now=date(2024, 10, 10))
    assert result.plan.assessment.facts.feature("flare").value is True


def test_past_rounds_stay_overdue_until_they_lapse_then_are_kept_as_missed(engine: Engine) -> None:
    every_round = ["diagnosis", "year-1", "year-2", "year-3"]
    rs = high_risk()
    rs += f.lung_screened(rs[0])  # only the cancer rounds are planned
    result = run_one(engine, *rs, now=date(2025, 8, 1))
    assert [r[0] for r in result.plan.rounds()] == every_round
    first = next(i for i in result.plan.items if i.round_id == "diagnosis")
    year1 = next(i for i in result.plan.items if i.key == ("year-1", "cbc"))
    assert result.plan.overdue(first) and result.plan.overdue(year1)
    # The 24-month round opens: the 12-month round lapses; the work-up at diagnosis stays owed.
    later = run_one(engine, *rs, now=date(2026, 3, 2))
    assert [r[0] for r in later.plan.rounds()] == every_round  # nothing dropped
    first = next(i for i in later.plan.items if i.round_id == "diagnosis")
    year1 = next(i for i in later.plan.items if i.key == ("year-1", "cbc"))
    assert later.plan.overdue(first)
    assert later.plan.status(year1) == "missed" and not later.plan.overdue(year1)


def test_plan_is_the_same_on_another_day(engine: Engine) -> None:
    resources = high_risk()
    a = run_one(engine, *resources, now=date(2024, 4, 1))
    b = run_one(engine, *resources, now=date(2024, 5, 20))
    assert a.identity == b.identity


@pytest.mark.parametrize(
    ("now", "ordered", "later"),
    [
        # At diagnosis: one radiograph ordered; the yearly ones are plan activities.
        (date(2024, 4, 1), {"diagnosis"}, {"year-1", "year-2", "year-3"}),
        # A month before the 24-month round: the undone diagnosis and 12-month ones are still
        # owed (overdue), the 24-month one is ordered ahead (the lead time), year 3 waits.
        (date(2026, 2, 1), {"diagnosis", "year-1", "year-2"}, {"year-3"}),
        # Once the 24-month round is open the 12-month one has lapsed (missed, not ordered).
        (date(2026, 3, 2), {"diagnosis", "year-2"}, {"year-3"}),
    ],
)
def test_chest_radiographs_are_ordered_only_for_open_rounds(
    engine: Engine, now: date, ordered: set[str], later: set[str]
) -> None:
    result = run_one(engine, *high_risk(), now=now)
    cxr = [r for r in result.service_requests if r["code"]["coding"][0]["code"] == "36643-5"]
    assert {r["identifier"][0]["value"].split(".")[-3] for r in cxr} == ordered
    assert len(cxr) == len(ordered)
    assert result.care_plan is not None
    waiting = [
        a["detail"]
        for a in result.care_plan["activity"]
        if "detail" in a
        and a["detail"]["code"]["coding"][0]["code"] == "36643-5"
        and a["detail"]["status"] == "not-started"
    ]
    starts = {
        i.due_start.isoformat(): i.round_id for i in result.plan.items if i.test_id == "chest-xray"
    }
    assert {starts[d["scheduledPeriod"]["start"]] for d in waiting} == later
