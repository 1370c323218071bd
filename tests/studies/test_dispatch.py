"""`--dispatch local|ray|slurm` (`harness.studies.dispatch`): the registry, the one-line refusals (a cluster package
missing, a backend's flag given to another), SLURM and Ray resources from the flags, a failed run named by row and
seed while the others land, and a tiny ablation through Ray (a local cluster) and through submitit's LocalExecutor
giving each run the final metrics the local path gives it for the same seed (one torch thread per run everywhere)."""

from __future__ import annotations

import sys
import types

import pytest
from cli_support import run_cli as cli

from harness.cli import main
from harness.errors import HarnessError
from harness.studies.dispatch import (
    DISPATCHERS,
    INSTALL_HINT,
    DispatchOptions,
    Failure,
    RayTasks,
    RunJob,
    SlurmJobs,
    SlurmOptions,
    error_line,
    failure_message,
    run_all,
)
from harness.studies.settings import RunSettings

# Table 4's Plain row on Fashion-MNIST-LT IF 100 at n_max 100 (10 classes, 100 -> 1 images), 20 test images per
# class, ResNet-8 trunks, 1+1 epochs with the demo's batch and LRs (so the two seeds learn, and differ, in seconds).
TINY = ["--dataset", "fmnistlt", "--if", "100", "--epochs", "1+1", "--set", "data.test_per_class=20",
        "--set", "train.eval_interval=0", "--set", "data.n_max=100", "--set", "data.augment=basic",
        "--set", "method.depth=8", "--set", "optim.batch_size=32", "--set", "stage.representation.peak_lr=0.075",
        "--set", "stage.classifier.peak_lr=0.05", "--set", "train.fast_path=on"]
STUDY = ["run", "ablation", "--rows", "plain", "--seeds", "0,1", "--cpus-per-run", "1", *TINY]
# The end-to-end tests share the module's store, the local reference runs and one Ray cluster: one xdist worker.
SHARED = pytest.mark.xdist_group("dispatch")
FINAL = ["metrics.test/top1", "metrics.test/few", "metrics.test/ece", "metrics.test/nll"]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_the_registry_holds_the_three_backends_and_names_them_on_a_miss():
    assert DISPATCHERS.names() == ["local", "ray", "slurm"]
    with pytest.raises(HarnessError, match="unknown dispatcher 'k8s'; known dispatchers: local, ray, slurm"):
        DISPATCHERS.get("k8s")


@pytest.mark.parametrize("command", [STUDY[:2], ["run", "method", "--method", "ce"]])
@pytest.mark.parametrize("backend, module, extra", [("ray", "ray", []), ("slurm", "submitit", ["--slurm-local"])])
def test_a_missing_cluster_package_is_one_line_naming_the_extra(command, backend, module, extra, monkeypatch,
                                                                 capsys, harness_home):
    monkeypatch.setitem(sys.modules, module, None)  # `import ray` raises ImportError, as where it is not installed
    code, _, err = cli([*command, *TINY, "--dispatch", backend, *extra], capsys)
    assert code == 2
    assert one_line(err) == (f"harness: error: --dispatch {backend} needs {module}, which is not installed: "
                             f"{INSTALL_HINT}")
    assert INSTALL_HINT == "pip install 'lt-harness[cluster]'"
    assert not (harness_home / "mlflow.db").exists()  # refused before any run or store


@pytest.mark.parametrize("flags, fragment", [
    (["--dispatch", "ray", "--slurm-partition", "gpu"], "--slurm-partition does not apply to --dispatch ray"),
    (["--slurm-local", "--ray-address", "auto", "--dispatch", "local"],
     "--slurm-local, --ray-address does not apply to --dispatch local"),
    (["--gpus-per-run", "1"], "--gpus-per-run does not apply to --dispatch local"),
    (["--dispatch", "slurm", "--slurm-option", "account"], "--slurm-option expects KEY=VALUE"),
    (["--dispatch", "mpi"], "unknown dispatcher 'mpi'; known dispatchers: local, ray, slurm"),
    (["--dispatch", "ray", "--workers", "2"], "--workers sizes the local process pool; with --dispatch ray"),
    (["--dispatch", "slurm", "--workers", "2", "--slurm-local"], "with --dispatch slurm SLURM runs as many"),
])
def test_a_flag_that_does_not_fit_the_backend_is_refused_in_one_line(flags, fragment, capsys, monkeypatch,
                                                                     harness_home):
    for module in ("ray", "submitit"):  # refused before either is imported: the same line without the extra
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = cli([*STUDY, *flags], capsys)
    assert code == 2 and fragment in one_line(err), err
    assert not (harness_home / "mlflow.db").exists()


