"""FHIR dates as intervals (a partial date like `1950-03` is a whole month) and month arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from dateutil.relativedelta import relativedelta

# Clinical dates outside these years are data errors; refusing them keeps date arithmetic
# (windows, rounds) far from the calendar's limits.
PLAUSIBLE_YEARS = (1800, 2200)


@dataclass(frozen=True, slots=True, order=True)
class DateSpan:
    """The earliest and latest day a (possibly partial) FHIR date can mean."""

    earliest: date
    latest: date

    @property
    def exact(self) -> bool:
        """True when the date is known to the day."""
        return self.earliest == self.latest

    def __str__(self) -> str:
        return self.earliest.isoformat() if self.exact else f"{self.earliest}..{self.latest}"


def parse_fhir_date(value: object) -> DateSpan | None:
    """Parse a FHIR date or dateTime (`YYYY`, `YYYY-MM`, `YYYY-MM-DD[T...]`); None if unusable."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value.strip()[:10]
    try:
        year = int(text[:4])
        if not PLAUSIBLE_YEARS[0] <= year <= PLAUSIBLE_YEARS[1]:
            return None
        if len(text) == 4:
            return DateSpan(date(year, 1, 1), date(year, 12, 31))
        month = int(text[5:7])
        if len(text) == 7:
            first = date(year, month, 1)
            return DateSpan(first, first + relativedelta(day=31))  # day=31: the month's last
        day = date(year, month, int(text[8:10]))
    except ValueError:
        return None
    return DateSpan(day, day)


def add_months(day: date, months: int) -> date:
    """The same day `months` later, clipped to the month's end (Jan 31 + 1 month = Feb 28/29)."""
    result: date = day + relativedelta(months=months)
    return result


def years_between(start: date, end: date) -> float:
    """Whole and fractional years from start to end, calendar-aware for birthdays."""
    years = end.year - start.year - ((end.month, end.day) < (start.month, start.day))
    anniversary = add_months(start, 12 * years)
    next_anniversary = add_months(start, 12 * (years + 1))
    fraction = (end - anniversary).days / max((next_anniversary - anniversary).days, 1)
    return years + fraction


def age_span(birth: DateSpan, at: DateSpan) -> tuple[float, float]:
    """The youngest and oldest age a person can have had at a date, given partial dates."""
    return years_between(birth.latest, at.earliest), years_between(birth.earliest, at.latest)
