import base64
import json

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gehirn_ts.edj import signature

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_signature_verifies_with_the_standard_webhooks_library():
    body = json.dumps({"type": "notice.fault", "data": {"x": "ü"}}).encode()
    headers = signature.headers(SECRET, "evt_1", 1_700_000_000, body)
    hook = Webhook(SECRET)
    # The library also checks the timestamp against its clock: give it the right time.
    from datetime import UTC, datetime

    import standardwebhooks.webhooks as sw

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromtimestamp(1_700_000_010, tz=UTC)

    original = sw.datetime
    sw.datetime = Frozen
    try:
        assert hook.verify(body, headers) == json.loads(body)
        with pytest.raises(WebhookVerificationError):
            hook.verify(body + b" ", headers)
        other = Webhook("whsec_" + base64.b64encode(b"z" * 32).decode())
        with pytest.raises(WebhookVerificationError):
            other.verify(body, headers)
    finally:
        sw.datetime = original


def test_signature_format():
    sig = signature.sign(SECRET, "id", 1, b"{}")
    version, _, digest = sig.partition(",")
    assert version == "v1"
    assert len(base64.b64decode(digest)) == 32


def test_no_secret_no_signature():
    headers = signature.headers(None, "id", 5, b"{}")
    assert headers == {"webhook-id": "id", "webhook-timestamp": "5"}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "secret",
        "whsec_",
        "whsec_***",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_" + base64.b64encode(b"x" * 65).decode(),
    ],
)
def test_bad_secrets(bad):
    with pytest.raises(signature.SecretError):
        signature.parse_secret(bad)


def test_new_secret_is_valid():
    assert len(signature.parse_secret(signature.new_secret())) == 32
