"""Grade one laboratory result: positive, weak positive, negative, equivocal, or unreadable.

Labs send the same answer in many shapes (codes.md §E): ordinal text ("2+", "3+ Strong
Positive", "Positive (45 U/mL)"), coded answers without a display, quantities with several
reference ranges whose bands mean negative / equivocal / positive, ranges given only as text
("<11 SI"), interpretation codes or text, booleans. This module reads them all into one `Grade`.
It is pure: every word list comes from config (`result_strings`), every code from the value sets
`answer-positive`, `answer-negative`, `answer-indeterminate`. Equivocal is a grade of its own,
which the facts read as unknown: never positive, never negative. When two parts of one result
disagree (the value says negative, the interpretation positive), the result is not graded: a
finding says so and nothing is guessed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fhir_dm.core.terminology import Matcher
from fhir_dm.knowledge.models import ResultStrings


class Grade(IntEnum):
    """What a result says, ordered from negative to positive (reference bands are monotone)."""

    NEGATIVE = 0
    EQUIVOCAL = 1
    WEAK_POSITIVE = 2
    POSITIVE = 3

    @property
    def direction(self) -> int:
        """-1 negative, 0 equivocal, +1 positive (weak or not): what "disagree" compares."""
        return -1 if self is Grade.NEGATIVE else 0 if self is Grade.EQUIVOCAL else 1


@dataclass(frozen=True, slots=True)
class Reading:
    """A grade, or None when the result cannot be graded; `problems` are finding messages."""

    grade: Grade | None
    problems: tuple[str, ...] = ()


# Finding messages: stable texts (findings are grouped by message), never patient data.
UNREADABLE = "antibody result could not be read"
NO_VALUE = "antibody result has no value (data absent); not used"
CODED_UNKNOWN = "coded antibody result not in the answer lists; not used"
NO_RANGE = "numeric antibody result without a reference range; not used"
RANGE_UNIT = "reference range in another unit than the result; not used"
BANDS_UNCLEAR = "numeric antibody result not inside one reference band; counted as unknown"
BOUND_UNCLEAR = "numeric antibody result given as a bound ('<', '>') that spans bands; unknown"
TEXT_CONFLICT = "antibody result text names contradicting grades; counted as unknown"
CONFLICT = "antibody result value and interpretation disagree; counted as unknown"
INTERPRETATION_UNKNOWN = "result interpretation code not recognised; ignored"

# The project's answer value sets (config/terminology/observations.yaml).
ANSWER_SETS = {
    "answer-positive": Grade.POSITIVE,
    "answer-negative": Grade.NEGATIVE,
    "answer-indeterminate": Grade.EQUIVOCAL,
}

_NUMBER = r"\d+(?:\.\d+)?"
_BOUND_WORDS = (
    ("less than or equal to", "<="),
    ("greater than or equal to", ">="),
    ("less than", "<"),
    ("greater than", ">"),
    ("more than", ">"),
    ("up to", "<="),
    ("≤", "<="),
    ("≥", ">="),
    ("=<", "<="),
    ("=>", ">="),
)
_SPAN = re.compile(rf"({_NUMBER})\s*(?:-|–|—|to)\s*({_NUMBER})")
_ONE_SIDED = re.compile(rf"(<=|>=|<|>)\s*({_NUMBER})")
_NUMBER_TOKEN = re.compile(r"[<>=]*\d+(?:[.,/]\d+)*%?")
_UNIT_TOKEN = re.compile(r"[\w/%\[\]'.^*-]{1,16}")

Point = tuple[float, int]  # (value, side): side -1 just below, 0 at, +1 just above the value


def normalise_text(text: str) -> str:
    """Case, width and spacing folded; "2 +" written "2+"; thousands separators dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", text)
    text = re.sub(r"(\d)\s+\+", r"\1+", text)
    return " ".join(text.split())


def normalise_unit(unit: str | None) -> str:
    """A unit compared loosely: "U/l" = "U/L", "µkat/L" = "ukat/L", spaces ignored."""
    text = unicodedata.normalize("NFKC", unit or "").replace("μ", "u")
    return "".join(text.split()).casefold()


