"""Suite-wide settings. CI sets FASTSSL_REQUIRE_EXTRAS (e.g. "dali,ffcv") so that an optional backend that was
meant to be installed cannot turn its tests into silent skips."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_EXTRA_MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv", "triton": "triton"}
_EXTRA_PROGRAMS = {"compiler": ("g++", "c++")}  # torch.compile's CPU backend (tests/test_compile.py)


def _session_tmpdir() -> None:
    """Every temporary file of the suite's processes (torchrun's torchelastic_* folders, multiprocessing's pymp-*,
    inductor's cache, tools' temporary files) in one folder that the session removes: left in /tmp they outlive
    the run, and CI machines share that disk."""
    import tempfile

    # pytest's own tmp_path folders stay where they were (a failed test's are kept for a look, by its retention).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    tmp = tempfile.mkdtemp(prefix="fastssl-tests-")
    os.environ["TMPDIR"] = tmp  # child processes
    tempfile.tempdir = tmp  # this process (gettempdir caches its first answer)


def pytest_sessionfinish(session, exitstatus):
    import shutil
    import tempfile

    tmp = os.environ.get("TMPDIR", "")
    if os.path.basename(tmp).startswith("fastssl-tests-"):
        shutil.rmtree(tmp, ignore_errors=True)
        tempfile.tempdir = None


def pytest_sessionstart(session):
    import shutil

    import torch

    _session_tmpdir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for extra in filter(None, os.environ.get("FASTSSL_REQUIRE_EXTRAS", "").split(",")):
        if extra in _EXTRA_PROGRAMS:
            if not any(shutil.which(p) for p in _EXTRA_PROGRAMS[extra]):
                raise pytest.UsageError(f"FASTSSL_REQUIRE_EXTRAS names {extra!r} but none of "
                                        f"{', '.join(_EXTRA_PROGRAMS[extra])} is on PATH")
            continue
        if extra not in _EXTRA_MODULES:
            raise pytest.UsageError(f"FASTSSL_REQUIRE_EXTRAS names {extra!r}; known: "
                                    f"{', '.join([*_EXTRA_MODULES, *_EXTRA_PROGRAMS])}")
        try:
            importlib.import_module(_EXTRA_MODULES[extra])
        except ImportError as e:
            raise pytest.UsageError(f"FASTSSL_REQUIRE_EXTRAS names {extra!r} but it does not import: {e}")


def run_tool(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600):
    """Run `python tools/<script> args...` as a user would; returns the CompletedProcess."""
    import subprocess

    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *fragments: str) -> None:
    """A user-facing error: non-zero exit, one `error:` line on stderr naming the value, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


def drloc_reference(mlp, grid, u, v) -> float:
    """L_drloc (Liu et al. 2021, sec. 4) by hand on given pairs: per image i and pair j the L1 distance between
    mlp([token u_ij, token v_ij]) and (|row_u - row_v| / rows, |col_u - col_v| / cols), averaged over all pairs;
    cells numbered row-major. `mlp` must treat rows independently (no BN in training mode)."""
    import torch

    b, rows, cols, _ = grid.shape
    total = 0.0
    for i in range(b):
        for j in range(u.shape[1]):
            a, c = int(u[i, j]), int(v[i, j])
            pair = torch.cat([grid[i, a // cols, a % cols], grid[i, c // cols, c % cols]])
            pred = mlp(pair[None])[0].detach().double()
            target = torch.tensor([abs(a // cols - c // cols) / rows, abs(a % cols - c % cols) / cols],
                                  dtype=torch.float64)
            total += float((pred - target).abs().sum())
    return total / (b * u.shape[1])


def perturb_(*modules, scale: float = 0.05, seed: int = 1) -> None:
    """Add seeded N(0, scale^2) noise to every parameter: weights then differ from any seeded init (a loader
    that ignored a file, or keys taken from the wrong network, could not reproduce them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def save_perturbed_encoder(file: Path, cfg, image_size: int, step: int = 7):
    """An encoder.pt as the trainer writes it, holding the config seed's init plus perturb_'s noise; returns
    the encoder."""
    import torch

    from fastssl.config import config_to_dict
    from fastssl.encoders import create_encoder

    torch.manual_seed(cfg.seed)
    enc = create_encoder(cfg.model, image_size)
    perturb_(enc)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder": enc.state_dict(), "config": config_to_dict(cfg), "step": step}, file)
    return enc


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    """A pid no process has any more (a child that exited and was reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def forbid(monkeypatch, owner, name: str, what: str) -> None:
    """Replace owner.name by a function that fails the test: `what` must not happen (e.g. before the options
    were checked)."""
    def fail(*args, **kwargs):
        raise AssertionError(what)

    monkeypatch.setattr(owner, name, fail)


_SLOWED_TOOL = """
import runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a shell that ignores it
module, name, tool = sys.argv[1:4]
__import__(module)
owner = sys.modules[module]
real = getattr(owner, name)
def slowed(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
setattr(owner, name, slowed)
sys.argv = sys.argv[3:]
runpy.run_path(tool, run_name="__main__")
"""


def signal_mid_conversion(tool: str, slowed: str, started, args: list[str], sig: int, timeout: float = 120):
    """Run `python tools/<tool> args...` with `slowed` ("module:function", called once per image, before any
    worker forks) taking 50 ms longer, and once `started()` says the partial output is being written, send `sig`
    to the tool's whole process group, as Ctrl-C in a terminal or a scheduler's time limit does. Fails if the
    tool ended first. Returns (returncode, stderr), after checking that no process of the group is left."""
    import signal as signals
    import subprocess
    import time

    module, name = slowed.split(":")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _SLOWED_TOOL, module, name, str(ROOT / "tools" / tool), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not started():
            assert proc.poll() is None, f"the tool ended before its output was started: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the tool did not start writing in time"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the writing (each image takes >= 50 ms), with its workers busy
        assert proc.poll() is None, f"the tool ended before the signal: {proc.stderr.read()}"
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
            proc.wait()
    # A killed worker's exit, and its reaping by init, take a moment: seconds on a loaded machine.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return proc.returncode, stderr
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signals.SIGKILL)
    except ProcessLookupError:  # gone in the last instant
        return proc.returncode, stderr
    raise AssertionError(f"a process of the tool (a worker) outlived it by 15 s; stderr: {stderr}")


def chi2_critical(df: int, z: float = 4.753) -> float:
    """Upper critical value of a chi-square with `df` degrees of freedom at the normal quantile z (4.753: alpha
    1e-6), by the Wilson-Hilferty cube-root approximation (within ~1% at df >= 10, a few % high below)."""
    import math

    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
