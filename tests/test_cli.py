"""The `lrnnx` command: every task trains end to end, files are written atomically, checkpoints
reload to the same model, Ctrl-C keeps the last checkpoint and resuming matches an uninterrupted
run, bad arguments fail with one line listing the valid choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrnnx.train as train_mod
from lrnnx.cli import main
from lrnnx.models.registry import MODEL_REGISTRY, available_models, build_mixer
from lrnnx.tasks import TASKS, make_task
from lrnnx.tasks.offline import mnist1d_available
from lrnnx.train import CHECKPOINT_NAME, METRICS_NAME, evaluate, load_checkpoint

TINY = ["--layers", "1", "--d-model", "16", "--d-state", "8", "--batch-size", "8"]
SIZES = ["--n-train", "64", "--n-test", "32"]

RUNS = {
    "selective-copy": ("mamba", ["--seq-len", "16", "--task-option", "n_memorize=4"]),
    "induction-heads": ("s4d", ["--seq-len", "16"]),
    "assoc-recall": ("lru", ["--seq-len", "9", "--task-option", "n_keys=8"]),
    "mnist1d": ("s5", []),
    "irregular-sine": ("event-s5", ["--seq-len", "16"]),
}


@pytest.fixture
def portable_scan(monkeypatch):
    """Pin the scans to the plain torch backend: these tests are about the command, and a fused
    CPU backend's first-call JIT compilation would dominate their run time."""
    monkeypatch.setenv("LRNNX_BACKEND", "torch")


def _needs(model: str) -> None:
    if model not in available_models(include_attention=True):
        pytest.skip(f"model {model} is not importable")


def _train_args(task: str, out: Path, steps: int = 4, extra=()) -> list[str]:
    model, task_args = RUNS[task]
    return [
        "train", "--task", task, "--model", model, "--steps", str(steps), "--out", str(out),
        *TINY, *SIZES, *task_args, *extra,
    ]  # fmt: skip


def test_every_task_is_listed():
    assert set(RUNS) == set(TASKS)


