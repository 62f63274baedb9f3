"""Frameworks a test needs: skipped when absent, unless ``SINGD_RKFAC_REQUIRE`` names them (set by ``make test``)."""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRED = {name.strip() for name in os.environ.get("SINGD_RKFAC_REQUIRE", "").split(",") if name.strip()}


def need(*modules: str) -> None:
    """Import each module, or skip; a module named in SINGD_RKFAC_REQUIRE must import."""
    for name in modules:
        if name in REQUIRED:
            importlib.import_module(name)
        else:
            pytest.importorskip(name, reason=f"{name} is not installed (the 'models' extra; `make test` runs this in .venv-vision)")
