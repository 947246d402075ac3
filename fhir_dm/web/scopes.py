"""SMART scopes (App Launch v1 and v2 syntax): what an access token lets its holder read or write.

v1: `patient/Observation.read`, `user/*.write`, `system/*.*`; v2: `patient/*.rs`,
`user/CarePlan.cu`, `system/Patient.cruds`. Both parse into one `Scope` with a set of the v2
permission letters (c create, r read, u update, d delete, s search), so every check is written
once. Scopes that are not about resources (`openid`, `launch/patient`, `fhirUser`, ...) are
ignored, and so are v2 granular scopes (`patient/Observation.rs?category=laboratory`): they
grant a subset the service cannot check, so they count as granting nothing.

Usage::

    scopes = parse_scopes("launch openid patient/*.rs patient/CarePlan.cu")
    missing_permissions(scopes, [Need("CarePlan", "cu")], levels={"patient"})  # -> []
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Level = Literal["patient", "user", "system"]
LEVELS: tuple[Level, ...] = ("patient", "user", "system")
# The v2 permission letters, in the order the v2 syntax requires them.
PERMISSIONS = "cruds"
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": PERMISSIONS}
_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([A-Za-z*]+)")
_V2_LETTERS = re.compile(r"c?r?u?d?s?")


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope: who it is for (`level`), which type (`*`: any), which permissions."""

    level: Level
    resource_type: str
    permissions: frozenset[str]

    def covers(self, resource_type: str, permission: str) -> bool:
        return self.resource_type in ("*", resource_type) and permission in self.permissions


@dataclass(frozen=True, slots=True)
class Need:
    """What an action needs on one resource type, as v2 letters (`"cu"`: create and update)."""

    resource_type: str
    permissions: str

    def label(self, level: str) -> str:
        return f"{level}/{self.resource_type}.{self.permissions}"


def parse_scope(text: str) -> Scope | None:
    """One scope, or None when it is not a (checkable) resource scope."""
    match = _SCOPE.fullmatch(text)
    if match is None:
        return None
    level, resource_type, permissions = match.groups()
    if permissions in _V1_PERMISSIONS:
        letters = _V1_PERMISSIONS[permissions]
    elif permissions and _V2_LETTERS.fullmatch(permissions):
        letters = permissions
    else:
        return None
    return Scope(level, resource_type, frozenset(letters))  # type: ignore[arg-type]


def parse_scopes(text: str | Iterable[str]) -> tuple[Scope, ...]:
    """The resource scopes of a space-separated scope string (or of a list of scopes)."""
    items = text.split() if isinstance(text, str) else [s for s in text if isinstance(s, str)]
    return tuple(scope for item in items if (scope := parse_scope(item)) is not None)


def missing_permissions(
    scopes: Sequence[Scope], needs: Iterable[Need], *, levels: Collection[Level]
) -> list[Need]:
    """The needs (reduced to the letters not granted) that no scope of `levels` covers."""
    missing: list[Need] = []
    for need in needs:
        lacking = "".join(
            p
            for p in need.permissions
            if not any(s.level in levels and s.covers(need.resource_type, p) for s in scopes)
        )
        if lacking:
            missing.append(Need(need.resource_type, lacking))
    return missing


def has_level(scopes: Sequence[Scope], level: Level) -> bool:
    return any(scope.level == level for scope in scopes)
