"""pyspf and dkimpy, imported without dnspython and PyNaCl.

Each picks a DNS library for its own lookups when it is imported: dnspython if it
imports, else pydns (the ``DNS`` module). gehirn-ts never lets them look anything up
themselves: pyspf's ``DNSLookup`` is replaced (`mta/spf.py`) and dkimpy is always given
a ``dnsfunc`` (`mta/dkim.py`), both answered by twisted.names (`threaddns.py`). Loading
dnspython for nothing is 3.8 MB of the daemon's memory, so it is kept out while the two
import, and they find a stand-in for pydns whose lookups raise: a default lookup
somewhere would fail in the tests rather than go to the network on its own.

dkimpy also imports PyNaCl (with libsodium, 0.9 MB) for Ed25519 keys (RFC 8463) alone.
The `cryptography` package the daemon has loaded anyway (TLS, RSA signatures) does
Ed25519 too, so dkimpy is given the few names it calls of PyNaCl, made with it.

If dnspython or PyNaCl is already loaded (another library, a test), dkimpy and pyspf
simply use it.
"""

from __future__ import annotations

import base64
import binascii
import sys
import types
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class NoDefaultLookups(RuntimeError):
    pass


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("DNS", "gehirn-ts's stand-in for pydns: lookups raise")

    def request(*args: Any, **kwargs: Any) -> Any:
        raise NoDefaultLookups("pyspf and dkimpy get their DNS answers from gehirn-ts")

    # What pyspf and dkimpy touch at import: the SPF type (pyspf patches it in when
    # missing) and the name server discovery.
    module.Type = types.SimpleNamespace(SPF=99)  # type: ignore[attr-defined]
    module.DiscoverNameServers = lambda: None  # type: ignore[attr-defined]
    module.DnsRequest = request  # type: ignore[attr-defined]
    # pyspf catches pydns's error and calls it a temporary DNS failure: a distinct
    # class, so that NoDefaultLookups itself comes out.
    module.DNSError = type("DNSError", (Exception,), {})  # type: ignore[attr-defined]
    return module


class Ed25519KeyError(ValueError):
    """A key that is not an Ed25519 key (PyNaCl's ``exceptions.ValueError``)."""


class BadSignatureError(Exception):
    pass


class _Signed:
    def __init__(self, signature: bytes) -> None:
        self.signature = signature


def _raw_key(text: bytes, encoder: Any) -> bytes:
    try:
        raw: bytes = encoder.decode(text)
    except (binascii.Error, ValueError) as e:
        raise Ed25519KeyError(str(e)) from None
    if len(raw) != 32:
        raise Ed25519KeyError(f"an Ed25519 key is 32 octets, not {len(raw)}")
    return raw


class VerifyKey:
    def __init__(self, key: bytes, encoder: Any) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(_raw_key(key, encoder))

    def verify(self, message: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            # A signature of the wrong length too: a failed check, not an error.
            raise BadSignatureError("the signature does not match") from None
        return message


class SigningKey:
    def __init__(self, seed: bytes, encoder: Any) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(_raw_key(seed, encoder))

    def sign(self, message: bytes) -> _Signed:
        return _Signed(self._key.sign(message))


class Base64Encoder:
    @staticmethod
    def decode(text: bytes) -> bytes:
        return base64.b64decode(text)


# The names dkimpy calls as ``nacl.signing.VerifyKey`` and so on.
ED25519 = types.SimpleNamespace(
    signing=types.SimpleNamespace(VerifyKey=VerifyKey, SigningKey=SigningKey),
    encoding=types.SimpleNamespace(Base64Encoder=Base64Encoder),
    exceptions=types.SimpleNamespace(
        ValueError=Ed25519KeyError, BadSignatureError=BadSignatureError
    ),
)


def _load() -> tuple[Any, Any]:
    hidden: list[str] = []
    if "dns" not in sys.modules and "DNS" not in sys.modules:
        # None in sys.modules makes `import dns` (and `import dns.resolver`) raise
        # ImportError, the case both libraries handle by trying pydns.
        sys.modules["dns"] = None  # type: ignore[assignment]
        sys.modules["DNS"] = _stand_in()
        hidden += ["dns", "DNS"]
    if "nacl" not in sys.modules:
        sys.modules["nacl"] = None  # type: ignore[assignment]
        hidden.append("nacl")
    try:
        import dkim
        import spf
    finally:
        for name in hidden:
            del sys.modules[name]
    if "nacl" in hidden:
        dkim.nacl = ED25519
    return spf, dkim


spf, dkim = _load()
