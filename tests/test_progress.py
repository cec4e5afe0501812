"""A long solve's progress: the solvers' hook, and the bar beneath mergekit's on a terminal only."""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch
import tqdm
import yaml

from mergekit_wudi import progress, solvers
from mergekit_wudi.solvers.progress import DONE


def task_vectors(seed=0, shape=(24, 16), count=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 1e-2 for _ in range(count)]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, phase, done, total):
        self.calls.append((phase, done, total))


def test_adam_reports_its_setup_and_every_step_and_solves_the_same():
    taus, heard = task_vectors(), Recorder()
    merged = solvers.wudi_adam(taus, iterations=7, progress=heard)
    assert heard.calls == (
        [("C and residual", 0, 8)] + [("Adam steps", step, 8) for step in range(1, 8)]
        + [(DONE, 8, 8)]
    )
    assert torch.equal(merged, solvers.wudi_adam(taus, iterations=7))


@pytest.mark.parametrize(
    "solve, phases",
    [
        (lambda taus, hook: solvers.wudi_closed_form(taus, omega=1e-4, progress=hook),
         ["C and D", "Cholesky", "solve"]),
        (lambda taus, hook: solvers.wudi_spectral(taus, progress=hook),
         ["C and D", "eigendecomposition", "filter"]),
        # The row space (N out < in) goes through the same phases.
        (lambda taus, hook: solvers.wudi_spectral(
            [tau[:4] for tau in taus], rank_ratio="auto", progress=hook),
         ["C and D", "eigendecomposition", "filter"]),
    ],
    ids=["closed_form", "spectral", "spectral_row_space"],
)
def test_one_shot_solvers_report_their_phases_and_solve_the_same(solve, phases):
    taus, heard = task_vectors(), Recorder()
    merged = solve(taus, heard)
    assert heard.calls == [(phase, done, 3) for done, phase in enumerate(phases)] + [(DONE, 3, 3)]
    assert torch.equal(merged, solve(taus, None))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_bar_without_a_terminal_or_without_mergekit_bar(monkeypatch):
    monkeypatch.setattr(progress, "BAR_DELAY_SECONDS", 0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file
    with tqdm.tqdm(total=1, file=io.StringIO()), progress.solve_progress("w") as hook:
        assert hook is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    # mergekit --quiet: its bars are disabled.
    with tqdm.tqdm(total=1, disable=True), progress.solve_progress("w") as hook:
        assert hook is None
    assert sys.stderr.getvalue() == ""


def test_bar_names_the_tensor_and_phase_and_clears_its_line(monkeypatch):
    monkeypatch.setattr(progress, "BAR_DELAY_SECONDS", 0)
    monkeypatch.setattr(sys, "stderr", Terminal())
    with tqdm.tqdm(total=1, file=io.StringIO()):
        with progress.solve_progress("model.layers.0.mlp.up_proj.weight") as hook:
            hook("C and D", 0, 3)
            hook("eigendecomposition", 1, 3)
            shown = sys.stderr.getvalue()
            hook(DONE, 3, 3)
    assert "wudi model.layers.0.mlp.up_proj.weight: eigendecomposition" in shown
    assert "1/3" in shown
    assert sys.stderr.getvalue().endswith("\r") or sys.stderr.getvalue().endswith("\x1b[A")


# "Short" is relative to the delay: a delay far above these tiny solves' time keeps
# the tests true on a loaded machine, and a bar drawn regardless of it still fails them.
SHORT_SOLVE_DELAY_SECONDS = 120.0


def test_a_short_solve_draws_nothing(monkeypatch):
    assert progress.BAR_DELAY_SECONDS >= 1  # the default keeps solves under a second silent
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(progress, "BAR_DELAY_SECONDS", SHORT_SOLVE_DELAY_SECONDS)
    with tqdm.tqdm(total=1, file=io.StringIO()), progress.solve_progress("w") as hook:
        solvers.wudi_adam(task_vectors(), iterations=20, progress=hook)
    assert sys.stderr.getvalue() == ""


MERGE = """
import sys
import mergekit_wudi.progress
mergekit_wudi.progress.BAR_DELAY_SECONDS = float(sys.argv.pop(1))
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
main()
"""


def merge(paths, directory, *flags, delay, terminal):
    """mergekit-yaml on a recipe, stderr on a pseudo-terminal or a pipe; (stdout, stderr)."""
    base, *experts = paths
    recipe = directory / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base),
        "models": [{"model": str(expert)} for expert in experts],
        "parameters": {"iterations": 40}, "dtype": "float32",
    }))
    command = [sys.executable, "-c", MERGE, str(delay), str(recipe), str(directory / "out"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, done.stderr
    leader, follower = pty.openpty()
    # 24 rows of 160 columns: tqdm draws nothing on a terminal 0 columns wide.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=env
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    stdout = child.stdout.read().decode()
    assert child.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    return stdout, shown.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, delay, terminal, bar",
    [
        ((), 0, True, True),
        (("--quiet",), 0, True, False),
        ((), 0, False, False),
        ((), SHORT_SOLVE_DELAY_SECONDS, True, False),  # tiny solves: milliseconds each
    ],
    ids=["terminal", "quiet", "pipe", "short_solves"],
)
def test_mergekit_yaml_shows_the_bar_on_a_terminal_only(families, tmp_path, flags, delay, terminal, bar):
    stdout, stderr = merge(families("llama"), tmp_path, *flags, delay=delay, terminal=terminal)
    assert ("wudi model.layers.1.mlp.down_proj.weight: C and residual" in stderr) == bar
    assert "wudi model.layers" not in stdout
    if not flags:
        assert "Executing graph" in stderr  # mergekit's own bar was there
    assert (tmp_path / "out" / "config.json").exists()
