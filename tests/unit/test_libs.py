"""dkimpy's Ed25519 (RFC 8463) made with cryptography, checked against PyNaCl itself
(gehirn_ts/mta/libs.py); and dkimpy signing and verifying with it."""

from __future__ import annotations

import base64

import nacl.encoding
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.mta import libs
from gehirn_ts.mta.dkim import generate
from gehirn_ts.mta.libs import ED25519, dkim

B64 = nacl.encoding.Base64Encoder


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=300))
def test_signatures_are_pynacls_and_each_verifies_the_other(seed: bytes, message: bytes) -> None:
    # Ed25519 signatures are deterministic (RFC 8032 section 5.1.6): the same octets.
    ours = ED25519.signing.SigningKey(base64.b64encode(seed), encoder=libs.Base64Encoder)
    theirs = nacl.signing.SigningKey(base64.b64encode(seed), encoder=B64)
    signature = ours.sign(message).signature
    assert signature == theirs.sign(message).signature
    public = base64.b64encode(bytes(theirs.verify_key))
    verify = ED25519.signing.VerifyKey(public, encoder=libs.Base64Encoder).verify
    assert verify(message, signature) == message
    nacl.signing.VerifyKey(public, encoder=B64).verify(message, signature)


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=100), st.binary(max_size=80))
def test_a_wrong_signature_is_a_bad_signature_never_another_error(
    seed: bytes, message: bytes, signature: bytes
) -> None:
    key = nacl.signing.SigningKey(seed)
    public = base64.b64encode(bytes(key.verify_key))
    if signature == key.sign(message).signature:
        return
    with pytest.raises(libs.BadSignatureError):
        ED25519.signing.VerifyKey(public, encoder=libs.Base64Encoder).verify(message, signature)


@pytest.mark.parametrize("key", [b"", b"AAAA", b"!!not base64", base64.b64encode(b"x" * 33)])
def test_a_key_that_is_not_ed25519_is_the_error_dkimpy_catches(key: bytes) -> None:
    for make in (ED25519.signing.VerifyKey, ED25519.signing.SigningKey):
        with pytest.raises(ED25519.exceptions.ValueError):
            make(key, encoder=libs.Base64Encoder)


MESSAGE = b"From: a@ed.example\r\nTo: b@x.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def test_dkimpy_signs_and_verifies_ed25519_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process PyNaCl may have been imported first; dkimpy is given the
    # stand-in here, as it is in the daemon (tests/unit/test_imports.py checks that).
    monkeypatch.setattr(dkim, "nacl", ED25519)
    private, public = generate("ed25519")
    records = {b"e1._domainkey.ed.example.": f"v=DKIM1; k=ed25519; p={public}".encode()}

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    signed = (
        dkim.sign(
            MESSAGE, b"e1", b"ed.example", private.encode(), signature_algorithm=b"ed25519-sha256"
        )
        + MESSAGE
    )
    assert dkim.verify(signed, dnsfunc=txt)
    assert not dkim.verify(signed.replace(b"Hello", b"Jello"), dnsfunc=txt)
    # The same signature as with PyNaCl.
    monkeypatch.setattr(dkim, "nacl", nacl)
    again = dkim.sign(
        MESSAGE, b"e1", b"ed.example", private.encode(), signature_algorithm=b"ed25519-sha256"
    )
    assert again + MESSAGE == signed