def test_slurm_parameters_come_from_the_flags(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))  # parameters() never calls it
    monkeypatch.setattr("harness.studies.dispatch.shutil.which", lambda name: None)
    with pytest.raises(HarnessError, match="needs SLURM's sbatch .* use --slurm-local"):
        SlurmJobs(DispatchOptions("slurm"))
    monkeypatch.setattr("harness.studies.dispatch.shutil.which", lambda name: f"/usr/bin/{name}")
    slurm = SlurmOptions(partition="gpu", time_min=90, mem_gb=16.0, array_parallelism=4,
                         extra=(("account", "lab"), ("slurm_qos", "high"), ("signal_delay_s", "120")))
    params = SlurmJobs(DispatchOptions("slurm", cpus_per_run=6, slurm=slurm)).parameters()
    assert params == {"name": "lt-harness", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 6,
                      "gpus_per_node": 1, "mem_gb": 16.0, "slurm_partition": "gpu", "slurm_array_parallelism": 4,
                      "slurm_account": "lab", "slurm_qos": "high", "slurm_signal_delay_s": 120}
    defaults = SlurmJobs(DispatchOptions("slurm", gpus_per_run=0)).parameters()
    assert (defaults["timeout_min"], defaults["cpus_per_task"], defaults["gpus_per_node"]) == (24 * 60, 1, 0)
    assert "slurm_partition" not in defaults and "mem_gb" not in defaults  # the cluster's defaults


def test_slurm_local_gives_a_device_only_where_this_machine_has_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    local = DispatchOptions("slurm", slurm=SlurmOptions(local=True))
    for cuda in (False, True):
        monkeypatch.setattr("harness.studies.dispatch.torch.cuda.is_available", lambda cuda=cuda: cuda)
        assert SlurmJobs(local).parameters()["gpus_per_node"] == int(cuda)


def fake_ray(monkeypatch, resources: dict[str, float]) -> None:
    module = types.ModuleType("ray")
    module.cluster_resources = lambda: resources
    monkeypatch.setitem(sys.modules, "ray", module)


@pytest.mark.parametrize("resources, options, expected", [
    ({"CPU": 16.0, "GPU": 4.0}, {}, (1, 1)),  # one device per run where the cluster has CUDA devices
    ({"CPU": 2.0}, {}, (1, 0)),  # else one CPU
    ({"CPU": 16.0, "GPU": 4.0}, {"cpus_per_run": 4, "gpus_per_run": 0}, (4, 0)),
])
def test_ray_resources_per_run(resources, options, expected, monkeypatch):
    fake_ray(monkeypatch, resources)
    assert RayTasks(DispatchOptions("ray", **options)).resources() == expected


def test_a_run_the_ray_cluster_cannot_fit_is_refused_instead_of_waiting_forever(monkeypatch):
    fake_ray(monkeypatch, {"CPU": 2.0})
    with pytest.raises(HarnessError, match=r"asks for 1 CPU\(s\) and 1 GPU\(s\) but the Ray cluster has 2 CPU\(s\) "
                                           r"and 0 GPU\(s\)"):
        RayTasks(DispatchOptions("ray", gpus_per_run=1)).resources()


class Ref:
    """An "object ref" that holds its task's result (hashable by identity, as Ray's refs are usable as keys)."""

    def __init__(self, value) -> None:
        self.value = value


class InlineRay(types.ModuleType):
    """Ray's API as RayTasks uses it, running each task inline: what is asked of Ray, without a cluster."""

    def __init__(self, initialized: bool = False) -> None:
        super().__init__("ray")
        self.calls: list[tuple[str, dict]] = []
        self.initialized = initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.calls.append(("init", kwargs))

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, function):
        ray = self

        class Task:
            def options(self, **kwargs):
                ray.calls.append(("options", kwargs))
                return self

            def remote(self, *args):
                return Ref(function(*args))

        return Task()

    def wait(self, pending: list, num_returns: int) -> tuple[list, list]:
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        return ref.value


