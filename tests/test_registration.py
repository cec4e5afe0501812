"""`merge_method: wudi` is known with no extra step: on import, at startup, in a fresh venv."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.merge_methods import registered_methods

import mergekit_wudi
from mergekit_wudi.method import wudi_merge
from tests.conftest import load_weights

REPO = Path(__file__).resolve().parent.parent


def python(code, executable=sys.executable, cwd="/"):
    return subprocess.run(
        [str(executable), "-c", code], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_import_registers_once():
    mergekit_wudi.register()
    mergekit_wudi.register()
    assert [m for m in registered_methods() if m.spec.name == "wudi"] == [wudi_merge]


def test_startup_hook_registers_without_importing_torch_at_start():
    result = python(
        "import sys\n"
        "assert '_mergekit_wudi_startup' in sys.modules\n"
        "assert 'torch' not in sys.modules and 'mergekit_wudi' not in sys.modules\n"
        "from mergekit import merge_methods\n"
        "print(merge_methods.get('wudi').spec.pretty_name)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "WUDI-Merging"


BROKEN_PACKAGES = {
    "missing dependency": ("ModuleNotFoundError: No module named 'not_a_dependency'",
                           {"__init__.py": "import not_a_dependency\n"}),
    "syntax error": ("SyntaxError", {"__init__.py": "def (\n"}),
    "registration fails": ("RuntimeError: another merge method", {
        "__init__.py": "from mergekit_wudi.registration import register\nregister()\n",
        "registration.py": "def register():\n"
                           "    raise RuntimeError('another merge method is already registered')\n",
    }),
}


@pytest.mark.parametrize("broken", BROKEN_PACKAGES)
def test_a_broken_install_is_one_warning_and_mergekit_works_for_other_methods(broken, tmp_path):
    # This tree's hook (not the venv's copy, so no site), a package that fails
    # to import first on the path, then mergekit's own command line.
    error, files = BROKEN_PACKAGES[broken]
    (tmp_path / "mergekit_wudi").mkdir()
    for name, text in files.items():
        (tmp_path / "mergekit_wudi" / name).write_text(text)
    paths = [str(tmp_path), str(REPO / "src_hook"), *site.getsitepackages()]
    result = subprocess.run(
        [sys.executable, "-S", "-c",
         f"import sys; sys.path[:0] = {paths!r}\n"
         "import _mergekit_wudi_startup\n"
         "from mergekit import merge_methods\n"
         "print(merge_methods.get('linear').spec.name)\n"
         "from mergekit.scripts.run_yaml import main\n"
         "main(['--help'])\n"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("linear\n") and "Usage:" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "mergekit-wudi" in line]
    assert len(warnings) == 1, result.stderr
    assert f"merge_method 'wudi' is unavailable ({error}" in warnings[0]
    assert "Reinstall mergekit-wudi" in warnings[0]


@pytest.mark.slow
def test_fresh_venv_wheel_install_runs_mergekit_yaml(families, tmp_path):
    """Build the wheel, install it (not editable) with mergekit into a new venv, and
    run that venv's own `mergekit-yaml`. Third-party dependencies (torch, transformers,
    ...) are borrowed from the test environment through a path entry, whose own .pth
    files (including this checkout's editable install) are not processed."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    fresh_site = Path(python("import site; print(site.getsitepackages()[0])", fresh_python).stdout.strip())
    install = subprocess.run(
        [str(fresh_python), "-m", "pip", "install", "-q", "--no-deps", "mergekit==0.1.5",
         *map(str, wheels.glob("mergekit_wudi-*.whl"))],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    # After the install, or pip would find mergekit already there and skip it.
    (fresh_site / "borrowed-dependencies.pth").write_text(site.getsitepackages()[0] + "\n")

    where = python("import mergekit_wudi, mergekit; print(mergekit_wudi.__file__, mergekit.__file__)", fresh_python)
    assert where.stdout.startswith(str(fresh_site)) and str(fresh_site) in where.stdout.split()[1], where

    base, *experts = families("llama")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base),
        "models": [{"model": str(e)} for e in experts], "parameters": {"iterations": 5},
    }))
    out = tmp_path / "merged"
    result = subprocess.run(
        [str(venv / "bin" / "mergekit-yaml"), str(config), str(out)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(load_weights(out)) == set(load_weights(base))
    assert "WUDI-Merging" in (out / "README.md").read_text()
