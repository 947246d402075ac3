"""config/ loading: the real knowledge base loads; each kind of mistake gives a clear message."""

from __future__ import annotations

import re
import shutil
from datetime import date
from pathlib import Path

import pytest
import yaml

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR, load_knowledge
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f

PACKAGE = Path(__file__).resolve().parents[2] / "fhir_dm"


def test_real_config_loads_with_name_and_version() -> None:
    k = load_knowledge()
    assert k.ruleset.label == f"{k.ruleset.name} {k.ruleset.version}"
    assert {f.factor_class for f in k.ruleset.factors} == {"high", "intermediate", "low"}


def test_every_rule_has_evidence_and_source() -> None:
    rs = load_knowledge().ruleset
    sourced = [
        *rs.factors,
        *rs.addons,
        *rs.panels.values(),
        *rs.schedules.values(),
        rs.red_flags,
        rs.flare,
        rs.lung_surveillance,
        rs.antibody_testing,
        rs.tiers,
    ]
    for item in sourced:
        assert item.evidence in rs.evidence_levels
        assert item.source.strip()


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, target)
    return target


def _edit(path: Path, change: object) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["factors"][1].pop("evidence"),
            "ruleset/imacs-2023.yaml: factors.1.evidence: Field required",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["factors"][0].update(evidence="strong"),
            "factors.0.evidence",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["panels"]["basic"]["tests"].append("x-ray-of-moon"),
            "unknown test 'x-ray-of-moon'",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["factors"][1]["when"].update(antibody_positive=["tif2"]),
            "unknown antibody_positive reference 'tif2'",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["factors"][1]["when"].update(feature=["x"]),
            "exactly one key",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d.update(surprise=1),
            "surprise: Extra inputs are not permitted",
        ),
        (
            "terminology/conditions.yaml",
            lambda d: d["value_sets"]["dysphagia"]["include"][0].update(source="NOWHERE"),
            "unknown source key 'NOWHERE'",
        ),
        (
            "terminology/conditions.yaml",
            lambda d: d["value_sets"]["dysphagia"]["include"][0].update(prefix="R13"),
            "exactly one of 'code' or 'prefix'",
        ),
        (
            "terminology/local-codes.yaml",
            lambda d: d["mappings"][0].update(value_set="nope"),
            "unknown value set 'nope'",
        ),
        (
            "site.yaml",
            lambda d: d["orders"].update(service_request_intent="demand"),
            "site.yaml: orders.service_request_intent",
        ),
        (
            "ruleset/imacs-2023.yaml",
            lambda d: d["tests"]["cbc"]["code"].update(code="58410  2"),
            "tests.cbc.code",
        ),
    ],
)
def test_bad_config_messages(config_copy: Path, file: str, change: object, message: str) -> None:
    _edit(config_copy / file, change)
    with pytest.raises(KnowledgeError) as err:
        load_knowledge(config_copy)
    assert message in err.value.message


def test_invalid_yaml(config_copy: Path) -> None:
    (config_copy / "site.yaml").write_text("site: [unclosed\n")
    with pytest.raises(KnowledgeError, match=r"site\.yaml: not valid YAML"):
        load_knowledge(config_copy)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="not found"):
        load_knowledge(tmp_path / "nope")


# Shapes of clinical codes: LOINC (12345-6), SNOMED CT (6-18 digits), ICD-10 (A12.3).
CODE_LITERAL = re.compile(r"""["'](\d{3,7}-\d|\d{6,18}|[A-Z]\d\d\.\d{1,4})["']""")


def test_no_clinical_code_is_a_literal_in_python() -> None:
    """Rules, codes and intervals live in config/; the package only interprets them."""
    offenders = [
        f"{path.relative_to(PACKAGE)}: {m.group(0)}"
        for path in PACKAGE.rglob("*.py")
        for m in CODE_LITERAL.finditer(path.read_text())
    ]
    assert offenders == []


# --- lists derived from the factors, names that must not overlap (clinical-logic §2, §4) -------


def test_preliminary_facts_are_derived_from_the_factors() -> None:
    rs = load_knowledge().ruleset
    assert rs.tiers.preliminary_if_unknown == (
        "antibody:tif1g",
        "antibody:nxp2",
        "antibody:sae1",
        "antibody:hmgcr",
        "antibody:mi2",
        "antibody:mda5",
        "onset_age",
        "sex",
        "subtype",
    )
    assert rs.factor_antibodies("high") == ("tif1g", "nxp2")


