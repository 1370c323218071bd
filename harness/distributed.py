"""Multi-process training with DistributedDataParallel (reference/large-scale-lt.md section 5), one code path for
`torchrun --nproc-per-node N -m harness run ...` and `harness run ... --nproc-per-node N` (which launches exactly
that: N copies of the same command with torchrun's environment).

Every process runs the whole command. What differs by rank lives here:
- Data: `optim.batch_size` is the GLOBAL batch (it must divide by the world size). Every process draws the same
  epoch (same seeded order and augmentation, from any feeder and sampler) and keeps its contiguous share of each
  global batch (`shard_batch`; views are sliced view by view), so the shares of one step are exactly the
  one-process batch. The price: each process loads and augments the whole global batch, N times the data work.
- Gradients: the model is wrapped in DDP per stage (after the stage set `requires_grad`), with an all-reduce that
  weights each process by its share of the batch, so an uneven last batch still gets the global-batch mean.
  A global batch smaller than the world size (at most N-1 images an epoch) is skipped on every process.
- Losses: each epoch's per-image sums and image counts are summed over the processes before they are logged.
- BatchNorm: per-process statistics (the reference's default; the BN batch is the per-process batch) unless
  `sync_bn`, which converts to nn.SyncBatchNorm and needs CUDA (torch's SyncBatchNorm refuses CPU tensors).
- Rank 0 alone writes: MLflow (`MainOnlyTracker`), checkpoints (then a barrier), the run's state files and the
  progress display. Every process evaluates (after rank 0's BN buffers are copied to all), so each returns the
  same metrics; resume loads the one checkpoint on every process.

What equals one process within float tolerance: losses and weights, for losses that are means of per-image terms
with BatchNorm that does not see the split (frozen, or SyncBN). Per-process BN statistics, mixup partners (drawn
within a process's share) and random draws shaped by the batch (dropout) make a DDP run a different, equally valid
run.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.config import RunConfig
from harness.errors import HarnessError

T = TypeVar("T")
FLAG = "--nproc-per-node"
GRACE_S = 10.0  # after one process fails, the others get this long to fail on their own (their runs end FAILED)
KILL_S = 30.0  # after a SIGTERM or Ctrl-C was forwarded, this long to unwind before SIGKILL
LOG_TAIL = 40  # lines of a failed process's stderr shown (other than rank 0's, which has the terminal)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs, checkpoints and shows progress."""
    return rank() == 0


