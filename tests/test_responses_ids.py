"""Signed response ids: what verifies, and that everything else is one and the same 400."""

from __future__ import annotations

import base64
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import PreviousResponseNotFound
from proxy.response_ids import (
    DEFAULT_MAX_AGE,
    ENV_SECRET,
    IdSecretError,
    ResponseIds,
    new_response_id,
    parse_secret,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET_A = "a" * 16 + "-first-secret"
SECRET_B = "b" * 16 + "-second-secret"
ROUTE = "letta/support-bot"
FP = "3f2a9c0d1e5b7a64"
CONV = "conv-6f0a6f0e-2f4b-4a59-9d0a-0d1c2b3a4f5e"
NOW = 1_800_000_000.0
ALPHABET = string.ascii_letters + string.digits + "-_"
ID_SHAPE = re.compile(r"resp_[A-Za-z0-9_-]+")

IDS = ResponseIds([("k1", SECRET_A.encode())])


def refused(ids: ResponseIds, token: Any, route: str = ROUTE, fp: str = FP,
            now: float = NOW) -> PreviousResponseNotFound:
    with pytest.raises(PreviousResponseNotFound) as caught:
        ids.verify(token, route, fp, now)
    return caught.value


def test_a_minted_id_verifies_to_its_claims() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    claims = IDS.verify(token, ROUTE, FP, now=NOW + 60)
    assert (claims.route, claims.conversation, claims.key_fingerprint, claims.issued_at,
            claims.kid) == (ROUTE, CONV, FP, int(NOW), "k1")


@pytest.mark.parametrize("conversation", [CONV, "c", "conv-ünïcødé-☃", "x" * 500])
def test_ids_use_only_url_safe_characters(conversation: str) -> None:
    token = IDS.mint(ROUTE, conversation, FP, now=NOW)
    assert ID_SHAPE.fullmatch(token)
    assert IDS.verify(token, ROUTE, FP, now=NOW).conversation == conversation


def test_changing_any_character_of_an_id_refuses_it() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    for i, char in enumerate(token):
        other = ALPHABET[(ALPHABET.index(char) + 1) % len(ALPHABET)] if char in ALPHABET else "x"
        refused(IDS, token[:i] + other + token[i + 1:])
        refused(IDS, token[:i] + token[i + 1:])  # and deleting it


def test_flipping_any_bit_of_the_signed_bytes_refuses_the_id() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    body = token[len("resp_"):]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            flipped = raw[:i] + bytes((raw[i] ^ bit,)) + raw[i + 1:]
            refused(IDS, "resp_" + base64.urlsafe_b64encode(flipped).decode().rstrip("="))


def test_unused_bits_of_the_last_character_cannot_be_changed() -> None:
    # base64 decoders ignore the spare low bits of a final character: those ids must not pass.
    for conversation in ("c", "cc", "ccc"):  # lengths that leave 0, 2 and 4 spare bits
        token = IDS.mint(ROUTE, conversation, FP, now=NOW)
        for other in ALPHABET:
            if other != token[-1]:
                refused(IDS, token[:-1] + other)


def test_appending_to_an_id_refuses_it() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    for extra in ("A", "AA", "AAAA", "=", "==", "\n"):
        refused(IDS, token + extra)


def test_an_id_for_another_api_key_is_refused() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    refused(IDS, token, fp="0000000000000000")


def test_an_id_for_another_route_is_refused() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    refused(IDS, token, route="letta/other-bot")


def test_an_id_expires_after_max_age_and_not_before() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    assert IDS.verify(token, ROUTE, FP, now=NOW + DEFAULT_MAX_AGE)
    refused(IDS, token, now=NOW + DEFAULT_MAX_AGE + 1)
    short = ResponseIds([("k1", SECRET_A.encode())], max_age=60)
    refused(short, token, now=NOW + 61)


def test_an_id_from_the_future_beyond_clock_skew_is_refused() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW + 3600)
    refused(IDS, token, now=NOW)
    assert IDS.verify(IDS.mint(ROUTE, CONV, FP, now=NOW + 60), ROUTE, FP, now=NOW)


