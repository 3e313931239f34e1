"""3D (shifted-)window attention: partitioning, masks, relative positions, a brute-force check."""
import itertools

import numpy as np
import pytest
import torch

from nnssl.architectures.blocks.swin import (
    SwinBlock, WindowAttention, attention_mask, effective_window, padded_size, relative_position_index,
    window_partition, window_reverse)


def test_partition_then_reverse_is_identity_and_windows_are_raster_blocks():
    x = torch.randn(2, 4, 6, 9, 5)
    win = (2, 3, 3)
    w = window_partition(x, win)
    assert w.shape == (2 * 2 * 2 * 3, 18, 5)
    assert torch.equal(window_reverse(w, win, (4, 6, 9)), x)
    # Window 0 of sample 0 is the first 2x3x3 corner block in raster order; window 1 is the
    # next block along the last axis; windows of sample 1 follow all of sample 0's.
    assert torch.equal(w[0], x[0, :2, :3, :3].reshape(-1, 5))
    assert torch.equal(w[1], x[0, :2, :3, 3:6].reshape(-1, 5))
    assert torch.equal(w[12], x[1, :2, :3, :3].reshape(-1, 5))


def test_effective_window_shrinks_small_axes_and_drops_their_shift():
    assert effective_window((3, 8, 6), (6, 6, 6), (3, 3, 3)) == ((3, 6, 6), (0, 3, 0))
    assert padded_size((3, 8, 6), (3, 6, 6)) == (3, 12, 6)


def test_relative_position_index_range_symmetry_and_shrunk_windows():
    win = (2, 3, 4)
    idx = relative_position_index(win)
    n_rows = 3 * 5 * 7
    assert idx.shape == (24, 24)
    assert idx.min() == 0 and idx.max() == n_rows - 1
    assert len(torch.unique(idx)) == n_rows  # every offset occurs
    centre = (1 * 5 + 2) * 7 + 3  # offset (0, 0, 0)
    assert torch.all(idx.diagonal() == centre)
    # Index is linear in the offset, so offsets d and -d sum to twice the centre.
    assert torch.all(idx + idx.T == 2 * centre)
    # Hand-checked entry: token 0 at (0,0,0), token 23 at (1,2,3): offset (-1,-2,-3) -> row 0.
    assert idx[0, 23] == 0 and idx[23, 0] == n_rows - 1
    # A shrunk window indexes the full table with the same rows as the full window's
    # sub-block of tokens.
    full = relative_position_index((4, 4, 4))
    small = relative_position_index((2, 2, 2), (4, 4, 4))
    sub = [i * 16 + j * 4 + k for i, j, k in itertools.product(range(2), repeat=3)]
    assert torch.equal(small, full[sub][:, sub])


def test_mask_none_without_shift_or_padding():
    assert attention_mask((8, 8, 8), (4, 4, 4), (0, 0, 0)) is None


def test_shifted_mask_blocks_tokens_that_wrapped_around():
    size, win, shift = (8, 8, 8), (4, 4, 4), (2, 2, 2)
    mask = attention_mask(size, win, shift)
    assert mask.shape == (8, 64, 64)
    # Windows in the interior of the rolled grid (window 0) mask nothing.
    assert not mask[0].any()
    # Last window along the first axis only (window index 4): rolled depth 4..7 are original
    # depths 6, 7, 0, 1. Token at in-window depth 0 (orig 6) and depth 2 (orig 0) must not
    # attend each other; depths 0 and 1 (orig 6, 7) may.
    t = lambda d, h, w: (d * 4 + h) * 4 + w  # noqa: E731
    assert mask[4, t(0, 0, 0), t(2, 0, 0)] and mask[4, t(2, 0, 0), t(0, 0, 0)]
    assert not mask[4, t(0, 0, 0), t(1, 3, 3)]
    assert not mask[4, t(2, 1, 1), t(3, 0, 2)]
    # Exhaustive rule: in the rolled frame, rolled index r wrapped iff r >= P - s; two tokens
    # of a window may attend iff they agree on "wrapped" along every axis.
    coords = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1)  # rolled coords
    wrapped = torch.from_numpy(coords >= 8 - 2)  # [8, 8, 8, 3]
    ww = window_partition(wrapped[None].to(torch.uint8), win)  # [nW, N, 3]
    expected = (ww[:, :, None, :] != ww[:, None, :, :]).any(-1)
    assert torch.equal(mask, expected)


