"""A database URL is checked before any driver reads it, and shown only redacted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.database_url import check_postgresql_url, redacted, scrubbed
from bridge.errors import ConfigError
from bridge.logs import redact_secrets

PASSWORD = "s3cr%t#p/ss"  # unencoded %, # and /: every piece of it is distinctive
PIECES = ("s3cr", "t#p", "p/ss")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://bridge:{PASSWORD}@db.internal:5432/bridge",
            "postgresql://bridge@db.internal:5432/bridge",
        ),
        (
            "postgresql://bridge:pa@ss:wo@rd@db.internal/bridge",
            "postgresql://bridge@db.internal/bridge",
        ),
        (
            "postgres://bridge:p?x#y@db.internal/bridge?sslmode=require",
            "postgres://bridge@db.internal/bridge",
        ),
        (
            "postgresql://bridge@h1:5432,h2:5433/bridge",
            "postgresql://bridge@h1:5432,h2:5433/bridge",
        ),
        ("postgresql://[::1]:5432/bridge", "postgresql://[::1]:5432/bridge"),
        ("postgresql:///bridge?host=/run/postgresql&password=s3cr3t", "postgresql:///bridge"),
        # Without an "@", a password that lost its host is not shown as a host or port.
        ("postgresql://bridge:s3cr3tpass/ss", "postgresql://***"),
        ("postgresql://bridge:s3cr%t", "postgresql://***"),
        ("postgresql://s3cr3t%2F/ss@db.internal/bridge", "postgresql://***@db.internal/bridge"),
        ("postgresql://bridge:x@db.internal/s3cr%t#/db", "postgresql://bridge@db.internal/***"),
        ("not a url s3cr3t", "***"),
    ],
)
def test_redacted_shows_only_plain_names(url: str, shown: str) -> None:
    assert redacted(url) == shown


@given(st.text(min_size=1))
def test_no_password_survives_redaction(password: str) -> None:
    url = f"postgresql://bridge:{password}@db.internal:5432/bridge"
    assert redacted(url) == "postgresql://bridge@db.internal:5432/bridge"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://bridge:{PASSWORD}@127.0.0.1/bridge",  # "%t#" is no escape
        "postgresql://bridge:s3cr/p/ss@127.0.0.1/bridge",  # "/" ends libpq's credentials
        "postgresql://bridge:1234/p/ss@127.0.0.1/bridge",  # ... even with a numeric start
        "postgresql://bridge:s3cr@p/ss@127.0.0.1/bridge",  # the first "@" ends them
        "postgresql://bridge:s3cr p/ss@127.0.0.1/bridge",  # libpq refuses spaces
        "postgresql://bridge@127.0.0.1:port/bridge",
        "postgresql://bridge@127.0.0.1/bridge?sslmode=require&passwrd=s3cr",  # no such option
    ],
)
def test_a_url_libpq_would_misread_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError, match="percent-encode") as refused:
        check_postgresql_url(url)
    assert refused.value.variable == "BRIDGE_DATABASE_URL"
    assert "s3cr" not in str(refused.value)
    assert refused.value.__context__ is None  # libpq's exception, which quotes it, is not kept


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bridge:s3cr%25t%23p%2Fss@127.0.0.1:5432/bridge",
        "postgresql://bridge:p#x?y@127.0.0.1/bridge",  # libpq reads these as written
        "postgres://bridge@h1:5432,h2:5433/bridge?sslmode=require",
        "postgresql://[::1]:5432/bridge",
        "postgresql:///bridge?host=/run/postgresql",
        "postgresql://%2Frun%2Fpostgresql/bridge",
    ],
)
def test_well_formed_urls_pass(url: str) -> None:
    assert check_postgresql_url(url) == url


def test_scrubbed_blanks_the_password_and_its_pieces_in_one_line() -> None:
    url = f"postgresql://bridge:{PASSWORD}@db.internal/bridge?password=0ther-s3cret"
    message = f'invalid token: "{PASSWORD}"\nand "s3cr" and "s3cr%t" and 0ther-s3cret'
    clean = scrubbed(message, url)
    assert "\n" not in clean
    assert not any(piece in clean for piece in (*PIECES, "0ther", "s3cret"))
    assert clean.startswith("invalid token:")


def test_log_lines_lose_database_credentials() -> None:
    url = f"postgresql://bridge:{PASSWORD}@db.internal/bridge"
    event = redact_secrets(None, "error", {"event": f"cannot use {url}", "detail": [url]})
    assert not any(piece in str(event) for piece in PIECES)
    assert "db.internal/bridge" in event["event"]
