"""docs/flannel.md is rendered from the code and covers every flanneld setting."""

from __future__ import annotations

import re
from pathlib import Path

from leaseagent.cli.flanneltable import BACKEND_ROWS, CONFIG_ROWS, REFUSED_TYPES, render
from leaseagent.config import FLANNEL_FLAGS
from leaseagent.core.network import CONFIG_FIELDS
from leaseagent.core.profiles import BACKEND_TYPES
from leaseagent.errors import NetworkConfigError

REPO = Path(__file__).parents[2]


def test_every_config_field_and_backend_option_has_a_row() -> None:
    assert sorted(r.name for r in CONFIG_ROWS) == sorted(CONFIG_FIELDS)
    assert set(BACKEND_ROWS) == set(BACKEND_TYPES)
    for kind, rows in BACKEND_ROWS.items():
        assert sorted(r.name for r in rows) == sorted(["Type", *BACKEND_TYPES[kind].option_keys]), kind


def test_flannels_other_backend_types_are_refused() -> None:
    import json

    import pytest

    from leaseagent.core.network import parse_network_config
    for name in REFUSED_TYPES:
        with pytest.raises(NetworkConfigError, match=f"Backend.Type='{name}': not supported"):
            parse_network_config(json.dumps({"Network": "10.5.0.0/16",
                                             "Backend": {"Type": name}}))


def test_every_test_the_doc_names_exists() -> None:
    names = re.findall(r"`(tests/[\w/.]+\.py)::(\w+)`", render())
    assert len(names) >= len(CONFIG_ROWS) + len(FLANNEL_FLAGS)
    for path, test in names:
        source = (REPO / path).read_text()
        assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{path}::{test}"


def test_the_committed_doc_is_what_the_code_renders() -> None:
    assert (REPO / "docs" / "flannel.md").read_text() == render(), (
        "docs/flannel.md is out of date: .venv/bin/python -m leaseagent.cli.flanneltable "
        "> docs/flannel.md")
