"""The default knowledge base (`config/`) and FHIR artifacts (`profiles/`) that ship with fhir-dm.

In a built wheel they live here, as `fhir_dm/_data/config` and `fhir_dm/_data/profiles`
(pyproject.toml maps the repository's top-level directories into this package at build time,
so the files have one home in the source tree). From a clone or an editable install they are
not copied here: the top-level directories beside the package are used instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

BundledName = Literal["config", "profiles"]


def bundled_dir(name: BundledName) -> Path:
    """The directory of the bundled `config` or `profiles`, installed or in a source tree.

    Returns a real directory path (the loaders glob and read files), so a zipped install is not
    supported; pip never installs one.
    """
    packaged = resources.files(__name__).joinpath(name)
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / name
