"""kubetune.operator: the kopf operator (thin handlers, pure manifest builders, one API module).

It never imports torch, transformers or vllm (tests/unit/test_boundaries.py checks).
"""

if __name__ == "operator":  # pragma: no cover - only when started from the repo root
    # `python -m X` run in the repo root puts the root first on sys.path, where this folder
    # shadows the standard library's `operator` before anything else is imported. Load the
    # real module in its place, with the loader that needs no other stdlib import.
    import sys
    import sysconfig
    from _frozen_importlib_external import SourceFileLoader

    _std = SourceFileLoader("operator", sysconfig.get_paths()["stdlib"] + "/operator.py")
    _mod = type(sys)("operator")
    _mod.__file__ = _std.path
    _std.exec_module(_mod)
    sys.modules["operator"] = _mod
    globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("__")})
