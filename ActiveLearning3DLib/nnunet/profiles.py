"""Training profiles: how long to train, on what, and with which network, as one overridable dataclass.

Five named profiles:

``paper``
    nnActive's study setting: nnU-Net ``3d_fullres`` plans unchanged (network, patch
    and batch size from the planner), 200 epochs x 250 iterations, 50 validation
    iterations per epoch, 5 folds. Needs a GPU to finish in hours.

``cpu-small``
    Trains a useful Hippocampus model on 2 CPU cores in about 5 minutes per fold
    (0.2 s per iteration). Against the ``3d_fullres`` plans it changes exactly:

    - network width: 8 features in the first stage instead of 32, doubling per
      stage up to 64 (instead of 320); the stages, kernels and strides are what
      nnU-Net's topology rule gives for the patch size below (4 stages for
      Hippocampus, as planned);
    - one convolution per stage in encoder and decoder instead of two;
    - patch size 32 x 40 x 32 voxels (Hippocampus is planned at 40 x 56 x 40),
      topology re-derived with nnU-Net's own ``get_pool_and_conv_props``;
    - batch size 4 (the planner gives 2 to 9 for Hippocampus, depending on the
      number of images);
    - 30 epochs x 50 iterations (1500 iterations instead of 50,000), 5 validation
      iterations per epoch, checkpoint (and progress plot) every 10 epochs;
    - data augmentation in the training process itself (no worker processes),
      which is as fast as one worker process on 2 cores and uses less memory.

    Everything else (loss, augmentation, learning rate schedule, deep supervision,
    sampling) is nnU-Net's default, plus our partial-label sampling and loss.
    Measured on 2 CPU cores, 45-image Hippocampus pool with the 20 starting boxes
    (20 x 20 x 20) of nnActive, fold 0, test Dice on 15 held-out images: 1200
    iterations 0.76, 2000 iterations 0.80 (mean of both classes); a wider network
    (16..128 features, 600 iterations, same time) 0.71.

``demo``
    The main job until 2026-12-05 (and the profile of the pre-fill study), sized so
    that a 3-method, 3-loop simulation with
    a full-data reference finishes within 20 minutes on 2 cores: ``cpu-small``'s
    network on a 24 x 32 x 24 patch (0.1 s per iteration), 2 folds of 20 epochs x
    25 iterations, initial learning rate 0.05, test-split evaluation without
    mirroring (8 times fewer forward passes). The learning rate: with nnU-Net's
    0.01 the poly schedule over 500 iterations ends before the network segments
    anything (measured on 20 Hippocampus boxes: pseudo Dice 0 after 400
    iterations; with 0.05, 0.25 / 0.55 after 400). Its models were too rough to
    read: test Dice 32 to 53 and a full-data reference of 35, below most loops.

``quick``
    The main job (``make demo``) now: ``demo`` trained three times as long (2 folds
    of 30 epochs x 50 iterations), and the demo warm-starts the loops after the
    first (``--init warm``: a third of the iterations from a tenth of the learning
    rate), so that the loops' trainings fit the same 20 minutes. On Hippocampus
    (64 cases, seed 0, 2026-12-05) test Dice 63 to 69 over the loops and a
    full-data reference of 73 (benchmarks/RESULTS.md).

``test``
    Seconds, for CI: a tiny network (8 features, 3 stages, one convolution per
    stage), patch 16 x 16 x 16, batch size 2, 2 epochs x 3 iterations, 1 validation
    iteration, 2 folds, no worker processes, checkpoint every epoch.

Warm start (``--init warm``; docs/METHODS.md section 2, and docs/USAGE.md under "Training, scoring and
evaluation with nnU-Net"): member k of loop t starts from member k of
loop t-1 and trains a shorter schedule, ``warm_fraction`` of the epochs (rounded up, at least 1) from the
starting learning rate ``warm_initial_lr`` with nnU-Net's poly decay over those epochs. Unset (``None``) they
are a third of the epochs and a tenth of ``initial_lr`` (1e-3 for ``paper`` and ``cpu-small``) for every
profile: untested defaults until the warm-start study has measured them. Unset fields are left out
of :meth:`TrainingProfile.to_json`, so profiles (and the names and keys made from them) stay as they were.

Use :func:`resolve_profile` to get one with overrides, e.g.
``resolve_profile("cpu-small", epochs=10, device="cpu")``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

DEVICES = ("auto", "cpu", "cuda")


class ProfileError(ValueError):
    """An unknown profile, an unknown override or a value out of range."""


@dataclass(frozen=True)
class TrainingProfile:
    """What one training run does. ``None`` for a network or batch setting means "as planned by nnU-Net"."""

    name: str
    configuration: str = "3d_fullres"
    epochs: int = 200
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    folds: int = 5
    batch_size: int | None = None
    patch_size: tuple[int, ...] | None = None
    base_features: int | None = None  # features of the first stage; doubled per stage
    max_features: int | None = None  # cap of the features per stage
    conv_per_stage: int | None = None  # convolutions per stage, encoder and decoder
    deep_supervision: bool = True
    device: str = "auto"  # "auto" = cuda when torch sees a GPU, else cpu
    num_workers: int | None = None  # data augmentation processes; 0 = in the training process; None = nnU-Net's rule
    initial_lr: float = 1e-2
    save_every: int = 50  # epochs between checkpoint_latest.pth writes (resume points)
    compile: bool | None = None  # torch.compile; None = nnU-Net's default (on for cuda, off for cpu)
    evaluation_mirroring: bool = True  # test-time mirroring when evaluating on the test split (nnActive: on)
    description: str = ""
    warm_fraction: float | None = None  # warm-started member: share of the epochs; None: a third (untested default)
    warm_initial_lr: float | None = None  # warm-started member: starting learning rate; None: initial_lr / 10

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "folds", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ProfileError(f"profile {self.name!r}: {name} must be at least 1, got {getattr(self, name)}")
        if int(self.folds) < 2:  # one fold would train on nothing: every image is in its validation set
            raise ProfileError(f"profile {self.name!r}: folds must be at least 2 (a cross-validation ensemble), got {self.folds}")
        if self.val_iterations < 1:
            raise ProfileError(f"profile {self.name!r}: val_iterations must be at least 1, got {self.val_iterations}")
        if self.device not in DEVICES:
            raise ProfileError(f"profile {self.name!r}: device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ProfileError(f"profile {self.name!r}: batch_size must be at least 1, got {self.batch_size}")
        if self.patch_size is not None:
            patch = tuple(int(p) for p in self.patch_size)
            if len(patch) not in (2, 3) or min(patch) < 1:
                raise ProfileError(f"profile {self.name!r}: patch_size must be 2 or 3 positive integers, got {self.patch_size}")
            object.__setattr__(self, "patch_size", patch)
        for name in ("base_features", "max_features", "conv_per_stage"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ProfileError(f"profile {self.name!r}: {name} must be at least 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ProfileError(f"profile {self.name!r}: num_workers must be >= 0, got {self.num_workers}")
        if self.warm_fraction is not None and not 0 < float(self.warm_fraction) <= 1:
            raise ProfileError(f"profile {self.name!r}: warm_fraction must be in (0, 1], got {self.warm_fraction}")
        if self.warm_initial_lr is not None and not float(self.warm_initial_lr) > 0:
            raise ProfileError(f"profile {self.name!r}: warm_initial_lr must be positive, got {self.warm_initial_lr}")

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    @property
    def warm_epochs(self) -> int:
        """Epochs of a warm-started member: ``warm_fraction`` (default a third) of ``epochs``, rounded up."""
        fraction = 1 / 3 if self.warm_fraction is None else float(self.warm_fraction)
        return max(1, math.ceil(self.epochs * fraction - 1e-9))

    @property
    def warm_lr(self) -> float:
        """Starting learning rate of a warm-started member (default a tenth of ``initial_lr``)."""
        return float(self.initial_lr) / 10 if self.warm_initial_lr is None else float(self.warm_initial_lr)

    @property
    def warm_save_every(self) -> int:
        """Checkpoint interval of a warm-started member: as many resume points per schedule as a full training."""
        return max(1, min(self.save_every, math.ceil(self.save_every * self.warm_epochs / self.epochs)))

    @property
    def changes_network(self) -> bool:
        return any(v is not None for v in (self.patch_size, self.base_features, self.max_features, self.conv_per_stage))

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``; ``auto`` asks torch (imported only here)."""
        return resolve_device(self.device)

    def data_loader_processes(self) -> int:
        """Background augmentation processes: the profile's number, else nnU-Net's rule (bounded by the CPU count)."""
        if self.num_workers is not None:
            return self.num_workers
        return max(0, min(12, (os.cpu_count() or 1) - 1))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("warm_fraction", "warm_initial_lr"):  # unset: left out, so older profiles read the same
            if d[key] is None:
                del d[key]
        if self.patch_size is not None:
            d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainingProfile":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ProfileError(f"unknown profile fields: {', '.join(sorted(unknown))}")
        values = dict(d)
        if values.get("patch_size") is not None:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)


