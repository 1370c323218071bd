"""DDP on CPU (gloo, 2 processes, 1 torch thread each; harness.distributed): a 2-process run takes the same steps as
one process with the same global batch, the processes' shares of a global batch are disjoint and cover it, a
resumed DDP run ends where an uninterrupted one does, and `harness run method --nproc-per-node 2` ends in one
FINISHED MLflow run with each metric logged once.

The equality cases freeze BatchNorm (`stage.*.freeze_bn`): with BN in training mode each process normalises with
its own share's statistics (per-process BN, the default), a different computation from one process's; SyncBN, which
would make it the same, needs CUDA (torch's SyncBatchNorm refuses CPU tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import distributed
from harness.config import resolve_config, stage_overrides
from harness.data import Split
from harness.datasets.augment import batched_pipeline, per_image_pipeline
from harness.distributed import ShardedFeeder, Share, shard_batch
from harness.errors import HarnessError
from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.hooks import Hook
from harness.registry import METHODS
from harness.samplers import make_draw, make_view_draw
from harness.trainer import Trainer

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
COUNTS = (30, 20, 15, 10)  # 75 images: batches of 16 end with 11, split 5 + 6 (the weighted all-reduce's case)
BATCH = 16
EPOCHS = "2+1"  # SHIKE's two stages: the DDP wrapper is rebuilt at the switch (stage 2 trains the new head only)
# BN frozen at its initial statistics (see above) diverges at SHIKE's LRs (0.15 / 0.1): these are tenfold lower
SETTINGS = {"optim.batch_size": BATCH, "method.experts": 2, "method.depth": 8, "train.compile": "off",
            "stage.representation.freeze_bn": True, "stage.classifier.freeze_bn": True, "optim.lr": 0.01,
            "stage.representation.peak_lr": 0.02, "stage.classifier.peak_lr": 0.01}
# float32 sums in a different order (two half-batch means averaged by the all-reduce, against one batch mean)
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def toy_split(n: int = sum(COUNTS)) -> Split:
    """Random images with a learnable class cue, whose first two pixels encode their index (`image_ids`)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(COUNTS)])[torch.randperm(n, generator=g)]
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 1] = (labels * 60).to(torch.uint8)[:, None, None]
    index = torch.arange(n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
    return Split(images, labels)


def image_ids(batch: torch.Tensor) -> torch.Tensor:
    pixels = ((batch[:, 0, 0, :2] * STD[0] + MEAN[0]) * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]


# --- the shares of a global batch (no processes needed) ---

def feeders(augment: str) -> dict[str, Any]:
    split = toy_split()
    return {"reference": ReferenceFeeder(split, per_image_pipeline(augment, MEAN, STD), BATCH, CPU),
            "device": DeviceFeeder(split, batched_pipeline(augment, MEAN, STD), BATCH, CPU)}


def epochs(feeder: Any, draw: Any, views: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(feeder.epoch(7, draw, views) if views else feeder.epoch(7, draw))


DRAWS = {"instance": (lambda: None, []), "class-balanced": (lambda: make_draw("class-balanced", 0, 1), []),
         "two views": (lambda: None, [None]),
         "class-balanced + reversed view": (lambda: make_draw("class-balanced", 0, 1), ["reversed"])}


@pytest.mark.parametrize("path", ["reference", "device"])
@pytest.mark.parametrize("case", DRAWS)
def test_the_shares_of_each_global_batch_are_disjoint_and_cover_it(path, case):
    draw_of, view_samplers = DRAWS[case]
    views = [make_view_draw(s, 0, 1) for s in view_samplers]
    copies = 1 + len(views)
    whole = epochs(feeders("none")[path], draw_of(), views)
    world = 2
    shares = [epochs(ShardedFeeder(feeders("none")[path], r, world, Share(2.0)), draw_of(), views) for r in range(world)]
    assert [len(s) for s in shares] == [len(whole)] * world
    for step, (images, labels) in enumerate(whole):
        size = len(labels) // copies
        parts = [shares[r][step] for r in range(world)]
        for v in range(copies):  # per view: rank 0's images then rank 1's are the view's batch, in order
            view = slice(v * size, (v + 1) * size)
            got = torch.cat([p[0].reshape(copies, -1, *images.shape[1:])[v] for p in parts])
            assert torch.equal(got, images[view]) and torch.equal(
                torch.cat([p[1].reshape(copies, -1)[v] for p in parts]), labels[view])
        positions = [set(range(*distributed.share_bounds(size, r, world))) for r in range(world)]
        assert not positions[0] & positions[1] and positions[0] | positions[1] == set(range(size))
        assert [len(p[1]) // copies for p in parts] == [size // 2, size - size // 2]  # 11 -> 5 + 6


@pytest.mark.parametrize("path", ["reference", "device"])
def test_an_epoch_with_augmentation_is_shared_out_from_the_same_draws(path):
    """Every process augments the whole global batch with the epoch's seed, so its share is the one-process
    batch's rows, augmentation included (the official AutoAugment + Cutout, drawn per image in batch order on the
    reference path)."""
    whole = epochs(feeders("autoaugment")[path], None, [])
    parts = [epochs(ShardedFeeder(feeders("autoaugment")[path], r, 2, Share(2.0)), None, []) for r in range(2)]
    for step, (images, _) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][step][0], parts[1][step][0]]), images)


