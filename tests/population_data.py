"""Synthetic populations for the population view's tests and bench, built from tests/factories.

Every patient carries a managing organisation and a general practitioner (references by id,
not resolved), so the measures' stratifiers have something to group by.
"""

from __future__ import annotations

from typing import Any

from tests import factories as f

Json = dict[str, Any]
SCT = f.SCT
# A recorded non-IIM problem for the patients without myositis (in codes.md, factories use it).
DYSPHAGIA = ("40739000", "Dysphagia (disorder)")


def _patient(tag: str, n: int, *, org: str, gp: str, gender: str = "female") -> Json:
    return f.patient(
        f"{tag}-{n}",
        gender=gender,
        birth_date="1970-01-15",
        managingOrganization={"reference": f"Organization/{org}"},
        generalPractitioner=[{"reference": f"Practitioner/{gp}"}],
    )


def population(tag: str, size: int, iim: int, *, onset: str = "2024-03-01") -> list[Json]:
    """`size` patients, the first `iim` with dermatomyositis (onset `onset`), the rest not.

    Patients alternate between two organisations and two practitioners (created first).
    """
    resources: list[Json] = []
    for n in range(2):
        resources.append(
            {"resourceType": "Organization", "id": f"{tag}-org-{n}", "name": f"Clinic {n}"}
        )
        resources.append(
            {"resourceType": "Practitioner", "id": f"{tag}-gp-{n}", "name": [{"family": f"GP{n}"}]}
        )
    for n in range(size):
        org, gp = f"{tag}-org-{n % 2}", f"{tag}-gp-{n % 2}"
        p = _patient(tag, n, org=org, gp=gp)
        resources.append(p)
        if n < iim:
            resources.append(f.iim_condition(p, onset=onset, recorded=onset, id=f"{tag}-c-{n}"))
        else:
            resources.append(
                f.condition(p, f.concept(SCT, *DYSPHAGIA), onset=onset, id=f"{tag}-c-{n}")
            )
    return resources


def transactions(resources: list[Json], per_bundle: int = 200) -> list[Json]:
    """PUT transactions of at most `per_bundle` resources, in order (patients before theirs)."""
    return [
        f.bundle(*resources[i : i + per_bundle], type="transaction")
        for i in range(0, len(resources), per_bundle)
    ]
