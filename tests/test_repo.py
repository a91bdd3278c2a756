"""Repository conventions: CI runs the README's test command; the layout is complete."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv") and ci.endswith("python -m pytest")
    assert ci in (REPO / "README.md").read_text(encoding="utf-8")


def test_top_level_layout():
    for path in ("Snakefile", "config.yaml", "workflow/rules/common.smk", "workflow/schemas/config.schema.yaml",
                 "workflow/profiles/default/config.yaml", "envs/semiseg.yaml", "src/semiseg/__init__.py",
                 "pyproject.toml", "README.md", "docs/benchmarks.md", "docs/method-choices.md"):
        assert (REPO / path).exists(), path
    assert "results/" in (REPO / ".gitignore").read_text(encoding="utf-8").split()


def test_conda_env_mirrors_package_dependencies():
    import re
    import tomllib

    import yaml

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower() for d in deps}
    env = yaml.safe_load((REPO / "envs" / "semiseg.yaml").read_text(encoding="utf-8"))
    conda = set()
    for d in env["dependencies"]:
        items = d["pip"] if isinstance(d, dict) else [d]
        conda |= {re.split(r"[<>=!~ ]", i, maxsplit=1)[0].lower() for i in items}
    conda_names = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
    conda = {conda_names.get(n, n) for n in conda}
    # snakemake runs the jobs; it need not be inside the jobs' environment.
    assert names - {"snakemake"} <= conda, names - conda


def test_license_and_citation():
    import tomllib

    import yaml

    assert tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"] == {"text": "MIT"}
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert cff["preferred-citation"]["title"].startswith("Exploring Feature Representation Learning")
    import semiseg

    assert str(cff["version"]) == semiseg.__version__


def test_readme_links_and_docs_for_users():
    """The README's relative links resolve; the user docs name no issue numbers and no
    paths outside the repository."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)\)", readme):
        assert (REPO / target).exists(), target
    for doc in ("workflow", "configuration", "real-data", "cluster", "data-format", "python-api", "command-line"):
        text = (REPO / "docs" / f"{doc}.md").read_text(encoding="utf-8")
        assert not re.search(r"\bissue \d+", text, flags=re.I), doc
        assert "../shared" not in text, doc
    assert not re.search(r"\bissue \d+", readme, flags=re.I) and "../shared" not in readme
