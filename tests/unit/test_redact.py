import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.redact import redact_secret, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/hook", "https://example.com/hook"),
        ("https://user:pa55@example.com:8443/hook", "https://user:****@example.com:8443/hook"),
        ("https://example.com/h?token=abc&x=1", "https://example.com/h?token=****&x=****"),
        (
            "https://hooks.slack.com/services/T000/B0000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://hooks.slack.com/services/T000/B0000000/XX****",
        ),
        ("http://[::1]:80/x", "http://[::1]:80/x"),
        ("https://example.com/h#frag", "https://example.com/h"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_bad_url_is_masked_whole():
    assert redact_url("http://[::1/") == "****"


SECRETS = st.text(alphabet="abcdefghijkLMNOPQRSTUVWXYZ0123456789-._~", min_size=4, max_size=30)


@given(SECRETS, SECRETS)
def test_passwords_and_query_values_never_survive(password, token):
    password, token = "Q9" + password, "Z7" + token
    redacted = redact_url(f"https://user:{password}@example.com/p?token={token}&n={token}")
    assert password not in redacted
    assert token not in redacted
    assert redacted.startswith("https://user:****@example.com/p?token=****")


def test_redact_secret():
    assert redact_secret("whsec_abcdef") == "whsec_****"
    assert redact_secret("other") == "****"
    assert redact_secret(None) is None


@given(st.text(max_size=80))
def test_redact_url_never_crashes(text):
    assert isinstance(redact_url(text), str)
