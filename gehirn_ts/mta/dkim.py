"""DKIM verification (RFC 6376) with dkimpy, in a thread, against the daemon's resolver."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from gehirn_ts.mta.libs import dkim
from gehirn_ts.threaddns import DnsTemporary, ThreadDNS


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass | fail | temperror | none
    domain: str
    selector: str

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "domain": self.domain, "selector": self.selector}


# A DKIM-Signature field at the start of a header line (RFC 5322 section 3.6.8 field
# names are case-insensitive; obsolete syntax allows blanks before the colon).
_SIGNED = re.compile(rb"(?im)^dkim-signature[ \t]*:")


def is_signed(message: bytes) -> bool:
    """Whether the header section has a DKIM-Signature field (pure; no DNS)."""
    end = message.find(b"\r\n\r\n")
    return _SIGNED.search(message, 0, end if end >= 0 else len(message)) is not None


class _Temporary(Exception):
    pass


def verify(message: bytes, resolver: ThreadDNS) -> list[DkimResult]:
    """One result per DKIM-Signature header (blocking: call in a thread)."""

    def txt(name: Any, timeout: float = 5) -> bytes:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            return b"".join(resolver.txt(qname))
        except DnsTemporary as e:
            raise _Temporary(str(e)) from None

    if not is_signed(message):
        # No signature to check (most mail): dkimpy would still parse the whole message.
        return []
    try:
        checker = dkim.DKIM(message)
    except dkim.MessageFormatError:
        return []
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    results = []
    for idx in range(count):
        try:
            ok = checker.verify(idx=idx, dnsfunc=txt)
            outcome = "pass" if ok else "fail"
        except _Temporary:
            outcome = "temperror"
        except dkim.DKIMException:
            outcome = "fail"
        domain = (checker.domain or b"").decode("ascii", "replace")
        selector = (checker.selector or b"").decode("ascii", "replace")
        results.append(DkimResult(outcome, domain, selector))
    return results


# --- signing (RFC 6376; Ed25519 per RFC 8463) ---
#
# dkimpy computes RSA signatures with Python integers: about 6 ms of CPU per signature on
# a 2048-bit key, all of it holding the GIL (the reactor waits). PKCS#1 v1.5 signatures
# are deterministic, so the same signature is made by OpenSSL (the `cryptography`
# package) from the key dkimpy parsed; tests compare both on the same input.


def _openssl_rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    n = private_key["modulus"]
    key = _RSA_KEYS.get(n)
    if key is None:
        numbers = rsa.RSAPrivateNumbers(
            p=private_key["prime1"],
            q=private_key["prime2"],
            d=private_key["privateExponent"],
            dmp1=private_key["exponent1"],
            dmq1=private_key["exponent2"],
            iqmp=private_key["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(private_key["publicExponent"], n),
        )
        key = numbers.private_key()
        if len(_RSA_KEYS) > 64:
            _RSA_KEYS.clear()
        _RSA_KEYS[n] = key
    algorithm = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[digest.name]  # noqa: S303
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


_RSA_KEYS: dict[int, Any] = {}
# dkim/__init__.py calls the name it imported from dkim.crypto.
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign
# dkimpy parses the PEM key with its own Python ASN.1 reader on every signature (a
# third of dkimpy's time per message in bench/send.py). The parsed key is a dict of
# integers that dkimpy only reads, so each key is parsed once.
dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)


def _compress_whitespace(content: bytes) -> bytes:
    """dkimpy's relaxed canonicalization step (RFC 6376 sections 3.4.2 and 3.4.4: each
    run of WSP becomes one SP), without rewriting every single space of ordinary text
    (50 us a 1 KiB body, 2 us so when there is nothing to change)."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP.sub(b" ", content)


_WSP = re.compile(rb"[\t ]+")
# canonicalization.Relaxed calls the module's name, for signing and for verifying.
dkim.canonicalization.compress_whitespace = _compress_whitespace

ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # rsa | ed25519
    private_key: str  # PEM (rsa) or the base64 seed (ed25519), as dkimpy takes them


def sign(message: bytes, keys: list[SigningKey]) -> bytes:
    """The DKIM-Signature fields to put on top of ``message``, one per key (blocking:
    call in a thread). Relaxed/relaxed; the header fields RFC 6376 section 5.4.1
    recommends, with the RFC 5322 singletons (From first of all) oversigned, so that a
    second From or Subject added on the way breaks the signature."""
    out = b""
    for key in keys:
        signer = dkim.DKIM(message)
        signer.add_frozen(dkim.DKIM.RFC5322_SINGLETON)
        out += signer.sign(
            key.selector.encode(),
            key.domain.encode(),
            key.private_key.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=ALGORITHMS[key.algorithm],
        )
    return out


def generate(algorithm: str) -> tuple[str, str]:
    """A new key pair: (private key as stored, the p= value of the DNS record)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        public = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private, base64.b64encode(public).decode()
    if algorithm == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        seed = ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(seed).decode(), base64.b64encode(public).decode()
    raise ValueError(f"unknown DKIM algorithm {algorithm!r} (rsa or ed25519)")


def dns_record(domain: str, selector: str, algorithm: str, public: str) -> tuple[str, str]:
    """(name, TXT value) to publish for a key."""
    return f"{selector}._domainkey.{domain}", f"v=DKIM1; k={algorithm}; p={public}"


def txt_strings(value: str) -> list[str]:
    """The value cut into the 255-byte strings a TXT record holds (RFC 1035 3.3.14)."""
    return [value[i : i + 255] for i in range(0, len(value), 255)]