_DEMO = TrainingProfile(
    name="demo",
    epochs=20,
    iterations_per_epoch=25,
    val_iterations=2,
    folds=2,
    batch_size=4,
    patch_size=(24, 32, 24),
    base_features=8,
    max_features=64,
    conv_per_stage=1,
    num_workers=0,
    initial_lr=0.05,
    save_every=10,
    evaluation_mirroring=False,
    description="the main job until 2026-12-05 (and the pre-fill study's profile): cpu-small's network on patch "
    "24x32x24, learning rate 0.05, 2 folds x 500 iterations (about 70 s per fold, two folds at a time "
    "on 2 cores), test evaluation without mirroring",
)


PROFILES: dict[str, TrainingProfile] = {
    "paper": TrainingProfile(
        name="paper",
        epochs=200,
        iterations_per_epoch=250,
        val_iterations=50,
        folds=5,
        description="nnActive study: 3d_fullres plans, 200 epochs x 250 iterations, 5 folds",
    ),
    "cpu-small": TrainingProfile(
        name="cpu-small",
        epochs=30,
        iterations_per_epoch=50,
        val_iterations=5,
        folds=5,
        batch_size=4,
        patch_size=(32, 40, 32),
        base_features=8,
        max_features=64,
        conv_per_stage=1,
        num_workers=0,
        save_every=10,
        description="2 CPU cores, ~5 min per fold: 8..64 features, 1 conv per stage, patch 32x40x32, "
        "batch 4, 30 epochs x 50 iterations",
    ),
    "demo": _DEMO,
    "quick": dataclasses.replace(
        _DEMO,
        name="quick",
        epochs=30,
        iterations_per_epoch=50,
        description="the main job (make demo): demo's network, patch and learning rate, 2 folds x 1500 iterations; "
        "with --init warm the loops after the first train a third of that from a tenth of the rate",
    ),
    "test": TrainingProfile(
        name="test",
        epochs=2,
        iterations_per_epoch=3,
        val_iterations=1,
        folds=2,
        batch_size=2,
        patch_size=(16, 16, 16),
        base_features=8,
        max_features=32,
        conv_per_stage=1,
        num_workers=0,
        save_every=1,
        evaluation_mirroring=False,
        description="CI: seconds; tiny network, 2 epochs x 3 iterations, 2 folds, evaluation without mirroring",
    ),
}