def test_the_gradient_divisor_weights_each_share_by_its_size():
    share = Share(2.0)
    feeder = ShardedFeeder(feeders("none")["device"], 1, 2, share)
    divisors = []
    for _ in feeder.epoch(3):
        divisors.append(share.divisor)
    assert divisors == [2.0, 2.0, 2.0, 2.0, 11 / 6]  # rank 1 holds 6 of the last 11: weight 6/11


def test_a_global_batch_smaller_than_the_world_is_skipped_by_every_process():
    images, labels = torch.zeros(3, 1), torch.arange(3)
    assert [len(shard_batch(images, labels, 1, r, 4)[1]) for r in range(4)] == [0, 1, 1, 1]
    feeder = ShardedFeeder(feeders("none")["device"], 0, 12, Share(12.0))  # 75 = 4 * 16 + 11; 11 < 12
    assert len(list(feeder.epoch(3))) == 4


def test_process_count_refusals():
    def configs(batch: int) -> list:
        return [resolve_config("ce", device="cpu", overrides={"optim.batch_size": batch})]

    with pytest.raises(HarnessError, match="must divide by the 2 processes"):
        distributed.check_processes(2, 1, "local", configs(15))
    with pytest.raises(HarnessError, match="drop --workers"):
        distributed.check_processes(2, 2, "local", configs(16))
    with pytest.raises(HarnessError, match="--dispatch ray"):
        distributed.check_processes(2, 1, "ray", configs(16))
    assert distributed.check_processes(2, 1, "local", configs(16)) is True
    assert distributed.check_processes(1, 4, "local", configs(15)) is False  # one process per run: nothing to check
    assert distributed.worker_argv(["run", "method", "--nproc-per-node", "2", "--seeds", "0", "--nproc-per-node=3"]) \
        == ["run", "method", "--seeds", "0"]


def test_the_cli_refuses_before_launching(harness_home, capsys):
    from harness.cli import main

    common = ["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--nproc-per-node", "2"]
    assert main([*common, "--set", "optim.batch_size=15"]) == 2
    assert "optim.batch_size=15 is the global batch and must divide by the 2 processes" in capsys.readouterr().err
    assert main([*common, "--workers", "2"]) == 2
    assert "drop --workers" in capsys.readouterr().err
    assert main(common) == 2  # called with its own argv: sys.argv (pytest's) is not a harness command to re-run
    assert "re-runs this process's command line" in capsys.readouterr().err


# --- two processes against one ---

