"""Secrets never appear in error messages (issue 16, item 11): an API key whose identity is malformed, a licensing
key YAML reads as a number, a wrong key presented over HTTP."""
from __future__ import annotations

import pytest

SECRET_KEY = "sk-supersecret-0123456789abcdef"


@pytest.mark.parametrize("identity", ["12345", "[a, b]", "{x: 1}", "null"])
def test_a_malformed_identity_does_not_echo_its_api_key(tmp_path, identity):
    from common.errors import UserError
    from serving.api.auth import load_api_keys

    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  sk-other-key-0123456789abcdef: team-a\n  {SECRET_KEY}: {identity}\n")
    with pytest.raises(UserError) as err:
        load_api_keys(path)
    msg = str(err.value)
    assert SECRET_KEY not in msg and "supersecret" not in msg, msg
    assert "key number 2" in msg, msg  # where it is, without what it is


@pytest.mark.parametrize("value", ["123456789012345678901234567890", "0x1234abcd", "[12345678, 2]"])
def test_a_licensing_key_yaml_reads_as_a_number_is_not_echoed(tmp_path, value):
    from licensing.config import load_config

    path = tmp_path / "licensing.yaml"
    path.write_text(f"key: {value}\n")
    with pytest.raises(Exception) as err:
        load_config(path)
    msg = str(err.value)
    secret_digits = "12345678" if value.startswith("[") else str(int(value, 0))[:8]
    assert value not in msg and secret_digits not in msg, msg
    assert "key" in msg


def test_a_wrong_key_is_not_echoed_over_http():
    from serving.api.auth import KeyChecker, digest
    from serving.api.errors import ApiError

    checker = KeyChecker({digest("sk-right-key-0123456789abcdef"): "team"})
    for header in (f"Bearer {SECRET_KEY}", f"Basic {SECRET_KEY}", SECRET_KEY):
        with pytest.raises(ApiError) as err:
            checker.identity(header)
        assert "supersecret" not in str(err.value.body()), err.value.body()
