"""The public network API (nnssl/architectures/build.py): ``build_network`` for every registered
architecture, its refusals, and ``load_pretrained``."""
import os

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnssl
from nnssl.architectures import ARCHITECTURES, build_network, load_pretrained
from nnssl.checkpoints import to_plain
from nnssl.errors import NnsslError

DS = "Dataset001_Blobs"


def tiny(name):
    return "tiny" if "tiny" in ARCHITECTURES.get(name).presets else None


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_every_architecture_builds_like_its_planner_plans(pretrain_tree, name):
    """At the patch and spacing the planner chose for the shared tiny dataset, build_network asks for
    exactly the plans' kwargs (planning and build_network cannot drift); at the planner's smallest
    patch the network runs: [2, 2, D, H, W] -> [2, 3, D, H, W], finite, and depends on the input."""
    spec = ARCHITECTURES.get(name)
    planner = spec.planner_class().without_dataset(2, 3, preset=tiny(name))
    pm = PlansManager(os.path.join(pretrain_tree["nnUNet_preprocessed"], DS, spec.plans_name + ".json"))
    cm = pm.get_configuration("3d_fullres")
    block = planner.network_for_patch(cm.patch_size, cm.spacing)
    assert block["network_class_name"] == cm.network_arch_class_name
    assert to_plain(block["arch_kwargs"]) == to_plain(cm.network_arch_init_kwargs)  # plans JSON has lists
    assert tuple(block["_kw_requires_import"]) == tuple(cm.network_arch_init_kwargs_req_import)

    patch = planner.smallest_patch()
    torch.manual_seed(0)
    net = build_network(name, patch, input_channels=2, num_classes=3, preset=tiny(name)).eval()
    x = torch.randn(2, 2, *patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, other = net(x), net(x.flip(2))
    assert out.shape == (2, 3, *patch)
    assert torch.isfinite(out).all() and not torch.allclose(out, other)


def test_deep_supervision_and_the_package_level_names():
    net = nnssl.build_network("plainconvunet", (16, 32, 32), 1, 2, deep_supervision=True, preset="tiny")
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, 16, 32, 32))
    # nnU-Net's topology for (16, 32, 32): 2 poolings of z, 3 of y/x -> outputs at full, 1/2, 1/4 (+ 1/8 y/x)
    assert [tuple(o.shape[2:]) for o in outs][:2] == [(16, 32, 32), (8, 16, 16)]
    assert nnssl.load_pretrained is load_pretrained


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(NnsslError, match="Choose one of: .*plainconvunet"):
        build_network("no_such_net", (32, 32, 32), 1, 2)
    with pytest.raises(NnsslError, match=r"divisible by \(32, 32, 32\)"):
        build_network("ulkanet", (48, 32, 32), 1, 2, preset="tiny")
    with pytest.raises(NnsslError, match=r"divisible by \(16, 16, 16\)"):
        build_network("pct_net", (16, 16, 24), 1, 2, preset="tiny")
    with pytest.raises(NnsslError, match="num_classes must be a positive integer"):
        build_network("plainconvunet", (16, 16, 16), 1, 0)
    with pytest.raises(NnsslError, match="input_channels must be a positive integer"):
        build_network("plainconvunet", (16, 16, 16), 0, 2)
    with pytest.raises(NnsslError, match="has no preset 'huge'"):
        build_network("plainconvunet", (16, 16, 16), 1, 2, preset="huge")
    with pytest.raises(NnsslError, match="three positive values"):
        build_network("plainconvunet", (16, 16), 1, 2)


def test_load_pretrained_returns_the_pretrained_network(pretrain_env, tmp_path):
    from nnssl.training.pretrainer import pretrain

    out = pretrain(DS, "volume_fusion", iterations=1, iterations_per_epoch=1, batch_size=2, device="cpu",
                   num_workers=0, output_folder=str(tmp_path / "pre"))
    path = os.path.join(out, "checkpoint_final.pth")
    ckpt = torch.load(path, weights_only=True)
    net = load_pretrained(path)
    state = net.state_dict()
    heads = ckpt["resume"]["network_excluded"]
    assert heads and set(state) == set(ckpt["network_weights"]) | set(heads)
    assert all(torch.equal(state[k], v) for k, v in {**ckpt["network_weights"], **heads}.items())
    fresh = load_pretrained(path, num_classes=5)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["network_weights"].items())
    assert all(state[k].shape[0] == 5 for k in heads if k.endswith(".weight"))
    with pytest.raises(NnsslError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing.pth"))
