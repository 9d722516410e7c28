"""Section 1.b checks: NOTICE text, a copy of the agreement, the "Llama" name prefix, "Built with Llama"."""
from __future__ import annotations

import pytest

from herd.cli import main as herd
from herd.errors import UserError
from licensing import NOTICE_TEXT, check_model_dir, require_llama_prefix, write_notice


def _model(tmp_path, name="Llama-4-Scout-support-bot", notice=True, agreement=True, readme=True):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    if notice:
        write_notice(d)
    if agreement:
        (d / "LICENSE").write_text("LLAMA 4 COMMUNITY LICENSE AGREEMENT\n... Llama 4 Community License ...\n")
    if readme:
        (d / "README.md").write_text("# Support bot\n\nBuilt with Llama\n")
    return d


def test_notice_text_is_the_licences_sentence():
    assert NOTICE_TEXT == ("Llama 4 is licensed under the Llama 4 Community License, Copyright © Meta Platforms, "
                           "Inc. All Rights Reserved.")


def test_a_complete_folder_passes(tmp_path, capsys):
    d = _model(tmp_path)
    assert check_model_dir(d, distributed=True) == []
    assert herd(["license", "check", str(d)]) == 0
    assert "meets" in capsys.readouterr().out


def test_each_missing_duty_is_named(tmp_path, capsys):
    d = _model(tmp_path, name="support-bot", notice=False, agreement=False, readme=False)
    problems = check_model_dir(d, distributed=True)
    assert len(problems) == 4
    assert any("no NOTICE file" in p and NOTICE_TEXT in p for p in problems)
    assert any("copy of the Llama 4 Community License" in p for p in problems)
    assert any("'support-bot' must begin with \"Llama\"" in p for p in problems)
    assert any("Built with Llama" in p for p in problems)
    assert herd(["license", "check", str(d)]) == 1
    assert capsys.readouterr().out.count("support-bot:") == 4
    # Kept internal: only the NOTICE and agreement duties remain.
    assert len(check_model_dir(d, distributed=False)) == 2
    # An explicit published name overrides the folder's.
    write_notice(d)
    assert not any("must begin" in p for p in check_model_dir(d, True, name="Llama-support-bot"))


def test_wrong_notice_text_is_reported(tmp_path):
    d = _model(tmp_path)
    (d / "NOTICE").write_text("Llama is licensed somehow.\n")
    assert check_model_dir(d, True) == [f'NOTICE does not contain the required text "{NOTICE_TEXT}"']


def test_require_llama_prefix_quotes_the_rule():
    require_llama_prefix("Llama-4-helper", distributed=True)
    require_llama_prefix("helper", distributed=False)
    with pytest.raises(UserError, match='include "Llama" at the beginning of any such AI model name'):
        require_llama_prefix("helper", distributed=True)
    with pytest.raises(UserError):
        require_llama_prefix("llama-lowercase", distributed=True)


def test_check_of_a_missing_folder_is_invalid_input(tmp_path, capsys):
    assert herd(["license", "check", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