@pytest.mark.parametrize("address, initialized, expected", [
    (None, False, [("init", {"include_dashboard": False, "log_to_driver": True})]),
    ("auto", False, [("init", {"address": "auto", "log_to_driver": True})]),
    ("auto", True, []),  # this process already joined a cluster: use it as it is
])
def test_ray_joins_or_starts_a_cluster_sends_one_task_per_run_and_ends_only_what_it_joined(
        address, initialized, expected, monkeypatch, harness_home, one_torch_thread):
    ray = InlineRay(initialized)
    monkeypatch.setitem(sys.modules, "ray", ray)
    dispatcher = DISPATCHERS.get("ray")(DispatchOptions("ray", ray_address=address))
    records, failures = run_all(dispatcher, [bad_job(0), bad_job(1)], f"sqlite:///{harness_home / 'mlflow.db'}",
                                False)
    assert records == [] and [f.job.label for f in failures] == ["row Plain seed 0", "row Plain seed 1"]
    tail = [] if initialized else [("shutdown", {})]
    assert ray.calls == [*expected, ("options", {"num_cpus": 1, "num_gpus": 0, "max_retries": 0}), *tail]


def bad_job(seed: int, row: str = "Plain") -> RunJob:
    """A run that fails in its first step: CIFAR-100 files that are not there."""
    cfg = RunSettings("cifar100lt", data_root="/nonexistent/cifar").config("ce", seed)
    return RunJob(cfg, "broken", f"broken-s{seed}", seed, row, "plain")


def test_a_failure_is_named_by_row_and_seed_in_one_line():
    class TaskError(Exception):  # what Ray raises: the task's own exception as `cause`
        def __init__(self, cause: Exception) -> None:
            super().__init__(f"ray::run_remote() failed\n{cause}")
            self.cause = cause

    assert error_line(TaskError(ValueError("bad\nmore"))) == "ValueError: bad"
    assert error_line(MemoryError()) == "MemoryError"
    failures = [Failure(bad_job(1), "RuntimeError: boom"), Failure(bad_job(2, "SHIKE"), "OSError: gone")]
    text = failure_message(failures, 3, "parent run abc")
    assert text.startswith("2 of 5 runs failed: row Plain seed 1 (RuntimeError: boom); row SHIKE seed 2 "
                           "(OSError: gone); the 3 other run(s) landed in parent run abc; rerun with --resume")
    method_job = RunJob(bad_job(0).cfg, "e", "n", 3, key="ce")
    assert method_job.label == "ce seed 3" and "\n" not in text


def test_submitits_path_reports_each_failed_run_and_goes_on(harness_home, one_torch_thread):
    """Through submitit's pickling path in this process (its debug cluster): both runs fail in their first step;
    each comes back as a Failure with its row and seed, none stops the other."""
    pytest.importorskip("submitit")
    options = DispatchOptions("slurm", slurm=SlurmOptions(cluster="debug"))
    records, failures = run_all(DISPATCHERS.get("slurm")(options), [bad_job(0), bad_job(1, "SHIKE")],
                                f"sqlite:///{harness_home / 'mlflow.db'}", False)
    assert records == []
    assert [(f.job.label, f.error.split(":")[0]) for f in failures] == [("row Plain seed 0", "HarnessError"),
                                                                       ("row SHIKE seed 1", "HarnessError")]
    assert all("--download" in f.error for f in failures)


# End to end: the same two seeds of Table 4's Plain row through each backend, into one store.

@pytest.fixture(scope="module")
def store(tmp_path_factory, one_torch_thread):
    """One runs folder for the module (the store is built once); each test logs to an experiment of its own."""
    home = tmp_path_factory.mktemp("dispatch") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_HOME", str(home))
        yield home


def study_runs(experiment: str):
    """(the parent run, its children) of the one study logged to `experiment`."""
    from harness.tracking import Tracker

    runs = Tracker().search([experiment])
    parents = runs[runs["tags.kind"] == "study"]
    assert len(parents) == 1
    return parents.iloc[0], runs[runs["tags.kind"] != "study"]


def landed_alike(experiment: str, reference: dict, out: str) -> None:
    """Every child FINISHED under the study's parent, each (row, seed) once, counted once in the table (n=2), with
    the same final metrics and thread count as the local runs of the same seeds."""
    parent, children = study_runs(experiment)
    assert parent["status"] == "FINISHED"
    assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert sorted(zip(children["tags.row_key"], children["tags.seed"])) == [("plain", "0"), ("plain", "1")]
    assert "(n=2)" in out.split("Plain", 1)[1].splitlines()[0]  # the table's Plain row counts each run once
    for _, child in children.iterrows():
        assert child["tags.torch_threads"] == "1"
        assert {k: child[k] for k in FINAL} == reference[child["tags.seed"]], child["tags.seed"]


