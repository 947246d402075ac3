"""The error tree: every class maps to an HTTP status and a FHIR issue type."""

from __future__ import annotations

from fhir_dm.common import errors

FHIR_ISSUE_TYPES = {
    "invalid",
    "structure",
    "required",
    "too-long",
    "not-supported",
    "not-found",
    "conflict",
    "login",
    "forbidden",
    "exception",
    "timeout",
    "processing",
    "incomplete",
    "too-costly",
    "transient",
    "throttled",
    "lock-error",
}


def _all(cls: type[errors.FhirDmError]) -> list[type[errors.FhirDmError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all(sub))
    return out


def test_every_error_has_a_status_and_a_fhir_issue_type() -> None:
    classes = _all(errors.FhirDmError)
    assert len(classes) >= 14
    for cls in classes:
        assert 400 <= cls.status <= 599, cls
        assert cls.issue_code in FHIR_ISSUE_TYPES, cls
        assert cls.__doc__, cls


def test_expression_is_kept() -> None:
    err = errors.NotFhirError("bad", expression=["Bundle.entry[0]"])
    assert err.expression == ("Bundle.entry[0]",) and err.message == "bad"
