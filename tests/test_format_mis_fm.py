"""MIS-FM's PCT-Net weights (nnssl/checkpoints/formats/mis_fm.py). The authors' network
(openmedlab/MIS-FM net/pct_net.py) is not installable here, so the file is built from a key/shape
manifest written from its source; every tensor is checked at its nnssl place (the reordered fusing
layers and the re-indexed bias tables by the function they compute), then fine-tuned --like."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foreign_finetune import finetune_like
from nnssl.errors import NnsslError

C = [4, 8, 16, 16, 32]  # channels of the 5 levels (the released model: 24, 48, 128, 256, 512)
HEADS, DEPTH, WINDOW, IN, CLASSES = [1, 2, 2], 2, 3, 1, 5


def conv(cout, cin, k):
    return {"weight": (cout, cin, *k), "bias": (cout,)}


def bn(c):
    return {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()}


def sub(prefix, params):
    return {f"{prefix}.{k}": v for k, v in params.items()}


def conv_block(prefix, c, k):  # ConvBlock: conv_conv = BN, PReLU, conv, BN, PReLU, dropout, conv
    return {**sub(f"{prefix}.conv_conv.0", bn(c)), f"{prefix}.conv_conv.1.weight": (1,),
            **sub(f"{prefix}.conv_conv.2", conv(c, c, k)), **sub(f"{prefix}.conv_conv.3", bn(c)),
            f"{prefix}.conv_conv.4.weight": (1,), **sub(f"{prefix}.conv_conv.6", conv(c, c, k))}


def preact(prefix, cin, cout, k, transposed=False):  # BN, PReLU, conv (DownSample.conv, ConvLayer.conv, up)
    w = {"weight": (cin, cout, *k), "bias": (cout,)} if transposed else conv(cout, cin, k)
    return {**sub(f"{prefix}.0", bn(cin)), f"{prefix}.1.weight": (1,), **sub(f"{prefix}.2", w)}


def convtrans(prefix, c, heads):
    out = conv_block(f"{prefix}.conv", c, (3, 3, 3))
    for j in range(DEPTH):
        b = f"{prefix}.trans.blocks.{j}"
        out.update({f"{b}.norm1.weight": (c,), f"{b}.norm1.bias": (c,),
                    f"{b}.attn.relative_position_bias_table": ((2 * WINDOW - 1) ** 3, heads),
                    f"{b}.attn.relative_position_index": (WINDOW ** 3, WINDOW ** 3),
                    f"{b}.attn.qkv.weight": (3 * c, c), f"{b}.attn.qkv.bias": (3 * c,),
                    f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,), f"{b}.norm2.weight": (c,),
                    f"{b}.norm2.bias": (c,), f"{b}.mlp.fc1.weight": (4 * c, c), f"{b}.mlp.fc1.bias": (4 * c,),
                    f"{b}.mlp.fc2.weight": (c, 4 * c), f"{b}.mlp.fc2.bias": (c,)})
    out.update({f"{prefix}.norm_layer.weight": (c,), f"{prefix}.norm_layer.bias": (c,)})
    return out


def upcat(prefix, c_low, c_high, up_k, conv_k):
    return {**preact(f"{prefix}.up", c_high, c_low, up_k, transposed=True),
            **preact(f"{prefix}.conv", 2 * c_low, c_low, conv_k)}


def manifest():
    """{key: shape} of the authors' PCTNet({in_chns, class_num, feature_chns=C, depths, num_heads,
    window_sizes, multiscale_pred=True}): three embeddings / heads (modes 0, 1, 2), one pyramid."""
    k3, k2 = (3, 3, 3), (1, 3, 3)
    out = {}
    for m, (conv_dims, down_dims) in enumerate((([3, 3], [3, 3]), ([2, 3], [2, 3]), ([2, 2], [2, 2]))):
        kk = [k3 if d == 3 else k2 for d in conv_dims]
        up = [(2, 2, 2) if d == 3 else (1, 2, 2) for d in down_dims]
        e, h = f"embeddings.{m}", f"pred_heads.{m}"
        out.update({**sub(f"{e}.proj", conv(C[0], IN, kk[0])), **conv_block(f"{e}.conv0", C[0], kk[0]),
                    **conv_block(f"{e}.conv1", C[1], kk[1]), **preact(f"{e}.down1.conv", C[0], C[1], kk[1]),
                    **preact(f"{e}.down2.conv", C[1], C[2], k3),
                    **upcat(f"{h}.up1", C[0], C[1], up[0], kk[0]), **upcat(f"{h}.up2", C[1], C[2], up[1], kk[1]),
                    **conv_block(f"{h}.conv0", C[0], kk[0]), **conv_block(f"{h}.conv1", C[1], kk[1]),
                    **preact(f"{h}.out_conv0.conv", C[0], CLASSES, (1, 1, 1)),
                    **preact(f"{h}.out_conv1.conv", C[1], CLASSES, (1, 1, 1))})
    p = "pyramid_ct"
    out.update({**preact(f"{p}.down3.conv", C[2], C[3], k3), **preact(f"{p}.down4.conv", C[3], C[4], k3),
                **upcat(f"{p}.up3", C[2], C[3], (2, 2, 2), k3), **upcat(f"{p}.up4", C[3], C[4], (2, 2, 2), k3),
                **convtrans(f"{p}.convtrans_e2", C[2], HEADS[0]), **convtrans(f"{p}.convtrans_d2", C[2], HEADS[0]),
                **convtrans(f"{p}.convtrans_e3", C[3], HEADS[1]), **convtrans(f"{p}.convtrans_d3", C[3], HEADS[1]),
                **convtrans(f"{p}.convtrans_e4", C[4], HEADS[2]),
                **preact(f"{p}.out_conv2.conv", C[2], CLASSES, (1, 1, 1)),
                **preact(f"{p}.out_conv3.conv", C[3], CLASSES, (1, 1, 1))})
    return out


def their_index(w):
    """The authors' WindowAttention index: offsets shifted by w-1; depth x (3w-1), height x (2w-1)."""
    idx = torch.zeros(w ** 3, w ** 3, dtype=torch.long)
    cells = [(a, b, c) for a in range(w) for b in range(w) for c in range(w)]
    for i, (a1, b1, c1) in enumerate(cells):
        for j, (a2, b2, c2) in enumerate(cells):
            idx[i, j] = (a1 - a2 + w - 1) * (3 * w - 1) + (b1 - b2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
    return idx


def mis_fm_file(path, trained_mode=1, prefix="module."):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in manifest().items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(5 if key.startswith(f"embeddings.{trained_mode}.") or "embeddings" not in key else 0)
        elif key.endswith("relative_position_index"):
            value = their_index(WINDOW)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        else:
            value = torch.randn(shape, generator=g)
        sd[prefix + key] = value
    # PyMIC's checkpoint; its valid_pred is a numpy scalar (a Dice computed with numpy)
    torch.save({"iteration": 200000, "valid_pred": np.float64(0.9), "model_state_dict": sd}, str(path))
    return {k[len(prefix):]: v for k, v in sd.items()}


def test_every_tensor_lands_where_the_authors_network_uses_it(tmp_path):
    from nnssl.architectures.pct_net import PCTNet
    from nnssl.checkpoints import load_pretraining_checkpoint

    sd = mis_fm_file(tmp_path / "pctnet_ct10k_volf.pt")
    ckpt = load_pretraining_checkpoint(str(tmp_path / "pctnet_ct10k_volf.pt"))
    kw, w = ckpt["architecture"]["arch_kwargs"], ckpt["network_weights"]
    assert (kw["channels"], kw["heads"], kw["swin_depth"], kw["window_size"], kw["embedding"]) == (
        C, HEADS, DEPTH, [WINDOW] * 3, "aniso")
    assert kw["swin_mask_padding"] is False and ckpt["transfer"] == "encoder+decoder"
    assert ckpt["normalization"]["spacing"] is None and ckpt["normalization"]["patch_size"] == [64, 128, 128]
    same = {"encoder.stem.0.weight": "embeddings.1.proj.weight",
            "encoder.stem_blocks.0.conv2.conv.weight": "embeddings.1.conv0.conv_conv.6.weight",
            "encoder.stem.1.norm.running_var": "embeddings.1.down1.conv.0.running_var",
            "encoder.down.2.conv.weight": "pyramid_ct.down4.conv.2.weight",
            "encoder.stages.1.conv.conv1.act.weight": "pyramid_ct.convtrans_e3.conv.conv_conv.1.weight",
            "encoder.stages.2.swin.1.mlp.fc2.weight": "pyramid_ct.convtrans_e4.trans.blocks.1.mlp.fc2.weight",
            "decoder.blocks.3.swin.0.attn.qkv.bias": "pyramid_ct.convtrans_d3.trans.blocks.0.attn.qkv.bias",
            "decoder.blocks.0.conv1.norm.weight": "pred_heads.1.conv0.conv_conv.0.weight",
            "decoder.up.0.conv.weight": "pred_heads.1.up1.up.2.weight",
            "decoder.up.3.act.weight": "pyramid_ct.up4.up.1.weight"}
    for ours, theirs in same.items():
        assert torch.equal(w[ours], sd[theirs]), ours
    dropped = set(ckpt["method"]["config"]["source"]["dropped_keys"])
    expected_dropped = {k for k in sd if k.startswith(("embeddings.0.", "embeddings.2.", "pred_heads.0.",
                                                                   "pred_heads.2.")) or "out_conv" in k
                        or ".norm_layer." in k}
    assert dropped == expected_dropped

    net = PCTNet(IN, 2, deep_supervision=False, **kw).eval()
    missing, unexpected = net.load_state_dict(w, strict=False)
    assert not unexpected and all(".seg_layers." in k for k in missing)
    # bias tables: the same bias for every token pair as the authors' index into their table
    theirs = their_index(WINDOW)
    for ours_block, key in ((net.encoder.stages[0].swin[1], "pyramid_ct.convtrans_e2.trans.blocks.1"),
                            (net.decoder.blocks[3].swin[0], "pyramid_ct.convtrans_d3.trans.blocks.0")):
        table = sd[f"{key}.attn.relative_position_bias_table"]
        expected = table[theirs.reshape(-1)].reshape(WINDOW ** 3, WINDOW ** 3, -1).permute(2, 0, 1)
        assert torch.equal(ours_block.attn.position_bias((WINDOW,) * 3), expected)
    # fusing layer: nnssl's [up, skip] through it == the authors' layer on [skip, up]
    up, skip = torch.randn(1, C[2], 4, 4, 4), torch.randn(1, C[2], 4, 4, 4)
    p = "pyramid_ct.up3.conv"
    x = F.batch_norm(torch.cat([skip, up], 1), sd[f"{p}.0.running_mean"], sd[f"{p}.0.running_var"],
                     sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], training=False)
    theirs_out = F.conv3d(F.prelu(x, sd[f"{p}.1.weight"]), sd[f"{p}.2.weight"], sd[f"{p}.2.bias"], padding=1)
    with torch.no_grad():
        torch.testing.assert_close(net.decoder.fuse[2](torch.cat([up, skip], 1)), theirs_out, rtol=1e-4, atol=1e-4)


