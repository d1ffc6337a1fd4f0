import importlib
import pkgutil

import dartvex_auth_better
import dartvex_auth_better._errors as errors_module


def test_all_is_sorted_unique_and_complete():
    names = list(dartvex_auth_better.__all__)
    assert names == sorted(names, key=lambda n: (n.startswith("_"), n))
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(dartvex_auth_better, name), name
    public = {
        n
        for n in vars(dartvex_auth_better)
        if n.isidentifier() and not n.startswith("_") and n != "annotations"
    }
    # Subpackages are importable but not part of the flat API.
    subpackages = {m.name for m in pkgutil.iter_modules(dartvex_auth_better.__path__)}
    assert public - subpackages <= set(names)


def test_every_error_is_exported_and_documented_in_one_place():
    doc = errors_module.__doc__ or ""
    for name in errors_module.__all__:
        assert name in dartvex_auth_better.__all__, name
        assert name in doc, f"{name} missing from the error tree docstring"
        assert issubclass(getattr(errors_module, name), dartvex_auth_better.DartvexError)


def test_private_modules_declare_all():
    for info in pkgutil.walk_packages(dartvex_auth_better.__path__, "dartvex_auth_better."):
        if info.name.endswith(("__main__", "pytest_plugin")):
            continue
        module = importlib.import_module(info.name)
        if not info.ispkg:
            assert hasattr(module, "__all__"), info.name


def test_convex_half_does_not_import_better_auth_half():
    import pathlib

    root = pathlib.Path(dartvex_auth_better.__file__).parent / "convex"
    for path in root.glob("*.py"):
        assert "better_auth" not in path.read_text(), path