def build(checkpoint: Path | None = None, hooks: list[Hook] = (), replicas: Any = distributed.LOCAL) -> Trainer:
    torch.manual_seed(0)
    cfg = resolve_config("shike", epochs=EPOCHS, overrides=SETTINGS)
    spec = METHODS.get("shike")(num_classes=len(COUNTS), class_counts=COUNTS, **cfg.method_kwargs)
    spec.stages = stage_overrides(spec.stages, cfg.stage_args)
    feeder = replicas.shard(ReferenceFeeder(toy_split(), per_image_pipeline("none", MEAN, STD), BATCH, CPU), BATCH)
    return Trainer(spec, cfg, feeder, CPU, checkpoint, hooks=list(hooks), replicas=replicas)


class Record(Hook):
    """Each step's (images on this process, total loss) and each epoch's logged metrics."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.epochs: dict[int, dict[str, float]] = {}

    def before_train(self, trainer: Trainer) -> None:
        inner = trainer.loss_step

        def loss_step(stage_index: int, images: torch.Tensor, labels: torch.Tensor, mix: Any = None) -> torch.Tensor:
            values = inner(stage_index, images, labels, mix)
            self.steps.append((len(labels), values[-1].item()))
            return values

        trainer.loss_step = loss_step

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs[epoch] = dict(metrics)


class StopAfter(Hook):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.epoch:
            trainer.request_stop("test")


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.spec.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """One process of the DDP runs: an uninterrupted run, then one stopped after its first epoch and resumed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    out = Path(folder)
    record = Record()
    trainer = build(out / "full.pt", [record], distributed.DataParallel())
    trainer.fit()
    result = {"steps": record.steps, "epochs": record.epochs, "weights": weights(trainer),
              "images_trained": trainer.images_trained, "world": dist.get_world_size()}
    stopped = build(out / "resumed.pt", [StopAfter(0)], distributed.DataParallel())
    stopped.fit()
    result["stopped_at"] = torch.load(out / "resumed.pt", weights_only=False)["epoch"]
    resumed = build(out / "resumed.pt", [], distributed.DataParallel())
    resumed.fit(resume=True)
    result["resumed"] = weights(resumed)
    try:  # why train.sync_bn is refused on CPU: torch's SyncBatchNorm itself refuses CPU tensors under a group
        torch.nn.SyncBatchNorm(4)(torch.randn(2, 4, 3, 3))
        result["torch_sync_bn"] = "ran"
    except ValueError as error:
        result["torch_sync_bn"] = str(error)
    try:
        distributed.DataParallel(sync_bn=True).place(CPU)
        result["sync_bn"] = "accepted"
    except HarnessError as error:
        result["sync_bn"] = str(error)
    torch.save(result, out / f"rank{rank}.pt")
    distributed.teardown()


# The tests that read the 2-process runs stay on one pytest-xdist worker, so the runs are made once.
TWO_PROCESS_RUNS = pytest.mark.xdist_group("distributed-two-processes")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the launcher's rendezvous
    mp.spawn(_worker, args=(2, store.port, str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)], folder


@pytest.fixture(scope="module")
def one_process():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = Record()
        trainer = build(None, [record])
        trainer.fit()
        return record, weights(trainer), trainer.images_trained
    finally:
        torch.set_num_threads(previous)


def global_step_losses(ranks: list[dict]) -> list[float]:
    """Each step's loss over the whole global batch: the processes' share means weighted by their share sizes."""
    steps = zip(*(r["steps"] for r in ranks))
    return [sum(n * loss for n, loss in step) / sum(n for n, _ in step) for step in steps]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