class _Phrases:
    """Grade words of one kind of text, found longest first as whole words."""

    def __init__(self, by_grade: Mapping[Grade, Iterable[str]]) -> None:
        self._grades: dict[str, Grade] = {}
        self._whole: dict[str, Grade] = {}
        for grade, words in by_grade.items():
            for word in words:
                key = normalise_text(word)
                if any(ch.isalnum() for ch in key):
                    self._grades[key] = grade
                else:
                    self._whole[key] = grade  # "+", "-", "+/-": only as the whole text
        ordered = sorted(self._grades, key=len, reverse=True)
        alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in ordered)
        self._pattern = re.compile(rf"(?<![\w+])(?:{alternatives or '(?!x)x'})(?![\w+])")

    def find(self, text: str) -> tuple[set[Grade], str]:
        """The grades named in a text, and what is left of the text without them."""
        norm = normalise_text(text)
        whole = self._whole.get(norm.strip(" ."))
        if whole is not None:
            return {whole}, ""
        grades = {self._grades[" ".join(m.group().split())] for m in self._pattern.finditer(norm)}
        return grades, self._pattern.sub(" ", norm)

    def read(self, text: str) -> set[Grade] | None:
        """The grades of a result text, or None if it says more than grades, numbers, units."""
        grades, rest = self.find(text)
        if not grades or not _only_numbers_and_units(rest):
            return None
        return grades


def _only_numbers_and_units(rest: str) -> bool:
    """True when a text holds nothing but numbers (with their units) and bracketed notes.

    "Positive (45 U/mL)" and "Negative <20" are read; "No antibodies detected" is not: a
    word the lists do not know may change the meaning.
    """
    rest = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", " ", rest)
    after_number = False
    for token in re.split(r"[\s,;:!]+", rest):
        bare = token.strip(".-/=*")
        if not bare:
            continue
        if _NUMBER_TOKEN.fullmatch(bare):
            after_number = True
        elif after_number and _UNIT_TOKEN.fullmatch(bare):
            after_number = False
        else:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Band:
    """One reference band: bounds as points (inclusive or not) and what a value inside means."""

    low: Point | None
    high: Point | None
    meaning: Grade
    labelled: bool = True  # False: a plain range, read as the normal (negative) band

    def below(self, point: Point) -> bool:
        return self.low is not None and point < self.low

    def above(self, point: Point) -> bool:
        return self.high is not None and point > self.high


def classify(bands: Sequence[Band], point: Point) -> Grade | None:
    """The one grade consistent with where a value lies against every band, else None.

    Meanings rise with the value (negative < equivocal < weak < positive), so a value above a
    band grades higher than that band and a value below grades lower; a value above the only
    (normal) range is positive. Two bands that disagree, or a gap between bands, give None.
    """
    candidates = {b.meaning for b in bands} | {Grade.NEGATIVE, Grade.POSITIVE}
    for band in bands:
        m = band.meaning
        if band.below(point):
            candidates = {g for g in candidates if g < m or g == m == Grade.NEGATIVE}
        elif band.above(point):
            candidates = {g for g in candidates if g > m or g == m == Grade.POSITIVE}
        else:
            candidates &= {m}
    return next(iter(candidates)) if len(candidates) == 1 else None


def parse_bounds(text: str) -> tuple[Point | None, Point | None] | None:
    """Bounds of a range written as text: "<11 SI", "<= 19", "0-19", ">40"; None if none."""
    norm = normalise_text(text)
    for words, symbol in _BOUND_WORDS:
        norm = norm.replace(words, symbol)
    span, one = _SPAN.search(norm), _ONE_SIDED.search(norm)
    if span and (one is None or span.start() < one.start()):
        return (float(span.group(1)), 0), (float(span.group(2)), 0)
    if one is None:
        return None
    op, value = one.group(1), float(one.group(2))
    if op.startswith("<"):
        return None, (value, 0 if op == "<=" else -1)
    return (value, 0 if op == ">=" else 1), None


