"""Read config/ into a validated `Knowledge`: the only module that reads configuration files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fhir_dm._data import bundled_dir
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.knowledge.models import Knowledge, RuleSet, Site, Terminology

# The knowledge base shipped with the package; a site names its own (--config, FHIR_DM_CONFIG_DIR).
DEFAULT_CONFIG_DIR = bundled_dir("config")
# The environment variable naming a site's knowledge base directory.
CONFIG_DIR_VARIABLE = "FHIR_DM_CONFIG_DIR"
TERMINOLOGY_DIR = "terminology"
RULESET_DIR = "ruleset"
SITE_FILE = "site.yaml"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one configuration file as a mapping; KnowledgeError (file name only) otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KnowledgeError(f"{path.name}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{path.name}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise KnowledgeError(f"{path.name}: expected a mapping at the top level")
    return data


def validation_lines(label: str, exc: ValidationError) -> str:
    """One `file: key.path: message` line per pydantic error."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        lines.append(f"{label}: {loc}: {err['msg']}" if loc else f"{label}: {err['msg']}")
    return "\n".join(lines)


def _merge_terminology(directory: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {"value_sets": {}}
    for path in sorted(directory.glob("*.yaml")):
        for key, value in read_yaml(path).items():
            if key == "value_sets":
                clash = merged["value_sets"].keys() & value.keys()
                if clash:
                    raise KnowledgeError(
                        f"terminology/{path.name}: value set defined twice: {sorted(clash)}"
                    )
                merged["value_sets"].update(value)
            elif key in merged:
                raise KnowledgeError(f"terminology/{path.name}: '{key}' defined twice")
            else:
                merged[key] = value
    return merged


def load_knowledge(config_dir: Path | str | None = None) -> Knowledge:
    """Load and validate config/; raise KnowledgeError with one line per problem."""
    root = Path(config_dir) if config_dir is not None else DEFAULT_CONFIG_DIR
    if not root.is_dir():
        raise KnowledgeError(f"configuration directory not found: {root.name}")
    site_raw = read_yaml(root / SITE_FILE)
    try:
        site = Site.model_validate(site_raw)
    except ValidationError as exc:
        raise KnowledgeError(validation_lines(SITE_FILE, exc)) from exc
    ruleset_name = f"{RULESET_DIR}/{site.ruleset}.yaml"
    try:
        ruleset = RuleSet.model_validate(read_yaml(root / ruleset_name))
    except ValidationError as exc:
        raise KnowledgeError(validation_lines(ruleset_name, exc)) from exc
    try:
        terminology = Terminology.model_validate(_merge_terminology(root / TERMINOLOGY_DIR))
    except ValidationError as exc:
        raise KnowledgeError(validation_lines(TERMINOLOGY_DIR, exc)) from exc
    try:
        return Knowledge(ruleset=ruleset, terminology=terminology, site=site)
    except ValidationError as exc:
        raise KnowledgeError(validation_lines("config", exc)) from exc
