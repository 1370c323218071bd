"""A third party adds a method, a dataset and a table without editing the project (issue 9, item 5).

The slow tests install the throwaway package in tests/plugin_pkg/ into a temporary folder (entry points only, no
edit here) and drive the `harness` command through it: `list` with the installed console script in a fresh
interpreter (what a user types), then `describe`, `run method`, `run ablation --workers 2` (spawned worker processes,
fresh interpreters, must find the plugin on their own) and `report` as processes forked from the warm CLI server
(tests/warm_cli.py: the same `python -m harness.cli`, without ~12 s of imports each; the server has imported no
plugin and looked up no entry point); then the same with a plain module named by `--plugin`. The fast tests pin the registry's rules for
entry points and HARNESS_PLUGINS in-process, with fake entry points.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import warm_cli
from warm_cli import WarmProcess

from harness.plugins import ENV_VAR
from harness.registry import Registry

PLUGIN_SRC = Path(__file__).resolve().parents[1] / "plugin_pkg"
TINY = ["--dataset", "toyset", "--if", "10", "--seeds", "0", "--set", "train.eval_interval=0"]


def harness_command() -> list[str]:
    """The installed console script (what a user types), else the module."""
    script = Path(sys.executable).with_name("harness")
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness.cli"]


def cli_env(path: list[Path], home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "HARNESS_HOME": str(home),
           "OMP_NUM_THREADS": "1",  # parent and workers alike: the same threads give the same numbers
           "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(ENV_VAR, None)
    return env


def start(args: list[str], env: dict[str, str], cwd: Path, fresh: bool = False) -> subprocess.Popen | WarmProcess:
    """`harness ARGS` (cwd outside the repo): forked from the warm server, or with `fresh` the console script in a
    new interpreter."""
    if fresh:
        return subprocess.Popen([*harness_command(), *args], env=env, cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = warm_cli.popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.args = args  # type: ignore[attr-defined]  # for the failure message, as Popen has
    return process


def finish(process: subprocess.Popen | WarmProcess, expect: int = 0) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == expect, f"{process.args}\nstdout:\n{out}\nstderr:\n{err}"
    return out if expect == 0 else err


def harness(args: list[str], env: dict[str, str], cwd: Path, expect: int = 0) -> str:
    """One `harness ...`; stdout, or stderr when it must fail."""
    return finish(start(args, env, cwd), expect)


def top1_of(method: str, run_method_output: str) -> str:
    """The top1 cell of `harness run method`'s summary line for seed 0."""
    return re.search(rf"│ {method}\s*│\s*0 │\s*([\d.]+) │", run_method_output).group(1)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """tests/plugin_pkg installed with pip into a temporary folder; the build happens in a copy, so the source
    folder stays as committed."""
    root = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN_SRC, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(root / "site"), str(root / "src")], check=True, capture_output=True, timeout=300)
    return root / "site"


