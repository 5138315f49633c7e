"""Training profiles: the named ones, overrides, device choice, and how a profile changes nnU-Net's plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ActiveLearning3DLib.nnunet.profiles import (
    PROFILES,
    ProfileError,
    TrainingProfile,
    profile_names,
    resolve_device,
    resolve_profile,
)


def test_named_profiles_have_the_documented_budgets():
    assert profile_names() == ["paper", "cpu-small", "demo", "quick", "test"]
    paper = resolve_profile("paper")
    assert (paper.configuration, paper.epochs, paper.iterations_per_epoch, paper.folds) == ("3d_fullres", 200, 250, 5)
    assert not paper.changes_network and paper.batch_size is None  # nnU-Net's plans unchanged
    small = resolve_profile("cpu-small")
    assert small.changes_network and small.total_iterations < paper.total_iterations / 20
    assert small.num_workers == 0 and small.device == "auto"
    demo = resolve_profile("demo")  # the cpu-small network on a smaller patch, a shorter budget, 2 folds
    assert (demo.base_features, demo.max_features, demo.folds) == (small.base_features, small.max_features, 2)
    assert np.prod(demo.patch_size) < np.prod(small.patch_size) and demo.initial_lr > small.initial_lr
    assert demo.total_iterations < small.total_iterations / 2 and not demo.evaluation_mirroring
    quick = resolve_profile("quick")  # the main job's: demo's network trained as many iterations as cpu-small
    assert (
        dataclasses.replace(
            quick, name="demo", epochs=demo.epochs, iterations_per_epoch=demo.iterations_per_epoch, description=demo.description
        )
        == demo
    )
    assert quick.total_iterations == small.total_iterations and quick.warm_epochs * 3 == quick.epochs


def test_the_main_job_warm_starts_the_quick_profile_and_says_what_it_reduced(tmp_path):
    from ActiveLearning3DLib.default_data import resolve_default_data
    from ActiveLearning3DLib.simulation import demo_settings

    data = resolve_default_data({}, tmp_path, tmp_path / "phantoms", 0)
    settings = demo_settings(data, tmp_path / "out")
    assert (settings.profile, settings.init, settings.loops, settings.seeds) == ("quick", "warm", 3, (0,))
    reductions = " ".join(settings.reductions)
    assert "'quick'" in reductions and "1500 iterations" in reductions and "warm-started" in reductions
    test = resolve_profile("test")
    assert test.total_iterations <= 10 and test.patch_size == (16, 16, 16) and not test.evaluation_mirroring


def test_overrides_replace_fields_and_none_means_not_given():
    p = resolve_profile("cpu-small", epochs=3, folds=None, device="cpu", patch_size=[24, 24, 24])
    assert (p.name, p.epochs, p.folds, p.device, p.patch_size) == ("cpu-small", 3, 5, "cpu", (24, 24, 24))
    assert PROFILES["cpu-small"].epochs != 3  # the registry is not changed
    assert resolve_profile("paper") is PROFILES["paper"]
    again = resolve_profile(p, iterations_per_epoch=7)  # a profile object can be resolved again
    assert (again.epochs, again.iterations_per_epoch) == (3, 7)


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"device": "tpu"},
        {"batch_size": 0},
        {"patch_size": (8, 0, 8)},
        {"val_iterations": 0},
        {"num_workers": -1},
        {"folds": 1},
    ],
)
def test_invalid_values_are_clear_errors(bad):
    with pytest.raises(ProfileError):
        resolve_profile("test", **bad)


def test_unknown_names_and_settings_are_errors():
    with pytest.raises(ProfileError, match="unknown training profile 'fast'.*paper"):
        resolve_profile("fast")
    with pytest.raises(ProfileError, match="unknown profile settings: epoch"):
        resolve_profile("paper", epoch=3)


def test_json_round_trip():
    p = resolve_profile("test", epochs=5)
    assert TrainingProfile.from_json(p.to_json()) == p
    with pytest.raises(ProfileError):
        TrainingProfile.from_json({**p.to_json(), "colour": "red"})


def test_device_auto_follows_torch(monkeypatch):
    import torch

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_profile("paper").resolved_device() == "cpu"
    with pytest.raises(ProfileError, match="no CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device(None) == "cuda"


def _plans(patch=(40, 56, 40)) -> dict:
    """A Hippocampus-like 3d_fullres configuration as nnU-Net 2.8.1 plans it."""
    arch = {
        "n_stages": 4,
        "features_per_stage": [32, 64, 128, 256],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 4,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 9,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [36, 50, 35],
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset001_AL3D",
        "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": config},
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
    }


def test_profile_changes_the_plans_network_and_keeps_the_data_identifier():
    from ActiveLearning3DLib.nnunet.trainer import plans_for_profile

    plans = _plans()
    small = plans_for_profile(plans, "3d_fullres", resolve_profile("cpu-small"))
    config = small["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    assert config["patch_size"] == [32, 40, 32] and config["batch_size"] == 4
    assert arch["n_stages"] == 4 and arch["features_per_stage"] == [8, 16, 32, 64]
    assert arch["n_conv_per_stage"] == [1] * 4 and arch["n_conv_per_stage_decoder"] == [1] * 3
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 9  # input untouched
    tiny = plans_for_profile(plans, "3d_fullres", resolve_profile("test"))["configurations"]["3d_fullres"]
    tiny_arch = tiny["architecture"]["arch_kwargs"]
    # a 16^3 patch allows only two poolings to the 4-voxel minimum: nnU-Net's topology rule gives 3 stages
    assert tiny["patch_size"] == [16, 16, 16] and tiny_arch["n_stages"] == 3
    assert len(tiny_arch["strides"]) == len(tiny_arch["kernel_sizes"]) == len(tiny_arch["features_per_stage"]) == 3
    assert tiny_arch["features_per_stage"] == [8, 16, 32] and len(tiny_arch["n_conv_per_stage_decoder"]) == 2
    unchanged = plans_for_profile(plans, "3d_fullres", resolve_profile("paper"))
    assert unchanged["configurations"]["3d_fullres"]["architecture"] == plans["configurations"]["3d_fullres"]["architecture"]


def test_profile_network_builds_with_nnunet():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    import torch

    from ActiveLearning3DLib.nnunet.trainer import plans_for_profile

    config = plans_for_profile(_plans(), "3d_fullres", resolve_profile("test"))["configurations"]["3d_fullres"]
    arch = config["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        3,
        allow_init=True,
        deep_supervision=False,
    )
    out = net(torch.zeros(1, 1, *config["patch_size"]))
    assert tuple(out.shape) == (1, 3, 16, 16, 16)
