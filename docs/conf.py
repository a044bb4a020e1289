"""Sphinx configuration of the saner_jax documentation (bash scripts/docs.sh)."""

import saner_jax

project = "saner_jax"
author = "saner_jax contributors"
copyright = "2026, saner_jax contributors"
release = saner_jax.__version__
version = release

extensions = [
  "myst_nb",  # Markdown pages (MyST) and the notebooks, rendered as committed
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",  # the docstrings' Args:/Returns:/Examples: sections
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]

# The notebooks are executed by the tests (tests/test_notebooks.py), not by
# every docs build: the build stays a few seconds long.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "examples"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"saner_jax {release}"
