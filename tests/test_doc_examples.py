"""Every TOML example in README.md and docs/ is a configuration tcpfwd accepts.

Whole files are checked as they are; fragments (a few service keys, or a [global] or
[admin] table) are checked inside a minimal service, as a reader would paste them.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tcpfwd.config import ServiceSettings, parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVICE_KEYS = {"listen", "backends"} | set(ServiceSettings.__dataclass_fields__)
MINIMAL_SERVICE = {"listen": "127.0.0.1:10025", "backends": ["127.0.0.1:25"]}


def examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```toml\n(.*?)```", document.read_text(), re.S):
            found.append((document.name, block))
    return found


def as_config(fragment: dict[str, Any]) -> dict[str, Any]:
    if "services" in fragment:
        # A service shown only for the keys a section is about: give it the rest.
        for port, service in enumerate(fragment["services"].values(), start=10025):
            service.setdefault("listen", f"127.0.0.1:{port}")
            service.setdefault("backends", MINIMAL_SERVICE["backends"])
        return fragment
    service = {key: fragment.pop(key) for key in list(fragment) if key in SERVICE_KEYS}
    return {**fragment, "services": {"example": {**MINIMAL_SERVICE, **service}}}


EXAMPLES = examples()


def test_the_documents_have_examples():
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize(("document", "block"), EXAMPLES)
def test_documented_example_is_a_valid_configuration(document, block):
    parse_config(as_config(tomllib.loads(block)), document)
