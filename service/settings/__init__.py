"""The configuration: one `Settings` object (`model.py`), its sections, and routes."""

from service.settings.expect import Expectation
from service.settings.model import (
    Settings,
    format_validation_error,
    load_settings,
    read_config_file,
)
from service.settings.route import DEFAULT_IGNORE, Route
from service.settings.sections import (
    CommandImporterSettings,
    CsvColumn,
    CsvSqlImporterSettings,
    Folders,
    HttpSettings,
    PythonImporterSettings,
    Retention,
    UiSettings,
)

__all__ = [
    "DEFAULT_IGNORE",
    "CommandImporterSettings",
    "CsvColumn",
    "CsvSqlImporterSettings",
    "Expectation",
    "Folders",
    "HttpSettings",
    "PythonImporterSettings",
    "Retention",
    "Route",
    "Settings",
    "UiSettings",
    "format_validation_error",
    "load_settings",
    "read_config_file",
]
