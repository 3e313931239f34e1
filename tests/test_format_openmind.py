"""OpenMind / MIC-DKFZ nnssl checkpoints (nnssl/checkpoints/formats/openmind.py): a file in the
exact layout MIC-DKFZ nnssl's save_checkpoint writes (network from dynamic_network_architectures),
read into the contract, planned --like and fine-tuned; nnssl checkpoints written in that format
for nnU-Net master's like_nnssl / PretrainedTrainer."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from foreign_finetune import finetune_like, native_checkpoint
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


# The fields of MIC-DKFZ nnssl's dataclasses (AdaptationPlan, Plan, ConfigurationPlan, ArchitecturePlans).
ADAPTATION_PLAN_FIELDS = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                          "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                          "key_to_lpe"}
PLAN_FIELDS = {"dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
               "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used"}
CONFIGURATION_FIELDS = {"data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                        "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask",
                        "resampling_fn_mask_kwargs", "spacing", "patch_size"}


def nnunet_master_loads(path: str, downstream_channels: int) -> nn.Module:
    """What nnU-Net master does with the file (like_nnssl.preprocess_like_nnssl, then
    PretrainedTrainer.build_network_architecture and load_pretrained_weights), step by step. The
    class is looked up in dynamic_network_architectures' unet module, where nnU-Net's
    recursive_find_python_class finds it (that search imports every architecture module, which
    needs a working torchvision)."""
    import dynamic_network_architectures.architectures.unet as unet
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    ckp = torch.load(path, weights_only=True, map_location="cpu")
    plan = ckp["nnssl_adaptation_plan"]
    pretrain_config = list(plan["pretrain_plan"]["configurations"].values())[0]
    assert isinstance(pretrain_config["spacing"], list) and len(pretrain_config["spacing"]) == 3
    architecture = dict(plan["architecture_plans"])
    class_name = architecture.pop("arch_class_name")
    requires_import = architecture.pop("arch_kwargs_requiring_import")
    assert class_name in ("PlainConvUNet", "ResidualEncoderUNet")
    for cit in ckp["citations"]:  # PretrainedTrainer.print_citations
        assert isinstance(cit["type"], str) and isinstance(cit["name"], str) and cit["apa_citations"]
    network = get_network_from_plans(f"{unet.__name__}.{class_name}", architecture["arch_kwargs"], requires_import,
                                     downstream_channels, 2, allow_init=True, deep_supervision=False)
    sd = ckp["network_weights"]
    pt_enc, pt_stem, in_proj = plan["key_to_encoder"], plan["key_to_stem"], plan["keys_to_in_proj"]
    assert pt_stem not in sd  # nnU-Net's test for "stem inside the encoder" is False for these networks
    encoder = {k: v for k, v in sd.items() if k.startswith(pt_enc)}
    stem = {k: v for k, v in sd.items() if k.startswith(pt_stem)}
    if downstream_channels > plan["pretrain_num_input_channels"]:
        vals = stem[in_proj[0] + ".weight"].repeat(1, downstream_channels, 1, 1, 1) / downstream_channels
        for k in in_proj:
            stem[k + ".weight"] = vals
    network.get_submodule(network.key_to_encoder).load_state_dict(
        {k.replace(pt_enc, "").lstrip("."): v for k, v in encoder.items()})  # strict, as in nnU-Net
    network.get_submodule(network.key_to_stem).load_state_dict(
        {k.replace(pt_stem, "").lstrip("."): v for k, v in stem.items()})
    return network


@pytest.mark.parametrize("arch, channels", [("plainconvunet", 1), ("resenc", 1), ("resenc", 2), ("resenc_l", 1)])
def test_export_for_nnunet_passes_nnunet_masters_reader(nnunet_env, tmp_path, arch, channels):
    import json
    import os

    from nnssl.checkpoints import export_pretrained, load_pretraining_checkpoint
    from nnssl.checkpoints.formats.openmind import to_native

    native = native_checkpoint(arch)
    torch.save(native, str(tmp_path / "checkpoint_final.pth"))
    os.makedirs(os.path.join(nnunet_env["nnUNet_preprocessed"], native["dataset"]))
    with open(os.path.join(nnunet_env["nnUNet_preprocessed"], native["dataset"], "nnUNetPlans.json"), "w") as f:
        json.dump({"image_reader_writer": "SimpleITKIO", "configurations": {}}, f)
    out = str(tmp_path / "for_nnunet.pth")
    result = export_pretrained(str(tmp_path / "checkpoint_final.pth"), out, format="nnunet")
    assert "warning" not in result  # z-scored like nnU-Net's like_nnssl does

    ckp = torch.load(out, weights_only=True)
    plan = ckp["nnssl_adaptation_plan"]
    assert set(plan) == ADAPTATION_PLAN_FIELDS and set(plan["pretrain_plan"]) == PLAN_FIELDS
    assert set(plan["architecture_plans"]) == {"arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import"}
    [(name, configuration)] = plan["pretrain_plan"]["configurations"].items()
    assert name == "3d_fullres" and set(configuration) == CONFIGURATION_FIELDS
    assert configuration["spacing_style"] in ("onemmiso", "median", "noresample")
    assert configuration["spacing"] == [1.0, 1.0, 1.0] and plan["recommended_downstream_patchsize"] == [16, 16, 16]
    assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
    assert plan["architecture_plans"]["arch_kwargs_requiring_import"] == ["conv_op", "norm_op", "nonlin"]
    assert (plan["key_to_encoder"], plan["key_to_stem"]) == (
        ("encoder.stages", "encoder.stages.0") if arch == "plainconvunet" else ("encoder.stages", "encoder.stem"))

    network = nnunet_master_loads(out, channels)
    stem_conv = {"encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight"}  # one tensor
    for k, v in network.encoder.state_dict(prefix="encoder.").items():
        if channels == 2 and k in stem_conv:  # nnU-Net repeats the stem over the channels, divided by 2
            assert torch.equal(v, native["network_weights"][k].repeat(1, 2, 1, 1, 1) / 2)
        else:
            assert torch.equal(v, native["network_weights"][k]), k
    # nnssl reads the file natively, and the OpenMind reader reads its plan back to the same network
    assert load_pretraining_checkpoint(out)["architecture"]["name"] == arch
    back = to_native({k: ckp[k] for k in ("network_weights", "nnssl_adaptation_plan")}, out)
    assert back["architecture"]["arch_kwargs"] == json.loads(json.dumps(native["architecture"]["arch_kwargs"]))
    for k, v in native["network_weights"].items():
        assert torch.equal(back["network_weights"][k], v), k


def test_export_for_nnunet_warns_that_nnunet_z_scores_a_ct_model(nnunet_env, tmp_path):
    import json
    import os

    from nnssl.checkpoints import export_pretrained

    native = native_checkpoint("plainconvunet")
    native["normalization"]["normalization_schemes"] = ["CTNormalization"]
    torch.save(native, str(tmp_path / "ct.pth"))
    os.makedirs(os.path.join(nnunet_env["nnUNet_preprocessed"], native["dataset"]))
    with open(os.path.join(nnunet_env["nnUNet_preprocessed"], native["dataset"], "nnUNetPlans.json"), "w") as f:
        json.dump({"configurations": {}}, f)
    result = export_pretrained(str(tmp_path / "ct.pth"), str(tmp_path / "out.pth"), format="nnunet")
    assert "normalizes every channel with ZScoreNormalization" in result["warning"]
    assert "['CTNormalization']" in result["warning"]


def test_export_for_nnunet_refuses_what_its_trainer_cannot_build(nnunet_env, tmp_path):
    from nnssl.checkpoints.formats.openmind import from_native

    with pytest.raises(NnsslError, match="PlainConvUNet and ResidualEncoderUNet only"):
        from_native(native_checkpoint("pct_net"), None)


def test_import_writes_an_archive_whose_card_names_the_source(tmp_path, capsys):
    import hashlib
    import json
    import zipfile

    from nnssl.checkpoints import load_pretraining_checkpoint
    from nnssl.cli.import_pretrained import main

    ref = openmind_file(tmp_path / "om.pth")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "om.pth"), "-o", str(tmp_path / "om.zip"), "--license", "CC-BY-4.0"])
    assert e.value.code == 0
    with zipfile.ZipFile(tmp_path / "om.zip") as z:
        card = json.loads(z.read("model_card.json"))
    assert card["source"]["format"] == "openmind" and card["source"]["file"] == "om.pth"
    assert card["source"]["sha256"] == hashlib.sha256((tmp_path / "om.pth").read_bytes()).hexdigest()
    assert card["license"] == "CC-BY-4.0" and "OpenMind" in card["citation"]
    assert card["architecture"] == "resenc_l" and card["spacing"] == [1.5, 1.5, 1.5]
    ckpt = load_pretraining_checkpoint(str(tmp_path / "om.zip"))
    for k, v in ref.encoder.state_dict(prefix="encoder.").items():
        assert torch.equal(ckpt["network_weights"][k], v), k

    capsys.readouterr()
    for argv, message in (([str(tmp_path / "om.pth"), "--format", "swin_ssl", "-o", str(tmp_path / "x.zip")],
                           "does not have the layout of the 'swin_ssl' format"),
                          ([str(tmp_path / "om.zip"), "-o", str(tmp_path / "y.zip")], "already an nnssl checkpoint")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "y.zip").exists()