@pytest.mark.slow
def test_an_installed_plugin_package_works_through_every_command(installed_plugin, tmp_path):
    env, cwd = cli_env([installed_plugin], tmp_path / "runs"), tmp_path
    listings = [start(["list", what], env, cwd, fresh=what == "methods") for what in ("methods", "datasets", "tables")]
    describe = start(["describe", "toy", "--dataset", "toyset", "--if", "10", "--set", "method.hidden=8", "--json"],
                     env, cwd)
    methods, datasets, tables = (finish(p) for p in listings)
    assert re.search(r"│ toy\s+│ Toy MLP: cross-entropy", methods), methods
    assert re.search(r"│ shike\s+│", methods)  # the plugin adds to the registry; it replaces nothing
    assert re.search(r"│ toyset\s+│ 4 classes, n_max 120; synthetic", datasets), datasets
    assert re.search(r"│ toytable\s+│ Toy: does balanced re-training help\?", tables), tables
    assert re.search(r"│ table4\s+│", tables)

    facts = json.loads(finish(describe))
    # The --set switch reached the plugin's builder: a 3x32x32 -> 8 -> 4 MLP.
    assert facts["parameters_total"] == (3 * 32 * 32 * 8 + 8) + (8 * 4 + 4)
    assert [(s["name"], s["epochs"], s["trainable"]) for s in facts["stages"]] == [
        ("representation", 2, ["backbone", "head"]), ("classifier", 1, ["head"])]
    assert facts["method_args"] == {"balanced": True, "hidden": 8}

    # The single run and the study are independent (two experiments of one store): started together.
    single_run = start(["run", "method", "--method", "toy", *TINY], env, cwd)
    study_run = start(["run", "ablation", "--table", "toytable", "--workers", "2", *TINY], env, cwd)
    single, study = finish(single_run), finish(study_run)
    assert "toy on toyset IF 10" in single
    assert "runs from study toytable-toyset-if10" in study and study.count("(n=1)") == 2, study
    report = harness(["report", "toytable", "--format", "csv", "--no-figures"], env, cwd)
    cells = {line.split(",")[0]: line.split(",") for line in report.splitlines() if ",Acc," in line}
    assert set(cells) == {"CE re-trained", "Balanced softmax"}, report
    assert all(cell[4] == "1" and cell[8] == "ok" for cell in cells.values()), report  # n=1, status ok
    # The worker process that ran the "Balanced softmax" row (the toy's defaults) found the plugin through its entry
    # points and built the same data and model as `run method` did in the main process: the same final accuracy.
    assert float(cells["Balanced softmax"][2]) == pytest.approx(float(top1_of("toy", single)), abs=0.006)


FLAG_PLUGIN = '''
"""Registers on import, with no entry points: `harness --plugin toy_flag ...`."""
from harness.registry import DATASETS, METHODS
from harness.studies.tables import TABLES, Column, TableSpec, row
from harness_toy_plugin import TOYSET, toy

DATASETS.register("toyset")(TOYSET)


@METHODS.register("flagtoy")
def flagtoy(*, num_classes: int, class_counts: tuple[int, ...], hidden: int = 8, balanced: bool = True):
    """The toy MLP, registered by decorator."""
    return toy(num_classes=num_classes, class_counts=class_counts, hidden=hidden, balanced=balanced)


TABLES.register("flagtable")(TableSpec("flagtable", "Toy table of a --plugin module",
                                       (Column("Acc", "test/top1", "toyset", 10.0),),
                                       (row("Flag CE", "ce", "flagtoy", None, balanced=False),
                                        row("Flag BSCE", "bsce", "flagtoy"))))
'''


@pytest.mark.slow
def test_a_plugin_module_named_by_flag_reaches_the_main_process_and_the_workers(tmp_path):
    modules = tmp_path / "modules"  # a plain folder on PYTHONPATH: no distribution, so no entry points
    modules.mkdir()
    (modules / "toy_flag.py").write_text(FLAG_PLUGIN)
    shutil.copy(PLUGIN_SRC / "harness_toy_plugin.py", modules)
    env, cwd = cli_env([modules], tmp_path / "runs"), tmp_path

    # Three independent commands (the first fails before any store exists), started together.
    unknown_run = start(["run", "method", "--method", "flagtoy", "--dataset", "fmnistlt"], env, cwd)
    single_run = start(["--plugin", "toy_flag", "run", "method", "--method", "flagtoy", *TINY], env, cwd)
    # Worker processes get the module through HARNESS_PLUGINS; without it they would not know 'flagtoy'.
    study_run = start(["--plugin", "toy_flag", "run", "ablation", "--table", "flagtable", "--workers", "2", *TINY],
                      env, cwd)
    unknown, single, study = finish(unknown_run, expect=2), finish(single_run), finish(study_run)
    assert "unknown method 'flagtoy'" in unknown  # on the path is not enough: it is --plugin that imports it
    assert "flagtoy on toyset IF 10" in single and top1_of("flagtoy", single)
    for row_name in ("Flag CE", "Flag BSCE"):
        assert re.search(rf"{row_name}\s*│\s*[\d.]+ \(n=1\)", study), study


# ---- the registry's rules, in-process with fake entry points (fast) ----

