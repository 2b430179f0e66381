"""Property tests of the kernel algebra, in float64 on random geometry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repnet import kernels
from repnet.kernels import Conv

TOLERANCE = 1e-10


def random_conv(
    draw,
    in_channels=None,
    groups=None,
    kernel=None,
    stride=None,
    dilation=None,
    out_channels=None,
):
    """A random :class:`Conv` in float64; any argument given is kept."""
    groups = groups or draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = in_channels or groups * draw(st.integers(1, 3))
    out_channels = out_channels or groups * draw(st.integers(1, 3))
    kernel = kernel or (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = stride or (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = dilation or (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(-1, d * (k - 1) + 1)) for k, d in zip(kernel, dilation))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(
        out_channels, in_channels // groups, *kernel, generator=generator, dtype=torch.float64
    )
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64)
    return Conv(weight, bias, stride, padding, dilation, groups)


def random_input(conv: Conv, extra: tuple[int, int] = (0, 0), seed: int = 1) -> torch.Tensor:
    """An input (odd-ish, non-square) large enough for ``conv`` to produce an output."""
    size = [
        max(1, d * (k - 1) + 1 - 2 * p) + e
        for k, d, p, e in zip(conv.kernel_size, conv.dilation, conv.padding, extra)
    ]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, conv.in_channels, *size, generator=generator, dtype=torch.float64)


def assert_close(reference: torch.Tensor, other: torch.Tensor, tolerance: float = TOLERANCE):
    assert reference.shape == other.shape
    assert relative_error(reference, other) <= tolerance


convs = st.composite(lambda draw: random_conv(draw))()
extras = st.tuples(st.integers(0, 6), st.integers(0, 6))


@given(conv=convs, extra=extras)
def test_conv_call_crops_for_negative_padding(conv, extra):
    x = random_input(conv, extra)
    ph, pw = conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))  # pads, or crops where negative
    expected = F.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
    assert_close(expected, conv(x))


@given(conv=convs, extra=extras, seed=st.integers(0, 2**16))
def test_fuse_bn_equals_conv_then_batchnorm(conv, extra, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = conv.out_channels
    stats = [torch.rand(channels, generator=generator, dtype=torch.float64) for _ in range(4)]
    mean, var, gamma, beta = stats[0] - 0.5, stats[1] + 0.2, stats[2] + 0.5, stats[3] - 0.5
    x = random_input(conv, extra)
    expected = F.batch_norm(conv(x), mean, var, gamma, beta, training=False, eps=1e-3)
    assert_close(expected, kernels.fuse_bn(conv, mean, var, gamma, beta, 1e-3)(x))


@given(conv=convs, extra=extras, grow=st.tuples(st.integers(0, 2), st.integers(0, 2)))
def test_pad_to_keeps_the_function(conv, extra, grow):
    size = (conv.kernel_size[0] + 2 * grow[0], conv.kernel_size[1] + 2 * grow[1])
    padded = kernels.pad_to(conv, size)
    assert padded.kernel_size == size
    x = random_input(conv, extra)
    assert_close(conv(x), padded(x))


def test_pad_to_refuses_an_odd_difference():
    conv = Conv(torch.ones(1, 1, 1, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="cannot centre"):
        kernels.pad_to(conv, (2, 3))


@st.composite
def parallel_convs(draw):
    """A main conv and smaller ones (1x1, 1xk, kx1) lined up with it, all of equal reach."""
    main = random_conv(
        draw, kernel=(draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([3, 5])))
    )
    others = []
    for size in [(1, 1), (1, main.kernel_size[1]), (main.kernel_size[0], 1)]:
        weight_seed = draw(st.integers(0, 2**16))
        generator = torch.Generator().manual_seed(weight_seed)
        padding = tuple(
            p - d * (big - small) // 2
            for p, d, big, small in zip(main.padding, main.dilation, main.kernel_size, size)
        )
        weight = torch.randn(
            main.out_channels, main.weight.shape[1], *size, generator=generator, dtype=torch.float64
        )
        bias = torch.randn(main.out_channels, generator=generator, dtype=torch.float64)
        others.append(replace(main, weight=weight, bias=bias, padding=padding))
    return [main, *others]


@given(branches=parallel_convs(), extra=extras)
def test_add_equals_the_sum_of_parallel_convs(branches, extra):
    x = random_input(branches[0], extra)
    expected = sum(conv(x) for conv in branches)
    assert_close(expected, kernels.add(*branches)(x))


@given(branches=parallel_convs(), extra=extras)
def test_concat_equals_stacked_outputs(branches, extra):
    x = random_input(branches[0], extra)
    expected = torch.cat([conv(x) for conv in branches], dim=1)
    assert_close(expected, kernels.concat(*branches)(x))


def test_add_refuses_outputs_that_do_not_line_up():
    one = Conv(torch.ones(1, 1, 3, 3), torch.zeros(1), padding=(1, 1))
    other = Conv(torch.ones(1, 1, 1, 1), torch.zeros(1), padding=(1, 1))
    with pytest.raises(ValueError, match="reach"):
        kernels.add(one, other)


@given(conv=convs, extra=extras)
def test_dense_keeps_the_function(conv, extra):
    x = random_input(conv, extra)
    assert_close(conv(x), kernels.dense(conv)(x))


@given(conv=convs, extra=extras, factor=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_dilate_turns_dilation_into_zero_taps(conv, extra, factor):
    dilated = replace(conv, dilation=(conv.dilation[0] * factor[0], conv.dilation[1] * factor[1]))
    spread = replace(conv, weight=kernels.dilate(conv.weight, factor))
    x = random_input(dilated, extra)
    assert_close(dilated(x), spread(x))


@given(conv=convs, data=st.data())
def test_one_pixel_is_the_conv_as_one_matrix_product(conv, data):
    sizes = [
        range(max(1, 1 - reach), stride - reach + 1)
        for reach, stride in zip(conv.reach, conv.stride)
    ]  # input sizes where the conv gives one pixel: 0 <= n + reach - 1 < stride
    assume(all(sizes))
    size = tuple(data.draw(st.sampled_from(sizes_of_axis)) for sizes_of_axis in sizes)
    x = torch.randn(3, conv.in_channels, *size, dtype=torch.float64)
    pixel, (rows, cols) = kernels.one_pixel(conv, size)
    window = x[:, :, rows, cols]
    assert pixel.padding == (0, 0) and pixel.groups == conv.groups
    assert pixel.kernel_size == window.shape[-2:]  # only the taps that read the input
    if window.numel() == 0:
        assert_close(conv(x).flatten(1), conv.bias.expand(3, -1))
        return
    assert_close(conv(x), pixel(window))
    if conv.groups == 1:
        product = window.flatten(1) @ pixel.weight.flatten(1).T + pixel.bias
        assert_close(conv(x).flatten(1), product)


def test_one_pixel_refuses_a_conv_that_gives_more_pixels():
    conv = Conv(torch.ones(2, 2, 3, 3), torch.zeros(2), padding=(1, 1))
    with pytest.raises(ValueError, match=r"gives 4x4 pixels on a 4x4 input, not one"):
        kernels.one_pixel(conv, (4, 4))


@given(channels=st.integers(1, 6), padding=st.tuples(st.integers(-1, 2), st.integers(-1, 2)))
def test_identity_kernel_is_the_identity(channels, padding):
    x = torch.randn(2, channels, 7, 6, dtype=torch.float64)
    conv = kernels.identity(channels, padding, like=x)
    assert conv.weight.shape == (channels, 1, 1, 1) and conv.groups == channels
    ph, pw = padding
    assert_close(F.pad(x, (pw, pw, ph, ph)), conv(x))


@given(
    channels=st.integers(1, 6),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    data=st.data(),
)
def test_avgpool_kernel_equals_avg_pool2d(channels, kernel, stride, data):
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    x = torch.randn(2, channels, 9, 8, dtype=torch.float64)
    conv = kernels.avgpool(channels, kernel, stride, padding, like=x)
    assert conv.weight.shape == (channels, 1, *kernel) and conv.groups == channels
    expected = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True)
    assert_close(expected, conv(x))


@given(conv=convs, extra=extras, data=st.data())
def test_regroup_keeps_the_function_in_any_coarser_grouping(conv, extra, data):
    groups = data.draw(
        st.sampled_from([g for g in range(1, conv.groups + 1) if conv.groups % g == 0])
    )
    regrouped = kernels.regroup(conv, groups)
    assert regrouped.groups == groups
    assert regrouped.weight.shape[1] == conv.in_channels // groups
    x = random_input(conv, extra)
    assert_close(conv(x), regrouped(x))


def test_regroup_refuses_a_grouping_that_does_not_divide():
    conv = Conv(torch.ones(6, 1, 1, 1), torch.zeros(6), groups=6)
    with pytest.raises(ValueError, match="cannot regroup"):
        kernels.regroup(conv, 4)


@given(
    a=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    b=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**16),
)
def test_conv2d_is_a_true_convolution(a, b, seed):
    """Commutative with full padding, and a delta reproduces the kernel unflipped."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *a, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 1, *b, generator=generator, dtype=torch.float64)
    x_k = kernels.conv2d(x, k, padding=(b[0] - 1, b[1] - 1))
    k_x = kernels.conv2d(k, x, padding=(a[0] - 1, a[1] - 1))
    assert_close(x_k, k_x)
    delta = torch.zeros(1, 1, 1, 1, dtype=torch.float64) + 1
    assert_close(k, kernels.conv2d(delta, k, padding=(b[0] - 1, b[1] - 1)))


