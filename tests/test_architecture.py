"""The package's shape, read from its source: stages are siblings, and every shared fact has one owner.

A stage (one command's work) imports only lower modules, never another stage: what two stages share
lives below both (``layout``, ``subtypes``, ``records``, ``evaluation``, ``devices``, ...). Only the
modules that chain stages (``run``, ``demo``, ``cli``) import them. Facts such as the subtype values,
the image channel suffix and the file names stages hand to each other are defined in their owner only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pancreas_cli
from pancreas_cli import exceptions

PACKAGE = Path(pancreas_cli.__file__).parent

#: Each command's own module. None imports another stage.
STAGES = frozenset({"synth", "prepare", "clean", "preprocess", "train", "predict", "evaluate", "report",
                    "doctor"})
#: The modules that chain stages, and the stages (or chains) each may import.
CHAINS = {
    "run": STAGES - {"synth", "doctor"},
    "demo": frozenset({"synth"}),
    "cli": STAGES | {"run", "demo"},
    "__main__": frozenset({"cli"}),
}

#: Names of shared facts, and the one module that may define them.
OWNED_NAMES = {
    "SUBTYPES": "subtypes", "CHANNEL": "subtypes", "TRAINERS": "layout", "CHECKPOINTS": "layout",
    "METRICS_NAME": "layout", "STATE_NAME": "layout", "METRICS_COLUMNS": "multitask.history",
    "SIDECAR_DIR": "records", "PER_CASE_COLUMNS": "evaluation", "CT_WINDOW": "figures",
    "PROBABILITIES_DIR": "outputs.probabilities", "STATISTICS_DIR": "outputs.statistics",
    "STATISTICS_NAME": "outputs.statistics", "PREVIEW_DIR": "outputs.preview", "DICOM_SEG_DIR": "outputs.dicomseg",
    "BACKENDS": "inference.backends",
}
#: File names that stages hand to each other, and the one module that may spell them out.
OWNED_STRINGS = {
    "metrics.csv": "layout",
    "pancseg_preprocess.json": "layout",
    "checkpoint_final.pth": "layout",
    "checkpoint_latest.pth": "layout",
    "checkpoint_best.pth": "layout",
    "subtypes.csv": "subtypes",
    "subtype_results.csv": "subtypes",
    "subtype_probabilities.csv": "subtypes",
    ".pancseg": "records",
    "metrics_per_case.csv": "evaluation",
    "metrics_summary.json": "evaluation",
}


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name below it (``multitask.trainer``), parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def _imported(tree: ast.Module) -> set[str]:
    """The package's modules that ``tree`` imports anywhere (inside functions too), by dotted name."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # from pancreas_cli import layout
    prefix = "pancreas_cli."
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of ``tree`` (prose may name any file)."""
    owners = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.ClassDef)))]
    return {id(o.body[0].value) for o in owners
            if o.body and isinstance(o.body[0], ast.Expr) and isinstance(o.body[0].value, ast.Constant)}


def _strings(tree: ast.Module) -> list[str]:
    """Every string constant of ``tree`` but its docstrings (f-strings' literal parts included)."""
    skip = _docstrings(tree)
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


MODULES = _modules()


def test_the_stages_and_chains_named_here_exist() -> None:
    assert STAGES | CHAINS.keys() <= MODULES.keys()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_stages_import_only_lower_modules(module: str) -> None:
    upper = STAGES | CHAINS.keys()
    imported = {name for name in _imported(MODULES[module]) if name in upper}
    allowed = CHAINS.get(module, frozenset())
    assert imported <= allowed, (
        f"pancreas_cli.{module} imports {sorted(imported - allowed)}: "
        + ("a stage imports only lower modules; move what they share below both"
           if module in STAGES else "only run, demo and cli chain stages"))


def _assigned(tree: ast.Module) -> set[str]:
    """The names ``tree`` assigns (``SUBTYPES = ...``, ``A, B = ...``)."""
    targets = [t for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets]
    targets += [n.target for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


@pytest.mark.parametrize(("name", "owner"), sorted(OWNED_NAMES.items()))
def test_shared_facts_are_defined_by_their_owner_only(name: str, owner: str) -> None:
    assert sorted(module for module, tree in MODULES.items() if name in _assigned(tree)) == [owner]


def test_case_ids_and_image_names_go_through_subtypes() -> None:
    """Only :mod:`pancreas_cli.subtypes` knows the image channel suffix: no module strips or adds it."""
    spelled = [name for name, tree in MODULES.items() if any("_0000" in s for s in _strings(tree))]
    assert spelled == ["subtypes"]


@pytest.mark.parametrize(("text", "owner"), sorted(OWNED_STRINGS.items()))
def test_shared_names_are_spelled_out_by_their_owner_only(text: str, owner: str) -> None:
    spelled = sorted(name for name, tree in MODULES.items() if text in _strings(tree))
    assert spelled == [owner]


def test_every_pancseg_error_is_defined_in_exceptions() -> None:
    ours = {name for name, value in vars(exceptions).items()
            if isinstance(value, type) and issubclass(value, exceptions.PancsegError)}
    classes = [(module, node) for module, tree in MODULES.items() if module != "exceptions"
               for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    def base_names(node: ast.ClassDef) -> set[str | None]:
        return {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}

    assert sorted(f"{module}.{node.name}" for module, node in classes if base_names(node) & ours) == []

