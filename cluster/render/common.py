"""Pieces every renderer shares: the YAML writer with its provenance header, and environment variables."""
from __future__ import annotations

from typing import Any

from cluster.schema import ClusterSpec


def dump(doc: dict[str, Any], source: str, command: str) -> str:
    """YAML text with a header saying where it came from; key order kept so diffs stay readable."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None  # serveConfigV2 and runtimeEnvYAML read as blocks
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    header = (f"# Rendered by herd from {source}; do not edit by hand.\n"
              f"# Edit the cluster file, then regenerate: {command}\n")
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def env_vars(spec: ClusterSpec) -> dict[str, str]:
    """Environment the herd processes read on every node; secrets are never inlined (see the renderers)."""
    env = {"HERD_LICENSING_STORE": licensing_store(spec)}
    if spec.storage.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = spec.storage.endpoint_url  # boto3 and pyarrow read it for S3 calls
    if spec.storage.region:
        env["AWS_DEFAULT_REGION"] = spec.storage.region
    return env


def licensing_store(spec: ClusterSpec) -> str:
    return spec.licensing.store or spec.storage.uri.rstrip("/") + "/licensing"
