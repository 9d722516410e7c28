"""The licensing config users write (YAML): where the store is, the key, column names, sketch size, alert levels.

A closed schema: unknown keys are rejected with a "did you mean", values are bounded. Environment variables
(`HERD_LICENSING_STORE`, `HERD_LICENSING_KEY`) win over nothing but lose to explicit flags; the key is better kept
in the environment (or a secret manager feeding it) than in a file.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from common.errors import LicensingConfigError, describe_validation_error, yaml_key_lines
from licensing.sketch import DEFAULT_LG_K, MAX_LG_K, MIN_LG_K


class Columns(BaseModel):
    """Names of the columns (Parquet) or fields (JSONL) in product activity logs."""

    model_config = ConfigDict(extra="forbid")
    user_id: str = Field("user_id", description="The user's ID (string or integer); hashed at once, never stored.")
    timestamp: str = Field("timestamp", description="Event time: epoch seconds, or an ISO-8601 / Parquet timestamp "
                                                    "(UTC unless it carries a zone).")
    product: str = Field("product", description="Which product or service the user was active in.")
    affiliate: str = Field("affiliate", description="Which affiliate (company) runs it; a missing column or empty "
                                                    "value means the licensee itself.")


class LicensingConfig(BaseModel):
    """Settings for `herd license` and `licensing.MauTracker`."""

    model_config = ConfigDict(extra="forbid")
    store: str | None = Field(None, description="Local directory or s3://bucket/prefix "
                                                "(default: $HERD_LICENSING_STORE, else ./herd-data/licensing).")
    endpoint_url: str | None = Field(None, description="S3 endpoint for an S3-compatible store (MinIO, Ceph); "
                                                       "default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL.")
    key: SecretStr | None = Field(None, description="Hashing key (32 hex digits); prefer $HERD_LICENSING_KEY.")
    lg_k: int = Field(DEFAULT_LG_K, ge=MIN_LG_K, le=MAX_LG_K,
                      description="log2 of HLL registers per sketch: 14 gives 0.81% standard error, 16 KiB raw.")
    alert_levels: list[float] = Field([50.0, 80.0, 90.0, 100.0],
                                      description="Percentages of the 700M threshold that raise an alert.")
    flush_interval_s: float = Field(60.0, gt=0, le=86400, description="How often a live tracker flushes its sketches.")
    chunk_rows: int = Field(1_000_000, ge=1000, le=50_000_000,
                            description="Rows per acknowledged ingest chunk (memory vs. work redone after a crash).")
    affiliate: str = Field("", description="Affiliate recorded by a live tracker when none is passed.")
    max_buffered_events: int = Field(1_000_000, ge=1, le=100_000_000,
                                     description="Events a live tracker holds in memory (about 24 B each) before "
                                                 "spilling them to local disk, e.g. while the store is down.")
    max_spill_bytes: int = Field(1 << 30, ge=0, description="Local disk a live tracker may spill to; past it, events "
                                                            "are dropped, counted (dropped_events) and logged.")
    spill_dir: str | None = Field(None, description="Where a live tracker spills (default: herd's cache root, "
                                                    "licensing-spill/).")
    columns: Columns = Field(default_factory=Columns, description="Column names in product activity logs.")

    @field_validator("alert_levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0 < x <= 1000]
        if bad:
            raise ValueError(f"alert levels must be percentages in (0, 1000], got {bad}")
        return sorted(set(v))


def parse_config(data: dict, where: str = "licensing config", lines: dict[tuple, int] | None = None) -> LicensingConfig:
    """Validate a dict into a config, turning pydantic's errors into one line naming the field and the fix."""
    try:
        return LicensingConfig.model_validate(data or {})
    except ValidationError as e:
        raise LicensingConfigError(describe_validation_error(e, LicensingConfig, source=where, lines=lines)) from None


def load_config(path: str | Path | None = None) -> LicensingConfig:
    """The config from a YAML file, or the defaults when no path is given."""
    if path is None:
        return LicensingConfig()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LicensingConfigError(f"config file {str(p)!r} not found")
    text = p.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise LicensingConfigError(f"{p}: expected a mapping of settings at the top level")
    return parse_config(data, where=str(p), lines=yaml_key_lines(text))
