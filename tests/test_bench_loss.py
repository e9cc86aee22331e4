"""`tools/bench.py loss` and the shared record/table/plot harness (fastssl/bench/record.py)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from conftest import ROOT, assert_user_error, run_tool
from fastssl.bench import loss as bench_loss
from fastssl.bench.record import SCHEMA_FIELDS, VERSION_KEYS, BenchRecord, new_record
from fastssl.errors import UserError


def test_loss_bench_end_to_end(tmp_path):
    out, png = tmp_path / "loss.json", tmp_path / "loss.png"
    proc = run_tool("tools/bench.py", "loss", "--n", "4096", "--d", "32", "--impl", "naive,chunked",
                    "--repeats", "1", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "chunked" in proc.stdout and "peak" in proc.stdout
    record = BenchRecord.from_json(out.read_text())
    assert record.kind == "loss" and set(record.versions) == set(VERSION_KEYS)
    # The record says what the matmuls ran in (triton was not asked for, so no kernel precision).
    assert record.config["float32_matmul_precision"] == "highest"
    assert "triton_dot_precision" not in record.config
    rows = {(r["impl"], r["n"]): r for r in record.figures}
    assert set(rows) == {("naive", 4096), ("chunked", 4096)}
    assert all(r["skipped"] is None and r["time_s"] > 0 for r in rows.values())
    # The naive impl must hold at least one N x N fp32 matrix (4096^2 * 4 B = 64 MiB); the chunked impl at this
    # size holds a 4 MiB block and O(N*D) rows. So the measurement has to see naive above 64 MiB and chunked
    # well below it (half, leaving room for the allocator's and the process's own noise, seen up to ~14 MiB on
    # CI), or it is not measuring what it claims.
    assert rows["naive", 4096]["peak_mib"] >= 64
    assert rows["chunked", 4096]["peak_mib"] < 32
    # The same inputs through both impls: the same loss.
    assert rows["chunked", 4096]["loss_value"] == pytest.approx(rows["naive", 4096]["loss_value"], rel=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.json", "loss.png"]  # no temp files left behind


def test_a_triton_record_names_the_kernels_dot_precision(monkeypatch):
    # Where triton runs (a GPU), the record says which tl.dot precision the fp32 rows used; the measurement
    # itself is replaced here (no GPU), the record-building path is the one the GPU runs.
    from fastssl.losses import triton_infonce

    monkeypatch.setattr(triton_infonce, "unavailable_reason", lambda device, d: None)
    monkeypatch.setattr(bench_loss, "_measure", lambda point, timeout: dict(time_s=1e-3, peak_mib=1.0,
                                                                            loss_value=1.0, skipped=None))
    args = SimpleNamespace(device="cpu", loss="nt_xent", dtype="fp32", temperature=0.1, repeats=1,
                           max_seconds=60.0, n="1024", d="128", impl="naive,triton")
    record = bench_loss.run(args)
    assert record.config["float32_matmul_precision"] == "highest"
    assert record.config["triton_dot_precision"] == "tf32x3"  # 3xTF32 under torch's "highest"
    assert {r["impl"] for r in record.figures if r["skipped"] is None} == {"naive", "triton"}


def test_the_sweep_covers_every_n_d_and_impl_and_plots_log_log(monkeypatch):
    # The grid and the plot's axes; the measurement itself (a child process per point) is replaced by a closed
    # form, so each row can be checked to carry its own point's figures.
    monkeypatch.setattr(bench_loss, "_measure", lambda p, timeout: dict(
        time_s=p["n"] * 1e-6, peak_mib=p["n"] * p["d"] * 1e-5 / (1 if p["impl"] == "naive" else 16),
        loss_value=1.0, skipped=None))
    args = SimpleNamespace(device="cpu", loss="nt_xent", dtype="fp32", temperature=0.1, repeats=1,
                           max_seconds=60.0, n="1024,4096", d="64,128", impl="naive,chunked")
    record = bench_loss.run(args)
    rows = {(r["impl"], r["n"], r["d"]): r for r in record.figures}
    assert set(rows) == {(i, n, d) for i in ("naive", "chunked") for n in (1024, 4096) for d in (64, 128)}
    for (impl, n, d), r in rows.items():
        assert r["peak_mib"] == n * d * 1e-5 / (1 if impl == "naive" else 16) and r["time_s"] == n * 1e-6
        assert r["memory_saving"] == pytest.approx(1 if impl == "naive" else 16)
    panels = []
    monkeypatch.setattr(bench_loss, "save_plot", lambda path, p, suptitle="": panels.extend(p))
    bench_loss.plot(record, "unused.png")
    assert [(p.logx, p.logy) for p in panels] == [(True, True), (True, True)]  # log-log, memory and time
    memory = panels[0].series
    assert set(memory) == {f"{i} D={d}" for i in ("naive", "chunked") for d in (64, 128)}
    assert memory["chunked D=128"] == ([1024, 4096], [1024 * 128 * 1e-5 / 16, 4096 * 128 * 1e-5 / 16])


def _cfg(**kw):
    return dict(dict(repeats=2, max_seconds=60.0), **kw)


def test_skip_reasons_extrapolate_time_and_memory():
    prev = {"n": 1000, "time_s": 1.0, "peak_mib": 100.0}
    # Time: quadratic in N, times (repeats + 1) runs: 1 s * 4^2 * 3 = 48 s fits 60 s; 8^2 * 3 = 192 s does not.
    assert bench_loss._skip_reason("chunked", 4000, prev, _cfg(), free_bytes=1e12) is None
    assert "~192 s > 60 s" in bench_loss._skip_reason("chunked", 8000, prev, _cfg(), free_bytes=1e12)
    # Memory: naive quadratic (100 MiB * 4^2 = 1600 MiB), fused linear (400 MiB); 80% of 1 GiB free is 819 MiB.
    assert "GiB >" in bench_loss._skip_reason("naive", 4000, prev, _cfg(), free_bytes=2**30)
    assert bench_loss._skip_reason("chunked", 4000, prev, _cfg(), free_bytes=2**30) is None
    # Nothing measured yet: naive is assumed to need 16 N^2 bytes (256k -> 1 TiB).
    assert "GiB >" in bench_loss._skip_reason("naive", 262144, None, _cfg(), free_bytes=2**36)
    assert bench_loss._skip_reason("chunked", 262144, None, _cfg(), free_bytes=2**36) is None


@pytest.mark.parametrize("args, fragment", [
    (["--n", "1024,abc"], "--n '1024,abc'"),
    (["--n", "1023"], "even N"),
    (["--impl", "naive,fast"], "unknown fast"),
    (["--impl", "triton"], "triton"),
    (["--loss", "byol"], "--loss 'byol'"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_options_are_one_line_errors(args, fragment, capsys, monkeypatch):
    # In process (a torch start-up per case would cost more than the test); the CLI path is the same
    # main() that test_help_lists_the_subcommands and the end-to-end test run as a subprocess.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _bench_tool().main(["loss", *args]) == 2
    assert_user_error(SimpleNamespace(returncode=2, stderr=capsys.readouterr().err), fragment)


def _bench_tool():
    spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_subcommands():
    proc = run_tool("tools/bench.py", "--help")
    assert proc.returncode == 0 and "loss" in proc.stdout


def test_record_round_trips_and_rejects_other_schemas(tmp_path):
    record = new_record("loss", {"n": [1]}, [{"impl": "naive", "time_s": 0.5}], "cpu: test")
    assert tuple(json.loads(record.to_json())) == SCHEMA_FIELDS
    assert BenchRecord.from_json(record.to_json()) == record
    bad = json.loads(record.to_json())
    del bad["figures"]
    with pytest.raises(UserError, match="figures"):
        BenchRecord.from_json(json.dumps(bad))


def test_ratios_compare_each_impl_with_naive_at_the_same_point():
    rows = [dict(impl="naive", n=8, d=4, peak_mib=100.0, time_s=2.0, skipped=None),
            dict(impl="chunked", n=8, d=4, peak_mib=5.0, time_s=1.0, skipped=None),
            dict(impl="chunked", n=16, d=4, peak_mib=9.0, time_s=3.0, skipped=None)]  # no naive at n=16
    bench_loss._add_ratios(rows)
    assert rows[1]["memory_saving"] == 20.0 and rows[1]["time_vs_naive"] == 0.5
    assert rows[2]["memory_saving"] is None and rows[2]["time_vs_naive"] is None
    bench_loss.show(SimpleNamespace(config=dict(loss="nt_xent", dtype="fp32", memory_method="m"), device="cpu",
                                    figures=rows))
