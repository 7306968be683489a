"""Sphinx configuration of the API reference: ``make docs`` builds it into docs/_build/html.

Every page comes from the docstrings: autosummary writes one page per module (docs/api/,
generated at each build, so a new module gets its page without an edit here), autodoc
renders each page's members and napoleon reads their Google-style sections (Args:,
Returns:, Raises:). The build treats warnings as errors (``-W --keep-going``).
"""

from importlib.metadata import version as _version

project = "vi-toolkit"
author = "vi-toolkit developers"
release = _version("vi-toolkit")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # hints beside each argument, not in long signatures

napoleon_google_docstring = True
napoleon_numpy_docstring = False  # one docstring style throughout: Google
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"vi-toolkit {release}"