@st.composite
def sequential_convs(draw):
    first = random_conv(draw)
    same_groups = draw(st.booleans())
    groups = first.groups if same_groups else 1
    second = random_conv(draw, in_channels=first.out_channels, groups=groups)
    if first.out_channels % second.groups:
        second = random_conv(draw, in_channels=first.out_channels, groups=1)
    padding = tuple(max(0, p) for p in second.padding)
    return first, replace(second, padding=padding)


def run_exactly(first: Conv, second: Conv, x: torch.Tensor) -> torch.Tensor:
    """``second`` on ``first``'s true output: ``first`` padded by ``p₁ + s₁p₂``, ``second`` by 0."""
    extended = tuple(
        p1 + s1 * p2 for p1, s1, p2 in zip(first.padding, first.stride, second.padding)
    )
    return replace(second, padding=(0, 0))(replace(first, padding=extended)(x))


@given(pair=sequential_convs(), extra=extras)
def test_compose_equals_the_sequence_everywhere(pair, extra):
    first, second = pair
    composed = kernels.compose(first, second)
    x = random_input(composed, extra)
    assert_close(run_exactly(first, second, x), composed(x))


@given(pair=sequential_convs(), extra=extras)
def test_compose_equals_the_naive_sequence_when_second_has_no_padding(pair, extra):
    first, second = pair
    second = replace(second, padding=(0, 0))
    composed = kernels.compose(first, second)
    x = random_input(composed, extra)
    assert_close(second(first(x)), composed(x))


