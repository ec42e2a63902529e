"""io's shared mechanisms on their own: one run per output (`output_lock`), outputs that must be writable
(`check_writable`), and the ownership record of a whole-folder output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dt_lora import errors
from dt_lora.io import (
    OUTPUT_MARKER,
    atomic_directory,
    check_output,
    check_writable,
    claim_output,
    is_dt_lora_folder,
    output_lock,
)

HOLD = """
import sys, time
from dt_lora.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s lock, as a second dt-lora run would."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_is_refused_while_the_first_holds_the_output_and_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "shield.safetensors"
    first = holder(out)
    try:
        with pytest.raises(errors.OutputBusy, match=rf"{out} is in use by another dt-lora run \(pid {first.pid}"):
            with claim_output(out, False, kind="adapter"):
                pass
        # the same path spelt otherwise is the same output
        with pytest.raises(errors.OutputBusy):
            with output_lock(tmp_path / "." / "shield.safetensors"):
                pass
        with output_lock(tmp_path / "other.safetensors"):  # another output is free
            pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with claim_output(out, False, kind="adapter"):  # the system released the killed run's lock
        with output_lock(out):  # and one process may take its own lock again
            pass
    assert list(tmp_path.iterdir()) == []  # no lock file among the user's files


def test_the_cli_refuses_a_second_train_on_the_same_output(tmp_path, capsys):
    from dt_lora.cli import main

    out = tmp_path / "circle.safetensors"
    first = holder(out)
    try:
        started = time.perf_counter()
        assert main(["train", "toy-circle", "-o", str(out), "-q"]) == 2
        assert time.perf_counter() - started < 60  # refused before the model and the data
    finally:
        first.kill()
        first.wait()
    assert "is in use by another dt-lora run" in capsys.readouterr().err
    assert not out.exists()


def test_a_work_folder_is_held_too(tmp_path, capsys):
    from dt_lora.cli import main

    out = tmp_path / "circle.safetensors"
    first = holder(tmp_path / "circle.safetensors.work")  # a run of another output with the same work folder
    try:
        assert main(["train", "toy-circle", "-o", str(out), "-q"]) == 2
    finally:
        first.kill()
        first.wait()
    assert f"{out}.work is in use" in capsys.readouterr().err


def test_check_writable_refuses_what_cannot_take_files_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.safetensors")
    assert list(tmp_path.iterdir()) == []  # neither the missing folders nor the probe
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.OutputNotWritable, match=r"file is a file, not a folder"):
        check_writable(tmp_path / "file" / "out.safetensors")
    with pytest.raises(errors.OutputNotWritable, match=r"cannot write /proc/x/out: /proc does not take new files"):
        check_writable("/proc/x/out")
    assert errors.exit_code(errors.OutputNotWritable("x")) == errors.EXIT_USER


def test_a_folder_output_records_every_file_it_holds(tmp_path):
    out = tmp_path / "report"
    with atomic_directory(out, kind="report", command="eval") as folder:
        (folder / "grids").mkdir()
        (folder / "grids" / "0000.png").write_bytes(b"png")
        (folder / "report.json").write_text("{}")
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "report" and marker["contents"] == ["grids/0000.png", "report.json"]
    assert is_dt_lora_folder(out)
    check_output(out, True, kind="report")
    with pytest.raises(errors.OutputInTheWay, match="not a baked model folder"):
        check_output(out, True, kind="model")
    os.symlink(tmp_path, out / "grids" / "link")  # a link someone added counts as theirs
    assert not is_dt_lora_folder(out)
    with pytest.raises(errors.OutputInTheWay, match=r"grids/link, which dt-lora did not write"):
        check_output(out, True, kind="report")


def test_a_folder_marked_by_an_older_dt_lora_without_its_file_list_is_not_replaced(tmp_path):
    out = tmp_path / "baked"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    (out / OUTPUT_MARKER).write_text(json.dumps({"written_by": "dt-lora", "command": "bake"}))
    with pytest.raises(errors.OutputInTheWay, match="lists no files"):
        check_output(out, True, kind="model")
