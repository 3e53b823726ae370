"""The registry of shipped sm_90 variants: each stage module decorates the function that lists its
variants with :func:`register` at import, and ``_sm90.shipped_variants()`` reads it.

It lives apart from ``_sm90`` so that importing a stage does not import ``_sm90``: ``python -m
moekernels._sm90`` runs that module as ``__main__``, and a copy imported earlier by the package
would hold a registry of its own (runpy warns about exactly that).
"""

REGISTRY: dict = {}  # stage module name -> fn() -> list[_sm90.Variant]


def register(fn):
    """Decorator: ``fn() -> list[Variant]`` lists a stage's shipped variants (one per module)."""
    REGISTRY[fn.__module__] = fn
    return fn
