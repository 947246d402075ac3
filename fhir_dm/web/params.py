"""Request parameters every endpoint reads the same way: bounded dates, safe ids.

Dates are bounded to 1900-01-01..2200-12-31: far enough for any real record or evaluation
date, near enough that plan windows, quarters and FHIR searches built from them never leave
Python's date range or send a server a date it cannot read (which used to answer 500, or 502
blaming the FHIR server).
"""

from __future__ import annotations

import re
from datetime import date

from fhir_dm.common.errors import InputError
from fhir_dm.core.ids import check_fhir_id

EARLIEST_DATE = date(1900, 1, 1)
LATEST_DATE = date(2200, 12, 31)
DATE_BOUNDS = f"{EARLIEST_DATE.isoformat()}..{LATEST_DATE.isoformat()}"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

__all__ = ["DATE_BOUNDS", "EARLIEST_DATE", "LATEST_DATE", "check_fhir_id", "parse_date"]


def parse_date(text: object, where: str) -> date:
    """A full date (YYYY-MM-DD) within DATE_BOUNDS; InputError (400) naming `where` otherwise."""
    if not isinstance(text, str) or not _DATE.fullmatch(text):
        raise InputError(f"{where} must be a full date (YYYY-MM-DD)", expression=[where])
    try:
        value = date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{where} is not a valid date", expression=[where]) from None
    if not EARLIEST_DATE <= value <= LATEST_DATE:
        raise InputError(f"{where} must lie within {DATE_BOUNDS}", expression=[where])
    return value
