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
from lrnnx.train import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CURVE_NAME,
    LAST_NAME,
    METRICS_NAME,
    evaluate,
    load_checkpoint,
    load_pretrained,
)

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


@pytest.mark.slow  # the installed command in a fresh process: make test-slow
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


def test_models_table(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LRNNX_CACHE_DIR", str(tmp_path))  # not the user's cache
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


@pytest.fixture
def pretend_threads(monkeypatch):
    """``pretend_threads(n)``: torch.get_num_threads() answers n for the test, and torch's real
    count is restored afterwards.  main() gives its caller back the count it read, here the
    pretended one, and torch.set_num_threads kept it for the rest of the process (a test with
    n = 1 left every later test in the process on one thread)."""
    real = torch.get_num_threads()
    yield lambda n: monkeypatch.setattr(torch, "get_num_threads", lambda: n)
    torch.set_num_threads(real)  # (monkeypatch, set up first, undoes its patch after this)


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
@pytest.mark.parametrize("threads", [1, 2])
def test_impossible_configurations_exit_2_with_one_line(
    extra, expected, threads, tmp_path, capsys, pretend_threads
):
    """Refused before --out is created, whatever the thread count: with more than one thread
    train first chooses the count by timing steps, and that path created --out before checking
    the model against the task (the test passed only after a test that left one thread)."""
    pretend_threads(threads)
    rc = main(["train", *extra, "--steps", "1", "--out", str(tmp_path / "x"), *SIZES])
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and all(x in lines[0] for x in expected), captured.err
    assert not (tmp_path / "x").exists()


#: the interrupt tests' runs take one thread: without --threads, train first times a few steps
#: (through the same batch_indices) to choose the count, and the interrupt could fall there
ONE_THREAD = ["--threads", "1"]


def _interrupt_at(monkeypatch, at_step: int) -> None:
    real = train_mod.batch_indices

    def fake(n, batch_size, seed, rank, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real(n, batch_size, seed, rank, step)

    monkeypatch.setattr(train_mod, "batch_indices", fake)


def test_interrupt_keeps_last_checkpoint_and_resume_matches(tmp_path, monkeypatch, capsys):
    extra = ["--eval-every", "4", "--no-plot", *ONE_THREAD]
    out = tmp_path / "interrupted"
    _interrupt_at(monkeypatch, 5)  # steps 0-4 done, checkpoint written after step 4
    assert main(_train_args("assoc-recall", out, steps=8, extra=extra)) == 130
    assert "interrupted at step 5" in capsys.readouterr().out
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["interrupted"] and metrics["steps_completed"] == 5
    _, state = load_checkpoint(out)
    assert state["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [BEST_NAME, CHECKPOINT_NAME, LAST_NAME, METRICS_NAME]
    )
    assert metrics["last"] == {"step": 5, "dir": LAST_NAME}  # the weights reached, not step 4's
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


@pytest.mark.slow  # the demo end to end: make test-slow
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
    # the LTI model is widened to the selective model's parameter count (within one width step)
    assert "Parameter counts matched to mamba's" in printed
    mamba, lru = results["results"]
    assert mamba["d_model"] == 64 and lru["d_model"] > 64
    assert abs(lru["params"] - mamba["params"]) < 0.1 * mamba["params"]
    # a budget this machine cannot meet scales the steps down, the same for every model
    assert main([*argv, "--steps", "50", "--time-budget", "0.01", "--models", "lru,s5"]) == 0
    assert "training 1 step each" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in results["results"]] == [1, 1]
    assert main(["demo", "--models", "s5,nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run directories


def _run(out: Path, steps: int = 4, extra=()) -> list[str]:
    return _train_args("assoc-recall", out, steps=steps, extra=["--no-plot", *extra])


def test_run_dir_holds_best_and_last_loadable_with_from_pretrained(tmp_path, capsys):
    from lrnnx.architectures import LRNNLMHeadModel

    out = tmp_path / "run"
    assert main(_run(out, extra=["--eval-every", "2"])) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / METRICS_NAME).read_text())
    best = metrics["best"]
    assert best["dir"] == BEST_NAME and best["step"] in (2, 4)
    assert metrics["last"] == {"step": 4, "dir": LAST_NAME}
    assert str(out / BEST_NAME) in printed and str(out / LAST_NAME) in printed
    assert f'LRNNLMHeadModel.from_pretrained("{(out / BEST_NAME).as_posix()}")' in printed

    cfg = metrics["config"]
    data = make_task(
        "assoc-recall", cfg["n_train"], cfg["n_test"], cfg["seq_len"], **cfg["task_options"]
    )
    model = LRNNLMHeadModel.from_pretrained(out / BEST_NAME)
    ev = evaluate(model, data.test, data.kind, torch.device("cpu"))
    assert ev["acc"] == pytest.approx(best["acc"], abs=1e-12)
    assert ev["loss"] == pytest.approx(best["loss"], rel=1e-5)
    # the last weights are the checkpoint's; load_pretrained(run_dir) picks best/ and the class
    last = LRNNLMHeadModel.from_pretrained(out / LAST_NAME)
    ckpt_model, _ = load_checkpoint(out)
    for (name, a), (_, b) in zip(
        last.state_dict().items(), ckpt_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    again = load_pretrained(out)
    assert type(again) is LRNNLMHeadModel
    assert evaluate(again, data.test, data.kind, torch.device("cpu")) == ev


def test_interrupt_before_the_first_evaluation_saves_last_and_says_where(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)
    assert main(_run(out, steps=8, extra=["--eval-every", "4", *ONE_THREAD])) == 130
    printed = capsys.readouterr().out
    assert "interrupted at step 2" in printed
    assert str(out / LAST_NAME) in printed and "no checkpoint yet" in printed
    assert (out / LAST_NAME / "config.json").is_file() and not (out / CHECKPOINT_NAME).exists()
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["last"] == {"step": 2, "dir": LAST_NAME} and metrics["best"] is None
    assert type(load_pretrained(out / LAST_NAME)).__name__ == "LRNNLMHeadModel"


def test_resume_without_a_checkpoint_is_an_error_naming_the_path(tmp_path, capsys):
    out = tmp_path / "nothing-here"
    assert main(_run(out, extra=["--resume"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / CHECKPOINT_NAME) in err[0] and "resume" in err[0], err
    assert not out.exists()


def test_a_used_out_dir_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run(out, steps=2)) == 0
    first = (out / METRICS_NAME).read_text()
    assert main(_run(out, steps=3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert (out / METRICS_NAME).read_text() == first  # nothing was touched

    (out / "notes.txt").write_text("mine")
    assert main(_run(out, steps=3, extra=["--overwrite", "--eval-every", "3"])) == 0
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert [e["step"] for e in metrics["history"]["eval"]] == [3]  # no step-2 leftovers
    assert metrics["best"]["step"] == 3 and load_checkpoint(out)[1]["step"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    with pytest.raises(SystemExit) as e:
        main(_run(out, extra=["--resume", "--overwrite"]))
    assert e.value.code == 2


def test_resume_header_agrees_with_the_run_and_a_finished_run_stops(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run(out, steps=4, extra=["--eval-every", "2"])) == 0
    capsys.readouterr()
    before = (out / CHECKPOINT_NAME).read_bytes()

    assert main(_run(out, steps=2, extra=["--resume"])) == 0
    printed = capsys.readouterr().out
    assert "already at step 4" in printed and "--steps 2" in printed
    assert "lrnnx train:" not in printed and "step 3/" not in printed  # no header, no training
    assert (out / CHECKPOINT_NAME).read_bytes() == before

    assert (
        main(_run(out, steps=6, extra=["--resume", "--eval-every", "2", "--log-every", "1"])) == 0
    )
    printed = capsys.readouterr().out
    assert "6 steps (resumed from" in printed and "at step 4)" in printed
    logged = [line.split()[1] for line in printed.splitlines() if line.startswith("step ")]
    assert logged == ["5/6", "6/6"]
    assert load_checkpoint(out)[1]["step"] == 6


def test_chance_level_is_printed_stored_and_plotted(tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args("assoc-recall", out, steps=2)  # n_keys=8, n_values=32 (the default)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chance level: test accuracy 3.1%" in printed and "chance 3.1%" in printed
    chance = json.loads((out / METRICS_NAME).read_text())["chance"]
    assert chance["acc"] == pytest.approx(1 / 32) and chance["n_choices"] == 32
    assert chance["loss"] == pytest.approx(torch.log(torch.tensor(32.0)).item())
    if _has_matplotlib():
        assert (out / CURVE_NAME).exists()


def test_plot_skips_empty_curves_and_draws_chance_without_warnings(tmp_path, recwarn):
    pytest.importorskip("matplotlib")
    messages = []
    empty = {"m": {"train": [], "eval": []}}
    assert not train_mod.plot_curves(empty, tmp_path / "a.png", log=messages.append)
    assert not (tmp_path / "a.png").exists() and "skipping" in messages[0]
    flat = {"train": [{"step": s, "loss": 2.77, "acc": 0.06} for s in (1, 2, 3)], "eval": []}
    chance = {"acc": 1 / 16, "loss": 2.7726}
    assert train_mod.plot_curves({"m": flat}, tmp_path / "b.png", chance=chance)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert not [w for w in recwarn if "matplotlib" in str(w.filename) or "legend" in str(w.message)]


def test_task_option_is_read_with_its_declared_type(tmp_path, capsys):
    base = [
        "train",
        "--task",
        "irregular-sine",
        "--model",
        "event-s5",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*base, "--task-option", "noise=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lrnnx train: error: --task-option noise: expected a float, got 'abc'"], err
    assert main([*base, "--task-option", "n_classes=2.5"]) == 2
    assert "--task-option n_classes: expected an integer, got '2.5'" in capsys.readouterr().err
    assert main([*base, "--task-option", "nois=0.1"]) == 2
    assert "did you mean 'noise'?" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- start-up speed

_NO_TORCH = """
import sys
from lrnnx.cli import main
try:
    rc = main({argv!r})
except SystemExit as e:
    rc = e.code
print("RC", rc, "TORCH", "torch" in sys.modules)
"""


def _run_cli_in_fresh_process(argv, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    code = _NO_TORCH.format(argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "argv", [["--help"], ["tasks"], ["demo", "--help"]], ids=["help", "tasks", "demo-help"]
)
def test_help_and_listings_do_not_import_torch(argv):
    """What keeps them fast (well under a second): no torch, no models, no mnist1d."""
    out = _run_cli_in_fresh_process(argv)
    assert "RC 0 TORCH False" in out, out


def test_demo_help_shows_what_it_does_and_its_time_budget(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--time-budget" in text and "540" in text and "minute" in text


@pytest.mark.slow  # two fresh processes: make test-slow
def test_models_table_is_cached_and_then_needs_no_torch(tmp_path):
    env = {"LRNNX_CACHE_DIR": str(tmp_path)}
    first = _run_cli_in_fresh_process(["models"], env)
    assert "RC 0" in first and "mamba" in first and (tmp_path / "models-table.json").exists()
    second = _run_cli_in_fresh_process(["models"], env)
    assert "RC 0 TORCH False" in second, second
    assert second.replace("TORCH False", "") == first.replace("TORCH True", "")


def test_a_stale_models_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRNNX_CACHE_DIR", str(tmp_path))
    (tmp_path / "models-table.json").write_text(json.dumps({"key": "old", "rows": []}))
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(MODEL_REGISTRY)


def test_a_closed_stdout_pipe_ends_quietly_with_the_sigpipe_status():
    """``lrnnx ... | head`` : the reader leaves early; no traceback, exit status 128 + SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrnnx.cli", "tasks"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the program writes its first line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


@pytest.mark.parametrize(
    "change, named",
    [
        (["--lr", "0.001"], "--lr 0.002"),
        (["--seed", "3"], "--seed 0"),
        (["--task-option", "n_keys=6"], "n_keys"),
    ],
    ids=["lr", "seed", "task-option"],
)
def test_resume_refuses_other_task_or_optimisation_settings(tmp_path, capsys, change, named):
    """A resumed run is the same run: its task options, seed and optimiser settings must match
    the checkpoint's (the message names each difference); steps and intervals may change."""
    out = tmp_path / "run"
    assert main(_run(out, steps=2, extra=["--eval-every", "2"])) == 0
    capsys.readouterr()
    assert main(_run(out, steps=3, extra=["--resume", *change])) == 2
    err = capsys.readouterr().err
    assert "resume:" in err and named in err and "(now" in err, err
    assert main(_run(out, steps=3, extra=["--resume", "--eval-every", "3"])) == 0


# ------------------------------------------------------------- settings that would waste a run
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--weight-decay", "nan"], "weight_decay"),
        (["--grad-clip", "nan"], "grad_clip"),
        (["--weight-decay", "inf"], "weight_decay"),
        (["--seed", "-1"], "seed"),
        (["--device", "meta"], "device"),
    ],
)
def test_settings_that_would_waste_a_run_exit_2(extra, expected, tmp_path, capsys):
    rc = main(_run(tmp_path / "x", extra=["--threads", "1", *extra]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and expected in lines[0], lines


def test_a_non_finite_task_option_is_refused(tmp_path, capsys):
    argv = ["train", "--task", "irregular-sine", "--model", "event-s5", "--task-option",
            "f_max=inf", "--out", str(tmp_path / "x"), *SIZES]  # fmt: skip
    assert main(argv) == 2
    assert "f_max: expected a finite float" in capsys.readouterr().err


def test_a_diverging_run_stops_and_exits_1(tmp_path, monkeypatch, capsys):
    """A non-finite loss stops the run before that step's update: exit 1, an error line, no
    'done: test accuracy' line; metrics.json says why."""
    real = train_mod.forward_batch
    calls = []

    def nan_at_third(*args, **kwargs):
        loss, correct, count = real(*args, **kwargs)
        if torch.is_grad_enabled():  # a training step (evaluation runs without a graph)
            calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), correct, count

    monkeypatch.setattr(train_mod, "forward_batch", nan_at_third)
    out = tmp_path / "run"
    rc = main(_run(out, steps=6, extra=["--threads", "1", "--eval-every", "2"]))
    captured = capsys.readouterr()
    assert rc == 1
    assert "training loss at step 3 is not finite" in captured.err.strip().splitlines()[-1]
    assert "done: test accuracy" not in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert "step 3" in metrics["diverged"] and metrics["steps_completed"] == 2


def test_resume_refuses_other_data_and_damaged_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run(out, extra=["--threads", "1"])) == 0
    capsys.readouterr()
    assert main(_run(out, steps=6, extra=["--threads", "1", "--resume", "--n-test", "16"])) == 2
    assert "--n-test 32 (now 16)" in capsys.readouterr().err
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    assert main(_run(out, steps=6, extra=["--threads", "1", "--resume"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read this checkpoint" in err[0]


def test_an_unwritable_out_fails_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(_run(tmp_path / "afile" / "run", extra=["--threads", "1"])) == 2
    captured = capsys.readouterr()
    assert "out: cannot write to" in captured.err and "step" not in captured.out


@pytest.mark.parametrize("value", ["abc", "-1", "2.5"])
def test_a_garbage_world_size_is_one_line(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", value)
    assert main(_run(tmp_path / "run", extra=["--threads", "1"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WORLD_SIZE: expected an integer >= 0" in err[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--models", "nosuch"], "unknown model 'nosuch'"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "0"], "--threads"),
        (["--device", "meta"], "device"),
    ],
)
def test_bench_refuses_bad_arguments_before_measuring(extra, expected, tmp_path, capsys):
    argv = ["bench", "--quick", "--out", str(tmp_path / "b"), *extra]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2 and expected in captured.err and "cases" not in captured.out


def test_interrupted_before_the_first_evaluation(tmp_path, monkeypatch):
    """Ctrl-C before any evaluation: the steps trained are in the history (the curve has
    them) and load_pretrained(run_dir) finds last/ (there is no best/ yet)."""
    real = train_mod.forward_batch
    calls = []

    def interrupt_at_third(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_batch", interrupt_at_third)
    out = tmp_path / "run"
    rc = main(_run(out, steps=20, extra=["--threads", "1", "--eval-every", "10",
                                         "--log-every", "10"]))  # fmt: skip
    assert rc == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]["train"]] == [2]
    assert not (out / "best").exists()
    model = train_mod.load_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == metrics["n_params"]


def test_training_commands_compile_in_their_own_process(tmp_path, monkeypatch):
    """lrnnx train (and demo) compile the fused kernels in their process unless the user set
    LRNNX_NUMBA_COMPILE: a busy training run starves the idle-priority compile process."""
    from lrnnx.ops import _numba

    seen = []
    real = train_mod.train

    def spy(*args, **kwargs):
        seen.append((os.environ.get(_numba.COMPILE_ENV), _numba.MARK_WAIT_COMPILES))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train", spy)
    monkeypatch.delenv(_numba.COMPILE_ENV, raising=False)
    assert main(_run(tmp_path / "a", steps=1, extra=["--threads", "1"])) == 0
    monkeypatch.setenv(_numba.COMPILE_ENV, "background")  # the user's choice stays
    assert main(_run(tmp_path / "b", steps=1, extra=["--threads", "1"])) == 0
    assert seen == [("wait", True), ("background", False)]
    assert not _numba.MARK_WAIT_COMPILES  # for the command's duration only


def test_mixer_option_values_read_as_literals_or_words():
    """--mixer-option reads Python literals and, as --task-option does, true/false/none."""
    from lrnnx.cli import _key_value

    assert _key_value("conj_sym=true") == ("conj_sym", True)
    assert _key_value("conj-sym=False") == ("conj_sym", False)
    assert _key_value("l_max=None") == ("l_max", None) == _key_value("l_max=none")
    assert _key_value("dt_min=1e-3") == ("dt_min", 1e-3)
    assert _key_value("discretization=zoh") == ("discretization", "zoh")


def test_progress_lines_show_the_rate_each_step_ran_at(tmp_path, capsys):
    """Without warm-up the first step runs at the peak rate, and its progress line says so (it
    used to show the scheduler's next rate)."""
    out = tmp_path / "run"
    extra = ["--warmup", "0", "--lr", "0.002", "--log-every", "1", "--no-plot"]
    assert main(_train_args("assoc-recall", out, steps=3, extra=extra)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("step")]
    assert "lr 2.00e-03" in lines[0], lines


def test_bad_out_and_unresumable_runs_fail_before_the_thread_timing(
    tmp_path, capsys, monkeypatch, pretend_threads
):
    """Without --threads, lrnnx train times a few steps to choose the thread count: an --out
    it cannot write and a --resume whose settings differ are refused before that timing."""
    import lrnnx.cli as cli

    out = tmp_path / "run"
    assert main(_run(out)) == 0
    capsys.readouterr()

    def no_timing(*args, **kwargs):
        raise AssertionError("timed before refusing")

    monkeypatch.setattr(cli, "_time_steps", no_timing)
    pretend_threads(2)  # as on a machine with cores
    threadless = _run(out)  # (no --threads)
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad_out = [*threadless]
    bad_out[bad_out.index("--out") + 1] = str(blocker / "sub")
    assert main(bad_out) == 2
    assert "out:" in capsys.readouterr().err
    assert main([*threadless, "--resume", "--lr", "0.123"]) == 2
    assert "resume:" in capsys.readouterr().err


# ------------------------------------------------------------------ freed memory (glibc)

_ALLOC_LOOP = """
import os, resource, sys, torch
from lrnnx.cli import keep_freed_memory
kept = keep_freed_memory()
sizes = [1 << 18, 1 << 19, 1 << 20, 3 << 18, 1 << 21, 5 << 18]  # 1-8 MB of float32

def one_step():  # activations of several sizes, each written, then all freed
    xs = [torch.empty(n).fill_(1.0) for n in sizes]
    del xs

for _ in range(5):  # the heap settles into its layout (page faults in the first 2-3)
    one_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    one_step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(kept, faults)
"""


def _alloc_loop(env: dict) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _ALLOC_LOOP], env=env, capture_output=True, text=True, check=True
    )
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_commands_keep_freed_memory_for_the_next_step():
    """After keep_freed_memory() (lrnnx train and demo call it), a step that allocates and frees
    the same 16 MB of activations again takes no new pages from the system once the heap has
    settled: 50 such steps take under 2,000 page faults in all (each fresh page costs one and
    a step writes 4,000; glibc's default took about 500 a step here, and the kept heap none
    or, rarely, one rearrangement of 512-1,280 pages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    kept, faults = _alloc_loop(env)
    if not kept:
        pytest.skip("not glibc")
    assert faults < 2000, faults


def test_a_users_malloc_settings_are_kept():
    """Whoever set glibc's MALLOC_*_ variables (or its tunables) keeps them: nothing is set."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert _alloc_loop(env)[0] is False
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}
    assert _alloc_loop(env)[0] is False