@st.composite
def sequences_with_a_depthwise_side(draw):
    """``first`` then ``second``, one of them depthwise (``[O, 1, kh, kw]``, ``O = m·C``: a pool,
    an identity, a channel multiplier), the other of any groups, stride and dilation."""
    if draw(st.booleans()):
        first = random_conv(draw)
        second = random_conv(draw, in_channels=first.out_channels, groups=first.out_channels)
    else:
        channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
        first = random_conv(draw, in_channels=channels, groups=channels)
        mid = first.out_channels
        divisors = [g for g in (1, 2, 3, mid) if mid % g == 0]
        second = random_conv(draw, in_channels=mid, groups=draw(st.sampled_from(divisors)))
    padding = tuple(max(0, p) for p in second.padding)
    return first, replace(second, padding=padding)


@given(pair=sequences_with_a_depthwise_side(), extra=extras)
def test_compose_with_a_depthwise_side_is_exact_and_keeps_the_other_sides_groups(pair, extra):
    first, second = pair
    composed = kernels.compose(first, second)
    x = random_input(composed, extra)
    assert_close(run_exactly(first, second, x), composed(x))
    if second.weight.shape[1] == 1:
        assert composed.groups == first.groups
    elif first.out_channels == first.in_channels:  # a depthwise first of one output per channel
        assert composed.groups == second.groups