@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Write importable modules into tmp_path; they leave sys.modules (and the --plugin memo) afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("harness.plugins._imported", set())
    written: list[str] = []

    def write(name: str, text: str) -> None:
        (tmp_path / f"{name}.py").write_text(text)
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)


def fake_entry_points(monkeypatch, *points: tuple[str, str, str]) -> None:
    """Make the registry see these (name, value, group) entry points and no others."""
    made = [importlib.metadata.EntryPoint(name, value, group) for name, value, group in points]
    monkeypatch.setattr("harness.registry.entry_points", lambda group: [p for p in made if p.group == group])


GADGETS = "from harness.registry import Registry\nGADGETS = Registry('gadget', 'test.gadgets')\n"


def test_entry_points_register_objects_by_their_name_and_modules_register_themselves(scratch, monkeypatch):
    scratch("gadgets_a", GADGETS)
    scratch("ep_objects", "def build():\n    'a builder'\n")
    scratch("ep_selfreg", "from gadgets_a import GADGETS\nGADGETS.register('by-decorator')(len)\n")
    fake_entry_points(monkeypatch, ("by-entry-point", "ep_objects:build", "test.gadgets"),
                      ("name-unused", "ep_selfreg", "test.gadgets"), ("other", "ep_objects:build", "other.group"))
    from gadgets_a import GADGETS as registry

    assert registry.names() == ["by-decorator", "by-entry-point"]
    assert registry.get("by-entry-point").__doc__ == "a builder" and registry.get("by-decorator") is len


def test_a_broken_or_clashing_plugin_is_skipped_with_a_warning_and_the_others_load(scratch, monkeypatch, caplog):
    scratch("ep_fine", "def build():\n    pass\n")
    scratch("ep_broken", "raise RuntimeError('plugin bug')\n")
    fake_entry_points(monkeypatch, ("broken", "ep_broken:build", "test.gadgets"),
                      ("taken", "ep_fine:build", "test.gadgets"), ("fine", "ep_fine:build", "test.gadgets"))
    registry = Registry("gadget", "test.gadgets")
    registry.register("taken")(min)
    with caplog.at_level(logging.WARNING, logger="harness.registry"):
        assert registry.names() == ["fine", "taken"]
    assert registry.get("taken") is min  # the first registration wins
    assert "skipping gadget plugin 'ep_broken:build' (RuntimeError: plugin bug)" in caplog.text
    assert "gadget 'taken' from ep_fine:build clashes" in caplog.text


def test_modules_in_the_environment_variable_are_imported_on_first_lookup(scratch, monkeypatch):
    """What a spawned worker does: its registries hold only built-ins until a lookup imports HARNESS_PLUGINS."""
    scratch("gadgets_b", GADGETS.replace("'test.gadgets'", "None"))
    scratch("env_plugin", "from gadgets_b import GADGETS\nGADGETS.register('from-env')(abs)\n")
    monkeypatch.setenv(ENV_VAR, "env_plugin")
    from gadgets_b import GADGETS as registry

    assert "env_plugin" not in sys.modules
    assert "from-env" in registry and registry.get("from-env") is abs


def test_a_plugin_that_reuses_a_built_in_name_is_refused_and_the_built_ins_stay_whole(scratch, tmp_path, caplog):
    """A distribution found before the harness on sys.path claims `shike`: the harness's own entry points load
    first, so the plugin is the one skipped (the other way round it took the name and broke `plain`, `ce`, ...)."""
    info = tmp_path / "shadow_plugin-0.1.dist-info"  # a real installed distribution, read by importlib.metadata
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shadow-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lt_harness.methods]\nshike = shadow_methods:fake\n")
    scratch("shadow_methods", "def fake(*, num_classes, class_counts):\n    'not SHIKE'\n")
    registry = Registry("method", "lt_harness.methods")  # filled from the real entry points, as METHODS is
    with caplog.at_level(logging.WARNING, logger="harness.registry"):
        names = registry.names()
    assert registry.get("shike").__module__ == "harness.methods.shike"
    assert {"shike", "plain", "ce", "bsce", "la"} <= set(names)
    assert "method 'shike' from shadow_methods:fake clashes" in caplog.text