@pytest.fixture(scope="module")
def local_reference(store):
    """The local path's final metrics per seed (in this process, one torch thread: what --cpus-per-run 1 sets)."""
    code = main([*STUDY, "--experiment", "via-local"])
    assert code == 0
    parent, children = study_runs("via-local")
    assert parent["status"] == "FINISHED" and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.torch_threads"]) == {"1"}
    reference = {child["tags.seed"]: {k: child[k] for k in FINAL} for _, child in children.iterrows()}
    assert reference["0"] != reference["1"]  # the seeds differ, so matching them is a real check
    return reference


@SHARED
@pytest.mark.slow
def test_a_tiny_ablation_through_submitits_local_executor_lands_like_the_local_one(local_reference, store, capsys):
    pytest.importorskip("submitit")
    code, out, err = cli([*STUDY, "--dispatch", "slurm", "--slurm-local", "--experiment", "via-slurm"], capsys)
    assert code == 0, err
    landed_alike("via-slurm", local_reference, out)
    logs = sorted(p.name for p in (store / "submitit").rglob("*_log.err"))
    assert len(logs) == 2  # one job per run, each with its own log


@pytest.mark.slow
def test_a_failed_run_leaves_the_others_landed_and_the_parent_failed(harness_home, monkeypatch, one_torch_thread):
    """Seed 1's run fails inside the job (submitit's debug cluster runs the jobs in this process, so a patch
    reaches them); seed 0 lands under the parent, the report of what landed is logged, and one line names seed 1."""
    pytest.importorskip("submitit")
    from harness.runner import Run
    from harness.studies.ablation import plan_study, run_study
    from harness.studies.tables import TABLES
    from harness.tracking import Tracker

    prepare = Run.prepare

    def fail_seed_one(run: Run) -> None:
        if run.cfg.train.seed == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        prepare(run)

    monkeypatch.setattr(Run, "prepare", fail_seed_one)
    overrides = tuple(TINY[i + 1] for i, flag in enumerate(TINY) if flag == "--set")
    settings = RunSettings("fmnistlt", 100.0, epochs="1+1", overrides=overrides)
    plan = plan_study(TABLES.get("table4"), ["plain"], [0, 1], settings, "failing")
    options = DispatchOptions("slurm", cpus_per_run=1, slurm=SlurmOptions(cluster="debug"))
    with pytest.raises(HarnessError) as raised:
        run_study(plan, Tracker(), dispatch=options)
    assert str(raised.value).startswith("1 of 2 runs failed: row Plain seed 1 (RuntimeError: CUDA out of memory "
                                        "(simulated)); the 1 other run(s) landed in parent run ")
    parent, children = study_runs("failing")
    assert parent["status"] == "FAILED"
    assert list(children["tags.seed"]) == ["0"] and list(children["status"]) == ["FINISHED"]
    assert set(Tracker().artifact_names(parent["run_id"], "report")) == {"report/table4.md", "report/table4.csv"}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of two CPUs without the dashboard; the dispatcher joins it and leaves it running."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@SHARED
@pytest.mark.slow
def test_a_tiny_ablation_through_ray_lands_like_the_local_one(local_reference, local_ray, capsys):
    code, out, err = cli([*STUDY, "--dispatch", "ray", "--experiment", "via-ray"], capsys)
    assert code == 0, err
    landed_alike("via-ray", local_reference, out)
    assert local_ray.is_initialized()  # a cluster it joined is left to its owner


@SHARED
@pytest.mark.slow
def test_a_run_that_fails_in_a_ray_task_is_named_by_row_and_seed(local_ray, harness_home):
    dispatcher = DISPATCHERS.get("ray")(DispatchOptions("ray"))
    records, failures = run_all(dispatcher, [bad_job(3)], f"sqlite:///{harness_home / 'mlflow.db'}", False)
    assert records == [] and [f.job.label for f in failures] == ["row Plain seed 3"]
    assert failures[0].error.startswith("HarnessError: ") and "--download" in failures[0].error
    assert local_ray.is_initialized()
