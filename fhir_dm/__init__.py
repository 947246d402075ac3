"""fhir-dm: IMACS 2023 cancer-risk stratification and screening plans for IIM, over FHIR R4."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fhir_dm.core.assess import AssessmentRun, Engine, PatientResult, assess
from fhir_dm.knowledge.load import load_knowledge

try:
    __version__ = version("fhir-dm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["AssessmentRun", "Engine", "PatientResult", "__version__", "assess", "load_knowledge"]
