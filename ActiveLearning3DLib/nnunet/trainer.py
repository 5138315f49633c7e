"""``nnUNetTrainerPartial``: nnU-Net's trainer for partial label maps, and :func:`train_fold` to run one fold.

What it changes against ``nnUNetTrainer`` (2.8.1), and what it keeps:

- Sampling: :class:`~.sampling.RegionSamplingDataLoader` (region sampling of
  docs/METHODS.md section 2; a third of each batch forced onto a random
  annotated foreground class) for training and validation batches.
- Loss: nnU-Net's own ``DC_and_CE_loss`` as its ``_build_loss`` makes it when
  dataset.json has an ``ignore`` label: cross-entropy with
  ``ignore_index = ignore``, soft Dice with a loss mask that drops ignore voxels,
  background out of Dice (``do_bg=False``), deep supervision. Changed: Dice
  smoothing 0 instead of 1e-5 (nnActive). Nothing else to add: nnU-Net 2.8.1
  already excludes ignore voxels from both terms.
- Budget and network from a :class:`~.profiles.TrainingProfile` (epochs,
  iterations, validation iterations, learning rate, checkpoint interval; patch
  size, batch size, width and depth applied to the plans before the network is
  built, so the ``plans.json`` saved with the model describes the network).
- Folders: ``nnUNetTrainer.__init__`` derives its input and output folders from
  the ``nnUNet_preprocessed`` / ``nnUNet_results`` environment variables and
  creates the output folder at once. This subclass pins explicit folders
  instead (class-level descriptors that take precedence over what the base
  ``__init__`` assigns), so training needs no environment variables at all.
  The folders, the profile and the progress hook travel in the ``plans`` dict
  under ``"al3d_run"``, removed before nnU-Net sees the plans (nnU-Net saves the
  constructor's arguments in every checkpoint, and its signature may not change).
- Progress: ``progress(dict)`` is called after every training iteration and at
  the end of every epoch with ``stage, fold, epoch, epochs, iteration,
  iterations, progress`` (fraction of all iterations) and losses.
- ``progress.png`` (a large matplotlib figure, about 1 s per drawing) is drawn
  when a checkpoint is written and after the last epoch, not after every epoch.
- Checkpoints are written beside and renamed into place (``os.replace``), where
  nnU-Net's ``torch.save`` writes over the file: a fold killed while writing
  keeps its previous ``checkpoint_latest.pth`` to resume from, never leaves a
  torn ``checkpoint_final.pth`` that would count as done, and a project copy
  that hard-links a checkpoint keeps its own when this one is written again.
- Seeded (``train_fold(seed=...)``): Python, NumPy and torch are seeded with the
  fold's seed before the network is built, augmentation runs in the training
  process on the CPU, torch's deterministic algorithms are on, cuDNN benchmark
  off, and every checkpoint carries the random states (``al3d_rng``), which a
  resumed fold restores once its data loaders exist: on the CPU a killed and
  resumed fold ends with the same weights as one that ran through
  (determinism.py, docs/REPRODUCIBILITY.md).
- Warm start (``train_fold(init="warm", warm_from=<previous model>)``): the fold
  loads member k of the previous loop's model (weights only, read with
  checkpoints.py's safe reader; optimizer, epochs and logs start fresh) into its
  network before the first step, after checking that the plans identifier, the
  network and the labels are the same, and trains the profile's warm schedule
  (``warm_epochs`` from ``warm_lr`` with the usual poly decay). No previous
  member, or another network: it trains from scratch with the full schedule and
  says so (job log, ``al3d_init.json`` and the fold's summary). The decision is
  recorded before the first step; a killed fold resumes from its own checkpoint
  with the recorded schedule, never from the previous loop's.
- No final validation on the validation split by default (it predicts whole
  images with a process pool of 8 and compares with partial labels); the
  per-epoch pseudo Dice on annotated voxels of validation patches is logged as usual.

Everything else (augmentation, optimiser, poly learning rate, checkpoints,
logging, network construction) is nnU-Net's.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch._dynamo import OptimizedModule
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..fileio import atomic_write_json, read_json, replacing_file
from .checkpoints import UnsafeCheckpoint, check_plain_pickles, load_checkpoint, weights_digest
from .determinism import (
    RNG_KEY,
    Determinism,
    assess,
    capture_rng_state,
    cpu_description,
    deterministic_torch,
    fold_seed,
    restore_rng_state,
    seed_everything,
)
from .paths import NnunetPaths
from .profiles import TrainingProfile, resolve_device, resolve_profile
from .sampling import RegionSamplingDataLoader

RUN_KEY = "al3d_run"
INITS = ("scratch", "warm")  # how a loop's members start: random weights, or the previous loop's members
INIT_FILE = "al3d_init.json"  # in the fold folder: how the fold started (warm or scratch, from what, why)
Progress = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training cannot start (no plans, stale preprocessing, no split for this fold)."""


