"""The package's import graph has no cycle, function-local imports included, and every module imports alone."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attnflow

PACKAGE = Path(attnflow.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every attnflow module ``path`` imports anywhere in its body (top level or inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != here}
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "attnflow.cli" in graph and "attnflow.store.write" in graph["attnflow.extract"]  # the parser sees imports
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_module_imports_alone_in_any_order():
    """Each module imported first into a fresh set of attnflow modules (torch stays loaded, for speed);
    ``attnflow.__main__`` is the command itself, which runs when imported."""
    modules = sorted(set(import_graph()) - {"attnflow.__main__"})
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r} + {modules[::-1]!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'attnflow' or m.startswith('attnflow.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_public_api_is_the_pipeline_whatever_was_imported_before():
    """attnflow.extract, .compare, .probe and .perturb are functions even after their modules are imported
    (which sets a package attribute of the same name), and every name of __all__ resolves."""
    import warnings

    import attnflow
    import attnflow.cli  # imports attnflow/extract.py, compare.py, probe.py, perturb.py
    from attnflow.compare import compare_files
    from attnflow.extract import extract
    from attnflow.measure import compute_metrics
    from attnflow.perturb import perturb
    from attnflow.probe import probe_caches
    from attnflow.store.read import open_metrics

    assert (attnflow.extract, attnflow.compare, attnflow.probe, attnflow.perturb) == (extract, compare_files, probe_caches, perturb)
    assert attnflow.compute_metrics is compute_metrics and attnflow.open_metrics is open_metrics
    for name in attnflow.__all__:
        assert getattr(attnflow, name) is not None, name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from attnflow.cache import open_metrics as old  # the path attnflow 0.1 showed, kept until 0.3
    assert old is open_metrics
    assert [w.category for w in caught] == [DeprecationWarning] and "attnflow.cache.open_metrics" in str(caught[0].message)


def test_every_module_declares_its_public_names():
    """Each module's __all__ (of subpackages too) names what it defines without a leading underscore, and only
    what exists; a package that defines nothing declares an empty one."""
    import importlib
    import pkgutil
    import warnings

    import attnflow

    for info in pkgutil.walk_packages(attnflow.__path__, "attnflow."):
        if info.name == "attnflow.__main__":  # runs the command
            continue
        module = importlib.import_module(info.name)
        declared = getattr(module, "__all__", None)
        assert declared is not None, f"{info.name} has no __all__"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the old paths' names (attnflow.schema)
            missing = [name for name in declared if not hasattr(module, name)]
        assert not missing, (info.name, missing)
        tree = ast.parse(Path(module.__file__).read_text())
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
        undeclared = [name for name in defined if name not in declared]
        assert not undeclared, f"{info.name} defines {undeclared} without declaring them in __all__"
        assert declared or info.ispkg, f"{info.name} declares nothing in __all__"


# Every public name of attnflow.schema as attnflow 0.2.0 had it, and the module of the storage package that holds it now.
OLD_SCHEMA = {
    "attnflow.store.names": [
        "SCHEMA", "METRICS_SCHEMA", "PERTURB_SCHEMA", "StoreMode", "DType", "Compression", "PARTIAL_SUFFIX",
        "IMAGE_IDS", "IMAGE_SHA256", "LABELS", "CLASS_NAMES", "SKIPPED", "SKIPPED_REASON", "FG", "ATTN", "ATTN_ROWS",
        "MAGNITUDE", "TOKEN_NORM", "TOKENS", "LAYER_TOKENS", "FINAL_NORM_WEIGHT", "FINAL_NORM_BIAS", "FINAL_NORM_EPS",
        "METRICS_GROUP", "ROLLOUT_MAP", "FLOW_MAP", "PERTURB_SIMILARITY", "PERTURB_CORRECT", "PERTURB_CLEAN_CORRECT",
        "PERTURB_RELEVANCE", "MAPS_DATASET", "STATIC_DATASETS", "SKIP_DATASETS", "metric_dataset", "partial_path",
        "from_text", "layout_attrs", "layout_from_attrs", "stored_token_layers", "tokens_dataset", "Expect",
        "CACHE_DATASETS", "METRICS_DATASETS", "PERTURB_DATASETS", "METRIC_DATASETS", "Attr", "ROOT_ATTRS",
        "FILE_ATTRS", "CACHE_ATTRS", "METRICS_ATTRS", "PERTURB_ATTRS", "OPTIONAL_ATTRS", "PREPROCESSING_KEYS",
    ],
    "attnflow.store.validate": ["open_hdf5", "hdf5_reason", "file_attrs", "validate", "written_by"],
    "attnflow.store.scales": ["attach_dimension_scales"],
    "attnflow.store.read": ["Rows", "CheckedDataset", "Cache", "MetricsFile", "PerturbFile", "open_cache", "open_metrics",
                            "open_perturbation", "describe"],
}

# Every public name attnflow.cache defined in attnflow 0.2.0 (it also gave those of attnflow.schema), and its new home.
OLD_CACHE = {
    "attnflow.store.write": ["RESUME_KEYS", "to_text", "inputs_digest", "masks_digest", "RowDataset", "CacheSpec",
                             "MetricsSpec", "GZIP_LEVEL", "RunLock", "RowFileWriter"],
    "attnflow.store.assembly": ["Segment", "in_memory_hdf5", "ASSEMBLY", "ASSEMBLY_STATE", "STEP_BYTES"],
}


def check_old_path(old: str, name: str, home: str) -> None:
    """``old.name`` is ``home.name``, given with one DeprecationWarning that names the new path."""
    import importlib
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(home), name), (old, name)
    also = f" (or attnflow.{name})" if name in attnflow.__all__ else ""
    assert [str(w.message) for w in caught] == [f"{old}.{name} moved to {home}.{name}{also}; the old path is removed in 0.3"]
    assert caught[0].category is DeprecationWarning and caught[0].filename == __file__  # the caller's line


def test_the_old_paths_still_give_every_name_they_had():
    """Until 0.3, every public name attnflow.schema and attnflow.cache had still comes from them, as the very
    object of its new home, with a DeprecationWarning; attnflow.cache also gives attnflow.schema's, as it did
    since 0.1."""
    import importlib

    for old, tables in (("attnflow.schema", [OLD_SCHEMA]), ("attnflow.cache", [OLD_CACHE, OLD_SCHEMA])):
        names = []
        for table in tables:
            for home, moved in table.items():
                for name in moved:
                    check_old_path(old, name, home)
                names += moved
        module = importlib.import_module(old)
        assert sorted(module.__all__) == sorted(names)
        with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'NOT_A_NAME'"):
            module.NOT_A_NAME