def test_a_depthwise_second_stage_is_composed_without_a_dense_product():
    """A 1x1 then a 3x3 average pool over 256 channels: each 1x1 row times its box (an outer
    product, no conv or matrix FLOPs), not a 256x256 conv; the 1x1's grouping is kept."""
    first = Conv(torch.randn(256, 32, 1, 1), torch.randn(256), padding=(1, 1), groups=2)
    pool = kernels.avgpool(256, (3, 3), stride=(2, 2))
    with FlopCounterMode(display=False) as counter:
        composed = kernels.compose(first, pool)
    assert counter.get_total_flops() == 0
    assert composed.weight.shape == (256, 32, 3, 3) and composed.groups == 2
    x = torch.randn(1, 64, 9, 8)
    expected = F.avg_pool2d(first(x), 3, 2)
    assert torch.allclose(composed(x), expected, atol=1e-5)


@st.composite
def parallel_with_depthwise(draw):
    """A grouped (or dense) main conv of ``O = m·C`` outputs and depthwise convs lined up with
    it (1x1, full size, 1xk), in any order."""
    groups = draw(st.sampled_from([1, 2, 3]))
    channels = groups * draw(st.integers(1, 2))
    main = random_conv(
        draw,
        in_channels=channels,
        groups=groups,
        out_channels=channels * draw(st.integers(1, 2)),
        kernel=(draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3]))),
    )
    if draw(st.booleans()):
        main = kernels.dense(main)
    parts = [main]
    for size in [(1, 1), main.kernel_size, (1, main.kernel_size[1])]:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        padding = tuple(
            p - d * (big - small) // 2
            for p, d, big, small in zip(main.padding, main.dilation, main.kernel_size, size)
        )
        weight = torch.randn(main.out_channels, 1, *size, generator=generator, dtype=torch.float64)
        bias = torch.randn(main.out_channels, generator=generator, dtype=torch.float64)
        parts.append(replace(main, weight=weight, bias=bias, padding=padding, groups=channels))
    return draw(st.permutations(parts))


@given(branches=parallel_with_depthwise(), extra=extras)
def test_add_puts_depthwise_kernels_on_the_diagonal_of_the_coarsest_grouping(branches, extra):
    x = random_input(branches[0], extra)
    merged = kernels.add(*branches)
    assert merged.groups == min(conv.groups for conv in branches)
    assert_close(sum(conv(x) for conv in branches), merged(x))


def seeded_conv(shape: tuple[int, ...], padding: tuple[int, int], bias: bool = True) -> Conv:
    """A float64 conv of weight ``shape`` from the global generator; zero bias if ``not bias``."""
    weight = torch.randn(*shape, dtype=torch.float64)
    values = torch.randn(shape[0], dtype=torch.float64)
    return Conv(weight, values if bias else torch.zeros_like(values), padding=padding)


def test_naive_sequence_differs_at_the_border_when_the_intermediate_is_zero_padded():
    """Why branches pad the first stage instead: zeros are not what the first conv gives."""
    torch.manual_seed(0)
    first, second = seeded_conv((2, 1, 3, 3), (1, 1)), seeded_conv((1, 2, 3, 3), (1, 1))
    x = torch.randn(1, 1, 9, 9, dtype=torch.float64)
    naive, exact = second(first(x)), kernels.compose(first, second)(x)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert_close(naive[inner], exact[inner])
    assert relative_error(exact, naive) > 1e-3


def test_worked_example_3x3_then_5x5_full_padding_is_one_7x7():
    torch.manual_seed(0)
    first = seeded_conv((100, 1, 3, 3), (2, 2), bias=False)
    second = seeded_conv((2, 100, 5, 5), (4, 4), bias=False)
    composed = kernels.compose(first, second)
    assert composed.weight.shape == (2, 1, 7, 7)
    assert composed.padding == (6, 6)
    x = torch.randn(3, 1, 11, 8, dtype=torch.float64)
    # Full padding and no bias: the naive zero-padded sequence is exact.
    assert_close(second(first(x)), composed(x))


def test_worked_example_3x3_then_3x5_with_biases_is_one_5x7_with_bias():
    torch.manual_seed(1)
    first, second = seeded_conv((4, 3, 3, 3), (1, 1)), seeded_conv((5, 4, 3, 5), (1, 2))
    composed = kernels.compose(first, second)
    assert composed.weight.shape == (5, 3, 5, 7)
    assert composed.padding == (2, 3)
    x = torch.randn(2, 3, 10, 13, dtype=torch.float64)
    assert_close(run_exactly(first, second, x), composed(x))
    assert composed.bias.abs().min() > 0


