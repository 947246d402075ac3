"""Synthetic populations for the population view's tests and bench, built from tests/factories.

Every patient carries a managing organisation and a general practitioner (references by id,
not resolved), so the measures' stratifiers have something to group by.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Case:
    """One IIM patient of the measures' test population: its facts and what was done when.

    `done` holds (what, date): a test id, or "@basic" (every basic-panel test) or "@workup"
    (every basic- and enhanced-panel test for the patient's sex, and the antibody panel);
    `except_tests` leaves tests out of those expansions. `tier` is what the rules give these
    facts (the test checks it).
    """

    key: str
    diagnosis: str
    tier: str
    birth: str = "1970-01-15"
    gender: str | None = "female"
    done: tuple[tuple[str, str], ...] = ()
    except_tests: tuple[str, ...] = ()
    mda5: bool = False


# Evaluation date 2026-12-02. Every patient has dermatomyositis, antibodies untested unless said.
MEASURE_CASES = (
    # High risk, every firm item done on time: the work-up and the 12- and 24-month rounds.
    Case(
        "all-done",
        "2024-03-01",
        "high",
        done=(("@workup", "2024-04-01"), ("@basic", "2025-03-15"), ("@basic", "2026-03-15")),
    ),
    Case("late", "2024-03-01", "high", done=(("@workup", "2024-08-01"),)),  # work-up late
    Case("nothing", "2024-03-01", "high"),
    Case("new", "2026-09-15", "high"),  # work-up due by 2026-12-15
    Case("lapsed", "2020-03-01", "high"),  # nothing recorded; the window ended in 2023
    # Window ended 2026-03-01; the 36-month round done 2026-03-20: the plan is complete.
    Case(
        "closed",
        "2023-03-01",
        "high",
        done=(
            ("@workup", "2023-04-01"),
            ("@basic", "2024-03-15"),
            ("@basic", "2025-03-15"),
            ("@basic", "2026-03-20"),
        ),
    ),
    # Sex not recorded: sex-specific tests are "consider" items; the 12-month round done late.
    Case(
        "no-sex",
        "2025-06-01",
        "high",
        gender=None,
        done=(("@workup", "2025-06-10"), ("@basic", "2026-10-01")),
    ),
    # Moderate (young, antibodies untested): the enhanced panel done, the CBC never.
    Case(
        "moderate",
        "2025-10-01",
        "moderate",
        birth="1994-01-15",
        done=(("@workup", "2025-11-01"),),
        except_tests=("cbc", "myositis-antibodies"),
    ),
    # Anti-MDA5: lung surveillance; HRCT done, the baseline PFT not, the 6-month PFT on time.
    Case(
        "lung",
        "2026-01-10",
        "high",
        mda5=True,
        done=(("@workup", "2026-02-01"), ("hrct-chest", "2026-01-20"), ("pft-dlco", "2026-08-01")),
    ),
)


def done_tests(knowledge: Any, case: Case, what: str) -> list[str]:
    """The test ids one `done` entry stands for."""
    rs = knowledge.ruleset
    if what == "@basic":
        tests = list(rs.panels["basic"].tests)
    elif what == "@workup":
        tests = [t for p in ("basic", "enhanced") for t in rs.panels[p].tests]
        tests.append(rs.antibody_testing.test)
    else:
        return [what]
    return [
        t
        for t in dict.fromkeys(tests)
        if t not in case.except_tests and rs.tests[t].sex in (None, case.gender)
    ]


def measure_population(tag: str, knowledge: Any) -> tuple[list[Json], dict[str, str]]:
    """The cases' resources (after two organisations and practitioners) and {key: patient id};
    two patients without an IIM come last."""
    resources: list[Json] = []
    for n in range(2):
        resources.append(
            {"resourceType": "Organization", "id": f"{tag}-org-{n}", "name": f"Clinic {n}"}
        )
        resources.append(
            {"resourceType": "Practitioner", "id": f"{tag}-gp-{n}", "name": [{"family": f"GP{n}"}]}
        )
    ids: dict[str, str] = {}
    for n, case in enumerate(MEASURE_CASES):
        p = f.patient(
            f"{tag}-{n:02d}",
            gender=case.gender,
            birth_date=case.birth,
            managingOrganization={"reference": f"Organization/{tag}-org-{n % 2}"},
            generalPractitioner=[{"reference": f"Practitioner/{tag}-gp-{n % 2}"}],
        )
        ids[case.key] = p["id"]
        resources.append(p)
        resources.append(
            f.iim_condition(p, onset=case.diagnosis, recorded=case.diagnosis, id=f"{tag}-c-{n}")
        )
        if case.mda5:
            resources.append(f.antibody(p, "mda5", effective=case.diagnosis, id=f"{tag}-ab-{n}"))
        for what, when in case.done:
            resources += [
                f.done_request(p, knowledge, t, when) for t in done_tests(knowledge, case, what)
            ]
    for n in range(2):
        p = _patient(tag, 90 + n, org=f"{tag}-org-{n}", gp=f"{tag}-gp-{n}")
        resources.append(p)
        resources.append(
            f.condition(p, f.concept(SCT, *DYSPHAGIA), onset="2024-03-01", id=f"{tag}-x-{n}")
        )
    return resources, ids