def test_rotation_verifies_ids_of_an_old_key_id_and_signs_with_the_first() -> None:
    old = ResponseIds(parse_secret(f"k1:{SECRET_A}"))
    token = old.mint(ROUTE, CONV, FP, now=NOW)
    rotated = ResponseIds(parse_secret(f"k2:{SECRET_B},k1:{SECRET_A}"))
    assert rotated.verify(token, ROUTE, FP, now=NOW).kid == "k1"
    fresh = rotated.mint(ROUTE, CONV, FP, now=NOW)
    assert rotated.verify(fresh, ROUTE, FP, now=NOW).kid == "k2"
    refused(old, fresh)  # the old keyring does not know k2
    retired = ResponseIds(parse_secret(f"k2:{SECRET_B}"))
    refused(retired, token)  # k1 removed: its ids end


def test_a_key_id_with_another_secret_is_refused() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    refused(ResponseIds([("k1", SECRET_B.encode())]), token)


def test_every_refusal_is_the_same_answer() -> None:
    token = IDS.mint(ROUTE, CONV, FP, now=NOW)
    errors = [
        refused(IDS, token[:-2] + "xx"),
        refused(IDS, token, fp="other"),
        refused(IDS, token, route="other"),
        refused(IDS, token, now=NOW + DEFAULT_MAX_AGE + 10),
        refused(ResponseIds([("k9", SECRET_B.encode())]), token),
        refused(IDS, "resp_garbage"),
        refused(IDS, new_response_id()),
        refused(IDS, ""),
    ]
    assert {(e.status, e.type, e.code, e.param, e.message) for e in errors} == {
        (400, "invalid_request_error", "previous_response_not_found", "previous_response_id",
         errors[0].message)
    }
    assert "previous_response_id" in errors[0].message


@pytest.mark.parametrize(
    "token",
    [None, 5, b"resp_abc", ["resp_"], "resp_", "resp_A", "resp_" + "A" * 5000, "resp_\x00\x00",
     "resp_ä", "resp_AAAA", "RESP_abcd", "resp_" + "_" * 200, "resp_" + "-" * 64],
    ids=["none", "int", "bytes", "list", "prefix-only", "one-char", "huge", "nul", "non-ascii",
         "zeros", "upper-prefix", "underscores", "dashes"],
)
def test_garbage_is_refused(token: Any) -> None:
    refused(IDS, token)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=300) | st.text(ALPHABET, max_size=300).map(lambda s: "resp_" + s))
def test_any_string_is_refused_with_previous_response_not_found_only(token: str) -> None:
    refused(IDS, token)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.text(min_size=1, max_size=80), st.text(max_size=40), st.text(max_size=40))
def test_any_conversation_route_and_key_round_trip(conv: str, route: str, fp: str) -> None:
    conv = conv.encode("utf-8", "replace").decode()
    route = route.encode("utf-8", "replace").decode()
    fp = fp.encode("utf-8", "replace").decode()
    token = IDS.mint(route, conv, fp, now=NOW)
    assert ID_SHAPE.fullmatch(token)
    assert IDS.verify(token, route, fp, now=NOW).conversation == conv


