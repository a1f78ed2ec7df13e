"""The benchmark's measuring pieces and reports (no timing assertions)."""

import torch

from lrnnx import bench


def test_peak_memory_sees_a_large_allocation():
    with bench.peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert mem["mb"] is not None and mem["mb"] > 32


def test_model_rows_and_reports(tmp_path):
    rows = bench.bench_models(["lru"], torch.device("cpu"), quick=True, repeats=1)
    assert [r.backend for r in rows] == ["auto", "torch"]
    assert all(r.fwd_ms > 0 and r.fwdbwd_ms > 0 and r.step_us > 0 for r in rows)
    assert "torch" in rows[0].speedup
    md = bench.write_reports(rows, "test machine", 1.0, tmp_path)
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1
    assert md.count("| lru |") == 2


def test_cli_registers_bench():
    from lrnnx.cli import SUBCOMMANDS

    assert "bench" in [c.name for c in SUBCOMMANDS]
