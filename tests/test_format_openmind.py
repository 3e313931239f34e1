"""OpenMind / MIC-DKFZ nnssl checkpoints (nnssl/checkpoints/formats/openmind.py): a file in the
exact layout MIC-DKFZ nnssl's save_checkpoint writes (network from dynamic_network_architectures),
read into the contract, planned --like and fine-tuned; nnssl checkpoints written in that format
for nnU-Net master's like_nnssl / PretrainedTrainer."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from foreign_finetune import finetune_like
from nnssl.errors import NnsslError

PATCH = (16, 16, 16)


def reference(arch_class: str, seed: int = 0) -> nn.Module:
    """A tiny 3-stage network of the class the plan names (what MIC-DKFZ nnssl pretrains)."""
    torch.manual_seed(seed)
    common = dict(input_channels=1, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=[1, 2, 2], num_classes=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-05, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                  deep_supervision=False)
    if arch_class == "PlainConvUNet":
        return PlainConvUNet(n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], **common).eval()
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1], **common).eval()


def adaptation_plan(arch_class: str, net: nn.Module) -> dict:
    """AdaptationPlan.serialize() of MIC-DKFZ nnssl for ``net``: class-valued kwargs as
    'module.Name' strings, tuples where its dataclasses hold tuples."""
    blocks = ({"n_conv_per_stage": [2, 2, 2]} if arch_class == "PlainConvUNet" else {"n_blocks_per_stage": [1, 2, 2]})
    kwargs = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [(3, 3, 3)] * 3, "strides": [(1, 1, 1), (2, 2, 2), (2, 2, 2)], **blocks,
              "n_conv_per_stage_decoder": [2, 2] if arch_class == "PlainConvUNet" else [1, 1], "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    configuration = {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
                     "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
                     "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                     "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                     "resampling_fn_mask": "resample_data_or_seg_to_shape",
                     "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
                     "spacing": [1.5, 1.5, 1.5], "patch_size": [32, 32, 32]}
    return {"architecture_plans": {"arch_class_name": arch_class, "arch_kwargs": kwargs,
                                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                              "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
                              "image_reader_writer": "NibabelReaderWriter", "transpose_forward": [0, 1, 2],
                              "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": configuration},
                              "experiment_planner_used": "ExperimentPlanner"},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": PATCH,
            "key_to_encoder": net.key_to_encoder, "key_to_stem": net.key_to_stem,
            "keys_to_in_proj": tuple(net.keys_to_in_proj), "key_to_lpe": None}


def openmind_file(path, arch_class="ResidualEncoderUNet", plan_changes=None, weight_prefix="") -> nn.Module:
    """Write what AbstractBaseTrainer.save_checkpoint writes; returns the reference network."""
    net = reference(arch_class)
    plan = {**adaptation_plan(arch_class, net), **(plan_changes or {})}
    torch.save({"network_weights": {weight_prefix + k: v for k, v in net.state_dict().items()},
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
                "grad_scaler_state": None, "logging": {"train_losses": [0.9, 0.8]}, "_best_ema": None,
                "current_epoch": 1000, "init_args": {"configuration": "onemmiso", "fold": 0},
                "trainer_name": "BaseMAETrainer", "nnssl_adaptation_plan": plan}, str(path))
    return net


@pytest.mark.parametrize("arch_class", ["ResidualEncoderUNet", "PlainConvUNet"])
def test_every_tensor_lands_where_it_was_and_outputs_equal_the_reference(tmp_path, arch_class):
    from nnssl.architectures import load_pretrained
    from nnssl.checkpoints import load_pretraining_checkpoint

    ref = openmind_file(tmp_path / "om.pth", arch_class)
    ckpt = load_pretraining_checkpoint(str(tmp_path / "om.pth"))
    assert ckpt["architecture"]["name"] == ("plainconvunet" if arch_class == "PlainConvUNet" else "resenc_l")
    assert ckpt["architecture"]["network_class_name"] == f"dynamic_network_architectures.architectures.unet.{arch_class}"
    assert ckpt["normalization"]["spacing"] == [1.5, 1.5, 1.5] and ckpt["normalization"]["patch_size"] == [16, 16, 16]
    assert ckpt["normalization"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert ckpt["transfer"] == "encoder" and ckpt["method"]["name"] == "openmind"
    expected = {k: v for k, v in ref.state_dict().items() if ".seg_layers." not in k}
    assert set(ckpt["network_weights"]) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt["network_weights"][k], v), k
    net = load_pretrained(str(tmp_path / "om.pth"), num_classes=2).eval()
    net.decoder.seg_layers.load_state_dict(ref.decoder.seg_layers.state_dict())
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_resencl_preset_is_nnunets_resenc_l_at_160():
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.checkpoints import to_plain
    from nnssl.checkpoints.formats.openmind import _architecture

    name, cls, kwargs, _ = _architecture({"arch_class_name": "ResEncL", "arch_kwargs": None}, "test")
    assert name == "resenc_l" and cls.endswith(".ResidualEncoderUNet")
    # MIC-DKFZ nnssl's get_res_enc_l: 6 stages, these widths and blocks, 1 conv per decoder stage
    assert kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6] and kwargs["n_conv_per_stage_decoder"] == [1] * 5
    planner = ARCHITECTURES.get("resenc_l").planner_class().without_dataset(1, 2)
    assert to_plain(planner.network_for_patch((160, 160, 160))["arch_kwargs"]) == kwargs


@pytest.mark.parametrize("changes, message", [
    ({"architecture_plans": {"arch_class_name": "PrimusM", "arch_kwargs": None}}, "nnssl has no Primus"),
    ({"recommended_downstream_patchsize": (18, 16, 16)}, "not divisible by the network's downsampling \\[4, 4, 4\\]"),
    ({"pretrain_num_input_channels": 2}, "2 input channels"),
])
def test_a_file_nnssl_cannot_use_is_refused(tmp_path, changes, message):
    from nnssl.checkpoints import load_pretraining_checkpoint

    openmind_file(tmp_path / "om.pth", plan_changes=changes)
    with pytest.raises(NnsslError, match=message):
        load_pretraining_checkpoint(str(tmp_path / "om.pth"))


def test_encoder_and_stem_move_from_the_plans_keys_to_the_networks(tmp_path):
    """A pretraining network that holds the U-Net under another name: key_to_encoder / key_to_stem
    say where; without them the encoder is not found and the file is refused."""
    from nnssl.checkpoints import load_pretraining_checkpoint

    keys = {"key_to_encoder": "backbone.encoder.stages", "key_to_stem": "backbone.encoder.stem"}
    ref = openmind_file(tmp_path / "moved.pth", plan_changes=keys, weight_prefix="backbone.")
    ckpt = load_pretraining_checkpoint(str(tmp_path / "moved.pth"))
    for k, v in ref.encoder.state_dict(prefix="encoder.").items():
        assert torch.equal(ckpt["network_weights"][k], v), k
    assert "backbone.decoder.seg_layers.0.weight" in ckpt["method"]["config"]["source"]["dropped_keys"]
    openmind_file(tmp_path / "unmoved.pth", weight_prefix="backbone.")
    with pytest.raises(NnsslError, match="do not fill the encoder of the ResidualEncoderUNet"):
        load_pretraining_checkpoint(str(tmp_path / "unmoved.pth"))


def test_like_then_finetune_loads_every_encoder_tensor(nnunet_env, tmp_path):
    ref = openmind_file(tmp_path / "om.pth")
    report = finetune_like(nnunet_env, str(tmp_path / "om.pth"))
    assert report["method"] == "openmind" and report["architecture"] == "resenc_l"
    loaded = report["report"]["keys"]["loaded"]
    assert sorted(loaded) == sorted(k for k, _ in ref.encoder.named_parameters(prefix="encoder"))
    assert report["plans_differences"]["refused"] == []
