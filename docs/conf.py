"""Sphinx configuration of the mtopt documentation (``make docs``).

The method pages (``methods/``), the API reference (``api/``) and the command-line reference
(``cli/``) are generated at build time from the registry, the package and the argparse parser by
the local extension ``_ext/mtopt_docs.py``: a new method, module or subcommand gets its page
without a documentation edit. Those three folders are build products (git-ignored).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # the checkout's mtopt, even without `pip install -e`

import mtopt  # noqa: E402

project = "mtopt"
author = "the mtopt authors"
copyright = "the mtopt authors"
release = version = mtopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "mtopt_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "_ext",
    "Thumbs.db",
    ".DS_Store",
    # tables written by scripts, shown inside a page that gives them a title ({include})
    "robustness/cases_*.md",
    "results/**/table.md",
    # what `mtopt report` writes beside a study (linked from its README, not pages themselves)
    "results/**/statistics.md",
    "results/**/learning_curves.md",
]

# -- autodoc / napoleon -------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Attributes:` as a field list, not as attribute objects that would clash with autodoc's
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- references -------------------------------------------------------------------------------
# A reference to an mtopt name that resolves nowhere is an error (a typo, a moved or renamed
# object); re-exported names (``mtopt.make``) resolve to where they are defined (_ext/mtopt_docs).
# Names outside mtopt (torch, numpy, the standard library) are not linked: the build is offline.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!mtopt\.).*"),  # outside mtopt, or relative names autodoc could not place
    (r"py:.*", r"mtopt(\.\w+)*\.[A-Z]"),  # type variables (T, P): not documented
    (r"py:.*", r"mtopt(\.\w+)*\._\w*"),  # private names, in rendered pydantic metadata
]

# -- MyST (the Markdown pages) ------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# -- HTML -------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"mtopt {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Multi-task optimization behind one step contract"}
