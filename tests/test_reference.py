"""The reference masks against brute-force definitions written entry by entry."""

import pytest
import torch

from longinfer.ops.reference import a_shape_mask, block_sparse_mask, masked_attention, vertical_slash_mask


def _brute_vertical_slash(vertical, slash, n, bs):
    b, h = vertical.shape[:2]
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            verts = {x for x in vertical[bi, hi].tolist() if 0 <= x < n}
            slashes = [x for x in slash[bi, hi].tolist() if 0 <= x < n]
            for i in range(n):
                start = i // bs * bs
                for j in range(i + 1):
                    out[bi, hi, i, j] = j in verts or any(start - s <= j <= start + bs - 1 - s for s in slashes)
    return out


@pytest.mark.parametrize("n,bs", [(1, 64), (63, 64), (65, 64), (130, 32), (97, 16)])
def test_vertical_slash_mask_matches_definition(n, bs):
    g = torch.Generator().manual_seed(n)
    vertical = torch.randint(-5, n + 5, (2, 3, 7), generator=g)
    slash = torch.randint(-5, n + 5, (2, 3, 5), generator=g)
    mask = vertical_slash_mask(vertical, slash, n, bs)
    assert torch.equal(mask, _brute_vertical_slash(vertical, slash, n, bs))
    rows = torch.tensor([0, n // 2, n - 1])
    assert torch.equal(vertical_slash_mask(vertical, slash, n, bs, rows=rows), mask[:, :, rows])


def test_block_sparse_mask_matches_definition():
    n, bs = 70, 16
    nb = 5
    g = torch.Generator().manual_seed(0)
    index = torch.randint(-1, nb + 2, (2, 2, nb, 3), generator=g)
    mask = block_sparse_mask(index, n, bs)
    for b in range(2):
        for h in range(2):
            for i in range(n):
                for j in range(n):
                    kb = j // bs
                    expected = j <= i and kb in index[b, h, i // bs].tolist()
                    assert mask[b, h, i, j].item() == expected


@pytest.mark.parametrize("sink,window", [(0, 0), (0, 1), (3, 5), (100, 2), (4, 1000)])
def test_a_shape_mask_matches_definition(sink, window):
    n = 40
    mask = a_shape_mask(sink, window, n)[0, 0]
    for i in range(n):
        for j in range(n):
            assert mask[i, j].item() == (j <= i and (j < sink or i - j < window))


def test_masked_attention_equals_softmax_with_gqa_and_empty_rows():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 9, 8, generator=g)
    k = torch.randn(1, 2, 9, 8, generator=g)
    v = torch.randn(1, 2, 9, 8, generator=g)
    mask = a_shape_mask(0, 3, 9).expand(1, 2, 9, 9).clone()
    mask[0, 1, 4] = False  # an empty row for query heads 2 and 3
    out = masked_attention(q, k, v, mask, query_chunk=4)
    kk = k.repeat_interleave(2, 1)
    vv = v.repeat_interleave(2, 1)
    full = mask.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2) / 8**0.5).masked_fill(~full, float("-inf"))
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ vv
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(out[0, 2:, 4] == 0)


@pytest.mark.parametrize("n, block_size, num_vertical, num_slash", [
    (300, 64, 7, 9), (1000, 64, 50, 40), (513, 16, 20, 60), (64, 64, 3, 3), (777, 32, 0, 5), (130, 64, 200, 200),
])
def test_vertical_slash_kept_counts_the_reference_mask(n, block_size, num_vertical, num_slash):
    """Kept keys per row from the kernel index (closed form) == the reference mask's row sums: random
    verticals and slashes with out-of-range entries and repeats, lengths off the tile grid, the last
    (partial) tile, overlapping columns and slash bands."""
    from longinfer.ops.index import build_vertical_slash_index, vertical_slash_kept

    gen = torch.Generator().manual_seed(n + block_size)
    for _ in range(5):
        vertical = torch.randint(-5, n + 5, (2, 3, num_vertical), generator=gen)
        slash = torch.randint(-5, n + 5, (2, 3, num_slash), generator=gen)
        rows = torch.sort(torch.randperm(n, generator=gen)[:17]).values
        expected = vertical_slash_mask(vertical, slash, n, block_size, rows=rows).sum(-1)
        index = build_vertical_slash_index(vertical, slash, n, block_size)
        assert torch.equal(vertical_slash_kept(index, rows), expected)


@pytest.mark.parametrize("n, block_size, num_vertical, num_slash", [
    (1000, 64, 50, 40), (513, 16, 20, 150), (777, 32, 0, 5), (130, 64, 200, 200),
])
def test_kept_kernel_equals_the_torch_count(n, block_size, num_vertical, num_slash):
    """The one-launch kept count (Triton, the CUDA path; without a GPU in the interpreter) equals the torch ops
    row for row, with more slash groups than one block of the kernel's loop (513 keys, 16-row tiles)
    and a head without any slash."""
    from longinfer.ops import index as index_module

    gen = torch.Generator().manual_seed(n * 3 + block_size)
    vertical = torch.randint(-5, n + 5, (2, 3, num_vertical), generator=gen)
    slash = torch.randint(-5, n + 5, (2, 3, num_slash), generator=gen)
    slash[1, 2] = -1
    rows = torch.sort(torch.randperm(n, generator=gen)[:9]).values
    want = index_module._kept_torch(index_module.build_vertical_slash_index(vertical, slash, n, block_size), rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    index = index_module.build_vertical_slash_index(vertical.to(device), slash.to(device), n, block_size)
    got = index_module._kept_triton(index, rows.to(device))
    assert got.dtype == want.dtype == torch.long
    assert torch.equal(got.cpu(), want)
