"""The population view's data (`config/population.yaml`): worklist horizon, measures, finder codes.

Code only interprets these entries (every threshold and code list lives in config, with its
evidence and source); a bad entry stops the command with one line per problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR
from fhir_dm.knowledge.models import Knowledge

POPULATION_FILE = "population.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorklistConfig(_Frozen):
    soon_due_days: int
    evidence: str
    source: str


class MeasureConfig(_Frozen):
    """One §11 measure: which patients (tiers), which items (firm IMACS cancer screening, or
    lung surveillance; of which rounds and panels), what a unit is, and how it counts."""

    id: str
    title: str
    kind: Literal["completion", "overdue"]
    tiers: tuple[str, ...]
    rounds: tuple[str, ...] = ()
    panels: tuple[str, ...] = ()
    # What is counted: a patient (all its measured items of the period), each round, each item.
    unit: Literal["patient", "round", "item"] = "patient"
    # Which items: firm IMACS cancer-screening items, or lung-surveillance items (not IMACS).
    items: Literal["imacs-screening", "lung"] = "imacs-screening"
    evidence: str
    source: str


class PrefixCodes(_Frozen):
    system: str
    prefix: str
    codes: tuple[str, ...]
    source: str

    @model_validator(mode="after")
    def _under_prefix(self) -> PrefixCodes:
        wrong = [c for c in self.codes if not c.startswith(self.prefix)]
        if wrong:
            raise ValueError(f"codes not under prefix {self.prefix}: {', '.join(wrong)}")
        return self


class FinderConfig(_Frozen):
    prefix_codes: tuple[PrefixCodes, ...] = ()
    evidence: str
    source: str


class PopulationConfig(_Frozen):
    worklist: WorklistConfig
    measures: tuple[MeasureConfig, ...]
    finder: FinderConfig

    def check_against(self, knowledge: Knowledge) -> None:
        """Refuse measures naming tiers, rounds or panels the rule set does not have."""
        rs = knowledge.ruleset
        tiers = {level.id for level in rs.tiers.levels}
        rounds = {r.id for schedule in rs.schedules.values() for r in schedule.rounds}
        rounds |= {r.id for r in rs.lung_surveillance.rounds}
        problems = []
        for m in self.measures:
            where = f"measures.{m.id}"
            problems += [f"{where}: unknown tier '{t}'" for t in m.tiers if t not in tiers]
            problems += [f"{where}: unknown round '{r}'" for r in m.rounds if r not in rounds]
            problems += [f"{where}: unknown panel '{p}'" for p in m.panels if p not in rs.panels]
        for entry in self.finder.prefix_codes:
            if entry.system not in knowledge.terminology.systems:
                problems.append(f"finder.prefix_codes: unknown system alias '{entry.system}'")
            if entry.source not in knowledge.terminology.sources:
                problems.append(f"finder.prefix_codes: unknown source key '{entry.source}'")
        if problems:
            raise KnowledgeError("\n".join(f"{POPULATION_FILE}: {p}" for p in problems))


def load_population_config(
    knowledge: Knowledge, config_dir: Path | str | None = None
) -> PopulationConfig:
    """Read and check `population.yaml` of the configuration directory."""
    root = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    path = root / POPULATION_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raise KnowledgeError(f"{POPULATION_FILE}: missing or not valid YAML") from None
    try:
        cfg = PopulationConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"{POPULATION_FILE}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors()
        ]
        raise KnowledgeError("\n".join(lines)) from None
    cfg.check_against(knowledge)
    return cfg
