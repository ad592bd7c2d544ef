from __future__ import annotations

import argparse

import pytest

from batchd.events import errors
from batchd.events.audit import Anchor
from batchd.events.backends.postgres import _quotes_userinfo
from batchd.events.timeutil import parse_iso, to_iso
from batchd.events.urls import StoreUrl, parse
from batchd.scheduler import cli_replay


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///relative.db", StoreUrl("sqlite", "relative.db")),
        ("sqlite:////var/lib/batchd/events.db", StoreUrl("sqlite", "/var/lib/batchd/events.db")),
        (
            "postgresql://ann@db:5433/batchd",
            StoreUrl("postgresql", "postgresql://ann@db:5433/batchd"),
        ),
        ("postgres://ann@db/batchd", StoreUrl("postgresql", "postgresql://ann@db/batchd")),
        ("memory://", StoreUrl("memory", "")),
    ],
)
def test_store_urls_follow_sqlalchemys_rules(url, expected):
    assert parse(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://x.db",
        "sqlite:///",
        "redis://h",
        "events.db",
        "postgresql://",
        "postgresql://u@h:99999/db",
        "postgresql://u@h:-1/db",
        "postgresql://u@h1:5432,h2:x/db",
        "postgresql://u:p@ss@h/db",  # the driver would look for host ss@h
    ],
)
def test_malformed_store_urls_are_refused(url):
    with pytest.raises(errors.StoreUrlError):
        parse(url)


def test_a_multi_host_or_ipv6_store_url_keeps_its_ports():
    for url in ("postgresql://u@h1:5432,h2:5433/db", "postgresql://u@[::1]:5432/db"):
        assert str(parse(url)) == url


def test_an_at_sign_in_a_password_is_written_percent_40():
    assert parse("postgresql://u:p%40ss@h/db").target == "postgresql://u:p%40ss@h/db"
    with pytest.raises(errors.StoreUrlError, match="must be written %40"):
        parse("postgresql://u:p@ss@h/db")


@pytest.mark.parametrize(("url", "rule"), [
    ("postgresql://batchd:Xk9mQ2v/abc@127.0.0.1:5432/db", "%2F"),
    ("postgresql://batchd:top?secret@127.0.0.1:5432/db", "%3F"),
    ("postgresql://batchd:Xk9#mQ2v@127.0.0.1:5432/db", "%23"),
])  # fmt: skip
def test_a_password_cut_by_a_slash_question_mark_or_hash_is_refused_unquoted(url, rule):
    """Such a password ends the URL's host part early: the error says how to write it, and
    quotes no piece of it (the "port" it would have found is the password's)."""
    with pytest.raises(errors.StoreUrlError) as refused:
        parse(url)
    said = str(refused.value)
    assert rule in said
    assert not any(piece in said for piece in ("Xk9", "mQ2v", "abc", "top", "secret"))


def test_a_driver_message_quoting_the_password_is_not_repeated():
    dsn = "postgresql://batchd:Xk9z@h/db"
    assert _quotes_userinfo("invalid literal for int() with base 10: 'Xk9'", dsn)
    assert not _quotes_userinfo("invalid sslmode: 'bogus'", dsn)


def test_passwords_never_show_in_a_store_url():
    shown = str(parse("postgresql://ann:hunter2@db/batchd"))
    assert "hunter2" not in shown and "ann:***@db" in shown
    shown = str(parse("postgresql://ann@db/batchd?password=pw1&sslpassword=pw2&sslmode=require"))
    assert shown.endswith("?password=***&sslpassword=***&sslmode=require")
    with pytest.raises(errors.StoreUrlError) as refused:
        parse("mysql://ann:hunter2@db/batchd")
    assert "hunter2" not in str(refused.value)


def test_times_without_a_zone_are_utc():
    assert parse_iso("2026-11-26T10:42:00") == parse_iso("2026-11-26T10:42:00Z")
    assert parse_iso("2026-11-26T11:42:00+01:00") == parse_iso("2026-11-26T10:42:00Z")
    assert to_iso(parse_iso("2026-11-26T10:42:00.000123Z")) == "2026-11-26T10:42:00.000123Z"
    for early in ("0001-01-01T00:00:00.000000Z", "0999-12-31T23:59:59.000001Z"):
        assert to_iso(parse_iso(early)) == early  # four digits of year, as ISO-8601 has them
    with pytest.raises(ValueError, match="not an ISO-8601 time"):
        parse_iso("yesterday")


def test_a_lower_bound_between_two_microseconds_is_taken_up_to_the_next():
    """An event recorded at .933573 is before --from .933573001, after --to .933573001."""
    at = parse_iso("2026-11-29T17:26:58.933573Z")
    assert parse_iso("2026-11-29T17:26:58.933573001Z", lower=True) == at + 1
    assert parse_iso("2026-11-29T17:26:58.933573001Z") == at  # an upper bound, a moment
    for whole in ("2026-11-29T17:26:58.933573000Z", "2026-11-29T17:26:58.933573Z"):
        assert parse_iso(whole, lower=True) == at
    assert parse_iso("2026-11-29T18:26:58.9335739+01:00", lower=True) == at + 1
    assert parse_iso("20261129T172658,933573001Z", lower=True) == at + 1  # the basic form
    assert parse_iso("20261129T172658.933573Z", lower=True) == at


def test_a_bad_time_is_named_by_the_option_it_came_from():
    with pytest.raises(ValueError) as bad:
        parse_iso("yesterday", "--to")
    assert str(bad.value).startswith("--to: 'yesterday' is not an ISO-8601 time")
    with pytest.raises(ValueError) as far:
        parse_iso("0001-01-01T00:00:00+01:00", "--at")
    assert (
        str(far.value) == "--at: '0001-01-01T00:00:00+01:00' is out of range (years 1 to 9999, UTC)"
    )
    with pytest.raises(ValueError) as plain:  # no option: the text alone (the API adds `at`)
        parse_iso("yesterday")
    assert str(plain.value).startswith("'yesterday' is not")


def test_anchors_parse_and_print():
    text = "42:" + "ab" * 32
    assert str(Anchor.parse(text)) == text
    for bad in (
        "42",
        "x:" + "ab" * 32,
        "0:" + "ab" * 32,
        "4:abcd",
        "4_2:" + "ab" * 32,
        "42:" + "ab " * 32,
        "-1:" + "ab" * 32,
    ):
        with pytest.raises(ValueError, match="POSITION:HASH"):
            Anchor.parse(bad)


def test_iso_times_are_exact_to_the_microsecond_within_and_across_seconds():
    import datetime as dt
    import random

    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    rng = random.Random(7)
    base = 1_800_000_000_000_000
    # runs within one second (the cached prefix), jumps, and times before the epoch
    times = [base + n * 37_000 for n in range(60)] + [-1, 0, 999_999, -1_000_001]
    times += [rng.randint(-(10**16), 10**17) for _ in range(2000)]
    for us in times:
        assert to_iso(us) == (epoch + dt.timedelta(microseconds=us)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        assert parse_iso(to_iso(us)) == us


def test_an_export_from_and_to_one_moment_between_two_microseconds_is_in_order():
    moment = "2026-11-29T17:26:58.9335731Z"
    args = argparse.Namespace(from_=moment, to=moment)
    start, end = cli_replay.export_bounds(args)  # (no "--to is before --from")
    assert start == end + 1  # no event can be recorded at it: none is exported
    with pytest.raises(ValueError, match="is before --from"):
        cli_replay.export_bounds(argparse.Namespace(from_=moment, to="2026-11-29T17:26:58Z"))
