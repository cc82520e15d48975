"""Counting MACs with torch's FlopCounterMode, for the tests that check the analytic cost against it."""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def torch_macs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """FlopCounterMode total / 2 of one forward on one image.

    Runs under SDPA's math backend: FlopCounterMode has no formula for the CPU flash kernel
    (`aten._scaled_dot_product_flash_attention_for_cpu`) that SDPA picks on some CPUs, and would
    silently count QK^T and AV as zero; the math backend lowers them to two counted matmuls.
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, in_chans, img_size, img_size))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2
