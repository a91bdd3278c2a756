"""Data sets: the synthetic demo generator."""


def case_id(index: int, prefix: str = "demo") -> str:
    """Case identifier of generated case ``index``: ``demo_000``, ``demo_001``, ...

    Here, not in :mod:`semiseg.data.synthetic`, so that the workflow can list a generated
    data set's cases while it parses without importing the generator's NumPy, SciPy and
    SimpleITK.
    """
    return f"{prefix}_{index:03d}"