def test_compose_refuses_mismatched_channels():
    one = Conv(torch.ones(2, 1, 1, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="channels"):
        kernels.compose(one, one)


def test_the_algebra_is_differentiable():
    first = Conv(torch.randn(3, 2, 1, 1, requires_grad=True), torch.zeros(3))
    second = Conv(torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True))
    third = Conv(torch.randn(4, 2, 1, 1, requires_grad=True), torch.zeros(4), padding=(-1, -1))
    merged = kernels.add(kernels.compose(first, second), third)
    (merged.weight.square().sum() + merged.bias.sum()).backward()
    assert all(t.grad.abs().sum() > 0 for t in (first.weight, second.weight, third.weight))


def test_to_conv2d_round_trips():
    conv = Conv(torch.randn(4, 2, 3, 1), torch.randn(4), (2, 1), (1, 0), (1, 2), 2)
    module = kernels.to_conv2d(conv)
    back = kernels.of_conv2d(module)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(module(x), conv(x)) and back.stride == conv.stride
    with pytest.raises(ValueError, match="negative"):
        kernels.to_conv2d(replace(conv, padding=(-1, 0)))


def test_add_refuses_different_output_channels():
    one = Conv(torch.ones(1, 1, 1, 1), torch.zeros(1))
    four = Conv(torch.ones(4, 1, 1, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="equal out_channels"):
        kernels.add(one, four)


def test_pad_to_refuses_a_smaller_kernel():
    conv = Conv(torch.ones(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot centre"):
        kernels.pad_to(conv, (1, 3))


@st.composite
def mixed_parallel_convs(draw):
    """``parallel_convs`` in any order, some made dense, size-1 axes given any dilation."""
    mixed = []
    for conv in draw(parallel_convs()):
        dilation = tuple(
            d if k > 1 else draw(st.integers(1, 3)) for d, k in zip(conv.dilation, conv.kernel_size)
        )
        conv = replace(conv, dilation=dilation)
        mixed.append(kernels.dense(conv) if draw(st.booleans()) else conv)
    return draw(st.permutations(mixed))


@given(branches=mixed_parallel_convs(), extra=extras)
def test_add_and_concat_line_up_any_order_groups_and_size_one_dilation(branches, extra):
    x = random_input(branches[0], extra)
    assert_close(sum(conv(x) for conv in branches), kernels.add(*branches)(x))
    assert_close(torch.cat([conv(x) for conv in branches], 1), kernels.concat(*branches)(x))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stride": (2, 1)}, "stride"),
        ({"dilation": (1, 2), "padding": (1, 2)}, "dilation"),
        ({"weight": torch.ones(1, 2, 3, 3)}, "in_channels"),
        ({"padding": (1, 2)}, "reach"),
    ],
)
def test_add_and_concat_refuse_each_kind_of_misalignment(change, field):
    one = Conv(torch.ones(1, 1, 3, 3), torch.zeros(1), padding=(1, 1))
    other = replace(one, **change)
    for merge in (kernels.add, kernels.concat):
        with pytest.raises(ValueError, match=field):
            merge(one, other)


def test_of_conv2d_of_a_bias_free_conv_has_zero_bias():
    module = nn.Conv2d(2, 4, (3, 1), stride=(1, 2), padding=(1, 0), bias=False).double()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert_close(module(x), kernels.of_conv2d(module)(x))


def test_compose_spaces_taps_by_the_gcd_of_d1_and_d2_s1():
    """A strided 1x1 then a 3x3: 3x3 taps spaced by the stride, not a 5x5 full of zeros."""
    zeros = torch.zeros(2, dtype=torch.float64)
    first = Conv(torch.randn(2, 1, 1, 1, dtype=torch.float64), zeros, stride=(2, 3))
    second = Conv(torch.randn(2, 2, 3, 3, dtype=torch.float64), zeros, dilation=(1, 2))
    composed = kernels.compose(first, second)
    assert composed.kernel_size == (3, 3) and composed.dilation == (2, 6)
