"""Result grading: one test per result shape labs send (codes.md §E, clinical-logic §2 rev 2)."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_dm.core import results as r
from fhir_dm.core.assess import Engine
from fhir_dm.core.results import Grade, ResultGrader
from tests import factories as f

POS, WEAK, NEG, EQ = Grade.POSITIVE, Grade.WEAK_POSITIVE, Grade.NEGATIVE, Grade.EQUIVOCAL
Json = dict[str, Any]


@pytest.fixture(scope="module")
def grader(engine: Engine) -> ResultGrader:
    return ResultGrader(engine.knowledge.terminology.result_strings, engine.matcher)


def quantity(value: float, *ranges: Json, comparator: str | None = None, unit: str = "U") -> Json:
    q: Json = {"value": value, "unit": unit}
    if comparator:
        q["comparator"] = comparator
    return {"valueQuantity": q, "referenceRange": list(ranges)}


def text_range(text: str) -> Json:
    return {"text": text}


# --- ordinal text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "grade"),
    [
        ("Positive", POS),
        ("POSITIVE", POS),
        ("  positive. ", POS),
        ("Pos", POS),
        ("Negative", NEG),
        ("NEG", NEG),
        ("Not Detected", NEG),
        ("Detected", POS),
        ("Weak positive", WEAK),
        ("weakly  POSITIVE", WEAK),
        ("Low Positive", WEAK),
        ("1+", WEAK),
        ("1 +", WEAK),
        ("+ mild", WEAK),
        ("2+", POS),
        ("3+ Strong Positive", POS),
        ("Strong positive", POS),
        ("Equivocal", EQ),
        ("Borderline", EQ),
        ("Indeterminate", EQ),
        ("Positive (45 U/mL)", POS),
        ("Positive 45 U/mL", POS),
        ("Negative <20", NEG),
        ("Negative (<20 AU/mL)", NEG),
        ("Positive (weak)", WEAK),
        ("+", POS),
        ("-", NEG),
    ],
)
def test_ordinal_text(grader: ResultGrader, text: str, grade: Grade) -> None:
    reading = grader.grade({"valueString": text})
    assert reading.grade is grade
    assert reading.problems == ()


@pytest.mark.parametrize("text", ["No antibodies detected", "see comment", "Not positive", ""])
def test_text_with_unknown_words_is_not_guessed(grader: ResultGrader, text: str) -> None:
    reading = grader.grade({"valueString": text})
    assert reading.grade is None
    assert reading.problems == (r.UNREADABLE,)


def test_text_naming_two_grades_is_unknown(grader: ResultGrader) -> None:
    reading = grader.grade({"valueString": "Negative / Positive"})
    assert reading.grade is None
    assert r.TEXT_CONFLICT in reading.problems


# --- coded answers and booleans -----------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code", "grade"),
    [
        (f.SCT, "260373001", POS),  # Detected, sent without a display
        (f.SCT, "52101004", POS),  # Present
        (f.LOINC, "LA11882-0", POS),  # Detected (LOINC answer)
        (f.SCT, "10828004", POS),
        (f.LOINC, "LA6577-6", NEG),
        (f.V3_INTERP, "IND", EQ),
    ],
)
def test_coded_answer_without_display(
    grader: ResultGrader, system: str, code: str, grade: Grade
) -> None:
    assert grader.grade({"valueCodeableConcept": f.concept(system, code)}).grade is grade


def test_unknown_answer_code_is_reported_and_its_display_read(grader: ResultGrader) -> None:
    bare = grader.grade({"valueCodeableConcept": f.concept("http://lab.example/ans", "ND")})
    assert bare.grade is None
    assert bare.problems == (r.CODED_UNKNOWN,)
    shown = f.concept("http://lab.example/ans", "ND", display="Not detected")
    assert grader.grade({"valueCodeableConcept": shown}).grade is NEG


@pytest.mark.parametrize(("value", "grade"), [(True, POS), (False, NEG)])
def test_value_boolean(grader: ResultGrader, value: bool, grade: Grade) -> None:
    assert grader.grade({"valueBoolean": value}).grade is grade


def test_data_absent_is_reported(grader: ResultGrader) -> None:
    reading = grader.grade({"dataAbsentReason": {"text": "not performed"}})
    assert reading == r.Reading(None, (r.NO_VALUE,))


# --- quantities and reference bands -----------------------------------------------------------

ARUP_TEXT = [text_range("<30 Negative"), text_range("30-40 Equivocal"), text_range(">40 Positive")]
ARUP_ONE_TEXT = [text_range("<30 Negative; 30-40 Equivocal; >40 Positive")]
ARUP_STRUCTURED = [
    {"high": {"value": 29.9, "unit": "AU/mL"}, "type": {"text": "Negative"}},
    {"low": {"value": 30}, "high": {"value": 40}, "text": "Equivocal"},
    {"low": {"value": 40.1}, "text": "Positive"},
]


@pytest.mark.parametrize("ranges", [ARUP_TEXT, ARUP_ONE_TEXT, ARUP_STRUCTURED])
@pytest.mark.parametrize(
    ("value", "grade"),
    [(4, NEG), (29.5, NEG), (30, EQ), (35, EQ), (40, EQ), (41, POS), (250, POS)],
)
def test_several_bands_each_meaning_honoured(
    grader: ResultGrader, ranges: list[Json], value: float, grade: Grade
) -> None:
    reading = grader.grade(quantity(value, *ranges, unit="AU/mL"))
    assert reading.grade is grade


@pytest.mark.parametrize(("value", "grade"), [(3, NEG), (6, EQ), (8, EQ), (10, EQ), (12, POS)])
def test_borderline_band_alone(grader: ResultGrader, value: float, grade: Grade) -> None:
    """National Jewish: 6-10 borderline; below is negative, above positive."""
    borderline = {"low": {"value": 6}, "high": {"value": 10}, "text": "Borderline"}
    assert grader.grade(quantity(value, borderline)).grade is grade


@pytest.mark.parametrize(
    ("text", "value", "grade"),
    [
        ("<11 SI", 5, NEG),
        ("<11 SI", 11, POS),
        ("<20", 19.9, NEG),
        ("<20", 20, POS),
        ("0-19", 19, NEG),
        ("0-19", 25, POS),
        ("<=19", 19, NEG),
        ("less than 20 U", 22, POS),
        ("Normal: <1.0", 0.4, NEG),
    ],
)
def test_range_given_only_as_text(
    grader: ResultGrader, text: str, value: float, grade: Grade
) -> None:
    assert grader.grade(quantity(value, text_range(text))).grade is grade


def test_structured_normal_range(grader: ResultGrader) -> None:
    normal = {"high": {"value": 20, "unit": "U"}}
    assert grader.grade(quantity(85, normal)).grade is POS
    assert grader.grade(quantity(4, normal)).grade is NEG
    typed = {"high": {"value": 20}, "type": f.concept("http://x.example/meaning", "normal")}
    assert grader.grade(quantity(4, typed)).grade is NEG


@pytest.mark.parametrize(
    ("comparator", "value", "grade"),
    [("<", 11, NEG), ("<=", 10, NEG), (">", 100, POS), (">=", 40, POS), ("<", 50, None)],
)
def test_value_given_as_a_bound(
    grader: ResultGrader, comparator: str, value: float, grade: Grade | None
) -> None:
    reading = grader.grade(quantity(value, text_range("<11 SI"), comparator=comparator))
    assert reading.grade is grade
    if grade is None:
        assert reading.problems == (r.BOUND_UNCLEAR,)


def test_ranges_that_disagree_give_unknown(grader: ResultGrader) -> None:
    reading = grader.grade(quantity(22, text_range("0-19"), text_range("0-24")))
    assert reading == r.Reading(None, (r.BANDS_UNCLEAR,))


def test_value_between_bands_gives_unknown(grader: ResultGrader) -> None:
    bands = [text_range("0-19 Negative"), text_range("20-39 Weak positive"), text_range(">=40")]
    assert grader.grade(quantity(19.5, *bands)).grade is None
    assert grader.grade(quantity(25, *bands)).grade is WEAK


@pytest.mark.parametrize(
    ("ranges", "problem"),
    [
        ((), r.NO_RANGE),
        (({"high": {"value": 20}, "type": {"text": "therapeutic"}},), r.NO_RANGE),
        (({"high": {"value": 20, "unit": "mg/L"}},), r.RANGE_UNIT),
        ((text_range("see report"),), r.NO_RANGE),
    ],
)
def test_quantity_without_usable_range(
    grader: ResultGrader, ranges: tuple[Json, ...], problem: str
) -> None:
    assert grader.grade(quantity(50, *ranges, unit="U/mL")) == r.Reading(None, (problem,))


def test_units_compared_loosely(grader: ResultGrader) -> None:
    ranged = {"high": {"value": 20, "unit": "u/ML"}}
    assert grader.grade(quantity(50, ranged, unit="U/mL")).grade is POS


# --- interpretation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "grade"),
    [("POS", POS), ("A", POS), ("H", POS), ("HH", POS), ("NEG", NEG), ("N", NEG), ("IND", EQ)],
)
def test_interpretation_codes(grader: ResultGrader, code: str, grade: Grade) -> None:
    assert grader.grade({"interpretation": [f.concept(f.V3_INTERP, code)]}).grade is grade


@pytest.mark.parametrize(
    ("text", "grade"),
    [("Positive", POS), ("Abnormal", POS), ("High", POS), ("Normal", NEG), ("Equivocal", EQ)],
)
def test_interpretation_text_only(grader: ResultGrader, text: str, grade: Grade) -> None:
    assert grader.grade({"interpretation": [{"text": text}]}).grade is grade


def test_unknown_interpretation_code_is_reported(grader: ResultGrader) -> None:
    reading = grader.grade({"interpretation": [f.concept(f.V3_INTERP, "L")]})
    assert reading.grade is None
    assert r.INTERPRETATION_UNKNOWN in reading.problems


def test_interpretation_reads_a_quantity_without_range(grader: ResultGrader) -> None:
    item = {**quantity(50), "interpretation": [f.concept(f.V3_INTERP, "H")]}
    assert grader.grade(item) == r.Reading(POS)


@pytest.mark.parametrize(
    "item",
    [
        {"valueString": "Negative", "interpretation": [f.concept(f.V3_INTERP, "POS")]},
        {"valueCodeableConcept": f.POSITIVE, "interpretation": [f.concept(f.V3_INTERP, "N")]},
        {**quantity(85, {"high": {"value": 20}}), "interpretation": [{"text": "Normal"}]},
        {"valueString": "Equivocal", "interpretation": [f.concept(f.V3_INTERP, "POS")]},
        {
            "interpretation": [
                f.concept(f.V3_INTERP, "POS"),
                f.concept(f.V3_INTERP, "NEG"),
            ]
        },
    ],
)
def test_value_and_interpretation_that_disagree_give_unknown(
    grader: ResultGrader, item: Json
) -> None:
    reading = grader.grade(item)
    assert reading.grade is None
    assert r.CONFLICT in reading.problems


def test_agreeing_value_and_interpretation(grader: ResultGrader) -> None:
    item = {"valueString": "Weak positive", "interpretation": [f.concept(f.V3_INTERP, "A")]}
    assert grader.grade(item) == r.Reading(WEAK)


def test_a_word_in_two_lists_is_a_configuration_error(engine: Engine) -> None:
    words = engine.knowledge.terminology.result_strings
    with pytest.raises(ValueError, match="listed under"):
        type(words).model_validate(
            {**words.model_dump(), "negative": (*words.negative, "equivocal")}
        )
