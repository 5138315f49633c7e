"""Seeds and random states of a training run: what makes a seeded CPU training reproducible bit for bit.

A fold's seed is derived from (base seed, loop, fold) with NumPy's
``SeedSequence``, so the folds of an ensemble and the loops of a run get
independent streams, and a run is repeated exactly by giving the same base
seed. nnU-Net's sampling and batchgeneratorsv2's augmentation draw from the
*global* NumPy and torch generators of the process that runs them, so a
deterministic training seeds those (and Python's ``random``) and runs the
augmentation in the training process itself (see :func:`assess`).

The states of all generators go into every checkpoint as tensors and lists of
ints (what ``torch.load(weights_only=True)`` accepts, see ``checkpoints.py``),
so a fold killed and resumed continues with the same random numbers as one
that ran through. torch is imported inside the functions that need it: the
simulation reads the determinism of a model without importing torch.
"""

from __future__ import annotations

import platform
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

RNG_KEY = "al3d_rng"


@dataclass(frozen=True)
class Determinism:
    """Whether a training run is reproducible bit for bit, and why (or why not)."""

    deterministic: bool
    reason: str
    seed: int | None = None  # the fold's derived seed
    base_seed: int | None = None
    loop: int | None = None
    cpu: str | None = None  # where it trained (cpu_description): the same bits need the same CPU type

    def to_json(self) -> dict:
        return asdict(self)


def cpu_description() -> str:
    """The CPU type and the instruction set torch's kernels use: two seeded CPU trainings give the same bits only
    where both agree (other vector widths split the sums differently)."""
    import torch

    fields: dict[str, str] = {}
    try:  # Linux: the first processor's block (platform.processor() is empty there); a virtual machine's model
        # name may be generic, its family / model / stepping numbers still tell the generation apart
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields:
        name += f", family {fields['cpu family']} model {fields.get('model')} stepping {fields.get('stepping')}"
    return f"{name} ({platform.machine()}, torch kernels {torch.backends.cpu.get_cpu_capability()})"


def fold_seed(base_seed: int, loop: int, fold: int) -> int:
    """The seed of one fold of one loop: independent streams for every (base seed, loop, fold)."""
    if min(int(base_seed), int(loop), int(fold)) < 0:
        raise ValueError(f"seed, loop and fold must be non-negative, got {base_seed}, {loop}, {fold}")
    return int(np.random.SeedSequence([int(base_seed), int(loop), int(fold)]).generate_state(1)[0])


def assess(
    device_type: str, seed: int | None, augmentation_processes: int, compiled: bool, torch_threads: int | None = None
) -> tuple[bool, str]:
    """(deterministic, reason) of a training with these settings; see docs/REPRODUCIBILITY.md."""
    if seed is None:
        return False, "no seed given"
    if device_type != "cpu":
        return False, (
            f"{device_type}: GPU kernels (atomic adds in convolution backward and reductions, "
            f"torch.compile) are not bitwise reproducible; seeded, cuDNN deterministic, benchmark off"
        )
    if augmentation_processes:
        return False, f"{augmentation_processes} augmentation processes deliver batches in arrival order"
    if compiled:
        return False, "torch.compile"
    threads = f", {torch_threads} torch threads" if torch_threads else ""
    return True, f"cpu, seeded, augmentation in the training process{threads}"


def seed_everything(seed: int) -> None:
    """Seed every generator training draws from: Python's, NumPy's global one (nnU-Net's sampling and
    batchgeneratorsv2's augmentation use it) and torch's (network initialisation, augmentation)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _numpy_state(state: tuple) -> dict:
    kind, key, pos, has_gauss, cached = state
    return {
        "kind": str(kind),
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_tuple(state: dict) -> tuple:
    return (
        state["kind"],
        np.asarray(state["key"], dtype=np.uint32),
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gaussian"]),
    )


def capture_rng_state(loaders: Iterable[Any] = ()) -> dict:
    """Every generator's state as plain data and tensors (weights-only loadable).

    ``loaders``: data loaders with a ``rs`` (batchgenerators' ``DataLoader`` keeps one ``RandomState``
    for shuffling); their states are kept in order.
    """
    import torch

    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss": gauss},
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "loaders": [_numpy_state(loader.rs.get_state()) for loader in loaders if hasattr(loader, "rs")],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict, loaders: Iterable[Any] = ()) -> None:
    """Set every generator to a state from :func:`capture_rng_state`."""
    import torch

    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    np.random.set_state(_numpy_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    for loader, saved in zip([ld for ld in loaders if hasattr(ld, "rs")], state.get("loaders", [])):
        loader.rs.set_state(_numpy_tuple(saved))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def model_determinism(model_folder: Path | str) -> dict:
    """Whether every fold of a trained model was trained deterministically, from the folds' ``al3d_summary.json``.

    A fold trained before this was recorded, or without a summary, counts as not deterministic.
    """
    from ..fileio import read_json

    folds = sorted(Path(model_folder).glob("fold_*/al3d_summary.json"))
    if not folds:
        return {"deterministic": False, "reason": f"no fold summaries in {model_folder}"}
    per_fold = {}
    for path in folds:
        info = read_json(path).get("determinism") or {"deterministic": False, "reason": "not recorded"}
        per_fold[path.parent.name] = info
    reasons = sorted({str(info.get("reason")) for info in per_fold.values()})
    deterministic = all(bool(info.get("deterministic")) for info in per_fold.values())
    cpus = sorted({str(info["cpu"]) for info in per_fold.values() if info.get("cpu")})
    return {
        "deterministic": deterministic,
        "reason": "; ".join(reasons),
        "seeds": {name: info.get("seed") for name, info in per_fold.items()},
        **({"cpu": "; ".join(cpus)} if cpus else {}),  # folds trained before the CPU was recorded name none
    }


@contextmanager
def deterministic_torch(device_type: str, enabled: bool) -> Iterator[None]:
    """While a seeded fold trains: on the CPU torch's deterministic algorithms, on a GPU cuDNN's deterministic
    kernels without benchmarking; the settings before are put back.

    ``warn_only``: an operation without a deterministic implementation warns instead of failing the training
    (nnU-Net's CPU training hits none; the tests compare its weights bit for bit). On a GPU the global switch is
    left alone: it would fail cuBLAS without ``CUBLAS_WORKSPACE_CONFIG`` and slow down kernels without making the
    run reproducible (docs/REPRODUCIBILITY.md).
    """
    import torch

    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    if enabled and device_type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif enabled:
        cudnn.benchmark = False
        cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]