def test_the_trained_embedding_is_found_and_a_damaged_file_refused(tmp_path):
    from nnssl.checkpoints import load_pretraining_checkpoint

    mis_fm_file(tmp_path / "iso.pt", trained_mode=0, prefix="")
    assert load_pretraining_checkpoint(str(tmp_path / "iso.pt"))["architecture"]["arch_kwargs"]["embedding"] == "iso"
    mis_fm_file(tmp_path / "mode2.pt", trained_mode=2)
    with pytest.raises(NnsslError, match="resolution_mode 2"):
        load_pretraining_checkpoint(str(tmp_path / "mode2.pt"))
    sd = torch.load(str(tmp_path / "iso.pt"), weights_only=False)  # our own test file
    del sd["model_state_dict"]["pyramid_ct.convtrans_e3.trans.blocks.1.norm2.bias"]
    torch.save(sd, str(tmp_path / "cut.pt"))
    with pytest.raises(NnsslError, match="1 PCT-Net tensors are missing"):
        load_pretraining_checkpoint(str(tmp_path / "cut.pt"))


def test_like_then_finetune_loads_every_encoder_and_decoder_tensor(nnunet_env, tmp_path):
    mis_fm_file(tmp_path / "pctnet_ct10k_volf.pt")
    report = finetune_like(nnunet_env, str(tmp_path / "pctnet_ct10k_volf.pt"), shape=(32, 64, 64),
                           spacing=(2.0, 1.0, 1.0), cli=False)
    assert report["method"] == "mis_fm" and report["architecture"] == "pct_net"
    counts = report["report"]["counts"]
    assert counts["loaded"] + counts["output_head"] == counts["total"] and counts["skipped_shape_mismatch"] == 0
    assert "spacing (not recorded by the checkpoint)" in " ".join(report["plans_differences"]["harmless"])
