"""Shared fixtures and test-wide settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import data_file
from pydicom import config as pydicom_config

# Strict when writing, as the project's outputs must be: an invalid value raises in tests.
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    """RG1_UNCR.dcm: a real PA chest CR, 1955 x 1841, 15-bit, MONOCHROME1."""
    return data_file("RG1_UNCR.dcm")