def test_plain_response_ids_are_unique_and_url_safe() -> None:
    ids = {new_response_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(ID_SHAPE.fullmatch(i) for i in ids)


# -- the secret -----------------------------------------------------------------------------


def test_a_plain_secret_is_one_key() -> None:
    assert parse_secret(SECRET_A) == (("0", SECRET_A.encode()),)


def test_a_keyring_lists_key_ids_first_signing() -> None:
    assert parse_secret(f" new:{SECRET_B} , old:{SECRET_A} ") == (
        ("new", SECRET_B.encode()), ("old", SECRET_A.encode()))


@pytest.mark.parametrize(
    "value",
    ["", "   ", "short", f"k1:{SECRET_A},oops", f"k1:{SECRET_A},k1:{SECRET_B}", "k1:short",
     f"k1:{SECRET_A},bad kid:{SECRET_B}"],
    ids=["empty", "blank", "short", "entry-without-kid", "duplicate-kid", "short-in-ring",
         "bad-kid"],
)
def test_an_unusable_secret_is_a_clear_error_without_the_secret(value: str) -> None:
    with pytest.raises(IdSecretError) as caught:
        parse_secret(value)
    assert ENV_SECRET in str(caught.value)
    assert SECRET_A not in str(caught.value) and SECRET_B not in str(caught.value)


def test_ids_of_a_plain_secret_verify_after_rotating_to_a_ring_that_lists_it_as_key_0() -> None:
    minted = ResponseIds.from_env({ENV_SECRET: SECRET_A}).mint(ROUTE, CONV, FP, now=NOW)
    rotated = ResponseIds.from_env({ENV_SECRET: f"new:{SECRET_B},0:{SECRET_A}"})
    assert rotated.verify(minted, ROUTE, FP, now=NOW).kid == "0"
    with pytest.raises(IdSecretError) as caught:
        parse_secret(f"new:{SECRET_B},{SECRET_A}")
    assert "`0:old`" in str(caught.value)


def test_from_env_reads_the_keyring() -> None:
    ids = ResponseIds.from_env({ENV_SECRET: f"k2:{SECRET_B},k1:{SECRET_A}"})
    assert ids.verify(IDS.mint(ROUTE, CONV, FP, now=NOW), ROUTE, FP, now=NOW).kid == "k1"


MINT = (
    "import sys, os; from proxy.response_ids import ResponseIds; "
    "print(ResponseIds.from_env(os.environ).mint(*sys.argv[1:4], now=float(sys.argv[4])))"
)


def mint_in_another_process(env_secret: str | None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_SECRET}
    if env_secret is not None:
        env[ENV_SECRET] = env_secret
    done = subprocess.run(
        [sys.executable, "-c", MINT, ROUTE, CONV, FP, str(NOW)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip(), done.stderr


def test_an_id_minted_by_another_process_with_the_same_secret_verifies() -> None:
    token, _ = mint_in_another_process(SECRET_A)
    here = ResponseIds.from_env({ENV_SECRET: SECRET_A})
    assert here.verify(token, ROUTE, FP, now=NOW).conversation == CONV


def test_an_id_minted_by_a_process_with_another_secret_is_refused() -> None:
    token, _ = mint_in_another_process(SECRET_B)
    refused(ResponseIds.from_env({ENV_SECRET: SECRET_A}), token)


def test_without_a_secret_a_process_warns_once_and_its_ids_die_with_it() -> None:
    code = (
        "import logging, os; logging.basicConfig(level=logging.WARNING); "
        "from proxy.response_ids import ResponseIds; env = {}; "
        "a = ResponseIds.from_env(env); b = ResponseIds.from_env(env); "
        f"t = a.mint('r', 'conv-1', 'fp', now={NOW}); "
        f"print(b.verify(t, 'r', 'fp', now={NOW}).conversation); print(t)"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_SECRET}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    conversation, token = done.stdout.split()
    assert conversation == "conv-1"  # every keyring of one process shares the random key
    assert done.stderr.count(ENV_SECRET) == 1 and "WARNING" in done.stderr
    # A restarted process has another random key: the old id is gone.
    again = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; from proxy.response_ids import ResponseIds; "
         "from proxy.errors import PreviousResponseNotFound\n"
         "try:\n"
         f"    ResponseIds.from_env({{}}).verify(sys.argv[1], 'r', 'fp', now={NOW})\n"
         "except PreviousResponseNotFound:\n"
         "    print('refused')",
         token],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert again.stdout.strip() == "refused"


def test_plain_response_ids_of_two_processes_differ() -> None:
    # Each worker is a process of its own: a fixed prefix would give two workers' first
    # responses the same id (and the same item ids).
    code = "from proxy.response_ids import new_response_id; print(new_response_id())"
    first, second = (
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=True).stdout.strip()
        for _ in range(2)
    )
    assert ID_SHAPE.fullmatch(first) and first != second
