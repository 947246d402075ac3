"""The FHIR id grammar, checked the same way at every edge (paths, bundles, notifications).

FHIR R4 allows `[A-Za-z0-9\\-\\.]{1,64}` as a logical id, which admits `.` and `..`. As a URL
path segment those climb out of the resource type (`Patient/..` is the server's base), so no
id of fhir-dm's may be one of them.
"""

from __future__ import annotations

import re

from fhir_dm.common.errors import InputError

# The grammar itself, for patterns that embed an id (references, locations).
FHIR_ID_PATTERN = r"(?!\.{1,2}(?![A-Za-z0-9\-.]))[A-Za-z0-9\-.]{1,64}"
# Ids the grammar allows but that are URL dot segments.
DOT_SEGMENT_IDS = frozenset({".", ".."})
NOT_A_SAFE_ID = "must be a FHIR id (1-64 letters, digits, '-' or '.'), not '.' or '..'"

_FHIR_ID = re.compile(FHIR_ID_PATTERN)


def is_fhir_id(value: object) -> bool:
    """Whether `value` is a FHIR logical id that is also safe as a URL path segment."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None


def check_fhir_id(value: object, where: str = "id") -> str:
    """`value` if it is a safe FHIR id; InputError (400) naming `where` otherwise."""
    if not is_fhir_id(value):
        raise InputError(f"{where} {NOT_A_SAFE_ID}", expression=[where])
    assert isinstance(value, str)
    return value
