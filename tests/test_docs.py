"""The documentation: the user guide's code runs, and the pages generated from the code
(``docs/_ext/mtopt_docs.py``) cover every method, module and subcommand.

The Sphinx build itself (warnings as errors) is ``make docs``, run by CI."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import mtopt
from mtopt.core import registry
from mtopt.core.registry import method_class

DOCS = Path(__file__).resolve().parent.parent / "docs"
GUIDE = sorted((DOCS / "guide").glob("*.md"))
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _generator():
    spec = importlib.util.spec_from_file_location("mtopt_docs", DOCS / "_ext" / "mtopt_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of a Markdown page."""
    return [
        (m["lang"], m["body"], text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)
    ]


@pytest.mark.parametrize("page", GUIDE, ids=[p.name for p in GUIDE])
def test_guide_code_runs(page):
    """The page's ``python`` blocks run in order as one script; its ``pycon`` blocks are
    doctests in the same namespace. A method the page registers is unregistered after."""
    text = page.read_text(encoding="utf-8")
    blocks = [b for b in code_blocks(text) if b[0] in ("python", "pycon")]
    assert blocks, f"{page.name} has no code to test"
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    saved = dict(registry._REGISTRY)
    try:
        for lang, code, line in blocks:
            where = f"{page}:{line}"
            if lang == "python":
                exec(compile(code, where, "exec", dont_inherit=True), namespace)
            else:
                test = doctest.DocTestParser().get_doctest(code, namespace, where, str(page), line)
                runner.run(test, clear_globs=False)
                namespace.update(test.globs)  # names a block defines stay for the next ones
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted, f"no examples found in {page.name}"
    assert not failed, f"{failed} of {attempted} examples failed in {page.name}"


def test_every_method_has_a_page():
    gen = _generator()
    pages = gen.pages()
    index = pages["methods/index.rst"]
    for name in mtopt.available_methods():
        cls = method_class(name)
        page = pages[f"methods/{name}.rst"]
        assert f".. autoclass:: {cls.__module__}.{cls.__qualname__}" in page
        assert f".. automodule:: {cls.__module__}" in page
        for hp in cls.hyperparameters():
            assert f"``{hp}``" in page, (name, hp)
        for level in cls.levels:
            assert f"``{level}``" in page
        assert f":doc:`{name}`" in index
        title, _, summary = gen.method_summary(cls)
        assert title, name
        assert summary, name


def test_method_capabilities_and_summary():
    gen = _generator()
    assert gen.capabilities_of(method_class("auto_lambda")) == ["ClosureMethod", "MetaBatchMethod"]
    assert gen.capabilities_of(method_class("dwa")) == ["EpochAware"]
    assert gen.capabilities_of(method_class("unitary")) == []
    assert gen.method_summary(method_class("mgda"))[1] == "Sener & Koltun 2018"
    title, paper, summary = gen.method_summary(method_class("unitary"))
    assert paper == "Kurin et al. 2022; Gama & Grassi 2025"
    assert title == summary == 'Unitary scalarization ("equal weighting", EW/LS)'
    assert gen.method_summary(method_class("fixed"))[:2] == ("Fixed", "")
    rows = {name: default for name, default, _ in gen.hyperparameter_rows(method_class("mgda"))}
    assert rows == method_class("mgda").hyperparameters()
    valid = {name: text for name, _, text in gen.hyperparameter_rows(method_class("mgda"))}
    assert valid["pair_clamp"] == "float in [0, 0.5)"
    assert valid["tol"] == "finite float > 0"
    assert valid["solver"] == "``'wolfe'`` or ``'pgd'`` or ``'fw'``"
    required = [r for r in gen.hyperparameter_rows(method_class("fixed")) if r[0] == "weights"]
    assert required
    assert required[0][1] is inspect.Parameter.empty


def test_api_pages_cover_every_module():
    gen = _generator()
    pages = gen.pages()
    for package in gen.API_PACKAGES:
        assert f"api/{package}.rst" in pages
        for module in gen.submodules(package) if package != "mtopt" else []:
            assert f".. automodule:: {module}\n" in pages[f"api/{module}.rst"]
    assert "mtopt.methods" not in gen.API_PACKAGES  # the methods have their own pages


def test_reexported_names_resolve_to_their_definition():
    gen = _generator()
    assert gen.canonical_name("mtopt.make") == "mtopt.core.registry.make"
    assert (
        gen.canonical_name("mtopt.MultiTaskOptimizer.task_input")
        == "mtopt.engine.optimizer.MultiTaskOptimizer.task_input"
    )
    assert gen.canonical_name("mtopt.no_such_name") is None


def test_cli_page_has_every_subcommand():
    gen = _generator()
    progs = [prog for prog, _, _ in gen.cli_help()]
    for command in ("train", "compare", "sweep", "report", "methods", "data", "data fetch"):
        assert f"mtopt {command}" in progs
    page = gen.pages()["cli/index.rst"]
    assert "usage: mtopt train" in page


def test_generated_pages_are_written_once(tmp_path):
    gen = _generator()
    first = gen.write_pages(tmp_path)
    assert "methods/mgda.rst" in first
    assert "cli/index.rst" in first
    assert gen.write_pages(tmp_path) == []  # unchanged text is not rewritten
    stale = tmp_path / "methods" / "removed_method.rst"
    stale.write_text("old")
    gen.write_pages(tmp_path)
    assert not stale.exists()