def profile_names() -> list[str]:
    return list(PROFILES)


def resolve_profile(name: str | TrainingProfile = "paper", **overrides: Any) -> TrainingProfile:
    """A named profile (or a given one) with ``overrides`` applied; ``None`` values in overrides are skipped.

    Skipping ``None`` lets a command line pass every option through
    (``resolve_profile(args.profile, folds=args.folds, device=args.device)``)
    without turning "not given" into "unset".
    """
    if isinstance(name, TrainingProfile):
        base = name
    else:
        try:
            base = PROFILES[name]
        except KeyError:
            raise ProfileError(f"unknown training profile {name!r}; known: {', '.join(PROFILES)}") from None
    known = {f.name for f in fields(TrainingProfile)} - {"name"}
    unknown = set(overrides) - known
    if unknown:
        raise ProfileError(f"unknown profile settings: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "patch_size" in changes:
        changes["patch_size"] = tuple(changes["patch_size"])
    return dataclasses.replace(base, **changes) if changes else base


def resolve_device(device: str | None = "auto") -> str:
    """``cuda`` if asked for or if ``auto`` and torch sees a GPU, else ``cpu``. Asking for cuda without one is an error."""
    device = device or "auto"
    if device not in DEVICES:
        raise ProfileError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ProfileError("device 'cuda' was asked for, but torch sees no CUDA GPU on this machine")
    return "cuda" if available else "cpu"
