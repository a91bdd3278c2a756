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
