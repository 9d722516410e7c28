"""Regenerate the rendered files in infra/ from the example cluster files: `python -m cluster.render_examples`.

One table says which file is rendered from which cluster file and target; a test renders the same table
in memory and fails when a file in infra/ is out of date with its source. `--check` does that check here.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (cluster file, target, output, --job), paths relative to the repository root.
EXAMPLES: list[tuple[str, str, str, str | None]] = [
    ("infra/clusters/local.yaml", "serve", "infra/rendered/local/serve.yaml", None),
    ("infra/clusters/maverick-fp8-1x8.yaml", "ray-cluster", "infra/rendered/maverick-fp8-1x8/ray-cluster.yaml", None),
    ("infra/clusters/maverick-bf16-2x8.yaml", "ray-cluster",
     "infra/rendered/maverick-bf16-2x8/ray-cluster.yaml", None),
    ("infra/clusters/maverick-bf16-2x8.yaml", "serve", "infra/rendered/maverick-bf16-2x8/serve.yaml", None),
    ("infra/clusters/maverick-bf16-2x8.yaml", "kuberay-service",
     "infra/rendered/maverick-bf16-2x8/kuberay-service.yaml", None),
    ("infra/clusters/maverick-bf16-2x8.yaml", "kuberay-job", "infra/rendered/maverick-bf16-2x8/kuberay-job.yaml",
     "/opt/herd/finetune/examples/support-gpu-zero3.yaml"),
    ("infra/clusters/scout-int4-1gpu.yaml", "ray-cluster", "infra/rendered/scout-int4-1gpu/ray-cluster.yaml", None),
]


def render_example(source: str, target: str, job: str | None) -> str:
    """What `herd render SOURCE --target TARGET` writes, run from the repository root."""
    from cluster.render import render
    from cluster.schema import load_cluster

    return render(load_cluster(REPO / source), target, source=source, job=job)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for source, target, out, job in EXAMPLES:
        text = render_example(source, target, job)
        path = REPO / out
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(out)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    if stale:
        print("out of date: " + ", ".join(stale) + "; run python -m cluster.render_examples", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
