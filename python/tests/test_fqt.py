"""1-bit FQT from Python (lowbit.arith, docs/arith.md): the 1-bit grids, Activation Gradient
Pruning, and the Fqt1Linear / Fqt1Conv2d layers against references computed here in fp64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit import arith

U32 = 2.0 ** -24  # unit roundoff of float32


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def heterogeneous(rows, cols, seed):
    """Rows of very different ranges, so the pruning has a clear choice."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 10.0 ** (torch.rand(rows, 1, generator=g) * 3 - 2)


# ---------------------------------------------------------------------------------------
# References, written independently of the library


def group_mask(g: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """g with all but the ceil(n / bits) widest (max - min) groups along dim zeroed."""
    groups = g.movedim(dim, 0).reshape(g.shape[dim], -1)
    widths = groups.max(1).values - groups.min(1).values
    keep = torch.zeros(g.shape[dim], dtype=g.dtype)
    keep[torch.topk(widths, math.ceil(g.shape[dim] / bits)).indices] = 1
    shape = [1] * g.dim()
    shape[dim] = -1
    return g * keep.view(shape)


# ---------------------------------------------------------------------------------------
# Quantizers


def test_binarize_signed_and_non_negative():
    x = randn(6, 37, seed=1)
    s = x.abs().mean(1, keepdim=True)
    # The row's mean |x| in fp32, summed in two orders: each within n u of the exact one.
    assert torch.allclose(arith.binarize(x), torch.where(x >= 0, s, -s), rtol=2 * 37 * U32, atol=0)
    relu = torch.relu(randn(4, 300, seed=2)) * torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    q = arith.binarize(relu).double()
    for r in range(4):
        levels = torch.unique(q[r])
        assert len(levels) <= 2 and float(levels.min()) == 0.0
        error = float(((relu[r].double() - q[r]) ** 2).sum())
        # Lloyd's iterations from the mean threshold never raise the squared error (each step
        # moves the level to its cell's centroid, then the threshold to the midpoint), so the
        # result is at most the error of that start: cells {x > mean}, levels 0 and the upper
        # cell's mean; plus fp32 rounding of the level, 2 sum |e| u |level| + n (u |level|)^2.
        row = relu[r].double()
        upper = row > row.mean()
        start = float(((row - torch.where(upper, row[upper].mean(), torch.zeros_like(row))) ** 2).sum())
        level = float(q[r].max())
        allowance = 2 * float((row - q[r]).abs().sum()) * U32 * level + row.numel() * (U32 * level) ** 2
        assert error <= start + allowance, r
    w = randn(4, 3, 3, 3, seed=3)
    alpha = w.abs().flatten(1).mean(1).view(4, 1, 1, 1)
    assert torch.allclose(arith.binarize_weight(w), torch.where(w >= 0, alpha, -alpha), rtol=2 * 27 * U32, atol=0)


@pytest.mark.parametrize("bits", [1, 4])
def test_agp_keeps_the_widest_groups_unbiased_on_their_grid(bits):
    g = heterogeneous(12, 40, seed=4).double()
    low, high = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    step = (high - low) / (2**bits - 1)
    kept = torch.zeros_like(g, dtype=torch.bool)
    kept[torch.topk((high - low).squeeze(1), math.ceil(12 / bits)).indices] = True
    draws, total = 2000, torch.zeros_like(g)
    # On the grid low + k step up to fp32 rounding: low, step and low + k step each round
    # once (u of values <= max(|low|, |high|)), in units of step: 4u max(|low|, |high|) / step.
    grid = (4 * U32 * torch.maximum(low.abs(), high.abs()) / step).expand_as(g)[kept]
    for seed in range(draws):
        q = arith.agp_quantize(g.float(), 0, bits, seed=seed).double()
        total += q
        if seed < 3:
            assert bool((q[~kept] == 0).all())
            steps = ((q - low) / step)[kept]
            assert bool(((steps - steps.round()).abs() <= grid).all())
            assert bool((steps >= -grid).all()) and bool((steps <= 2**bits - 1 + grid).all())
    frac = (g - low) / step - torch.floor((g - low) / step)
    stderr = (frac * (1 - frac)).sqrt() * step / math.sqrt(draws)
    # 5 standard errors of the mean of `draws` unbiased roundings, plus the grid's rounding
    # (which does not average out) for entries on a grid point (stderr 0).
    error = (total / draws - g).abs()[kept]
    assert bool((error <= 5 * stderr[kept] + grid * step.expand_as(g)[kept]).all())
    assert torch.equal(arith.agp_quantize(g.float(), 1, bits, seed=0), arith.agp_quantize(g.float(), -1, bits, seed=0))


def test_quantizer_bad_arguments_raise():
    with pytest.raises(ValueError, match="group_dim 2"):
        arith.agp_quantize(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        arith.agp_quantize(torch.zeros(3, 4), 0, bits=9)
    with pytest.raises(ValueError, match="NaN or Inf"):
        arith.agp_quantize(torch.full((3, 4), float("nan")), 0)
    with pytest.raises(ValueError, match="seed"):
        arith.agp_quantize(torch.zeros(3, 4), 0, seed=-1)
    with pytest.raises(TypeError, match="floating"):
        arith.binarize(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        arith.binarize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="tensor"):
        arith.binarize_weight([1.0])


# ---------------------------------------------------------------------------------------
# Layers


def mean_gradients(layer, x, gy, draws):
    """Mean and standard error of (dX, dW) over draws of the layer's stochastic backward."""
    sums, squares = None, None
    for _ in range(draws):
        xr = x.clone().requires_grad_(True)
        layer.weight.grad = None
        layer(xr).backward(gy)
        grads = [xr.grad.double(), layer.weight.grad.double()]
        sums = grads if sums is None else [s + d for s, d in zip(sums, grads)]
        squares = [d * d for d in grads] if squares is None else [s + d * d for s, d in zip(squares, grads)]
    means = [s / draws for s in sums]
    stderrs = [((q / draws - m * m).clamp_min(0) / draws).sqrt() for q, m in zip(squares, means)]
    return means, stderrs


def assert_mean_matches(means, stderrs, expected, floors):
    """Each entry within 6 standard errors (estimated from the draws) of its expectation: for
    N <= 1000 entries P(max |z| > 6) <= 2 N Phi(-6) = 2e-6 (the mean of 800 draws is near
    normal). The floor is what does not average out: the fp32 rounding of the layer's sums,
    L u sum |terms| (floors, per entry). And the whole error, ||e||^2, within 5 of its
    standard deviations (<= sqrt(2) sum SE^2) of its expectation sum SE^2."""
    for what, mean, stderr, exact, floor in zip(("dX", "dW"), means, stderrs, expected, floors):
        assert bool(((mean - exact).abs() <= 6 * stderr + floor).all()), what
        assert float(((mean - exact).abs() - floor).clamp_min(0).pow(2).sum()) <= \
            (1 + 5 * math.sqrt(2)) * float((stderr ** 2).sum()), what


def group_max(g: torch.Tensor, dim: int) -> torch.Tensor:
    """|g| bounded by its group's largest |value| (the AGP grid of a group lies within its
    [min, max], so every quantized value does too)."""
    other = [d for d in range(g.dim()) if d != dim]
    return g.abs().amax(dim=other, keepdim=True).expand_as(g)


def rounding_floor(op, xq, wq, gd, dx_dim, dw_dim):
    """Per entry of dX and dW, the fp32 rounding of its sum: each sums at most N = numel(g)
    products, so it is within N u sum |terms| of the exact value (Higham); sum |terms| is the
    same op's backward on |x|, |w| and the quantized gradient's bound group_max (float64)."""
    floors = []
    for dim, which in ((dx_dim, 0), (dw_dim, 1)):
        xa = xq.abs().clone().requires_grad_(True)
        wa = wq.abs().clone().requires_grad_(True)
        op(xa, wa).backward(group_max(gd, dim))
        floors.append(gd.numel() * U32 * (xa, wa)[which].grad)
    return floors


@pytest.mark.parametrize("bits,scq", [(1, True), (4, True), (4, False)])
def test_fqt1_linear_forward_gradients_and_kept_bytes(bits, scq):
    x, gy = torch.relu(randn(24, 30, seed=5)), heterogeneous(24, 10, seed=6)
    layer = arith.Fqt1Linear(30, 10, bits=bits, scq=scq, seed=7)
    xq, wq = arith.binarize(x).double(), arith.binarize_weight(layer.weight.detach()).double()
    y = layer(x.clone().requires_grad_(True))
    # The forward in fp32 against float64: sums of 31 terms (30 products and the bias),
    # within 31 u sum |terms| (the binarized values are exact in fp32).
    forward = 31 * U32 * (xq.abs() @ wq.abs().t() + layer.bias.detach().double().abs())
    assert bool(((y.double() - F.linear(xq, wq, layer.bias.detach().double())).abs() <= forward).all())
    assert layer.kept_bytes == (24 * 30 + 7) // 8 + 4 * 24 + 1 and layer.fp32_bytes == 24 * 30 * 4
    gd = gy.double()
    expected = (group_mask(gd, 0, bits) @ wq, group_mask(gd, 1 if scq else 0, bits).t() @ xq)
    floors = rounding_floor(lambda a, w: F.linear(a, w), xq, wq, gd, 0, 1 if scq else 0)
    assert_mean_matches(*mean_gradients(layer, x, gy, 800), expected, floors)
    xr = x.clone().requires_grad_(True)
    layer.bias.grad = None
    layer(xr).backward(gy)
    # exact: the rows of gy summed in fp32 (24 terms, 24 u sum |g| for another order)
    assert torch.allclose(layer.bias.grad, gy.sum(0), rtol=0, atol=24 * U32 * float(gy.abs().sum(0).max()))
    with torch.no_grad():
        assert bool(((layer(x).double() - F.linear(xq, wq, layer.bias.double())).abs() <= forward).all())


def test_fqt1_conv2d_gradients_edges_and_options():
    x, gy = randn(8, 3, 7, 7, seed=8), randn(8, 6, 4, 4, seed=9) * 10.0 ** (torch.rand(8, 6, 1, 1) - 0.5)
    layer = arith.Fqt1Conv2d(3, 6, 3, stride=2, padding=1, seed=10)
    xq, wq = arith.binarize(x).double(), arith.binarize_weight(layer.weight.detach()).double()

    def backward_of(g, input_side):
        xr, wr = xq.clone().requires_grad_(True), wq.clone().requires_grad_(True)
        F.conv2d(xr, wr, None, 2, 1).backward(g)
        return xr.grad if input_side else wr.grad

    gd = gy.double()
    expected = (backward_of(group_mask(gd, 0, 4), True), backward_of(group_mask(gd, 1, 4), False))
    floors = rounding_floor(lambda a, w: F.conv2d(a, w, None, 2, 1), xq, wq, gd, 0, 1)
    assert_mean_matches(*mean_gradients(layer, x, gy, 800), expected, floors)
    assert layer.kept_bytes == (x.numel() + 7) // 8 + 4 * 8 + 1
    edge = arith.Fqt1Conv2d(3, 6, 3, stride=2, padding=1, edge=True)
    assert torch.equal(edge(x), F.conv2d(x, edge.weight, edge.bias, 2, 1))  # an edge layer is plain fp32
    assert edge.kept_bytes == x.numel() * 4
    assert edge(x[0]).shape == (6, 4, 4)  # unbatched input
    with pytest.raises(ValueError, match="groups=2"):
        arith.Fqt1Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        arith.Fqt1Linear(2, 2, bits=0)
    with pytest.raises(TypeError, match="scq and edge must be bool"):
        arith.Fqt1Linear(2, 2, scq=1)
    assert "arith=fqt1, bits=4, scq=True, edge=True" in repr(edge)


def test_convert_marks_the_edges_and_takes_the_fqt_options():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    arith.convert(model, "fqt1", fqt_bits=2, fqt_scq=False, seed=1)
    assert [type(m) for m in (model[0], model[2], model[3])] == [arith.Fqt1Linear] * 3
    assert [m.edge for m in (model[0], model[2], model[3])] == [True, False, True]
    assert all(m.bits == 2 and not m.scq for m in (model[0], model[2], model[3]))
    arith.convert(model, "fqt1", keep_edges=False)
    assert not any(m.edge for m in (model[0], model[2], model[3]))
    with pytest.raises(ValueError, match="bits"):
        arith.convert(model, "fqt1", fqt_bits=9)
    with pytest.raises(TypeError, match="keep_edges"):
        arith.convert(model, "fqt1", keep_edges="yes")
