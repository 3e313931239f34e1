"""Swin-UNETR self-supervised weights (nnssl/checkpoints/formats/swin_ssl.py): a model_swinvit.pt
built from MONAI's SwinUNETR in the released layout (Swin ViT keys under module./swinViT., MLP as
fc1/fc2), read into swinunetr with MONAI <= 1.4's merge order, planned --like and fine-tuned."""
import pytest
import torch

from conftest import require_optional
from foreign_finetune import finetune_like
from nnssl.errors import NnsslError
from test_swinunetr import _as_monai_1_4


def monai_reference(seed=0):
    monai_nets = require_optional("monai.networks.nets", min_version="1.5")  # fails under CI=true
    torch.manual_seed(seed)
    return monai_nets.SwinUNETR(in_channels=1, out_channels=2, depths=(2, 2, 2, 2), feature_size=12,
                                window_size=3).eval()


def swinvit_file(path, reference, prefix="module.", heads=False):
    """The released layout: {"state_dict": Swin ViT weights}, keys as MONAI's load_from reads them."""
    sd = {}
    for k, v in reference.swinViT.state_dict().items():
        sd[prefix + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2.")] = v
    if heads:  # the whole SSLHead saved under DDP
        sd["module.rotation_head.weight"] = torch.zeros(4, 96)
        sd["module.conv.0.weight"] = torch.zeros(8, 96, 3, 3, 3)
    torch.save({"epoch": 100, "state_dict": sd}, str(path))


@pytest.mark.parametrize("prefix, heads", [("module.", False), ("swinViT.", False), ("module.swinViT.", True)])
def test_every_swin_tensor_lands_and_outputs_equal_monai_1_4(tmp_path, prefix, heads):
    from nnssl.architectures.swinunetr import SwinUNETR
    from nnssl.checkpoints import load_pretraining_checkpoint

    ref = monai_reference()
    swinvit_file(tmp_path / "model_swinvit.pt", ref, prefix, heads)
    ckpt = load_pretraining_checkpoint(str(tmp_path / "model_swinvit.pt"))
    kwargs = ckpt["architecture"]["arch_kwargs"]
    assert ckpt["architecture"]["name"] == "swinunetr" and ckpt["method"]["name"] == "swin_ssl"
    assert (kwargs["feature_size"], kwargs["depths"], kwargs["num_heads"], kwargs["window_size"]) == (
        12, [2, 2, 2, 2], [3, 6, 12, 24], 3)
    assert kwargs["legacy_patch_merging"] is True and kwargs["attention_compat"] == "monai"
    assert ckpt["normalization"]["spacing"] == [2.0, 1.5, 1.5] and ckpt["normalization"]["patch_size"] == [96] * 3
    props = ckpt["normalization"]["foreground_intensity_properties_per_channel"]["0"]
    assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == (-1000, 1000, -1000, 2000)
    expected = {f"encoder.swinViT.{k}": v for k, v in ref.swinViT.state_dict().items()
                if not k.endswith("relative_position_index")}
    assert set(ckpt["network_weights"]) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt["network_weights"][k], v), k
    dropped = ckpt["method"]["config"]["source"]["dropped_keys"]
    assert dropped == (["module.rotation_head.weight", "module.conv.0.weight"] if heads else [])

    net = SwinUNETR(1, 2, **kwargs).eval()
    net.load_state_dict(ckpt["network_weights"], strict=False)
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = net.encoder.swinViT(x), _as_monai_1_4(ref).swinViT(x, True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_damaged_file_is_refused(tmp_path):
    from nnssl.checkpoints import load_pretraining_checkpoint

    ref = monai_reference()
    sd = {"module." + k: v for k, v in ref.swinViT.state_dict().items() if "layers2.0.blocks.1.norm2" not in k}
    torch.save({"state_dict": sd}, str(tmp_path / "cut.pt"))
    with pytest.raises(NnsslError, match="2 Swin ViT tensors are missing"):
        load_pretraining_checkpoint(str(tmp_path / "cut.pt"))
    sd = {"module." + k: v for k, v in ref.swinViT.state_dict().items()}
    sd["module.layers1.0.blocks.0.attn.relative_position_index"] = torch.zeros(27, 27, dtype=torch.long)
    torch.save({"state_dict": sd}, str(tmp_path / "index.pt"))
    with pytest.raises(NnsslError, match="relative-position index"):
        load_pretraining_checkpoint(str(tmp_path / "index.pt"))


def test_like_then_finetune_loads_every_swin_tensor(nnunet_env, tmp_path):
    ref = monai_reference()
    swinvit_file(tmp_path / "model_swinvit.pt", ref)
    # images at the pretraining spacing (z, y, x), large enough for SwinUNETR's smallest patch
    report = finetune_like(nnunet_env, str(tmp_path / "model_swinvit.pt"), shape=(48, 80, 80), spacing=(2.0, 1.5, 1.5),
                           cli=False)
    assert report["method"] == "swin_ssl" and report["architecture"] == "swinunetr"
    keys = report["report"]["keys"]
    swin = sorted(f"encoder.swinViT.{k}" for k, _ in ref.swinViT.named_parameters())
    assert sorted(k for k in keys["loaded"]) == swin
    # the conv encoder blocks are not part of the released weights: reported, left random
    assert keys["not_in_checkpoint"] and all(k.startswith(("encoder.encoder", "decoder.")) for k in
                                             keys["not_in_checkpoint"])
