"""Sphinx configuration for the accel_hydra documentation."""

import os
import sys

# Document the package from this checkout, not from whatever is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import accel_hydra  # noqa: E402

project = "accel_hydra"
author = "the accel_hydra authors"
copyright = "the accel_hydra authors"
release = accel_hydra.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]

# Google-style docstrings (STYLE.md). Instance attributes listed under
# "Attributes:" become :ivar: fields rather than object descriptions, so the class
# can be rendered on both trainer.rst and api.rst without duplicate targets.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

autodoc_member_order = "bysource"

nitpicky = False

html_theme = "alabaster"
html_title = f"accel_hydra {release}"
html_static_path = []
