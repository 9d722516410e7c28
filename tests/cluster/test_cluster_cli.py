"""`herd plan` and `herd render` as users run them: output, exit codes 0/1/2, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.placement import PlacementMap
from herd.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_plan_fits_exit_0_with_per_gpu_figures(capsys):
    rc = main(["plan", str(REPO / "infra/clusters/maverick-bf16-2x8.yaml"), "--throughput", "5000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "  non-expert share          3.54 GB" in out
    assert "  routed-expert slice      48.32 GB" in out
    # the released vision tower (0.87B params, bf16) split over 8 GPUs; 8 images of 16 + 1 tiles x 144 tokens
    assert "  vision tower share        0.22 GB  (871.9M params; images: up to 2,467 prompt tokens each, 19,736 " \
           "per request)" in out
    assert "KV-cache budget" in out and "headroom" in out
    assert "  node 1 gpu 7: experts 120-127" in out
    assert "per million tokens (estimate: assumes a sustained 5000" in out
    assert out.rstrip().endswith("FITS")


def test_plan_does_not_fit_exit_1_with_reasons_and_fixes(cluster_doc, write_cluster, capsys):
    rc = main(["plan", str(write_cluster(cluster_doc(preset="maverick", dtype="bf16")))])
    out = capsys.readouterr().out
    assert rc == 1
    tail = out[out.index("DOES NOT FIT"):].splitlines()
    assert tail[1].startswith("  because weights need 100.4 GB per GPU (3.5 non-expert + 96.6 routed experts + 0.2 "
                              "vision)")
    assert "  fix: add nodes: set serving.nodes_per_replica to 2 (and node_groups[0].count to at least 2)" in tail


def test_plan_invalid_file_exit_2_one_line(cluster_doc, write_cluster, capsys):
    doc = cluster_doc()
    doc["node_groups"][0]["gpus_per_nod"] = 8
    path = write_cluster(doc)
    rc = main(["plan", str(path)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    line = path.read_text().splitlines().index("  gpus_per_nod: 8") + 1
    assert captured.err == (f"herd: error: {path}:{line}: node_groups[0].gpus_per_nod: unknown key (did you mean "
                            "'gpus_per_node'?); valid keys in node_groups[0]: name, gpu, gpu_memory_gib, gpus_per_node,"
                            " count, cpus, ram_gib, price_per_hour, instance_type, disk_gib\n")


def test_plan_json_and_placement_out(tmp_path, capsys):
    out_file = tmp_path / "placement.json"
    rc = main(["plan", str(REPO / "infra/clusters/local.yaml"), "--json", "--placement-out", str(out_file)])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["fits"] is True
    assert d["layout"]["expert_parallel_size"] == 2 and d["layout"]["gpus_per_node"] == 0
    pm = PlacementMap.load(out_file)
    assert pm.experts_on(1, 3) == list(range(64, 128))
    assert d["placement"]["workers"][1]["experts"] == list(range(64, 128))


def test_render_writes_a_valid_file_and_refuses_fp8(tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    assert main(["render", str(REPO / "infra/clusters/local.yaml"), "--target", "serve", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["expert_parallel_size"] == 2
    src = REPO / "infra/clusters/maverick-fp8-1x8.yaml"
    assert main(["render", str(src), "--target", "serve", "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"herd: error: {src}: model.weight_dtype fp8: herd plans fp8 but cannot serve it yet")
    assert not (tmp_path / "x.yaml").exists()
    assert main(["render", str(src), "--target", "srve", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "--target: unknown target 'srve' (did you mean 'serve'?)" in capsys.readouterr().err
    # Issue 16 item 17: a cloud Serve config listens on 0.0.0.0; without an API keys file herd says so, loudly.
    keyless = tmp_path / "keyless.yaml"
    doc = yaml.safe_load((REPO / "infra/clusters/maverick-bf16-2x8.yaml").read_text())
    doc["serving"].pop("api_keys_file", None)
    keyless.write_text(yaml.safe_dump(doc))
    assert main(["render", str(keyless), "--target", "serve", "-o", str(tmp_path / "k.yaml")]) == 0
    err = capsys.readouterr().err
    assert "herd: WARNING:" in err and "serves on 0.0.0.0 with no API keys" in err
    assert main(["render", str(REPO / "infra/clusters/maverick-bf16-2x8.yaml"), "--target", "serve", "-o",
                 str(tmp_path / "with-keys.yaml")]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_herd_subprocess_entry_point(cluster_doc, write_cluster):
    """The real entry point: no traceback for a user mistake, exit code 2."""
    doc = cluster_doc(expert_parallel_size=16)
    proc = subprocess.run([sys.executable, "-m", "herd", "plan", str(write_cluster(doc))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "serving.expert_parallel_size: 16 does not match the replica's GPUs" in proc.stderr


def test_herd_subprocess_exit_1_when_it_does_not_fit(cluster_doc, write_cluster):
    proc = subprocess.run([sys.executable, "-m", "herd", "plan", str(write_cluster(cluster_doc(dtype="bf16")))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and proc.stderr == ""


def test_missing_arguments_are_one_line_errors(capsys):
    assert main(["render", "x.yaml", "-o", "out.yaml"]) == 2
    assert capsys.readouterr().err == ("herd: error: missing target: add --target ray-cluster, kuberay-service, "
                                       "kuberay-job or serve\n")
    assert main(["render", "x.yaml", "--target", "serve"]) == 2
    assert capsys.readouterr().err == "herd: error: missing out: add -o FILE\n"
    assert main(["plan"]) == 2
    assert capsys.readouterr().err == ("herd: error: missing cluster file: give the cluster YAML, e.g. "
                                       "infra/clusters/local.yaml\n")
    assert main(["plan", str(REPO / "infra/clusters/local.yaml"), "--throughput", "0"]) == 2
    assert capsys.readouterr().err.startswith("herd: error: --throughput: 0 tokens/s; give the expected tokens")
