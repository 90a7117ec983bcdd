"""`HmacScheme` on its own: signatures computed here by hand, as each provider documents
them, in every encoding and prefix the scheme offers, and the reason of each refusal."""

from __future__ import annotations

import base64
import hmac
import time

import pytest

from bridge.errors import SignatureInvalid
from bridge.plugin import WebhookRequest
from bridge.signatures import HmacScheme

BODY = b'{"id":1,"name":"caf\xc3\xa9"}'
SECRET = "a shared secret"


def request(headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(source="s", headers=headers, body=BODY, received_at=time.time())


def mac(digest: str = "sha256", secret: str = SECRET) -> bytes:
    return hmac.new(secret.encode(), BODY, digest).digest()


@pytest.mark.parametrize(
    ("scheme", "header", "value"),
    [
        (HmacScheme("X-Sig"), "x-sig", mac().hex()),  # hex by default, read lower-case
        (HmacScheme("x-sig", encoding="base64"), "x-sig", base64.b64encode(mac()).decode()),
        (HmacScheme("x-hub-signature-256", prefix="sha256="), "x-hub-signature-256", None),
        (HmacScheme("x-sig", digest="sha1"), "x-sig", mac("sha1").hex()),
    ],
    ids=["hex", "base64", "prefix", "sha1"],
)
def test_signatures_computed_by_hand_verify(
    scheme: HmacScheme, header: str, value: str | None
) -> None:
    value = value or "sha256=" + mac().hex()
    assert scheme.headers == (header,)
    assert scheme.sign(BODY, SECRET, 0) == {header: value, "content-type": "application/json"}
    scheme.verify(request({header: value}), [SECRET], 300)
    scheme.verify(request({header: f" {value} "}), [SECRET], 300)  # padding is not content
    with pytest.raises(SignatureInvalid):
        scheme.verify(request({header: value.upper()}), [SECRET], 300)


def test_a_prefixed_scheme_wants_the_prefix() -> None:
    scheme = HmacScheme("x-hub-signature-256", prefix="sha256=")
    with pytest.raises(SignatureInvalid):
        scheme.verify(request({"x-hub-signature-256": mac().hex()}), [SECRET], 300)


def test_each_refusal_says_why() -> None:
    scheme = HmacScheme("X-Sig")
    with pytest.raises(SignatureInvalid) as refused:
        scheme.verify(request({}), [SECRET], 300)
    assert str(refused.value) == "missing x-sig header"
    with pytest.raises(SignatureInvalid) as refused:
        scheme.verify(request({"x-sig": mac(secret="another").hex()}), [SECRET], 300)
    assert str(refused.value) == "x-sig does not match any configured secret"


def test_a_sha256_scheme_refuses_a_sha1_signature() -> None:
    scheme = HmacScheme("x-sig")
    with pytest.raises(SignatureInvalid):
        scheme.verify(request({"x-sig": mac("sha1").hex()}), [SECRET], 300)