@TWO_PROCESS_RUNS
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(two_processes, one_process):
    ranks, _ = two_processes
    record, one_weights, one_images = one_process
    assert [r["world"] for r in ranks] == [2, 2]
    one_losses = [loss for _, loss in record.steps]
    two_losses = global_step_losses(ranks)
    assert len(one_losses) == len(two_losses) == 15  # 5 steps (16, 16, 16, 16, 11) x 3 epochs
    for step, (a, b) in enumerate(zip(one_losses, two_losses)):
        assert abs(a - b) <= LOSS_TOLERANCE * max(1.0, abs(a)), (step, a, b)
    print("\nstep  one process  two processes  |difference|")
    for step, (a, b) in enumerate(zip(one_losses, two_losses)):
        print(f"{step:4d}  {a:.7f}    {b:.7f}      {abs(a - b):.2e}")
    for epoch, metrics in record.epochs.items():  # logged epoch means: the all-reduced sums, on every process
        for rank in ranks:
            assert rank["epochs"][epoch].keys() == metrics.keys()
            for key, value in metrics.items():
                assert rank["epochs"][epoch][key] == pytest.approx(value, rel=LOSS_TOLERANCE, abs=1e-7), key
    assert ranks[0]["images_trained"] == ranks[1]["images_trained"] == one_images == 3 * 75
    difference = max_weight_difference(one_weights, ranks[0]["weights"])
    print(f"max |weight difference|, 1 vs 2 processes: {difference:.2e}")
    assert difference <= WEIGHT_TOLERANCE
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0  # the processes agree exactly


@pytest.mark.slow
@TWO_PROCESS_RUNS
def test_a_resumed_ddp_run_ends_with_the_weights_of_an_uninterrupted_one(two_processes):
    ranks, folder = two_processes
    assert [r["stopped_at"] for r in ranks] == [1, 1]  # stopped after epoch 1, checkpointed by rank 0
    for rank in ranks:
        assert max_weight_difference(rank["weights"], rank["resumed"]) == 0.0
    assert sorted(p.name for p in folder.iterdir()) == ["full.pt", "rank0.pt", "rank1.pt", "resumed.pt"]  # no temp


@pytest.mark.slow
@TWO_PROCESS_RUNS
def test_sync_bn_is_refused_on_cpu_where_torch_refuses_it(two_processes):
    ranks, _ = two_processes
    for rank in ranks:
        assert "SyncBatchNorm expected input tensor to be on GPU" in rank["torch_sync_bn"]
        assert rank["sync_bn"].startswith("train.sync_bn=true needs CUDA devices")


# --- the command line, end to end on real Fashion-MNIST-LT ---

@pytest.mark.slow
def test_run_method_on_two_processes_ends_in_one_finished_run_logged_once(tmp_path):
    env = {**os.environ, "HARNESS_HOME": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "harness", "run", "method", "--method", "ce", "--dataset", "fmnistlt",
               "--if", "100", "--epochs", "1", "--set", "method.depth=8", "--set", "data.n_max=40",
               "--set", "data.test_per_class=10", "--set", "data.augment=none", "--set", "optim.batch_size=32",
               "--device", "cpu", "--nproc-per-node", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ce on fmnistlt") == 1  # one result table: rank 1's stdout is not shown
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ce-fmnistlt-if100")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), key  # each step once: rank 1 logged nothing
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [0]
    assert "test/top1" in run.data.metrics
    (folder,) = (tmp_path / "runs" / "checkpoints").glob("*/*/")
    assert sorted(p.name for p in folder.iterdir()) == ["state.json"]  # finished: checkpoint and journal gone


# --- the launcher's supervision (plain child processes, no torch) ---

def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_one_failed_process_ends_the_others_and_its_exit_code_is_returned():
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    waiting = sleeper()
    assert distributed.supervise([waiting, failing], grace_s=0.2, kill_s=5) == 3
    assert waiting.returncode == -15  # SIGTERM once the grace period passed


def test_a_sigterm_to_the_launcher_reaches_every_process():
    procs = [sleeper(), sleeper()]
    threading.Timer(0.5, os.kill, (os.getpid(), 15)).start()
    assert distributed.supervise(procs, grace_s=5, kill_s=5) == 128 + 15
    assert [p.returncode for p in procs] == [-15, -15]