class _PinnedFolder:
    """A trainer attribute that reads an explicitly given folder, whatever ``nnUNetTrainer.__init__`` assigns."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        pinned = obj.__dict__.get("_al3d_folders") or {}
        return pinned[self.name] if self.name in pinned else obj.__dict__.get(self.name)

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = value


def plans_for_profile(plans: Mapping, configuration: str, profile: TrainingProfile) -> dict:
    """A copy of ``plans`` whose ``configuration`` has the profile's patch size, batch size and network overrides.

    A new patch size gets a new topology from nnU-Net's ``get_pool_and_conv_props``
    (the same function the planner uses), so pooling fits the patch. The
    configuration keeps its name and data identifier: preprocessing does not
    depend on these settings.
    """
    plans = copy.deepcopy(dict(plans))
    if configuration not in plans["configurations"]:
        raise TrainingError(f"configuration {configuration!r} is not planned; planned: {', '.join(plans['configurations'])}")
    config = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration)
    config.pop("inherits_from", None)
    arch = config["architecture"]["arch_kwargs"]
    if profile.batch_size is not None:
        config["batch_size"] = int(profile.batch_size)
    if profile.patch_size is not None:
        from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

        if len(profile.patch_size) != len(config["patch_size"]):
            raise TrainingError(
                f"profile patch size {list(profile.patch_size)} does not fit the {len(config['patch_size'])}D "
                f"configuration {configuration!r}"
            )
        _, strides, kernels, patch, _ = get_pool_and_conv_props(config["spacing"], list(profile.patch_size), 4, 999999)
        config["patch_size"] = [int(p) for p in patch]
        arch["strides"] = [[int(s) for s in st] for st in strides]
        arch["kernel_sizes"] = [[int(k) for k in ks] for ks in kernels]
        arch["n_stages"] = len(strides)
    n = int(arch["n_stages"])
    features = list(arch["features_per_stage"])
    base = int(profile.base_features or features[0])
    cap = int(profile.max_features or max(features))
    if profile.base_features or profile.max_features or len(features) != n:
        arch["features_per_stage"] = [min(cap, base * 2**i) for i in range(n)]
    conv = int(profile.conv_per_stage or list(arch["n_conv_per_stage"])[0])
    if profile.conv_per_stage or len(arch["n_conv_per_stage"]) != n:
        arch["n_conv_per_stage"] = [conv] * n
        arch["n_conv_per_stage_decoder"] = [conv] * (n - 1)
    plans["configurations"][configuration] = config
    return plans


class nnUNetTrainerPartial(nnUNetTrainer):
    """nnU-Net's trainer for partial labels with region sampling; see the module docstring."""

    preprocessed_dataset_folder_base = _PinnedFolder()
    preprocessed_dataset_folder = _PinnedFolder()
    output_folder_base = _PinnedFolder()
    output_folder = _PinnedFolder()

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnUNetTrainer's own signature)
    ):
        run = plans.pop(RUN_KEY, None) or {}
        self.profile: TrainingProfile | None = TrainingProfile.from_json(run["profile"]) if run.get("profile") else None
        self.progress_callback: Progress | None = run.get("progress")
        self.seed: int | None = run.get("seed")  # this fold's seed (determinism.fold_seed); None: not seeded
        self._al3d_seeding = {k: run.get(k) for k in ("base_seed", "loop")}
        self._al3d_resume_rng: dict | None = None
        self._al3d_resumed_without_rng = False
        self._al3d_processes = 0
        self._al3d_threads: set[int] = set()  # torch threads seen in the training steps (results depend on them)
        self.warm = bool(run.get("warm"))  # the warm schedule (set before the optimizer is made)
        self.warm_loaded_digest: str | None = None  # digest of the network at the first step of a warm start
        self._al3d_warm_loaded = False
        if self.profile is not None and (self.profile.changes_network or self.profile.batch_size is not None):
            plans.update(plans_for_profile(plans, configuration, self.profile))
        if run.get("preprocessed") and run.get("output"):
            config = PlansManager(plans).get_configuration(configuration)
            base = str(run["preprocessed"])
            output = str(run["output"])
            self._al3d_folders = {
                "preprocessed_dataset_folder_base": base,
                "preprocessed_dataset_folder": str(Path(base) / config.data_identifier),
                "output_folder_base": output,
                "output_folder": str(Path(output) / f"fold_{fold}"),
            }
        self._al3d_iteration = 0
        self._al3d_epoch_started = time.perf_counter()
        self.train_seconds = 0.0
        self.train_iterations = 0
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.profile is not None:
            p = self.profile
            self.num_epochs = p.epochs
            self.num_iterations_per_epoch = p.iterations_per_epoch
            self.num_val_iterations_per_epoch = p.val_iterations
            self.initial_lr = p.initial_lr
            self.save_every = p.save_every
            self.enable_deep_supervision = p.deep_supervision
            if self.warm:
                self.num_epochs, self.initial_lr, self.save_every = p.warm_epochs, p.warm_lr, p.warm_save_every
        self.run_final_validation = False
        # nnU-Net redraws progress.png (a 30 x 54 inch figure, about a second) after every epoch; with short CPU
        # epochs that is a large share of the time. Draw it when a checkpoint is written and after the last epoch.
        draw = self.logger.plot_progress_png

        def plot_progress_png(output_folder):
            finished = self.current_epoch + 1
            if finished % self.save_every == 0 or finished >= self.num_epochs:
                draw(output_folder)

        self.logger.plot_progress_png = plot_progress_png

    # ------------------------------------------------------------- nnU-Net hooks
    def _do_i_compile(self) -> bool:
        if self.profile is not None and self.profile.compile is not None:
            return bool(self.profile.compile) and self.device.type == "cuda"
        return super()._do_i_compile()

    def initialize(self):
        if not self.was_initialized and self.seed is not None:
            seed_everything(self.seed)  # before the network's weights are drawn
        super().initialize()

    def _build_loss(self):
        loss = super()._build_loss()
        inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        if self.label_manager.has_ignore_label:
            assert getattr(inner, "ignore_label", None) == self.label_manager.ignore_label, "nnU-Net's loss lost the ignore label"
        dice = getattr(inner.dc, "_orig_mod", inner.dc)  # torch.compile wraps it
        dice.smooth = 0.0
        return loss

    def get_dataloaders(self):
        """nnU-Net's ``get_dataloaders`` with our loader class and the profile's number of augmentation processes."""
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        lm = self.label_manager
        tr_transforms = self.get_training_transforms(
            patch_size,
            rotation_for_DA,
            deep_supervision_scales,
            mirror_axes,
            do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels,
            regions=lm.foreground_regions if lm.has_regions else None,
            ignore_label=lm.ignore_label,
        )
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales,
            is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels,
            regions=lm.foreground_regions if lm.has_regions else None,
            ignore_label=lm.ignore_label,
        )
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = RegionSamplingDataLoader(
            dataset_tr,
            self.batch_size,
            initial_patch_size,
            patch_size,
            lm,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=tr_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
        )
        dl_val = RegionSamplingDataLoader(
            dataset_val,
            self.batch_size,
            patch_size,
            patch_size,
            lm,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None,
            pad_sides=None,
            transforms=val_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
        )
        processes = self.profile.data_loader_processes() if self.profile is not None else None
        if processes is None:
            from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

            processes = get_allowed_n_proc_DA()
        if self.seed is not None and self.device.type == "cpu":
            # NonDetMultiThreadedAugmenter's workers draw from their own generators and deliver batches in
            # arrival order: a seeded CPU run augments in this process, in order, from the seeded generators
            processes = 0
        self._al3d_processes = processes
        if processes == 0:
            mt_gen_train = SingleThreadedAugmenter(dl_tr, None)
            mt_gen_val = SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_gen_train = NonDetMultiThreadedAugmenter(dl_tr, None, processes, max(6, processes // 2), None, pin, 0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(
                dl_val, None, max(1, processes // 2), max(3, processes // 4), None, pin, 0.002
            )
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    def do_split(self):
        if self.fold != "all":
            splits_file = Path(self.preprocessed_dataset_folder_base) / "splits_final.json"
            if not splits_file.is_file():
                raise TrainingError(f"{splits_file}: no splits; prepare the project before training")
            n = len(read_json(splits_file))
            if not 0 <= int(self.fold) < n:
                # nnU-Net would silently train on a random 80:20 split instead
                raise TrainingError(f"fold {self.fold} does not exist: the splits have {n} folds (0..{n - 1})")
        return super().do_split()

    def plot_network_architecture(self):
        pass  # nnU-Net tries the 'hiddenlayer' package, which is not installed, and logs the failure

    def warm_start(self, checkpoint_path: Path | str) -> str | None:
        """Load a previous member's weights (weights only) into the network; None, or why it could not.

        Names and shapes are compared before anything is loaded, so a refused
        checkpoint leaves the freshly initialised network as it was.
        """
        if not self.was_initialized:
            self.initialize()
        try:
            checkpoint = load_checkpoint(checkpoint_path, map_location=self.device)
        except UnsafeCheckpoint as e:
            return str(e)
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        own = network.state_dict()
        weights = {k[7:] if k not in own and k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
        if weights.keys() != own.keys():
            return f"{checkpoint_path}: another network (layer names differ)"
        wrong = [k for k in own if tuple(own[k].shape) != tuple(weights[k].shape)]
        if wrong:
            return (
                f"{checkpoint_path}: another network ({wrong[0]}: {list(weights[wrong[0]].shape)} instead of "
                f"{list(own[wrong[0]].shape)})"
            )
        network.load_state_dict(weights)
        self._al3d_warm_loaded = True
        return None

    def use_full_schedule(self) -> None:
        """Back to the profile's full schedule (a warm start that fell back to scratch), before the first step."""
        if self.profile is None:
            return
        self.warm = False
        self.num_epochs, self.initial_lr, self.save_every = self.profile.epochs, self.profile.initial_lr, self.profile.save_every
        if self.was_initialized:
            self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def on_train_start(self):
        super().on_train_start()  # builds the data loaders, which draw a first batch each
        if self._al3d_warm_loaded:  # what the first step starts from: the previous member's weights
            network = self.network.module if self.is_ddp else self.network
            self.warm_loaded_digest = weights_digest(getattr(network, "_orig_mod", network).state_dict())
        if self._al3d_resume_rng is not None:
            # continue with the random numbers the interrupted run would have drawn next
            restore_rng_state(self._al3d_resume_rng, self._loaders())
            self._al3d_resume_rng = None

    def _loaders(self) -> list:
        """The batchgenerators data loaders behind the augmenters (their shuffling generators are checkpointed)."""
        return [getattr(g, "data_loader", None) for g in (self.dataloader_train, self.dataloader_val) if g is not None]

    def determinism(self) -> Determinism:
        """Whether this run is reproducible bit for bit (see determinism.assess)."""
        if self._al3d_resumed_without_rng:
            ok, reason = False, "resumed from a checkpoint without random states"
        elif len(self._al3d_threads) > 1:
            ok, reason = (
                False,
                (
                    f"torch threads changed while training ({', '.join(map(str, sorted(self._al3d_threads)))}; "
                    f"the runner's idle-core sharing)"
                ),
            )
        else:
            ok, reason = assess(
                self.device.type,
                self.seed,
                self._al3d_processes,
                isinstance(self.network, OptimizedModule),
                torch.get_num_threads() if self.device.type == "cpu" else None,
            )
        cpu = cpu_description() if self.device.type == "cpu" else None
        return Determinism(ok, reason, self.seed, self._al3d_seeding.get("base_seed"), self._al3d_seeding.get("loop"), cpu)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._al3d_iteration = 0
        self._al3d_epoch_started = time.perf_counter()

    def on_train_epoch_end(self, train_outputs):
        # time of the training iterations alone (data loading, forward, backward), without validation and checkpoints
        self.train_seconds += time.perf_counter() - self._al3d_epoch_started
        self.train_iterations += len(train_outputs)
        super().on_train_epoch_end(train_outputs)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self._al3d_threads.add(torch.get_num_threads())
        self._al3d_iteration += 1
        self._report(loss=float(result["loss"]))
        return result

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        get = self.logger.get_value
        self._report(
            epoch=epoch,
            iteration=self.num_iterations_per_epoch,
            event="epoch_end",
            train_loss=float(get("train_losses", step=-1)),
            val_loss=float(get("val_losses", step=-1)),
            pseudo_dice=[float(d) for d in get("dice_per_class_or_region", step=-1)],
            epoch_seconds=float(get("epoch_end_timestamps", step=-1) - get("epoch_start_timestamps", step=-1)),
        )

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # writes nothing
        with replacing_file(filename) as tmp:
            if self.seed is None:
                super().save_checkpoint(str(tmp))
            else:
                torch.save(self._checkpoint_with_rng(), tmp)

    def _checkpoint_with_rng(self) -> dict:
        """nnU-Net 2.8.1's checkpoint dict (``nnUNetTrainer.save_checkpoint``) plus the random states (``al3d_rng``)."""
        mod = self.network.module if self.is_ddp else self.network
        mod = getattr(mod, "_orig_mod", mod)
        return {
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            RNG_KEY: capture_rng_state(self._loaders()),
        }

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Resume from a checkpoint read weights-only (nnU-Net's own reader unpickles anything; see checkpoints.py).

        nnU-Net 2.8.1's ``load_checkpoint`` reads with ``weights_only=False`` and fails on an already loaded dict
        (``checkpoint`` unbound), so its restore steps are repeated here on the dict our reader returns.
        """
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            try:
                checkpoint = load_checkpoint(checkpoint, map_location=self.device)
            except UnsafeCheckpoint as e:
                raise TrainingError(str(e)) from e
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        own = network.state_dict().keys()
        weights = {k[7:] if k not in own and k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes
        )
        network.load_state_dict(weights)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self._al3d_resume_rng = checkpoint.get(RNG_KEY)
        self._al3d_resumed_without_rng = self._al3d_resume_rng is None
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.run_final_validation:
            super().perform_actual_validation(save_probabilities)

    # ---------------------------------------------------------------- progress
    def _report(self, **extra: Any) -> None:
        if self.progress_callback is None:
            return
        epoch = extra.pop("epoch", self.current_epoch)
        iteration = extra.pop("iteration", self._al3d_iteration)
        total = self.num_epochs * self.num_iterations_per_epoch
        done = epoch * self.num_iterations_per_epoch + iteration
        status = {
            "stage": "training",
            "fold": self.fold,
            "epoch": int(epoch),
            "epochs": int(self.num_epochs),
            "iteration": int(iteration),
            "iterations": int(self.num_iterations_per_epoch),
            "progress": min(1.0, done / total) if total else 1.0,
            **extra,
        }
        self.progress_callback(status)


def train_fold(
    project_path: Path | str,
    fold: int,
    profile: TrainingProfile | str = "paper",
    output_dir: Path | str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    configuration: str | None = None,
    resume: bool = True,
    seed: int | None = None,
    loop: int | None = None,
    init: str = "scratch",
    warm_from: Path | str | None = None,
    warm_note: str | None = None,
) -> dict:
    """Train one fold of the project's ensemble with :class:`nnUNetTrainerPartial`, in this process.

    ``output_dir`` is the model folder (nnU-Net's layout: ``plans.json``,
    ``dataset.json``, ``fold_<k>/checkpoint_final.pth``), so nnU-Net's predictor
    loads it as it is. It belongs to one state of the labels: the default is
    ``<project>/nnunet/results/loop_<t>_<profile>`` for the last loop ``t``. Needs
    the project prepared (plans, current preprocessing, splits;
    :func:`~.prepare.prepare`). No environment variables are needed.

    ``resume``: a fold with ``checkpoint_final.pth`` is not trained again; one
    with ``checkpoint_latest.pth`` continues from it. Either only when the fold
    was trained on the same data (labels, plans, splits: ``al3d_data_key.txt`` in
    the fold folder); a folder holding a model of other data is an error, never
    silently reused. Returns a summary with the checkpoint path, final losses and
    seconds per iteration (training iterations alone, and overall).

    ``seed``: the base seed; the fold trains with ``fold_seed(seed, loop, fold)``
    (``loop``: default the project's last loop), and on the CPU ends with the same
    weights every time, resumed or not. The summary's ``determinism`` says
    whether the run was reproducible and why (see determinism.py).

    ``init="warm"``: start from ``warm_from/fold_<fold>/checkpoint_final.pth``
    (the previous loop's model) with the profile's warm schedule, or from
    scratch when that member is missing or has other plans or another network
    (``warm_note``: why the caller found no previous model). The summary's
    ``init`` says which, from what and why; see the module docstring.
    """
    if init not in INITS:
        raise TrainingError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    from ..project import Project
    from .planning import load_plans, project_dataset_json
    from .preprocessing import preprocessing_is_current, training_data_key

    project = Project.open(project_path)
    profile = resolve_profile(profile) if isinstance(profile, str) else profile
    if device is not None:
        profile = resolve_profile(profile, device=device)
    configuration = configuration or profile.configuration
    paths = NnunetPaths.for_project(project)
    current, why = preprocessing_is_current(project, configuration)
    if not current:
        raise TrainingError(f"{project.path}: preprocessing is not current ({why}); prepare the project first")
    try:  # nnU-Net unpickles the case properties while training: a shared project's must be plain data
        check_plain_pickles(paths.preprocessed_dataset)
    except UnsafeCheckpoint as e:
        raise TrainingError(str(e)) from e
    data_key = training_data_key(project, configuration)
    last_loop = (project.loop_indices() or [0])[-1]
    loop = last_loop if loop is None else int(loop)
    if output_dir is None:
        output_dir = paths.results_root / f"loop_{last_loop:03d}_{profile.name}"
    output = Path(output_dir)
    fold_dir = output / f"fold_{fold}"
    final = fold_dir / "checkpoint_final.pth"
    key_file = fold_dir / "al3d_data_key.txt"
    if key_file.is_file() and key_file.read_text().strip() != data_key:
        raise TrainingError(
            f"{fold_dir}: holds a model trained on other data (labels, plans or splits changed); train into a new output folder"
        )
    if resume and final.is_file():
        summary_file = fold_dir / "al3d_summary.json"
        summary = read_json(summary_file) if summary_file.is_file() else {}
        return {**summary, "checkpoint": str(final), "resumed": "already done"}
    fold_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(data_key + "\n")
    plans = load_plans(project)
    plans["continue_training"] = False
    latest = fold_dir / "checkpoint_latest.pth"
    resume_from = latest if resume and latest.is_file() else None
    if resume_from is not None:
        plans["continue_training"] = True
    init_file = fold_dir / INIT_FILE
    if resume_from is not None:  # a resumed fold keeps how it started; its own checkpoint holds its weights
        start = (
            read_json(init_file)
            if init_file.is_file()
            else {
                "requested": init,
                "init": "scratch",
                "from": None,
                "reason": "resumed from its own checkpoint, written before warm starts were recorded",
            }
        )
    else:
        start = _start_decision(project, configuration, profile, fold, init, warm_from, warm_note, plans)
    plans[RUN_KEY] = {
        "profile": profile.to_json(),
        "progress": progress,
        "preprocessed": str(paths.preprocessed_dataset),
        "output": str(output),
        "seed": None if seed is None else fold_seed(seed, loop, fold),
        "base_seed": seed,
        "loop": loop,
        "warm": start["init"] == "warm",
    }
    torch_device = torch.device(resolve_device(profile.device))
    trainer = nnUNetTrainerPartial(plans, configuration, fold, project_dataset_json(project), torch_device)
    if resume_from is not None:
        trainer.load_checkpoint(str(resume_from))
    elif start["init"] == "warm":
        refused = trainer.warm_start(start["from"])
        if refused is not None:
            trainer.use_full_schedule()
            start = {**start, "init": "scratch", "reason": f"warm start refused, trained from scratch: {refused}"}
    if resume_from is None:
        start["epochs"] = int(trainer.num_epochs)
        start["initial_lr"] = float(trainer.initial_lr)
        atomic_write_json(init_file, start)
    if init == "warm" and progress is not None:
        said = (
            f"fold {fold}: warm start from {start['from']} ({start['epochs']} epochs from learning rate {start['initial_lr']:g})"
            if start["init"] == "warm"
            else f"fold {fold}: {start['reason']}"
        )
        progress(
            {
                "event": "init",
                "stage": "training",
                "fold": fold,
                "message": ("resumed from its own checkpoint; " if resume_from is not None else "") + said,
            }
        )
    started = time.perf_counter()
    start_epoch = trainer.current_epoch
    with deterministic_torch(torch_device.type, seed is not None):
        trainer.run_training()
    seconds = time.perf_counter() - started
    iterations = (trainer.num_epochs - start_epoch) * trainer.num_iterations_per_epoch
    get = trainer.logger.get_value
    summary = {
        "fold": fold,
        "profile": profile.name,
        "configuration": configuration,
        "device": str(trainer.device),
        "checkpoint": str(final),
        "model_folder": str(output),
        "epochs": trainer.num_epochs,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "resumed_from_epoch": start_epoch,
        "seconds": round(seconds, 2),
        "seconds_per_iteration": round(trainer.train_seconds / max(1, trainer.train_iterations), 4),
        "seconds_per_iteration_overall": round(seconds / max(1, iterations), 4),
        "final_train_loss": float(get("train_losses", step=-1)),
        "final_val_loss": float(get("val_losses", step=-1)),
        "final_pseudo_dice": [float(d) for d in get("dice_per_class_or_region", step=-1)],
        "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
        "batch_size": int(trainer.batch_size),
        "data_key": data_key,
        "determinism": trainer.determinism().to_json(),
        "init": {**start, **({"initial_weights_sha256": trainer.warm_loaded_digest} if trainer.warm_loaded_digest else {})},
    }
    for key in ("final_train_loss", "final_val_loss"):
        if not math.isfinite(summary[key]):
            raise TrainingError(f"fold {fold}: {key} is {summary[key]} (training diverged)")
    atomic_write_json(fold_dir / "al3d_summary.json", summary)
    return summary


def _plans_differ(previous: Path, plans: Mapping, dataset: Mapping, configuration: str) -> str | None:
    """Why a previous model folder's network does not fit these plans (None when it does)."""
    try:
        old_plans = read_json(previous / "plans.json")
        old_dataset = read_json(previous / "dataset.json")
    except (OSError, ValueError) as e:
        return f"{previous}: no readable plans.json / dataset.json ({e})"
    if old_plans.get("plans_name") != plans.get("plans_name"):
        return f"{previous}: plans {old_plans.get('plans_name')!r}, not {plans.get('plans_name')!r}"
    try:
        old = PlansManager(old_plans).get_configuration(configuration).configuration
    except (KeyError, ValueError, TypeError):
        return f"{previous}: its plans have no configuration {configuration!r}"
    new = PlansManager(copy.deepcopy(dict(plans))).get_configuration(configuration).configuration
    for key in ("architecture", "spacing", "normalization_schemes", "data_identifier"):
        if old.get(key) != new.get(key):
            return f"{previous}: another {key.replace('_', ' ')} in its plans"
    if old_plans.get("foreground_intensity_properties_per_channel") != plans.get("foreground_intensity_properties_per_channel"):
        return f"{previous}: other intensity normalisation in its plans"
    for key in ("labels", "channel_names"):
        if old_dataset.get(key) != dataset.get(key):
            return f"{previous}: other {key.replace('_', ' ')} in its dataset.json"
    return None


def _start_decision(
    project,
    configuration: str,
    profile: TrainingProfile,
    fold: int,
    init: str,
    warm_from: Path | str | None,
    warm_note: str | None,
    plans: Mapping,
) -> dict:
    """How a fold starts (before its first step): ``{"requested", "init", "from", "reason"}``."""
    from .planning import project_dataset_json

    decision = {"requested": init, "init": "scratch", "from": None, "reason": "scratch requested"}
    if init != "warm":
        return decision
    if warm_from is None:
        return {**decision, "reason": f"warm start without a previous model, trained from scratch: {warm_note or 'none given'}"}
    previous = Path(warm_from)
    checkpoint = previous / f"fold_{fold}" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        return {
            **decision,
            "reason": f"warm start without a previous member, trained from scratch: {previous.name} has no finished fold {fold}",
        }
    current = plans_for_profile(plans, configuration, profile) if (profile.changes_network or profile.batch_size) else plans
    differ = _plans_differ(previous, current, project_dataset_json(project), configuration)
    if differ is not None:
        return {**decision, "reason": f"warm start refused, trained from scratch: {differ}"}
    return {**decision, "init": "warm", "from": str(checkpoint), "reason": f"member {fold} of {previous.name}"}