def test_a_new_high_class_antibody_joins_the_preliminary_list(config_copy: Path) -> None:
    """Reclassing a factor moves its antibody into the derived list: nothing to keep in step."""

    def reclass(d: dict) -> None:  # type: ignore[type-arg]
        ku = next(f for f in d["factors"] if f["id"] == "ab-myositis-associated")
        ku.update({"class": "high"})
        d["antibody_testing"]["when_untested"] += ["ku", "pmscl", "ro52"]

    _edit(config_copy / "ruleset/imacs-2023.yaml", reclass)
    facts = load_knowledge(config_copy).ruleset.tiers.preliminary_if_unknown
    assert {"antibody:ku", "antibody:pmscl", "antibody:ro52"} <= set(facts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            # An antibody whose result cannot change the tier.
            lambda d: d["antibody_testing"]["when_untested"].append("jo1"),
            "'jo1' is in no high or intermediate factor",
        ),
        (
            # A hand-written preliminary list that forgets one.
            lambda d: d["tiers"].update(
                preliminary_if_unknown=["antibody:tif1g", "onset_age", "sex", "subtype"]
            ),
            "tiers.preliminary_if_unknown: out of step with the factors",
        ),
    ],
)
def test_lists_out_of_step_with_the_factors_are_refused(
    config_copy: Path, change: object, message: str
) -> None:
    _edit(config_copy / "ruleset/imacs-2023.yaml", change)
    with pytest.raises(KnowledgeError) as err:
        load_knowledge(config_copy)
    assert message in err.value.message


def test_a_synonym_inside_another_antibodys_name_is_refused(config_copy: Path) -> None:
    """ "SAE" would read "SAE2 Ab Positive" as anti-SAE1 positive."""
    _edit(
        config_copy / "terminology/observations.yaml",
        lambda d: d["value_sets"]["ab-sae1"]["synonyms"].append("SAE"),
    )
    with pytest.raises(KnowledgeError) as err:
        load_knowledge(config_copy)
    assert "value_sets.ab-sae1.synonyms: 'SAE' also matches 'SAE2' of ab-sae2" in err.value.message


def test_a_new_high_risk_antibody_is_listed_for_preliminary_and_antibody_testing(
    config_copy: Path,
) -> None:
    """The recipe of docs/development.md, followed: anti-SAE2 as a high-risk antibody takes an
    antibody entry and a factor (its value set exists); both derived lists then include it."""

    def add_sae2(d: dict) -> None:  # type: ignore[type-arg]
        d["antibodies"].append({"id": "sae2", "label": "anti-SAE2", "value_set": "ab-sae2"})
        d["factors"].insert(
            3,
            {
                "id": "ab-sae2",
                "class": "high",
                "label": "anti-SAE2 positive",
                "when": {"antibody_positive": ["sae2"]},
                "evidence": "design",
                "source": "a test of the contributor's recipe, not a clinical claim",
            },
        )

    _edit(config_copy / "ruleset/imacs-2023.yaml", add_sae2)
    # It is now used: no longer among the results recognised and reported as "not used".
    _edit(
        config_copy / "site.yaml",
        lambda d: d["antibody_results"]["recognised_not_used"].remove("ab-sae2"),
    )
    rs = load_knowledge(config_copy).ruleset
    assert "antibody:sae2" in rs.tiers.preliminary_if_unknown
    assert "sae2" in rs.antibody_testing.when_untested
    assert rs.factor_antibodies("high") == ("tif1g", "nxp2", "sae2")


def test_no_test_pins_the_rule_set_version(knowledge: Knowledge) -> None:
    """A new rule-set version must not need test edits: tests read it from the knowledge base."""
    tests_dir = Path(__file__).resolve().parents[1]
    version = knowledge.ruleset.version
    pinned = [
        str(path.relative_to(tests_dir))
        for path in tests_dir.rglob("*.py")
        if f'"{version}"' in (text := path.read_text(encoding="utf-8"))
        or f"'{version}'" in text
        or f"{knowledge.ruleset.name}|{version}" in text
    ]
    assert pinned == [], f"use knowledge.ruleset.version instead of the literal in {pinned}"


def test_a_new_screening_test_is_planned_after_the_recipes_edits(config_copy: Path) -> None:
    """The recipe of docs/development.md, followed: a test entry, its "done" value set, and a
    place in a panel; the engine then plans it (the code is the project's own, for the test)."""

    def add_test(d: dict) -> None:  # type: ignore[type-arg]
        d["tests"]["recipe-lab"] = {
            "display": "Recipe laboratory test",
            "kind": "order",
            "category": "laboratory",
            "code": {
                "system": "dm-screening",
                "code": "recipe-laboratory-test",
                "display": "Recipe laboratory test",
                "source": "FHIR-DM",
            },
            "done": [{"value_set": "done-recipe-lab"}],
        }
        d["panels"]["basic"]["tests"].append("recipe-lab")

    _edit(config_copy / "ruleset/imacs-2023.yaml", add_test)
    _edit(
        config_copy / "terminology/screening-done.yaml",
        lambda d: d["value_sets"].update(
            {"done-recipe-lab": {"title": "Recipe laboratory test done", "include": []}}
        ),
    )
    engine = Engine(load_knowledge(config_copy), software_version="test")
    [result] = engine.assess(f.bundle(*f.seed_case()), now=date(2015, 10, 25)).results
    assert "recipe-lab" in {item.test_id for item in result.plan.items}