class ResultGrader:
    """Reads every result shape into a Grade; built once per Knowledge (the lists compiled)."""

    def __init__(self, words: ResultStrings, matcher: Matcher) -> None:
        base: dict[Grade, tuple[str, ...]] = {
            Grade.POSITIVE: words.positive,
            Grade.WEAK_POSITIVE: words.weak_positive,
            Grade.NEGATIVE: words.negative,
            Grade.EQUIVOCAL: words.indeterminate,
        }
        self._matcher = matcher
        self._value = _Phrases(base)
        self._interpretation = _Phrases(
            {
                **base,
                Grade.POSITIVE: words.positive + words.abnormal,
                Grade.NEGATIVE: words.negative + words.normal,
            }
        )
        self._range = _Phrases({**base, Grade.NEGATIVE: words.negative + words.normal})

    # --- one result ---

    def grade(self, item: Mapping[str, Any]) -> Reading:
        """Grade an Observation or component from its value and its interpretation."""
        value_problems: list[str] = []
        value = self._value_grade(item, value_problems)
        interpretation, problems = self._interpretation_grade(item)
        if CONFLICT in problems:
            return Reading(None, tuple(problems))
        if value is not None and interpretation is not None:
            if value.direction != interpretation.direction:
                return Reading(None, (CONFLICT, *problems))
            return Reading(min(value, interpretation), tuple(problems))
        if value is not None or interpretation is not None:
            return Reading(value if value is not None else interpretation, tuple(problems))
        return Reading(None, tuple(dict.fromkeys((value_problems or [UNREADABLE]) + problems)))

    def _value_grade(self, item: Mapping[str, Any], problems: list[str]) -> Grade | None:
        if isinstance(item.get("valueBoolean"), bool):
            return Grade.POSITIVE if item["valueBoolean"] else Grade.NEGATIVE
        if "valueCodeableConcept" in item:
            return self._coded_grade(item["valueCodeableConcept"], problems)
        if "valueString" in item:
            return self._texts_grade([item["valueString"]], self._value, problems)
        if "valueQuantity" in item or "valueInteger" in item:
            quantity = item.get("valueQuantity") or {"value": item.get("valueInteger")}
            return self._quantity_grade(quantity, item.get("referenceRange") or [], problems)
        if any(key.startswith("value") for key in item):
            problems.append(UNREADABLE)
        elif "dataAbsentReason" in item:
            problems.append(NO_VALUE)
        return None

    def _coded_grade(self, concept: Mapping[str, Any], problems: list[str]) -> Grade | None:
        answers = self._answers(concept)
        if len({g.direction for g in answers}) > 1:
            problems.append(TEXT_CONFLICT)
            return None
        if answers:
            return min(answers)
        texts = _concept_texts(concept, codes=False)
        if not texts:
            problems.append(CODED_UNKNOWN if concept.get("coding") else UNREADABLE)
            return None
        return self._texts_grade(texts, self._value, problems)

    def _answers(self, concept: Mapping[str, Any]) -> set[Grade]:
        value_sets = self._matcher.concept(concept).value_sets
        return {grade for vs, grade in ANSWER_SETS.items() if vs in value_sets}

    def _texts_grade(
        self, texts: Sequence[str], phrases: _Phrases, problems: list[str]
    ) -> Grade | None:
        """Every readable text must agree; "Positive (weak)" is weak positive."""
        grades: set[Grade] = set()
        for text in texts:
            grades |= phrases.read(text) or set()
        if not grades:
            problems.append(UNREADABLE)
            return None
        if len({g.direction for g in grades}) > 1:
            problems.append(TEXT_CONFLICT)
            return None
        return min(grades)

    def _interpretation_grade(self, item: Mapping[str, Any]) -> tuple[Grade | None, list[str]]:
        grades: set[Grade] = set()
        problems: list[str] = []
        for concept in item.get("interpretation") or []:
            found = self._answers(concept)
            if not found:
                for text in _concept_texts(concept, codes=False):
                    found |= self._interpretation.read(text) or set()
            if not found:
                problems.append(INTERPRETATION_UNKNOWN)
            grades |= found
        if len({g.direction for g in grades}) > 1:
            return None, [*problems, CONFLICT]
        return (min(grades) if grades else None), problems

    # --- quantities ---

    def _quantity_grade(
        self,
        quantity: Mapping[str, Any],
        ranges: Sequence[Mapping[str, Any]],
        problems: list[str],
    ) -> Grade | None:
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(UNREADABLE)
            return None
        unit = normalise_unit(quantity.get("code") or quantity.get("unit"))
        bands: list[Band] = []
        for rng in ranges:
            if not self._same_unit(rng, unit):
                problems.append(RANGE_UNIT)
                return None
            bands.extend(self.bands(rng))
        if any(b.labelled for b in bands):
            # Beside labelled bands a plain range's meaning is not known: it is not used.
            bands = [b for b in bands if b.labelled]
        if not bands:
            problems.append(NO_RANGE)
            return None
        comparator = quantity.get("comparator")
        side = {"<": -1, ">": 1}.get(comparator or "", 0)
        grade = classify(bands, (float(value), side))
        if comparator in ("<", "<="):
            grade = grade if grade is Grade.NEGATIVE else None
        elif comparator in (">", ">="):
            grade = grade if grade in (Grade.WEAK_POSITIVE, Grade.POSITIVE) else None
        elif comparator is not None:
            problems.append(UNREADABLE)
            return None
        if grade is None:
            problems.append(BOUND_UNCLEAR if comparator else BANDS_UNCLEAR)
        return grade

    @staticmethod
    def _same_unit(rng: Mapping[str, Any], unit: str) -> bool:
        for end in ("low", "high"):
            bound = rng.get(end) or {}
            other = normalise_unit(bound.get("code") or bound.get("unit"))
            if unit and other and other != unit:
                return False
        return True

    def bands(self, rng: Mapping[str, Any]) -> list[Band]:
        """The bands of one referenceRange: structured low/high, else its text (one band per
        ";"-separated part: "<30 Negative; 30-40 Equivocal; >40 Positive")."""
        low = (rng.get("low") or {}).get("value")
        high = (rng.get("high") or {}).get("value")
        type_texts = _concept_texts(rng.get("type"))
        text = rng.get("text") or ""
        if isinstance(low, int | float) or isinstance(high, int | float):
            meaning = self._meaning([text, *type_texts], typed=bool(type_texts))
            if meaning is None:
                return []
            return [
                Band(
                    (float(low), 0) if isinstance(low, int | float) else None,
                    (float(high), 0) if isinstance(high, int | float) else None,
                    *meaning,
                )
            ]
        out = []
        for part in re.split(r"[;\n]+", text):
            bounds = parse_bounds(part)
            meaning = self._meaning([part, *type_texts], typed=bool(type_texts))
            if bounds is not None and meaning is not None:
                out.append(Band(bounds[0], bounds[1], *meaning))
        return out

    def _meaning(self, texts: Sequence[str], *, typed: bool) -> tuple[Grade, bool] | None:
        """What a band means from its text and type, and whether it said so; a plain range is
        the normal (negative) one (FHIR: a range without a type is the normal range).

        A range typed with something that is not a grade ("treatment", "therapeutic") or
        naming two grades is not used.
        """
        grades: set[Grade] = set()
        for text in texts:
            grades |= self._range.find(text)[0]
        if len(grades) > 1:
            return None
        if grades:
            return next(iter(grades)), True
        return None if typed else (Grade.NEGATIVE, False)


def _concept_texts(concept: Mapping[str, Any] | None, *, codes: bool = True) -> list[str]:
    """A concept's text and displays (and its bare codes, for a range type such as "normal")."""
    concept = concept or {}
    texts = [concept.get("text") or ""]
    for coding in concept.get("coding") or []:
        texts += [coding.get("display") or "", coding.get("code") or "" if codes else ""]
    return [t for t in texts if t]
