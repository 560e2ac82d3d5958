import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.config import (
    Config,
    ConfigError,
    from_mapping,
    load,
    render_sample,
    replace_options_table,
)
from gehirn_ts.durations import format_duration, format_size, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "etc" / "gehirn-ts.toml"


def test_no_file_means_embedded_defaults():
    config = load(None)
    assert config == Config()
    assert config.http.listen == "tcp:8025:interface=127.0.0.1"
    assert config.bus.url == "local:"
    assert config.edj.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert config.edj.http_timeout == 10
    assert config.edj.allow_networks == ()
    # A batch holds at most what a consumer works on at once (docs/decisions.md).
    from gehirn_ts.edj.registry import MAX_BATCH

    assert config.bus.prefetch >= MAX_BATCH


def test_operations_doc_lists_every_option():
    # docs/operations.md carries every option as a table (make sample renders it).
    doc = (SAMPLE.parents[1] / "docs" / "operations.md").read_text()
    assert replace_options_table(doc) == doc
    assert "| `forward_sender` |" in doc and "| `mail_loop_limit` |" in doc


def test_sample_is_rendered_from_the_schema():
    # The sample documents every option with its default: it must be exactly what the
    # schema renders (run `make sample` after changing an option).
    assert SAMPLE.read_text() == render_sample()


def test_sample_loads_to_the_defaults_and_names_every_key():
    assert load(SAMPLE) == Config()
    raw = tomllib.loads(SAMPLE.read_text())
    import dataclasses

    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(section.default_factory())}
        assert set(raw[section.name]) == keys


def test_every_bad_key_is_reported_at_once_with_its_path():
    raw = {
        "http": {"listen": 8025, "max_body": "lots", "colour": "red"},
        "edj": {"retry_schedule": ["5s", "soon"], "retry_jitter": 2, "allow_networks": ["x"]},
        "bogus": {},
        "bus": {"url": "redis://x/", "namespace": "Has Space"},
    }
    with pytest.raises(ConfigError) as e:
        from_mapping(raw)
    paths = [err.split(":")[0] for err in e.value.errors]
    assert sorted(paths) == sorted(
        [
            "http.listen",
            "http.max_body",
            "http.colour",
            "edj.retry_schedule",
            "edj.retry_jitter",
            "edj.allow_networks",
            "bogus",
            "bus.url",
            "bus.namespace",
        ]
    )
    message = str(e.value)
    assert "edj.retry_schedule: item 1" in message
    assert "http.colour: unknown key" in message


def test_section_that_is_not_a_table():
    with pytest.raises(ConfigError) as e:
        from_mapping({"http": 5})
    assert e.value.errors == ["http: expected a table [http]"]


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[http\nlisten=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_values_are_parsed():
    config = from_mapping(
        {
            "http": {"max_body": "2MiB"},
            "edj": {"retry_schedule": [1, "2s", "1m"], "allow_networks": ["127.0.0.1/8"]},
        }
    )
    assert config.http.max_body == 2 * 1024 * 1024
    assert config.edj.retry_schedule == (1.0, 2.0, 60.0)
    assert config.edj.allow_networks == ("127.0.0.0/8",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1.5s", 1.5), (3, 3)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "-1s", "s", True, None, float("nan"), -2, "1e3"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.text(max_size=20) | st.integers() | st.floats() | st.booleans() | st.none())
def test_duration_parser_never_crashes(value):
    try:
        result = parse_duration(value)
    except ValueError:
        return
    assert result >= 0


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_format_round_trips(ms):
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(min_value=1, max_value=2**40))
def test_size_format_round_trips(size):
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=20) | st.integers() | st.booleans())
def test_size_parser_never_crashes(value):
    try:
        assert parse_size(value) >= 1
    except ValueError:
        pass


def test_error_lines_name_paths():
    with pytest.raises(ConfigError) as e:
        from_mapping({"state": {"dir": ""}, "bus": {"prefetch": 0}})
    assert all(re.match(r"^[a-z_]+\.[a-z_]+: ", line) for line in e.value.errors)
