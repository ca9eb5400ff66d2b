"""Text templates shipped inside the package (and so inside the pyz), filled in with @NAME@ placeholders."""

from __future__ import annotations

import pkgutil
import re

# @NAME@ rather than $NAME or {{NAME}}: nginx, shell and GitHub Actions all use those themselves.
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def load(name: str) -> str:
    """The raw text of templates/NAME; read through pkgutil so that it works from inside the zip."""
    data = pkgutil.get_data("bluegreen", f"templates/{name}")
    if data is None:  # a loader without get_data: cannot happen for a directory or a zipapp
        raise FileNotFoundError(f"bluegreen template {name}")
    return data.decode("utf-8")


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every @NAME@; a placeholder without a value is a bug, so it raises KeyError."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def render(name: str, **values: object) -> str:
    return fill(load(name), {k: str(v) for k, v in values.items()})