def setup() -> None:
    """Join the process group torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT), once per
    process: gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA is visible. Left at interpreter exit."""
    if world_size() <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())  # NCCL and object collectives use the current device
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    except (ValueError, RuntimeError) as error:
        raise HarnessError(f"cannot join the DDP process group (WORLD_SIZE={world_size()}, RANK={rank()}): "
                           f"{error}; launch with torchrun or `harness run ... {FLAG} N`") from None
    atexit.register(teardown)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` computed by rank 0 and handed to every process (a run id, a state file's content, a decision). An
    exception in rank 0's `fn` is raised on every process, so all of them fail alike instead of waiting."""
    if world_size() <= 1:
        return fn()
    setup()
    box: list[Any] = [None]
    error: Exception | None = None
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as raised:
            error = raised
            shared = raised if isinstance(raised, HarnessError) else HarnessError(
                f"rank 0 failed: {type(raised).__name__}: {raised}")
            box[0] = (False, shared)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise error if error is not None else value
    return value


# Tracker methods that only read the store: every rank may call them (a study's report on every rank).
READS = frozenset({"uri", "local", "remote", "search", "load_text", "load_arrays", "download", "artifact_names",
                   "experiment_names"})
# Tracker methods that create and return an id: rank 0 creates, every rank gets its id.
CREATES = frozenset({"start", "experiment_id"})


class MainOnlyTracker:
    """A `harness.tracking.Tracker` as a DDP process sees it: rank 0's calls go through; the other ranks read the
    store but drop every write, and `start` gives every rank rank 0's new run id (one MLflow run per run, not one per
    process). Every process makes the same creating calls in the same order: they all run the same command."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "tracker":
            raise AttributeError(name)
        if name in CREATES:
            method = getattr(self.tracker, name)
            return lambda *args, **kwargs: from_main(lambda: method(*args, **kwargs))
        if is_main() or name in READS or not callable(getattr(type(self.tracker), name, None)):
            return getattr(self.tracker, name)
        return _dropped


def _dropped(*args: Any, **kwargs: Any) -> None:
    return None


def main_only(tracker: Any) -> Any:
    """`tracker` itself in one process; a `MainOnlyTracker` around it in a DDP process."""
    if world_size() <= 1 or isinstance(tracker, MainOnlyTracker):
        return tracker
    return MainOnlyTracker(tracker)


def share_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous part [start, end) of a batch of `size` images: parts differ by at most one image."""
    return rank * size // world, (rank + 1) * size // world


def shard_batch(images: torch.Tensor, labels: torch.Tensor, copies: int, rank: int, world: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch stacked view-major ([view 0; view 1; ...], `copies` views of `size`
    images each): the same images of every view, stacked view-major again."""
    size = len(labels) // copies
    start, end = share_bounds(size, rank, world)
    if copies == 1:
        return images[start:end], labels[start:end]
    rows = torch.cat([torch.arange(v * size + start, v * size + end) for v in range(copies)]).to(labels.device)
    return images[rows], labels[rows]


@dataclass
class Share:
    """The current step's global batch over this process's part of it (the world size when the parts are even):
    the gradient all-reduce divides by it, so the processes' gradients sum to the global-batch mean."""

    divisor: float


class ShardedFeeder:
    """Any feeder's epochs, each global batch cut to this process's share (`shard_batch`)."""

    def __init__(self, feeder: Any, rank: int, world: int, share: Share) -> None:
        self.feeder, self.rank, self.world, self.share = feeder, rank, world, share
        self.batch_size = getattr(feeder, "batch_size", None)

    def __len__(self) -> int:
        return len(self.feeder)

    def epoch(self, seed: int, draw: Any = None, views: Sequence[Any] = ()) -> Iterator[tuple[torch.Tensor, ...]]:
        batches = self.feeder.epoch(seed, draw, views) if views else self.feeder.epoch(seed, draw)
        copies = 1 + len(views)
        for images, labels in batches:
            size = len(labels) // copies
            if size < self.world:  # a process with no image cannot take part in the all-reduce: skipped by all
                continue
            start, end = share_bounds(size, self.rank, self.world)
            self.share.divisor = size / (end - start)
            yield shard_batch(images, labels, copies, self.rank, self.world)


def _weighted_allreduce(share, bucket):  # noqa: ANN001, ANN202 - DDP checks real annotations; these would be strings
    """DDP's gradient all-reduce (dist.GradBucket -> Future[Tensor]) with each process's gradient weighted by its part
    of the global batch: sum_r (n_r / n) grad_r, the gradient of the global-batch mean (even parts: divisor = world,
    DDP's own mean)."""
    tensor = bucket.buffer().div_(share.divisor)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


class Local:
    """One process: the model itself, the feeder itself, and every collective the identity."""

    rank, world_size, is_main = 0, 1, True

    def place(self, device: torch.device) -> torch.device:
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, feeder: Any, batch_size: int) -> Any:
        return feeder

    def total(self, sums: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        return sums, seen

    def barrier(self) -> None:
        pass

    def from_main(self, fn: Callable[[], T]) -> T:
        return fn()

    def tracker(self, tracker: Any) -> Any:
        return tracker

    def sync_buffers(self, model: nn.Module) -> None:
        pass


LOCAL = Local()


class DataParallel(Local):
    """This process's part of a DDP run (see the module docstring). One per run: the share its feeder sets and its
    gradient hook reads is the run's own."""

    def __init__(self, sync_bn: bool = False) -> None:
        setup()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.sync_bn = sync_bn
        self.share = Share(float(self.world_size))

    def place(self, device: torch.device) -> torch.device:
        """This process's device: cuda:LOCAL_RANK on CUDA (one device per process)."""
        if device.type != "cuda":
            if self.sync_bn:
                raise HarnessError("train.sync_bn=true needs CUDA devices: torch's SyncBatchNorm refuses CPU tensors; "
                                   "on CPU use per-process BatchNorm (train.sync_bn=false)")
            return device
        count = torch.cuda.device_count()
        if local_rank() >= count:
            raise HarnessError(f"process {local_rank()} of this node has no CUDA device ({count} visible); use "
                               f"{FLAG} {count} or fewer, or --device cpu")
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())

    def wrap(self, model: nn.Module) -> nn.Module:
        """A fresh DDP for the stage's trainable parameters (DDP expects a gradient for each of them every step, so
        it is built after the stage set `requires_grad`); the model itself when the stage trains nothing."""
        if not any(p.requires_grad for p in model.parameters()):
            return model
        if self.sync_bn and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root; same parameter objects
        device = next(model.parameters()).device
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped.register_comm_hook(self.share, _weighted_allreduce)
        return wrapped

    def shard(self, feeder: Any, batch_size: int) -> ShardedFeeder:
        check_batch(batch_size, self.world_size)
        return ShardedFeeder(feeder, self.rank, self.world_size, self.share)

    def total(self, sums: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        """Every process's per-image loss sums and image count of the epoch, summed (float64: counts stay exact)."""
        packed = torch.cat([sums.double(), torch.tensor([float(seen)], dtype=torch.float64, device=sums.device)])
        dist.all_reduce(packed)
        return packed[:-1].to(sums.dtype), int(packed[-1].item())

    def barrier(self) -> None:
        dist.barrier()

    def from_main(self, fn: Callable[[], T]) -> T:
        return from_main(fn)

    def tracker(self, tracker: Any) -> Any:
        return main_only(tracker)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics on every process (DDP copies them before each forward; after the last step
        each process holds its own), so every process evaluates the model rank 0 saves."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def replicas(sync_bn: bool = False) -> Local | DataParallel:
    """`LOCAL` in one process; this process's `DataParallel` under torchrun or `--nproc-per-node`."""
    return DataParallel(sync_bn) if world_size() > 1 else LOCAL


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise HarnessError(f"optim.batch_size={batch_size} is the global batch and must divide by the {world} "
                           f"processes; use a multiple of {world} (e.g. {batch_size - batch_size % world or world})")


def check_processes(nproc: int, workers: int, dispatch: str, configs: Iterable[RunConfig]) -> bool:
    """Refuse, before any process starts, what cannot run on several processes per run (under torchrun too); True
    when this process should launch them (`nproc` > 1)."""
    world = nproc if nproc > 1 else world_size()
    if nproc > 1 and world_size() > 1:
        raise HarnessError(f"this process is already one of {world_size()} (torchrun); drop {FLAG}")
    if world <= 1:
        return False
    if workers > 1:
        raise HarnessError(f"{FLAG} {world} runs each run on {world} processes, one run at a time; --workers "
                           f"{workers} would start {workers} runs of {world} processes: drop --workers")
    if dispatch != "local":
        raise HarnessError(f"{FLAG} runs on this machine; --dispatch {dispatch} does not launch DDP jobs yet")
    for cfg in configs:
        check_batch(cfg.optim.batch_size, world)
        cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        if nproc > 1 and cuda and torch.cuda.device_count() < nproc:
            raise HarnessError(f"{FLAG} {nproc} needs one CUDA device per process and {torch.cuda.device_count()} "
                               f"are visible; use {FLAG} {torch.cuda.device_count()} or --device cpu")
    return nproc > 1


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line without --nproc-per-node: what each of the processes it asked for runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(FLAG + "="):
            out.append(arg)
    return out


def _die_with_parent() -> None:
    """In each worker, before exec: SIGTERM when the launcher dies (even by SIGKILL), so no run is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def launch(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run this command (`sys.argv`, or `argv`) in `nproc` processes with torchrun's environment, wait, and return
    the first failing process's exit code (0 if all succeed). This process hosts the rendezvous store on a free
    port, as torchrun's agent does. Rank 0 has the terminal (one table, one progress display); the others' output
    is shown only when they fail (the end of their stderr, after they ended)."""
    if argv is None:
        if not any(a == FLAG or a.startswith(FLAG + "=") for a in sys.argv):
            raise HarnessError(f"{FLAG} re-runs this process's command line, which does not hold it (harness.cli.main "
                               "called with its own argv?); run `harness ...` from a shell, or use torchrun")
        argv = sys.argv[1:]
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_WORLD_SIZE": str(nproc),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # cores shared, not oversubscribed
    command = [sys.executable, "-m", "harness", *worker_argv(argv)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as folder:
        logs = [Path(folder) / f"rank{r}.log" for r in range(nproc)]
        try:
            for r in range(nproc):
                with open(logs[r], "wb") as log:
                    procs.append(subprocess.Popen(
                        command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)},
                        stdout=None if r == 0 else subprocess.DEVNULL, stderr=None if r == 0 else log,
                        process_group=0, preexec_fn=_die_with_parent))
            return supervise(procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for r, proc in enumerate(procs[1:], start=1):
                if proc.returncode:
                    tail = logs[r].read_text(errors="replace").splitlines()[-LOG_TAIL:]
                    print("\n".join(f"[rank {r}] {line}" for line in tail), file=sys.stderr)
            del store  # the rendezvous outlives every process


def supervise(procs: Sequence[subprocess.Popen], grace_s: float = GRACE_S, kill_s: float = KILL_S) -> int:
    """Wait for every process. SIGINT/SIGTERM to this process are forwarded to them (they run in their own process
    group, so a Ctrl-C reaches them once, through here); one failing ends the others after `grace_s`; a process
    still running `kill_s` after it was signalled is killed. Returns the first non-zero exit code (128 + signal
    number for a process ended by a signal), else 0."""
    signalled: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        signalled.append(time.monotonic())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first: int | None = None
    failed_at: float | None = None
    try:
        while [proc.poll() for proc in procs].count(None):  # every process polled, each time round
            now = time.monotonic()
            for proc in procs:
                if proc.returncode not in (None, 0) and first is None:
                    first, failed_at = proc.returncode, now
            if failed_at is not None and now - failed_at > grace_s and not signalled:
                forward(signal.SIGTERM, None)
            if signalled and now - signalled[0] > kill_s:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.05)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if first is None:
        first = next((proc.returncode for proc in procs if proc.returncode), 0)
    return 128 - first if first < 0 else first
