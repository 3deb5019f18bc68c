"""The benchmark harness keeps working: `softpo bench --tiny --device cpu` writes a complete record.

No timing is asserted (a benchmark is not a test); only that the record holds what a reader needs and
that every provider appears, measured or skipped with a reason.
"""

import json
import math

import pytest

from softpo import bench
from softpo.bench import cases, harness, providers, report

RESULT_KEYS = {
    "time_median_s", "time_q25_s", "time_q75_s", "time_min_s", "time_max_s", "n_samples", "first_call_s",
    "peak_mem_bytes", "grad_bytes", "input_bytes", "ceiling", "ceiling_fraction",
}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # In process: one worker process per result is exercised by test_isolated_worker.
    code = bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--no-isolate",
                       "--target-seconds", "0.05", "--min-samples", "2"])
    assert code == 0
    (path,) = out.glob("cpu-*.json")
    return json.loads(path.read_text()), out


def test_record_header(record):
    doc, out = record
    assert doc["device"]["type"] == "cpu" and doc["device"]["name"]
    for package in ("torch", "triton", "liger_kernel", "trl", "softpo"):
        assert doc["versions"][package], package
    assert doc["date"][:4].isdigit() and doc["set"] == "tiny" and doc["complete"] is True
    assert doc["ceilings"]["matmul_flops_per_s"] > 1e8
    assert doc["ceilings"]["copy_bytes_per_s"] > 1e7
    assert (out / (doc["device"]["type"] + "-" + doc["date"][:10] + "-tiny.md")).read_text().startswith("# softpo")


def test_every_provider_recorded(record):
    doc, _ = record
    seen = {(r["case"], r["provider"]) for r in doc["results"]}
    assert seen == {(c["id"], p) for c in doc["cases"] for p in doc["providers"]}
    for r in doc["results"]:
        assert r["status"] in ("ok", "skipped", "error"), r
        if r["status"] != "ok":
            assert r["reason"], r


def test_measured_values_plausible(record):
    doc, _ = record
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"softpo-torch", "torch-eager"}
    for r in ok:
        assert RESULT_KEYS <= r.keys(), r
        assert 0 < r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"] < 60
        assert r["n_samples"] >= 2
        assert 0 < r["ceiling_fraction"] < 10 and math.isfinite(r["ceiling_fraction"])
        assert r["ceiling"] == ("matmul" if r["case"].startswith("hidden") else "copy")
    for r in ok:
        if "-fwdbwd-" in r["case"]:
            assert r["grad_bytes"] > 0, r


def test_cuda_only_providers_skipped_with_reason(record):
    doc, _ = record
    by = {(r["case"], r["provider"]): r for r in doc["results"]}
    for case in doc["cases"]:
        triton = by[(case["id"], "softpo-triton")]
        assert triton["status"] == "skipped" and "CUDA" in triton["reason"]
    logits = next(c["id"] for c in doc["cases"] if c["path"] == "logits")
    assert by[(logits, "liger-triton")]["status"] == "skipped" and "CUDA" in by[(logits, "liger-triton")]["reason"]


def test_resumed_piece_keeps_the_cases_of_earlier_pieces(tmp_path):
    common = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-isolate", "--no-plots",
              "--target-seconds", "0.01", "--min-samples", "1", "--providers", "softpo-torch,torch-eager"]
    assert bench.main([*common, "--only", "^hidden-fwdbwd"]) == 0
    (path,) = tmp_path.glob("cpu-*-tiny.json")
    assert len(json.loads(path.read_text())["cases"]) == 1
    assert bench.main([*common, "--resume", "--only", "^logits", "--providers", "torch-eager"]) == 0
    doc = json.loads(path.read_text())
    assert [c["id"].split("-")[0] for c in doc["cases"]] == ["hidden", "logits"]
    assert set(doc["providers"]) == {"softpo-torch", "torch-eager"}
    recorded = {(r["case"].split("-")[0], r["provider"]) for r in doc["results"]}
    assert recorded == {("hidden", "softpo-torch"), ("hidden", "torch-eager"), ("logits", "torch-eager")}
    # softpo-torch never ran the logits case: the record says it is not complete.
    assert doc["complete"] is False
    assert "## logits" in path.with_suffix(".md").read_text()


