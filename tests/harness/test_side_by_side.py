"""The harness installs next to a package named `datasets` (Hugging Face's, in most environments of this field) and
both import (issue 9, item 6): the repository's folders install under the one import name `harness`.

A throwaway distribution providing a top-level `datasets` package is installed into a temporary folder; a fresh
interpreter whose working directory is NOT the repository (the repository root on sys.path would expose its own
folders by their folder names) imports both. The same check with the real Hugging Face package needs a download, so
it is done by hand; the README's "Plugins" section and the issue's closing note record it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

STAND_IN = {
    "pyproject.toml": '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
                      '[project]\nname = "datasets"\nversion = "0.0.1"\n\n'
                      '[tool.setuptools]\npackages = ["datasets"]\n',
    "datasets/__init__.py": 'WHO = "stand-in for Hugging Face datasets"\n',
}

PROBE = """
import importlib.util, json, sys
import datasets
import harness.datasets, harness.methods, harness.studies
print(json.dumps({
    "datasets": datasets.__file__, "who": datasets.WHO,
    "harness.datasets": harness.datasets.__file__, "harness.methods": harness.methods.__file__,
    "harness.studies": harness.studies.__file__,
    "still_the_same_datasets": sys.modules["datasets"] is datasets,
    "top_level": {name: importlib.util.find_spec(name) is not None for name in ("methods", "studies")},
}))
"""


def install_stand_in(root: Path) -> Path:
    """Build and install the `datasets` stand-in with pip into root/site (offline: setuptools is in the venv)."""
    source = root / "src"
    for name, text in STAND_IN.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(root / "site"), str(source)], check=True, capture_output=True, timeout=300)
    return root / "site"


@pytest.mark.slow  # a pip install and a fresh interpreter
def test_a_package_named_datasets_and_the_harness_import_side_by_side(tmp_path):
    site = install_stand_in(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["datasets"]) == site / "datasets" / "__init__.py" and found["who"].startswith("stand-in")
    # Each harness part resolves to its own file (the repository folder in an editable install), as in this process.
    for module in ("harness.datasets", "harness.methods", "harness.studies"):
        assert found[module] == importlib.util.find_spec(module).origin, found
        assert site not in Path(found[module]).parents
    assert found["still_the_same_datasets"]  # importing the harness did not replace the other package
    assert found["top_level"] == {"methods": False, "studies": False}  # the harness installs no generic top names
