"""peak_bytes measures what the allocator held at the call's peak, on CPU too."""

import torch

from xpar.bench.memory import memory_use, peak_bytes


def test_peak_is_the_live_tensors_at_the_worst_moment():
    w = torch.randn(64, 256)
    x = torch.randn(512, 64)

    def kept():
        h = x @ w  # 512 x 256 floats
        return torch.relu(h)  # another, both alive at the end

    def freed():
        for _ in range(3):
            (x @ w).sum()  # one at a time: the peak is one product

    n = 512 * 256 * 4
    assert peak_bytes(kept) == 2 * n
    assert n <= peak_bytes(freed) < 2 * n


def test_kept_is_what_the_call_still_holds_when_it_returns():
    w = torch.randn(64, 256)
    x = torch.randn(512, 64)
    n = 512 * 256 * 4

    def one_kept():
        h = x @ w
        return torch.relu(h)  # h freed on return

    assert memory_use(one_kept) == (2 * n, n)
