"""The benchmark's measuring pieces and reports (no timing assertions)."""

import pytest
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


def test_contradictory_times_are_flagged():
    """A forward timed slower than forward + backward (a busy machine) is marked and named under
    the table; consistent rows are not."""
    ok = bench.Row("model", "s4d", "B=1", "auto", 1.0, 3.0)
    busy = bench.Row("model", "mamba", "B=1 L=256", "torch", 5.0, 3.0)
    fwd_only = bench.Row("op", "cauchy", "B=1", "auto", 5.0)
    assert [bench.implausible(r) for r in (ok, busy, fwd_only)] == [False, True, False]
    md = bench.markdown([ok, busy, fwd_only], "test machine", 1.0)
    assert md.count("(!)") == 2 and "mamba B=1 L=256 torch" in md and "quiet machine" in md
    assert "(!)" not in bench.markdown([ok], "test machine", 1.0)


def test_cli_registers_bench():
    from lrnnx.cli import SUBCOMMANDS

    assert "bench" in [c.name for c in SUBCOMMANDS]


def test_quick_help_matches_the_quick_scope():
    """--quick promises about a minute on a 2-core CPU; the scope behind that claim is these
    shapes (a run of `lrnnx bench --quick` measures it, no test times it)."""
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    quick_help = next(a.help for a in p._actions if a.dest == "quick")
    assert "about a minute" in quick_help and "a line per case" in quick_help
    assert bench.linear_scan_shapes(True) == [(1, 1024, 4096)]
    assert bench.selective_scan_shapes(True) == [(1, 256, 16, 512)]
    assert bench.model_shape(True) == (1, 256, 64, 16) and bench.lti_lengths(True) == (2048,)
    assert "B=1 L=256 H=64" in quick_help


def test_progress_line_per_case_as_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "linear_scan_shapes", lambda quick: [(1, 16, 8), (1, 32, 8)])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device, mbytes, preallocated=False: 1.0)
    argv = ["--quick", "--ops", "linear_scan", "--models", "--repeats", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("2 cases (--quick)") for line in lines)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2
    assert progress[0].startswith("[1/2] linear_scan B=1 L=16 C=8: ")
    assert progress[1].startswith("[2/2] linear_scan B=1 L=32 C=8: ")
    assert all(" ms" in line and "vs torch" in line for line in progress)
    assert (tmp_path / "bench.csv").exists()


def test_plot_has_a_title_shapes_and_a_colour_per_role(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.bench_models(["lru"], torch.device("cpu"), quick=True, repeats=1)
    ours, baseline = rows
    assert bench._ROLE_COLOURS[bench._role(ours)] != bench._ROLE_COLOURS[bench._role(baseline)]
    lti = bench.Row("model", "LRU mode=auto", "B=1 L=8 H=4 N=4", "auto->scan", 1.0, 2.0)
    fft = bench.Row("model", "LRU mode=fft", "B=1 L=8 H=4 N=4", "fft", 1.0, 2.0)
    assert bench._role(lti) == "lrnnx" and bench._role(fft) == "fft"

    import matplotlib.pyplot as plt

    saved = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        saved["title"] = ax.get_title(loc="left")
        saved["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        saved["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        saved["colours"] = {tuple(p.get_facecolor()) for p in ax.patches}
        return real_savefig(fig, path, *args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(plt.Figure, "savefig", spy):
        bench.write_reports(rows, "test machine", 1.0, tmp_path, title="lrnnx bench\ntest machine")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "lrnnx bench" in saved["title"] and "test machine" in saved["title"]
    assert all("B=1 L=256 H=64 N=16" in label for label in saved["labels"])
    assert len(saved["legend"]) == 2 and len(saved["colours"]) == 2


def test_packing_flag_prints_padded_and_packed_rows(tmp_path, capsys):
    """`lrnnx bench --packing` reaches lrnnx.bench_packing: one row per model, both layouts."""
    from lrnnx.cli import main

    md = tmp_path / "packing.md"
    argv = [
        "bench", "--packing", "--models", "s5", "--pack-seqs", "3", "--pack-mean-len", "8",
        "--pack-max-len", "16", "--pack-d-model", "8", "--repeats", "1", "--device", "cpu",
        "--markdown", str(md), "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Packed vs padded" in out and "packed/padded" in out
    assert "| s5 |" in md.read_text()


def test_threads_option_leaves_the_callers_thread_count(tmp_path):
    """`lrnnx bench --threads N` runs on N threads; a caller of main() keeps its own count
    afterwards (as after train and demo)."""
    from lrnnx.cli import main

    argv = [
        "bench", "--packing", "--models", "s5", "--pack-seqs", "2", "--pack-mean-len", "4",
        "--pack-max-len", "8", "--pack-d-model", "8", "--repeats", "1", "--device", "cpu",
        "--out", str(tmp_path), "--threads", "1",
    ]  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_small_flag_reaches_the_small_work_rows(tmp_path, capsys):
    """`lrnnx bench --small` reaches lrnnx.bench_small: default vs torch rows per model."""
    from lrnnx.cli import main

    md = tmp_path / "small.md"
    argv = [
        "bench", "--small", "--models", "lru", "--small-repeats", "2", "--device", "cpu",
        "--markdown", str(md), "--out", str(tmp_path), "--small-train",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "lru" in md.read_text() and "torch" in capsys.readouterr().out
    assert "| s4d | B=64 L=68 d_model=64 layers=2 |" in md.read_text()  # the training steps
