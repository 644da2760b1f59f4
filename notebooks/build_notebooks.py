"""Writes the Colab notebooks of this folder from the cell sources of the ``nb_*`` modules beside it (outputs
cleared).

    python notebooks/build_notebooks.py          # rewrite notebooks/*.ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from what this file builds

The notebooks are generated so that they can be reviewed (and diffed) as Python: ``nb_cells.py`` holds the
cells every notebook shares (install, runtime, tiny checkpoint), one ``nb_*.py`` module each notebook's
cells. Edit the cells there, rerun, commit both. ``tests/test_notebooks.py`` executes every notebook top
to bottom with ``APRIEL_NOTEBOOK_SMOKE=1`` (a few steps per stage) and checks that the committed files are
up to date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the nb_* modules, also when this file is loaded by path (tests)
    sys.path.insert(0, str(HERE))

from nb_colab_lora import colab_lora  # noqa: E402
from nb_conversion import conversion  # noqa: E402
from nb_finetune import finetune  # noqa: E402
from nb_quickstart import quickstart  # noqa: E402
from nb_recipe import recipe  # noqa: E402

NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_finetune.ipynb": finetune,
    "03_conversion.ipynb": conversion,
    "04_recipe.ipynb": recipe,
    "05_colab_lora.ipynb": colab_lora,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    })
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives identical files
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
