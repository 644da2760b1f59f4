"""The notebooks' install cell: where it installs apriel-jax from, and the one sentence it stops with.

The cell is the notebooks' first code cell and runs before apriel-jax can be imported. Here it is executed
as written (the source that build_notebooks.py puts in every notebook) with ``apriel_jax`` made
unimportable and ``subprocess.run`` replaced by a recorder that plays pip and git, in a temporary working
directory: from a checkout, from a git URL, from a wheel, from the package index, and from nothing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbformat")

BUILDER = Path(__file__).resolve().parents[1] / "notebooks" / "build_notebooks.py"


def _install_cell_source() -> str:
    spec = importlib.util.spec_from_file_location("build_notebooks", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts notebooks/ on sys.path for its nb_* modules
    from nb_cells import INSTALL_CELL

    for name in module.NOTEBOOKS:  # every notebook starts with this cell
        first_code = next(c for c in module.build(name).cells if c.cell_type == "code")
        assert first_code.source == INSTALL_CELL.strip(), name
    return INSTALL_CELL


class FakeShell:
    """subprocess.run for the cell: records every command; pip and git succeed unless told otherwise, and a
    successful install makes ``apriel_jax`` importable (as pip would)."""

    def __init__(self, monkeypatch, *, pip_ok=True, git_ok=True, installs=True):
        self.commands, self.installed = [], False
        self.pip_ok, self.git_ok, self.installs = pip_ok, git_ok, installs
        real_find_spec = importlib.util.find_spec

        def find_spec(name, *args):
            if name == "apriel_jax" and not self.installed:
                return None
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr("shutil.which", lambda name: None)  # no nvidia-smi: a CPU runtime
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.delenv("APRIEL_JAX_SOURCE", raising=False)
        monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)

    def run(self, cmd, *args, **kwargs):
        self.commands.append(list(cmd))
        ok = self.git_ok if cmd[0] == "git" else self.pip_ok
        if cmd[0] == "git" and ok:
            (Path(cmd[-1]) / "apriel_jax").mkdir(parents=True)
            (Path(cmd[-1]) / "setup.py").write_text("")
        if cmd[1:4] == ["-m", "pip", "install"] and ok:
            self.installed = self.installs
        return subprocess.CompletedProcess(cmd, 0 if ok else 1)

    def pip_args(self) -> list[list[str]]:
        return [c[5:] for c in self.commands if c[1:4] == ["-m", "pip", "install"]]


def _run_cell(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "install_cell", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def cell() -> str:
    return _install_cell_source()


def _stop_message(excinfo) -> str:
    lines = excinfo.value._render_traceback_()
    assert len(lines) == 1, lines  # one sentence, no traceback
    return lines[0]


def test_an_importable_package_installs_nothing(cell, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    _run_cell(cell)
    assert "apriel-jax: already importable" in capsys.readouterr().out


def test_a_notebook_opened_from_a_checkout_installs_that_checkout(cell, monkeypatch, tmp_path, capsys):
    (tmp_path / "apriel_jax").mkdir()
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # Jupyter's working directory: the notebook's folder
    shell = FakeShell(monkeypatch)
    _run_cell(cell)
    assert shell.pip_args() == [["-e", str(tmp_path)]]
    assert sys.path[0] == str(tmp_path)  # this kernel imports the editable checkout without a restart
    assert f"installed from checkout {tmp_path}" in capsys.readouterr().out


def test_a_git_url_is_cloned_and_installed_editable(cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shell = FakeShell(monkeypatch)
    monkeypatch.setenv("APRIEL_JAX_SOURCE", "git+https://example.org/team/apriel-jax")
    _run_cell(cell)
    clone = tmp_path / "apriel-jax"
    assert shell.commands[0] == ["git", "clone", "--depth", "1", "https://example.org/team/apriel-jax", str(clone)]
    assert shell.pip_args() == [["-e", str(clone)]]  # the clone's configs/ come along


def test_a_wheel_and_the_package_index(cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    wheel = tmp_path / "apriel_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    shell = FakeShell(monkeypatch)
    _run_cell(cell.replace('APRIEL_JAX_SOURCE = ""', f'APRIEL_JAX_SOURCE = "{wheel}"', 1))
    assert shell.pip_args() == [[f"apriel-jax @ {wheel.as_uri()}"]]
    shell = FakeShell(monkeypatch)
    _run_cell(cell)
    assert shell.pip_args() == [["apriel-jax"]]


def test_without_a_source_it_stops_with_one_sentence(cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    FakeShell(monkeypatch, pip_ok=False)  # no release on the index
    with pytest.raises(Exception) as excinfo:
        _run_cell(cell)
    message = _stop_message(excinfo)
    assert "set APRIEL_JAX_SOURCE at the top of this cell" in message
    assert "YOUR-ORG" not in cell and "placeholder" not in cell.lower()


def test_bad_sources_and_failed_installs_stop_with_one_sentence(cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    FakeShell(monkeypatch)
    monkeypatch.setenv("APRIEL_JAX_SOURCE", str(tmp_path / "missing"))
    with pytest.raises(Exception) as excinfo:
        _run_cell(cell)
    assert "is neither a git URL nor an existing checkout or wheel" in _stop_message(excinfo)

    FakeShell(monkeypatch, git_ok=False)
    monkeypatch.setenv("APRIEL_JAX_SOURCE", "https://example.org/team/apriel-jax")
    with pytest.raises(Exception) as excinfo:
        _run_cell(cell)
    assert "git could not clone https://example.org/team/apriel-jax" in _stop_message(excinfo)

    FakeShell(monkeypatch, installs=False)  # pip reports success, but the kernel still cannot import it
    with pytest.raises(Exception) as excinfo:
        _run_cell(cell)
    assert "restart the session" in _stop_message(excinfo)
