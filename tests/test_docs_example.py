"""The handler written in docs/handlers.md works as the guide says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bridge.errors import SignatureInvalid
from bridge.registry import check_handler
from bridge.testing import TEST_SECRET, run_handler, signed_request

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "acme_handler.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acme_handler", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["acme_handler"] = module
    spec.loader.exec_module(module)
    return module


def test_the_guide_handler_is_valid_and_translates() -> None:
    acme = load_example()
    handler = check_handler("acme", acme.handler)
    result = run_handler(handler, acme.SAMPLE)
    assert result.delivery_id == "evt_1"
    (purchase,) = result.calls
    assert purchase.event_id == "purchase:pay_1"
    assert purchase.properties == {"amount_cents": 1999, "currency": "eur"}
    tampered = signed_request(handler, acme.SAMPLE)
    tampered = type(tampered)(
        source="acme",
        headers=tampered.headers,
        body=acme.SAMPLE.replace(b"1999", b"9999"),
        received_at=0,
    )
    with pytest.raises(SignatureInvalid):
        handler.scheme.verify(tampered, [TEST_SECRET], 300)
    docs = (EXAMPLE.parent.parent / "handlers.md").read_text()
    assert "examples/acme_handler.py" in docs
