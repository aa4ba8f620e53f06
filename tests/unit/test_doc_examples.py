"""Every TOML example in README.md and docs/ is a configuration tcpfwd accepts.

Whole files are checked as they are; fragments (a few service keys, or a [global] or
[admin] table) are checked inside a minimal service, as a reader would paste them.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from support import MINIMAL_SERVICE, ROOT, service
from tcpfwd.config import ServiceSettings, parse_config

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVICE_KEYS = {"listen", "backends"} | set(ServiceSettings.__dataclass_fields__)


def examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```toml\n(.*?)```", document.read_text(), re.S):
            found.append((document.name, block))
    return found


def as_config(fragment: dict[str, Any]) -> dict[str, Any]:
    if "services" in fragment:
        # A service shown only for the keys a section is about: give it the rest.
        for port, table in enumerate(fragment["services"].values(), start=10025):
            table.setdefault("listen", f"127.0.0.1:{port}")
            table.setdefault("backends", MINIMAL_SERVICE["backends"])
        return fragment
    keys = {key: fragment.pop(key) for key in list(fragment) if key in SERVICE_KEYS}
    return {**fragment, "services": {"example": service(**keys)}}


EXAMPLES = examples()


def test_the_documents_have_examples():
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize(("document", "block"), EXAMPLES)
def test_documented_example_is_a_valid_configuration(document, block):
    parse_config(as_config(tomllib.loads(block)), document)
