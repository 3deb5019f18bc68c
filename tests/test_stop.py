"""`softpo train` keeps its work: SIGINT / SIGTERM stop a run at a step boundary with a checkpoint (one
process, and two torchrun ranks where the signal reaches one rank only), the resumed run equals the
uninterrupted one, and an unreadable checkpoint is refused in one line without touching the run directory.
Every process started here runs under a deadline, so a hang fails the test instead of stalling CI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from softpo import train

from test_train import TIMING_KEYS, TINY, read_metrics

DEADLINE_S = 300
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")


def _start(argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process, timeout=DEADLINE_S):
    """(exit status, stderr); the whole process group is killed past the deadline."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, err


def _wait_for_steps(process, run, count):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {count}: {process.communicate()[1]}")
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    raise TimeoutError(f"no step {count} within {DEADLINE_S} s")


def _assert_same_run(whole, split):
    expected, got = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert {k: a[k] for k in a.keys() - TIMING_KEYS} == {k: b[k] for k in b.keys() - TIMING_KEYS}
    final_whole = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    final_split = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


COMMON = [*TINY, "--loss", "grpo", "--beta", "0.05", "--save-every", "1000"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_boundary_and_the_resume_equals_the_whole_run(tmp_path, signum):
    split, whole = tmp_path / "split", tmp_path / "whole"
    process = _start(["-m", "softpo.train", *COMMON, "--steps", "200", "--out", str(split)])
    _wait_for_steps(process, split, 1)
    process.send_signal(signum)
    code, err = _finish(process)
    assert code == 128 + signum, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "stopped by" in line]
    assert signum.name in line and str(split) in line and f"softpo train --resume {split}" in line
    stopped_at = torch.load(split / "checkpoint.pt", weights_only=False)["step"]
    assert [r["step"] for r in read_metrics(split)] == list(range(1, stopped_at + 1))
    steps = stopped_at + 2
    assert train.main(["--resume", str(split), "--steps", str(steps)]) == 0
    assert train.main([*COMMON, "--steps", str(steps), "--out", str(whole)]) == 0
    _assert_same_run(whole, split)


def _descendants(pid):
    """Process ids below `pid`, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(launcher_pid, rank):
    for pid in _descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = handle.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under process {launcher_pid}")


def _torchrun(argv):
    from distributed import free_port

    return _start(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "softpo.train", *argv])


def test_sigint_to_one_rank_stops_every_rank_and_the_resume_equals_the_whole_run(tmp_path):
    """Under torchrun the signal reaches rank 1 only: both ranks agree to stop after the same step, save one
    consistent checkpoint and exit; nobody waits in a collective."""
    split, whole = tmp_path / "split", tmp_path / "whole"
    process = _torchrun([*COMMON, "--steps", "200", "--out", str(split)])
    _wait_for_steps(process, split, 1)
    os.kill(_rank_pid(process.pid, 1), signal.SIGINT)
    _, err = _finish(process)
    (line,) = [line for line in err.splitlines() if "stopped by SIGINT" in line]
    assert f"torchrun --nproc-per-node 2 -m softpo.train --resume {split}" in line
    state = torch.load(split / "checkpoint.pt", weights_only=False)
    stopped_at = state["step"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert [r["step"] for r in read_metrics(split)] == list(range(1, stopped_at + 1))
    steps = stopped_at + 2
    code, err = _finish(_torchrun(["--resume", str(split), "--steps", str(steps)]))
    assert code == 0, err
    assert f"resumed {split} at step {stopped_at} of {steps}" in err
    code, err = _finish(_torchrun([*COMMON, "--steps", str(steps), "--out", str(whole)]))
    assert code == 0, err
    _assert_same_run(whole, split)


def _snapshot(run):
    return {path.name: path.read_bytes() for path in sorted(run.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert train.main([*TINY, "--steps", "1", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("damage", ["truncated", "empty", "other-shape"])
def test_an_unreadable_checkpoint_is_one_line_and_leaves_the_run_untouched(tmp_path, capsys, finished_run, damage):
    run = tmp_path / "run"
    run.mkdir()
    for path in finished_run.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    checkpoint = run / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    else:
        other = tmp_path / "other"
        assert train.main([*TINY, "--hidden-size", "48", "--steps", "1", "--out", str(other)]) == 0
        checkpoint.write_bytes((other / "checkpoint.pt").read_bytes())
    before = _snapshot(run)
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"softpo train: error: {checkpoint}: "), err
    assert "Traceback" not in err
    assert _snapshot(run) == before


def test_display_flags_are_not_the_runs_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main([*TINY, "--steps", "1", "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["args"]
    assert "no_progress" not in saved and "threads" not in saved
    assert train.main(["--resume", str(run), "--steps", "2", "--no-progress"]) == 0
    assert f"resumed {run} at step 1 of 2" in capsys.readouterr().err
