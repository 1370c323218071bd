"""Benchmarks of the training paths: the reference path (per-image PIL DataLoader, eager, fp32) against the fast
path (device-resident uint8 set, batched augmentation, bf16 autocast on CUDA, channels_last, optionally compiled).

Modules, smallest first: `build` (the variants and modes compared, synthetic LT data, the one place that makes a
config and a Trainer), `timing`, `augment` (per-image vs batched augmentation), `step` and `memory` (one training
step), `epoch` (whole epochs), `plan` (what `harness bench` runs), `render` (its tables), and `gpu`, `gpu_child`,
`gpu_report` (`harness bench gpu`: per-epoch figures in child processes and the extrapolation to the targets).

Kept free of imports here: `harness bench --help` must not load torch.
"""
