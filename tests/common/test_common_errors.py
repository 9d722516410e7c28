"""The one-line message every area prints for a pydantic error, and S3 URL parsing."""
from __future__ import annotations

from typing import Optional, Union

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from common.errors import (CheckpointError, JobFileError, UserError, describe_validation_error, field_path,
                           path_loc, yaml_key_lines)
from common.s3url import S3UrlError, parse_s3_url


class Lora(BaseModel):
    """LoRA hyper-parameters."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on LoRA inputs.")

    @model_validator(mode="after")
    def _check(self) -> "Lora":
        if self.rank > 512 and self.dropout:
            raise ValueError("lora.dropout must be 0 above rank 512; set lora.dropout: 0")
        return self


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the run's name")
    lora: Lora = Field(default_factory=Lora)
    stages: list[Lora] = Field(default_factory=list, description="one LoRA per stage")
    prompt: Union[str, list[int]] = Field("", description="Text or token ids.")
    key: Optional[SecretStr] = Field(None, description="hashing key (32 hex digits)")
    checkpoint: Optional[Lora] = None


def _message(data: dict, **kw) -> str:
    with pytest.raises(ValidationError) as e:
        Job.model_validate(data)
    msg = describe_validation_error(e.value, Job, **kw)
    assert "\n" not in msg
    return msg


def test_unknown_key_suggests_the_closest_and_lists_the_valid_ones():
    assert _message({"name": "a", "lora": {"rnak": 4}}) == \
        "lora.rnak: unknown key (did you mean 'rank'?); valid keys in lora: rank, dropout"
    assert _message({"name": "a", "lroa": {}}).startswith(
        "lroa: unknown key (did you mean 'lora'?); valid keys in the top level: name, lora, stages, prompt, key")
    assert _message({"name": "a", "zzz": 1}).startswith("zzz: unknown key; valid keys in the top level: name, ")


def test_wrong_value_names_the_path_the_value_and_the_fix_from_the_description():
    assert _message({"name": "a", "lora": {"rank": 0}}) == ("lora.rank: 0 is not accepted: Input should be greater "
                                                            "than or equal to 1; set it to LoRA rank r")
    assert _message({"name": "a", "stages": [{}, {"dropout": 2.0}]}) == (
        "stages[1].dropout: 2.0 is not accepted: Input should be less than 1; set it to dropout on LoRA inputs")
    # The union's branch names ('str', 'list[int]') are not keys: the path is the field's own.
    assert _message({"name": "a", "prompt": 3.5}).startswith("prompt: 3.5 is not accepted: ")


def test_a_validators_message_is_kept_without_the_sections_dict():
    assert _message({"name": "a", "lora": {"rank": 600, "dropout": 0.1}}) == \
        "lora: lora.dropout must be 0 above rank 512; set lora.dropout: 0"


def test_missing_key_says_what_it_is():
    assert _message({}) == "name: missing; add it (the run's name)"
    assert _message({"name": "a", "stages": [{"rank": "x"}]}).startswith("stages[0].rank: 'x' is not accepted")


def test_a_misspelt_required_key_is_reported_as_the_misspelling():
    assert _message({"nmae": "a"}).startswith("nmae: unknown key (did you mean 'name'?)")
    assert _message({"nmae": "a"}).endswith("(1 more problem after this one)")
    assert _message({"nmae": "a", "lora": {"rank": 0}}).endswith("(2 more problems after this one)")


def test_source_and_yaml_line():
    text = "name: a\nlora:\n  rank: 0\n"
    assert _message(yaml.safe_load(text), source="job.yaml", lines=yaml_key_lines(text)).startswith(
        "job.yaml:3: lora.rank: 0 is not accepted")
    assert _message({}, source="job.yaml") == "job.yaml: name: missing; add it (the run's name)"


def test_a_secret_is_never_echoed():
    msg = _message({"name": "a", "key": 12345678})
    assert msg.startswith("key: (value hidden) is not accepted") and "12345678" not in msg


def test_paths_round_trip():
    loc = ("node_groups", 0, "gpus_per_node")
    assert field_path(loc) == "node_groups[0].gpus_per_node" and path_loc(field_path(loc)) == loc


def test_area_errors_are_user_errors_and_keep_their_old_base():
    for cls in (JobFileError, CheckpointError):
        e = cls("x")
        assert isinstance(e, UserError) and isinstance(e, ValueError) and e.exit_code == 2


def test_s3_urls():
    assert parse_s3_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    url = parse_s3_url("s3://bucket")
    assert url == ("bucket", "") and url.key("a.json") == "a.json" and str(url) == "s3://bucket"
    assert parse_s3_url("s3://b/p").key("a.json") == "p/a.json"
    with pytest.raises(S3UrlError, match=r"^store: 's3:///x' has no bucket name; write it as s3://bucket/prefix$"):
        parse_s3_url("s3:///x", field="store")
    with pytest.raises(ValueError, match=r"^checkpoint path: '/local' is not an s3:// URL; write it as s3://"):
        parse_s3_url("/local", field="checkpoint path")
    assert issubclass(S3UrlError, UserError)
