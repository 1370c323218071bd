"""What a tuning study searches: numeric switches of a method, as named ranges or `name=low:high[:log]` entries,
checked against the method builder's keyword defaults (so a typo or a non-numeric switch fails before any trial)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import builder_defaults
from harness.errors import HarnessError
from harness.registry import METHODS


@dataclass(frozen=True)
class Param:
    """One searched switch: a float (or int) range, sampled on a log scale if `log`."""

    low: float
    high: float
    log: bool = False


# alpha weights L_nt, beta L_mu, both in batch-mean KL units (findings.md): official = 0.1 / 0.01.
# The Baselines II methods: each one's main knob around its official value (RIDE's diversity weight -0.45, TLC's
# engagement threshold 0.54, ResLT's beta 0.995, PaCo's alpha 0.01 and T 0.05, BCL's SCL weight 0.6 and T 0.07,
# NCL's NBOD lambda 0.6). BBN has no numeric loss switch (its alpha is a schedule): pass --space for it.
SPACES: dict[str, dict[str, Param]] = {
    "shike": {"alpha": Param(1e-3, 1.0, True), "beta": Param(1e-4, 0.1, True), "scale": Param(10.0, 40.0)},
    "ride": {"diversity_factor": Param(-1.0, 0.0)},
    "tlc": {"tau": Param(0.3, 0.9), "diversity_factor": Param(1e-3, 0.1, True)},
    "reslt": {"reslt_beta": Param(0.9, 0.999)},
    "paco": {"paco_alpha": Param(1e-3, 0.1, True), "temperature": Param(0.03, 0.2, True)},
    "bcl": {"scl_weight": Param(0.1, 1.0), "temperature": Param(0.05, 0.2, True)},
    "ncl": {"nbod_weight": Param(0.1, 1.0)},
}
DEFAULT_SPACE: dict[str, tuple[str, ...]] = {"shike": ("alpha", "beta"), "ride": ("diversity_factor",),
                                             "tlc": ("tau",), "reslt": ("reslt_beta",), "paco": ("paco_alpha",),
                                             "bcl": ("scl_weight",), "ncl": ("nbod_weight",)}


def parse_space(method: str, text: str) -> dict[str, Param]:
    """`alpha,beta` (named ranges of SPACES) or `name=low:high[:log]` entries; checked against the builder."""
    entries = [e.strip() for e in text.split(",") if e.strip()] or list(DEFAULT_SPACE.get(method, ()))
    switches = builder_defaults(METHODS.get(method))
    numeric = [k for k, v in switches.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    space = dict(_parse_entry(method, entry) for entry in entries)
    for name, param in space.items():
        if name not in numeric:
            raise HarnessError(f"--space: '{name}' is not a numeric switch of '{method}'; those are: "
                               f"{', '.join(numeric)}")
        if not param.low < param.high or (param.log and param.low <= 0):
            raise HarnessError(f"--space: bad range for '{name}': {param}")
    if not space:
        raise HarnessError(f"no search space for method '{method}'; pass --space name=low:high[:log],...")
    return space


def _parse_entry(method: str, entry: str) -> tuple[str, Param]:
    name, sep, spec = entry.partition("=")
    if not sep:
        if name not in SPACES.get(method, {}):
            raise HarnessError(f"--space: no named range for '{name}' of '{method}' (named: "
                               f"{', '.join(SPACES.get(method, {})) or 'none'}); write {name}=low:high[:log]")
        return name, SPACES[method][name]
    parts = spec.split(":")
    try:
        return name, Param(float(parts[0]), float(parts[1]), parts[2:] == ["log"])
    except (ValueError, IndexError):
        raise HarnessError(f"--space entry '{entry}': expected name=low:high or name=low:high:log") from None