def test_padding_mask_hides_padded_keys_from_real_queries():
    size, win = (5, 4, 4), (4, 4, 4)  # depth padded 5 -> 8
    mask = attention_mask(size, win, (0, 0, 0))
    assert mask.shape == (2, 64, 64)
    assert not mask[0].any()  # first window: all real
    real = torch.zeros(64, dtype=torch.bool)
    real[:16] = True  # second window: only in-window depth 0 (original depth 4) is real
    assert torch.equal(mask[1], real[:, None] & ~real[None, :])
    assert not mask.all(-1).any()  # no fully masked row (would give NaN)


def _reference_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Brute force, token by token: each real query attends the real keys of its rolled
    window that sit on the same side of every wrap; bias from the in-window offset."""
    size = x.shape[1:4]
    win, shift = effective_window(size, block.window, block.shift)
    pad = padded_size(size, win)
    attn: WindowAttention = block.attn
    c = x.shape[-1]
    hd = c // attn.heads
    qkv = attn.qkv(x[0])  # [D, H, W, 3C]
    out = torch.zeros_like(x[0])
    positions = list(itertools.product(*[range(n) for n in size]))
    rolled = {p: tuple((o - s) % P for o, s, P in zip(p, shift, pad)) for p in positions}
    for q in positions:
        rq = rolled[q]
        keys = [k for k in positions
                if all(rk // w == r // w and (rk >= P - s) == (r >= P - s)
                       for rk, r, w, s, P in zip(rolled[k], rq, win, shift, pad))]
        heads = []
        for h in range(attn.heads):
            qv = qkv[q][h * hd:(h + 1) * hd] * attn.scale
            kv = torch.stack([qkv[k][c + h * hd:c + (h + 1) * hd] for k in keys])
            vv = torch.stack([qkv[k][2 * c + h * hd:2 * c + (h + 1) * hd] for k in keys])
            bias = []
            for k in keys:
                off = [(r1 % w) - (r2 % w) for r1, r2, w in zip(rq, rolled[k], win)]
                row = ((off[0] + block.window[0] - 1) * (2 * block.window[1] - 1)
                       + off[1] + block.window[1] - 1) * (2 * block.window[2] - 1) + off[2] + block.window[2] - 1
                bias.append(attn.relative_position_bias_table[row, h])
            a = torch.softmax(kv @ qv + torch.stack(bias), 0)
            heads.append(a @ vv)
        out[q] = attn.proj(torch.cat(heads))
    return out[None]


# (8, 4, 4): a wrap with no padding; (7, 6, 3): a last window holding real, padded and
# wrapped tokens at once; (4, 4, 4): one plain window; (5, 6, 3): padding only beside the wrap.
@pytest.mark.parametrize("size,shift", [((8, 4, 4), (2, 2, 2)), ((7, 6, 3), (1, 2, 1)), ((4, 4, 4), (0, 0, 0)),
                                        ((5, 6, 3), (2, 2, 2))])
def test_window_attention_matches_brute_force(size, shift):
    torch.manual_seed(0)
    block = SwinBlock(dim=4, heads=2, window=(4, 4, 4), shift=shift).eval()
    x = torch.randn(1, *size, 4)
    with torch.no_grad():
        got = block._attend(x)
        ref = _reference_attention(block, x)
    assert got.shape == x.shape
    assert torch.allclose(got, ref, atol=1e-5)


def test_swin_block_shapes_gradients_and_post_norm():
    torch.manual_seed(0)
    for post_norm in (False, True):
        block = SwinBlock(dim=8, heads=2, window=(3, 3, 3), shift=(1, 1, 1), post_norm=post_norm, drop_path=0.1)
        x = torch.randn(2, 4, 5, 3, 8, requires_grad=True)
        y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().mean().backward()
        assert all(p.grad is not None for p in block.parameters())
    with pytest.raises(ValueError):
        SwinBlock(dim=8, heads=2, window=(3, 3, 3), shift=(3, 0, 0))


def test_swin_block_mask_padding_option():
    """mask_padding=False lets padded tokens be keys: outputs then depend on the padding, except on a
    grid the window divides (nothing padded), where both settings agree."""
    torch.manual_seed(0)
    masked = SwinBlock(8, 2, (4, 4, 4)).eval()
    unmasked = SwinBlock(8, 2, (4, 4, 4), mask_padding=False).eval()
    unmasked.load_state_dict(masked.state_dict())
    assert masked.mask_padding and not unmasked.mask_padding
    with torch.no_grad():
        padded = torch.randn(1, 6, 6, 6, 8)  # 6 > 4, not a multiple: padded to 8
        assert not torch.allclose(masked(padded), unmasked(padded))
        exact = torch.randn(1, 8, 8, 8, 8)
        torch.testing.assert_close(masked(exact), unmasked(exact))