def test_failing_provider_recorded_as_error():
    class Broken(cases.Provider):
        name = "broken"

        def build(self, case, inputs):
            raise RuntimeError("cannot run this case")

    case = cases.case_set("tiny")[0]
    result = harness.measure_safely(case, Broken(), "cpu", target_s=0.01, min_samples=1, max_samples=1)
    assert result["status"] == "error" and "cannot run this case" in result["reason"]


def test_isolated_worker():
    case = cases.case_set("tiny")[1]
    spec = {"case": case.to_dict(), "provider": "torch-eager",
            "device": "cpu", "measure": {"target_s": 0.01, "min_samples": 2, "max_samples": 2}}
    result = harness.run_isolated(spec, timeout_s=120)
    assert result["status"] == "ok", result
    # The logits' gradient alone is N x V fp32; the call's peak above the inputs cannot be below it.
    assert result["peak_mem_bytes"] >= case.N * case.V * 4


def test_plot_and_table_from_a_sweep(tmp_path):
    sweep = [cases.Case("hidden", "fwdbwd", "sapo", False, B, 8, 100, H=16, dtype="fp32") for B in (2, 4)]
    results = [
        {"case": c.id, "provider": p, "status": "ok", "reason": None, "time_median_s": 1e-3 * c.B,
         "time_q25_s": 1e-3, "time_q75_s": 2e-3, "peak_mem_bytes": 2**20 * c.B, "ceiling_fraction": 0.1}
        for c in sweep for p in ("softpo-torch", "torch-eager")
    ]
    doc = {
        "device": {"type": "cpu", "name": "test cpu"}, "versions": {"torch": "x"}, "date": "2026-01-01T00:00:00",
        "set": "test", "complete": True, "command": "softpo bench", "memory_method": "m",
        "ceilings": {"matmul_flops_per_s": 1e9, "matmul": {"dtype": "float32", "shape": [8, 8, 8]},
                     "copy_bytes_per_s": 1e9},
        "timing": {"method": "perf_counter"},
        "providers": {"softpo-torch": {"recomputes_logits": True}, "torch-eager": {}},
        "cases": [c.to_dict() for c in sweep], "results": results,
    }
    (png,) = report.plot(doc, tmp_path, "t")
    assert png.stat().st_size > 1000
    table = report.markdown(doc)
    assert sweep[0].id in table and "| softpo-torch* |" in table


