"""The reference pages in docs/ stay true: every error code and every setting the code has is documented."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from training.config import Settings
from training.errors import catalogue_markdown

ROOT = Path(__file__).resolve().parent.parent


def setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += setting_names(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_the_error_page_is_the_catalogue():
    assert (ROOT / "docs" / "errors.md").read_text() == catalogue_markdown(), "run: python -m training.errors > docs/errors.md"


def test_every_setting_is_in_the_settings_page():
    page = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in setting_names(Settings) if name.rsplit(".", 1)[-1] not in page]
    assert not missing, f"document these settings in docs/settings.md: {missing}"


def test_the_readme_and_the_architecture_page_link_only_to_files_that_exist():
    for page in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
