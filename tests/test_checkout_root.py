"""Started from the checkout root, Python puts the working directory first on sys.path: the top-level
kernels/ folder must not shadow PyPI's `kernels` package (transformers imports it) there, whatever starts
Python: `python -c`, `python -m`, pytest, torchrun."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The folder that must not be imported as `kernels` (a virtual environment may itself live in the checkout).
SHADOW = str(ROOT / "kernels")
PYPI_KERNELS = importlib.util.find_spec("kernels") is not None and not str(
    importlib.util.find_spec("kernels").origin or ""
).startswith(SHADOW)

WHERE_IS_KERNELS = "import kernels; print(getattr(kernels, '__file__', None))"
# `python -m MODULE` puts the working directory first on sys.path as `-c` does; timeit's setup runs the check.
AS_MODULE = ["-m", "timeit", "-n", "1", "-r", "1", "-s", WHERE_IS_KERNELS, "pass"]


def _run(*command, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.setdefault("TRITON_INTERPRET", "1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _outside_checkout(printed: str) -> bool:
    # A namespace portion has no __file__ (None): it cannot shadow a regular package of the same name.
    return printed == "None" or not printed.startswith(SHADOW)


def test_this_process_started_from_the_root_sees_the_installed_kernels():
    # pytest itself (`python -m pytest tests/` from the root, as CI runs it) is one of the ways in.
    import kernels

    location = getattr(kernels, "__file__", None)
    assert location is None or not location.startswith(SHADOW), location
    if PYPI_KERNELS:
        assert "site-packages" in location


@pytest.mark.skipif(not PYPI_KERNELS, reason="PyPI's kernels package is not installed in this environment")
def test_python_c_and_python_m_from_the_root_import_the_installed_kernels():
    done = _run(sys.executable, "-c", WHERE_IS_KERNELS)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout.strip(), done.stdout
    done = _run(sys.executable, *AS_MODULE)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout.splitlines()[0], done.stdout


def test_softpo_kernels_resolve_to_the_checkout_folder():
    done = _run(sys.executable, "-c", "import softpo.kernels.logits as m; print(m.__file__)")
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip()).resolve() == ROOT / "kernels" / "logits.py"


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_the_trl_drop_in_imports_from_the_root():
    done = _run(sys.executable, "-c", "from softpo.integrations.trl import SoftpoGRPOTrainer; " + WHERE_IS_KERNELS)
    assert done.returncode == 0, done.stderr
    assert _outside_checkout(done.stdout.strip().splitlines()[-1]), done.stdout


def test_python_m_softpo_train_runs_from_the_root(tmp_path):
    done = _run(sys.executable, "-m", "softpo.train", "--steps", "2", "--no-progress", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.skipif(shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None,
                    reason="torchrun is not available")
def test_torchrun_from_the_root_imports_the_installed_kernels():
    # torchrun -m starts `python -m MODULE` in each worker, with the root as working directory.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    done = _run(*torchrun, *AS_MODULE, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _outside_checkout(done.stdout.strip().splitlines()[0]), done.stdout
    done = _run(*torchrun, "--no-python", sys.executable, "-c", WHERE_IS_KERNELS, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _outside_checkout(done.stdout.strip().splitlines()[-1]), done.stdout
