"""The engine names no method and no optimizer: it tells methods apart by their level and their
capabilities only. Checked on the code (names, attributes, string constants), not on prose."""

from __future__ import annotations

import ast
from pathlib import Path

import mtopt
import mtopt.engine

#: optimizers and optimizer-specific keys the engine must not know about
OPTIMIZER_WORDS = {"adam", "adamw", "sgd", "muon", "apt", "use_muon", "rmsprop", "lion"}


def _code_words(tree: ast.AST) -> set[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.add(node.value)
    return {w.lower() for w in words}


def test_no_module_of_the_engine_names_a_method_or_an_optimizer():
    forbidden = {*mtopt.available_methods(), *OPTIMIZER_WORDS}
    folder = Path(mtopt.engine.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        found = _code_words(ast.parse(path.read_text())) & forbidden
        assert not found, f"{path.name} names {sorted(found)}"


def test_the_check_sees_names_in_code():
    assert "mgda" in _code_words(ast.parse('x = make("mgda")'))
    assert "muon" in _code_words(ast.parse("opt.muon.step()"))
    assert "mgda" not in _code_words(ast.parse('"""Like mgda."""\n'))