@pytest.mark.parametrize("task", list(RUNS))
def test_train_every_task_and_reload(task, tmp_path, capsys, portable_scan):
    if task == "mnist1d" and not mnist1d_available():
        pytest.skip("pip install mnist1d")
    _needs(RUNS[task][0])
    out = tmp_path / "run"
    assert main(_train_args(task, out, extra=["--log-every", "2", "--eval-every", "2"])) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "acc" in printed and "tok/s" in printed

    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["task"] == task and metrics["model"] == RUNS[task][0]
    assert metrics["steps_completed"] == 4 and not metrics["interrupted"]
    assert [h["step"] for h in metrics["history"]["train"]] == [2, 4]
    assert [h["step"] for h in metrics["history"]["eval"]] == [2, 4]
    assert all(h["tokens_per_s"] > 0 for h in metrics["history"]["train"])
    final = metrics["final"]
    assert 0.0 <= final["test_acc"] <= 1.0 and final["test_loss"] > 0
    n_params = metrics["n_params"]

    # the checkpoint rebuilds the same network: same size, same held-out loss and accuracy
    model, state = load_checkpoint(out)
    assert state["step"] == 4 and sum(p.numel() for p in model.parameters()) == n_params
    cfg = state["config"]
    data = make_task(
        task, cfg["n_train"], cfg["n_test"], cfg["seq_len"], cfg["seed"], **cfg["task_options"]
    )
    ev = evaluate(model, data.test, data.kind, torch.device("cpu"))
    assert ev["acc"] == pytest.approx(final["test_acc"], abs=1e-12)
    assert ev["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    if _has_matplotlib():
        assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_training_reduces_the_loss(tmp_path):
    out = tmp_path / "run"
    args = _train_args("assoc-recall", out, steps=60, extra=["--log-every", "10", "--no-plot"])
    assert main(args + ["--lr", "1e-2"]) == 0
    train = json.loads((out / METRICS_NAME).read_text())["history"]["train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # nats


def test_console_script_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("lrnnx")
    if not exe.exists():
        pytest.skip("the lrnnx console script is not installed in this environment")
    out = tmp_path / "run"
    args = _train_args("assoc-recall", out, steps=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout  # plain progress lines when stdout is not a TTY
    assert (out / CHECKPOINT_NAME).exists() and (out / METRICS_NAME).exists()
    bad = subprocess.run(
        [str(exe), "train", "--task", "assoc-recall", "--model", "nope"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "s5" in bad.stderr and "mamba" in bad.stderr


def test_models_table(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(MODEL_REGISTRY)
    available = set(available_models(include_attention=True))
    for name, row in rows.items():
        spec = MODEL_REGISTRY[name]
        assert row["family"] == spec.family and row["arxiv"] == spec.arxiv
        assert row["timesteps"] == spec.supports_timesteps
        assert row["available"] == (name in available)
        if name in available:
            mixer = build_mixer(name, 64, 64)
            assert row["params"] == sum(p.numel() for p in mixer.parameters())
        else:
            assert row["params"] is None
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in MODEL_REGISTRY) and "LTI" in text and "LTV" in text


def test_tasks_listing(capsys):
    assert main(["tasks"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in TASKS) and "n_memorize" in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--task", "copy", "--model", "s5"], list(TASKS)),
        (["train", "--task", "assoc-recall", "--model", "nope"], ["s5", "lru", "mamba", "s6"]),
        (["train", "--task", "assoc-recall", "--model", "s5", "--d-model", "0"], ["positive"]),
        (["train", "--task", "assoc-recall", "--model", "s5", "--steps", "-3"], ["positive"]),
        (["train", "--task", "assoc-recall", "--model", "s5", "--task-option", "x"], ["KEY=VALUE"]),
        (["frobnicate"], ["models", "train", "demo"]),
    ],
)
def test_bad_arguments_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in err and all(x in err for x in expected), err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--task", "assoc-recall", "--model", "lru", "--seq-len", "32"], ["odd"]),
        (["--task", "irregular-sine", "--model", "s5"], ["integration_timesteps", "event-s5"]),
        (
            ["--task", "selective-copy", "--model", "s5", "--task-option", "n_memorise=3"],
            ["n_memorize", "n_tokens"],
        ),
        (["--task", "selective-copy", "--model", "s5", "--seq-len", "4"], ["seq_len"]),
    ],
)
def test_impossible_configurations_exit_2_with_one_line(extra, expected, tmp_path, capsys):
    rc = main(["train", *extra, "--steps", "1", "--out", str(tmp_path / "x"), *SIZES])
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and all(x in lines[0] for x in expected), captured.err
    assert not (tmp_path / "x").exists()


def _interrupt_at(monkeypatch, at_step: int) -> None:
    real = train_mod.batch_indices

    def fake(n, batch_size, seed, rank, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real(n, batch_size, seed, rank, step)

    monkeypatch.setattr(train_mod, "batch_indices", fake)


def test_interrupt_keeps_last_checkpoint_and_resume_matches(tmp_path, monkeypatch, capsys):
    extra = ["--eval-every", "4", "--no-plot"]
    out = tmp_path / "interrupted"
    _interrupt_at(monkeypatch, 5)  # steps 0-4 done, checkpoint written after step 4
    assert main(_train_args("assoc-recall", out, steps=8, extra=extra)) == 130
    assert "interrupted at step 5" in capsys.readouterr().out
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["interrupted"] and metrics["steps_completed"] == 5
    _, state = load_checkpoint(out)
    assert state["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME, METRICS_NAME]
    monkeypatch.undo()

    assert main(_train_args("assoc-recall", out, steps=8, extra=[*extra, "--resume"])) == 0
    assert "resumed" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main(_train_args("assoc-recall", straight, steps=8, extra=extra)) == 0
    resumed, s1 = load_checkpoint(out)
    direct, s2 = load_checkpoint(straight)
    assert s1["step"] == s2["step"] == 8
    for (name, a), (_, b) in zip(
        resumed.state_dict().items(), direct.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_max_time_stops_after_a_final_evaluation(tmp_path):
    out = tmp_path / "run"
    assert main(_train_args("assoc-recall", out, steps=500, extra=["--max-time", "1e-6"])) == 0
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["stopped_early"] and metrics["steps_completed"] == 1
    assert [e["step"] for e in metrics["history"]["eval"]] == [1]
    assert load_checkpoint(out)[1]["step"] == 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    train_mod.save_checkpoint(path, {"format": "x", "v": torch.arange(3)})
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.save_checkpoint(path, {"format": "x", "v": torch.arange(5)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left


def test_without_matplotlib_the_plot_is_skipped_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    assert main(_train_args("assoc-recall", out, steps=2)) == 0
    printed = capsys.readouterr().out
    notice = [line for line in printed.splitlines() if "matplotlib is not installed" in line]
    assert len(notice) == 1 and "pip install matplotlib" in notice[0]
    assert not (out / "learning_curve.png").exists() and (out / METRICS_NAME).exists()


def test_demo_smoke(tmp_path, capsys, portable_scan):
    for model in ("mamba", "lru"):
        _needs(model)
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--seq-len", "20", "--models", "mamba,lru", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["results"]] == ["mamba", "lru"]
    assert [r["family"] for r in results["results"]] == ["LTV", "LTI"]
    assert all(0 <= r["test_acc"] <= 1 and r["steps"] == 2 for r in results["results"])
    # a budget this machine cannot meet scales the steps down, the same for every model
    assert main([*argv, "--steps", "50", "--time-budget", "0.01", "--models", "lru,s5"]) == 0
    assert "training 1 step each" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in results["results"]] == [1, 1]
    assert main(["demo", "--models", "s5,nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
