"""The distribution: a name of its own on PyPI, the `imgproc` command, every library it imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: Import names whose distribution is named otherwise.
DISTRIBUTIONS = {
    "yaml": "pyyaml", "erfa": "pyerfa", "skimage": "scikit-image", "cv2": "opencv-python-headless"
}  # fmt: skip


def test_the_distribution_has_a_free_name_and_the_command_stays_imgproc() -> None:
    project = PROJECT["project"]
    assert project["name"] == "imgproc-astro"  # "imgproc" on PyPI is another package
    assert project["scripts"] == {"imgproc": "imgproc.cli:main"}
    assert "Topic :: Scientific/Engineering :: Astronomy" in project["classifiers"]
    assert "Intended Audience :: Science/Research" in project["classifiers"]
    versions = [
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert min(versions) == project["requires-python"].removeprefix(">=")


def test_every_library_the_package_imports_is_a_dependency() -> None:
    required = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in PROJECT["project"]["dependencies"]}
    imported = set()
    for path in [*(REPO / "imgproc").glob("*.py"), *(REPO / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"imgproc", "__future__"}
    assert {DISTRIBUTIONS.get(name, name) for name in third_party} <= required


def test_the_wheel_carries_the_workflow() -> None:
    included = PROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    needed = {"Snakefile", "config.yaml", "rules", "scripts", "schemas", "envs", "profiles"}
    assert set(included) == needed and all((REPO / name).exists() for name in needed)
    assert all(target == f"imgproc/workflow/{name}" for name, target in included.items())
