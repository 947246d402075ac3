"""Typed form of config/cds.yaml (service, prefetch, cards, override reasons) and its loader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR, read_yaml, validation_lines

DEFAULT_CDS_CONFIG = DEFAULT_CONFIG_DIR / "cds.yaml"
DEFAULT_MAX_CODES_PER_QUERY = 64
DEFAULT_MAX_QUERY_LENGTH = 2048
DEFAULT_PAGE_SIZE = 200

Indicator = Literal["info", "warning", "critical"]
TemplateUse = Literal["patient", "data", "existing-plans"]

_SERVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PREFETCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceInfo(_Frozen):
    """What discovery says about the one service."""

    id: str
    hook: Literal["patient-view"]
    title: str = Field(min_length=1)
    description: str = Field(min_length=1)
    usage_requirements: str | None = None

    @field_validator("id")
    @classmethod
    def _id_is_a_path_segment(cls, value: str) -> str:
        if not _SERVICE_ID.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' (a URL path segment)")
        return value


class CodeFilter(_Frozen):
    """Codes appended to a search template as `&<param>=system|code,...`.

    `antibodies` takes every antibody value set of the rule set, `tests` every test code of
    the rule set and every code that shows a test done (`tests.<id>.done`), `value_sets` names
    terminology value sets; site-local codes mapped onto a chosen value set
    (terminology/local-codes.yaml) are added unless `local_mappings` is off.
    """

    param: Literal["code", "combo-code"] = "code"
    antibodies: bool = False
    tests: bool = False
    value_sets: tuple[str, ...] = ()
    local_mappings: bool = True


class TemplateConfig(_Frozen):
    """One prefetch template; `required` ones that cannot be had make the call fail with 412."""

    query: str = Field(min_length=1)
    use: TemplateUse = "data"
    required: bool = True
    codes: CodeFilter | None = None


class PrefetchConfig(_Frozen):
    """`page_size` becomes `_count` of every search template (unless a template sets its own):
    an EHR that forwards only the first page of a search then still forwards all of it."""

    max_codes_per_query: int = Field(default=DEFAULT_MAX_CODES_PER_QUERY, ge=1)
    max_query_length: int = Field(default=DEFAULT_MAX_QUERY_LENGTH, ge=64)
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=1000)
    templates: dict[str, TemplateConfig]

    @model_validator(mode="after")
    def _one_patient_template(self) -> PrefetchConfig:
        for key in self.templates:
            if not _PREFETCH_KEY.fullmatch(key):
                raise ValueError(
                    f"templates.{key}: a key is a letter, then letters, digits, _ or -"
                )
        uses = [t.use for t in self.templates.values()]
        if uses.count("patient") != 1:
            raise ValueError("exactly one template must have use: patient")
        if uses.count("existing-plans") > 1:
            raise ValueError("at most one template may have use: existing-plans")
        for key, template in self.templates.items():
            if template.use == "patient" and (template.codes is not None or not template.required):
                raise ValueError(
                    f"templates.{key}: the patient template is required, without codes"
                )
        return self


class TopicConfig(_Frozen):
    """A Coding whose system is a terminology alias (terminology/systems.yaml)."""

    system: str
    code: str
    display: str


class NextConfig(_Frozen):
    """What a card lists under "Next" (clinical ordering, so it is knowledge, not code).

    Overdue items come first, then the tests whose result could change the plan
    (`plan_changing_tests`, e.g. the antibody panel of a preliminary tier), then the plan's
    due tests in the order of `key_tests` (imaging and tests that matter most first), then
    the other due tests; at most `max_items`, the rest counted as "and N more".
    """

    max_items: int = Field(default=5, ge=2, le=10)
    plan_changing_tests: tuple[str, ...] = ()
    key_tests: tuple[str, ...] = ()


class CardsConfig(_Frozen):
    source_label: str = Field(min_length=1)
    summary_label: str = Field(min_length=1, max_length=40)
    guideline_link_label: str = Field(min_length=1)
    app_link_label: str = Field(default="Open the screening timeline", min_length=1)
    topic: TopicConfig
    indicators: dict[str, Indicator]
    plan_on_file_indicator: Indicator = "info"
    # The plan on file differs from what the record now gives (tier or due orders).
    plan_changed_indicator: Indicator = "warning"
    # Data the assessment needs could not be had: never silence ("All clear").
    incomplete_indicator: Indicator = "warning"
    next: NextConfig = Field(default_factory=NextConfig)
    not_applicable_card: bool = False
    max_findings: int = Field(default=10, ge=0)
    include_provenance: bool = True


class OverrideReasonConfig(_Frozen):
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)


class OverrideReasons(_Frozen):
    system: str = Field(min_length=1)
    reasons: tuple[OverrideReasonConfig, ...] = ()

    @model_validator(mode="after")
    def _distinct_codes(self) -> OverrideReasons:
        codes = [r.code for r in self.reasons]
        if len(codes) != len(set(codes)):
            raise ValueError("override reason codes must be distinct")
        return self

    def display(self, system: str | None, code: str | None) -> str | None:
        """The configured display of a reason, if it is one of ours."""
        if system != self.system:
            return None
        return next((r.display for r in self.reasons if r.code == code), None)


class CdsConfig(_Frozen):
    """config/cds.yaml."""

    service: ServiceInfo
    prefetch: PrefetchConfig
    cards: CardsConfig
    override_reasons: OverrideReasons


def load_cds_config(path: Path | str | None = None) -> CdsConfig:
    """Load and validate config/cds.yaml; raise KnowledgeError with one line per problem."""
    file = Path(path) if path is not None else DEFAULT_CDS_CONFIG
    raw = read_yaml(file)
    try:
        return CdsConfig.model_validate(raw)
    except ValidationError as exc:
        raise KnowledgeError(validation_lines(file.name, exc)) from None