@pytest.mark.parametrize("path", ["hidden", "logits"])
@pytest.mark.parametrize("objective", ["sapo", "grpo", "gspo", "spo"])
@pytest.mark.parametrize("entropy", [False, True], ids=["ent-off", "ent-on"])
def test_providers_compute_the_same_gradients(path, objective, entropy):
    """The suite compares like with like: every provider that runs a case on CPU produces the gradients
    of torch eager (materialized logits + softpo.objectives) on the same inputs."""
    import torch

    case = cases.Case(path, "fwdbwd", objective, entropy, 2, 16, 50, H=8 if path == "hidden" else 0,
                          dtype="fp32")
    grads = {}
    for name, provider in providers.PROVIDERS.items():
        # The compiled providers cost a compile per case here; tests/test_compile.py covers softpo's.
        if name in ("torch-compile", "softpo-compile") or provider.skip_reason(case, "cpu"):
            continue
        inputs = cases.make_inputs(case, "cpu")
        provider.build(case, inputs)()
        grads[name] = [leaf.grad for leaf in inputs["leaves"]]
    ref = grads.pop("torch-eager")
    assert "softpo-torch" in grads
    for name, got in grads.items():
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_vocab_parallel_record(tmp_path):
    """`softpo bench --vocab-parallel 2` on a tiny shape: one record with the single run and every rank."""
    code = bench.main(["--vocab-parallel", "2", "--vp-shape", "16,8,97", "--vp-samples", "2", "--out", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("cpu-*-vocab-parallel-P2.json")
    doc = json.loads(path.read_text())
    assert doc["case"]["V"] == 97 and doc["case"]["processes"] == 2 and doc["versions"]["torch"]
    assert [r["vocab_rows"] for r in doc["ranks"]] == [[0, 49], [49, 97]] and doc["single"]["vocab_rows"] == [0, 97]
    for run in [doc["single"], *doc["ranks"]]:
        assert run["time_median_s"] > 0 and run["n_samples"] == 2
        # d hidden (16 x 8) and this rank's d weight rows, fp32.
        assert run["grad_bytes"] == 4 * 8 * (16 + run["vocab_rows"][1] - run["vocab_rows"][0])
    assert path.with_suffix(".md").read_text().startswith("# softpo vocab-parallel sweep")
    assert bench.main(["--vocab-parallel", "2", "--vp-shape", "16,8", "--out", str(tmp_path)]) == 2


def test_profile_step_writes_a_kernel_breakdown(tmp_path):
    """`python -m softpo.bench.profile_step` (where a hidden SAPO step's time goes) on a CPU-sized case: a
    record whose parts add up."""
    from softpo.bench import profile_step

    assert profile_step.main(["--device", "cpu", "--out", str(tmp_path), "--N", "128", "--T", "64", "--H", "32",
                              "--V", "500", "--dtype", "fp32", "--steps", "2"]) == 0
    (record,) = tmp_path.glob("cpu-*-profile-hidden-fwdbwd-sapo-N128-*.json")
    doc = json.loads(record.read_text())
    assert doc["case"]["N"] == 128 and doc["versions"]["torch"]
    assert doc["ms_per_step_by_kind"]["matmul"] > 0  # the projection and its two gradient matmuls
    assert math.isclose(sum(doc["ms_per_step_by_kind"].values()), doc["device_busy_ms_per_step"], rel_tol=1e-9)
    assert doc["top_kernels"] and all(k["kind"] in dict(profile_step.KINDS) or k["kind"] == "other"
                                      for k in doc["top_kernels"])
    assert profile_step.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profile_step.kind_of("_logits_fwd_kernel") == "sweep"


def test_unavailable_providers_reported_once_with_the_install_command(tmp_path, capsys, monkeypatch):
    """A peer that is not installed is named once, at the start, with the command that installs it, and
    recorded as skipped for every case; no line per (case, provider) says so."""
    from softpo.bench import cases as cases_module

    real = cases_module.missing_module
    monkeypatch.setattr(cases_module, "missing_module", lambda module: module == "trl" or real(module))
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-plots",
                       "--target-seconds", "0.01", "--min-samples", "1"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "not installed" in line]
    assert line.count("trl") == 2 and providers.install_command() in line
    (cuda_line,) = [line for line in out.splitlines() if "need CUDA" in line]
    assert "softpo-triton" in cuda_line and "liger-triton" in cuda_line
    assert not [line for line in out.splitlines() if line.strip().startswith("skipped")]
    (path,) = tmp_path.glob("cpu-*-tiny.json")
    doc = json.loads(path.read_text())
    trl = [r for r in doc["results"] if r["provider"] == "trl"]
    assert len(trl) == len(doc["cases"]) and all(r["status"] == "skipped" and "not installed" in r["reason"]
                                                  for r in trl)


def test_install_command_names_the_bench_extra(tmp_path, monkeypatch):
    import softpo

    monkeypatch.chdir(tmp_path)
    root = __import__("pathlib").Path(softpo.__file__).resolve().parents[1]
    expected = f'pip install -e "{root}[bench]"' if (root / "setup.py").is_file() else 'pip install "softpo[bench]"'
    assert providers.install_command() == expected


def test_tiny_runs_as_a_command(tmp_path):
    """`python -m softpo.bench --tiny --device cpu` from outside the checkout: a record, exit status 0."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "softpo.bench", "--tiny", "--device", "cpu", "--out", "results",
                           "--no-plots"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "results").glob("cpu-*-tiny.json")
    assert json.loads(path.read_text())["complete"] is True


def test_package_imports_without_loading_by_file_path():
    """The harness is a plain package: every module imports by name, none loads code from a file path,
    and no module of it imports the package's own command line back (no cycle)."""
    import ast
    import pathlib

    package = pathlib.Path(bench.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not names & {"spec_from_file_location", "exec_module"}, path.name
        assert "sys.path" not in path.read_text(), path.name
        if path.name not in ("__init__.py", "__main__.py"):
            imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
            assert "command" not in imports or path.name == "command.py", path.name
    for name in ("cases", "peers", "providers", "harness", "report", "vocab_parallel", "profile_step", "command"):
        __import__(f"softpo.bench.{name}")
    assert callable(bench.main)
