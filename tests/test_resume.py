"""Checkpoint and resume: a training process killed with SIGKILL and resumed from its last
checkpoint in a new process continues with exactly the masks and losses (bitwise, CPU) of an
uninterrupted run (tests/resume_worker.py is the training process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 8


def _run(checkpoint: Path, *flags: str) -> list[dict]:
    """The worker's per-step records (loss and masks) of one whole run."""
    result = subprocess.run(
        [sys.executable, str(WORKER), str(checkpoint), str(STEPS), *flags],
        capture_output=True, text=True, check=True, env=_env(),
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_sigkilled_training_resumes_bitwise(tmp_path, mode):
    flags = ("--compile",) if mode == "compile" else ()
    uninterrupted = _run(tmp_path / "full.pt", *flags)
    assert [r["step"] for r in uninterrupted] == list(range(STEPS))

    checkpoint = tmp_path / "killed.pt"
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), str(checkpoint), str(STEPS), *flags, "--sleep", "0.5"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    before = []
    for line in worker.stdout:  # type: ignore[union-attr]
        before.append(json.loads(line))
        if before[-1]["step"] == 3:
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait()
    assert worker.returncode == -signal.SIGKILL

    resumed = _run(checkpoint, *flags, "--resume")
    assert resumed and resumed[0]["step"] >= 4, "resumed from the last checkpoint"
    first = resumed[0]["step"]
    assert before[:first] == uninterrupted[:first]
    assert resumed == uninterrupted[first:], "masks and losses must continue exactly"
