"""Low-bit training arithmetic from Python (lowbit.arith, docs/arith.md): the quantizers,
the LUQ-4 and RMM layers against references computed here with plain autograd, and
lowbit.convert on a small CNN trained with lowbit.Shampoo and torch.optim.AdamW."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import arith

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------
# References, written independently of the library


def grid4_reference(x: torch.Tensor) -> torch.Tensor:
    """The forward's 4-bit grid: absmax / 7 x (-7..7), or max / 15 x (0..15) for x >= 0."""
    x = x.detach().float()
    levels, low = (15, 0) if bool((x >= 0).all()) else (7, -7)
    absmax = float(x.abs().max())
    scale = absmax / levels if absmax > 0 else 1.0
    return torch.round(x / scale).clamp(low, levels) * scale


def luq_neighbours(x: torch.Tensor, bits: int):
    """For each element: the two magnitudes LUQ rounds between (lo, hi) and P(hi)."""
    a = x.abs().double()
    top = 2 ** (bits - 1) - 2
    alpha = float(a.max()) / 2.0**top
    lo = torch.zeros_like(a)
    hi = torch.full_like(a, alpha)
    for j in range(top + 1):  # alpha 2^j <= a: lo = alpha 2^j, hi = alpha 2^(j+1) (capped at max)
        level = alpha * 2.0**j
        inside = a >= level
        lo = torch.where(inside, torch.full_like(a, level), lo)
        hi = torch.where(inside, torch.full_like(a, min(2 * level, alpha * 2.0**top)), hi)
    p = torch.where(hi > lo, (a - lo) / (hi - lo), torch.zeros_like(a))
    return lo, hi, p, alpha


# ---------------------------------------------------------------------------------------
# luq_quantize


def luq_test_vector() -> torch.Tensor:
    g = randn(40, seed=1, dtype=torch.float64)
    alpha = 3.0 / 64
    special = torch.tensor([3.0, -3.0, alpha, alpha / 3, -alpha / 7, 0.0, 1.5, -0.75, 1e-3, 2.9999, alpha * 1.5],
                           dtype=torch.float64)
    return torch.cat([special, g.clamp(-2.9, 2.9)])


@pytest.mark.parametrize("bits", [4, 3])
def test_luq_values_lie_on_the_radix2_grid(bits):
    x = randn(500, seed=2) * torch.logspace(-4, 1, 500)
    q = lowbit.luq_quantize(x, bits=bits, seed=5)
    assert q.shape == x.shape and q.dtype == x.dtype
    top = 2 ** (bits - 1) - 2
    alpha = float(x.abs().max()) / 2**top
    levels = torch.tensor([0.0] + [alpha * 2.0**j for j in range(top + 1)])
    dist = (q.abs().unsqueeze(1) - levels.unsqueeze(0)).abs().min(1).values
    # alpha = max / 2^top and its multiples by powers of two are exact (ldexp), here and in C++.
    assert float(dist.max()) == 0
    assert bool((q * x >= 0).all())  # the sign is kept (or the element is 0)
    # each element is one of its two neighbours
    lo, hi, _, _ = luq_neighbours(x.double(), bits)
    qa = q.abs().double()
    assert bool(((qa == lo) | (qa == hi)).all())
    # the maximum is a level and stays exact
    i = int(x.abs().argmax())
    assert float(q[i]) == float(x[i])


def test_luq_is_unbiased_with_the_two_point_variance():
    x = luq_test_vector()
    n = 2000
    samples = torch.stack([lowbit.luq_quantize(x, bits=4, seed=s) for s in range(n)])
    lo, hi, p, _ = luq_neighbours(x, 4)
    # every sample is sign(x) lo or sign(x) hi
    mag = samples.abs()
    assert bool((samples * x.sign() >= 0).all())
    assert bool(((mag == lo) | (mag == hi)).all())  # exact levels (max = 3 is an fp32 value)
    variance = p * (1 - p) * (hi - lo) ** 2
    standard_error = (variance / n).sqrt()
    error = (samples.mean(0) - x).abs()
    # 5 standard errors; plus what is not random: the mean of n float64 values rounds by
    # <= n 2^-53 max|x|, and LUQ is unbiased for fl32(x), u |x| from x.
    floor = n * U64 * float(x.abs().max()) + U32 * x.abs()
    assert bool((error <= 5 * standard_error + floor).all()), (error / standard_error.clamp_min(1e-30)).max()
    # and the empirical variance is the two-point one
    spread = samples.var(0)
    varied = (p >= 0.1) & (p <= 0.9)
    assert int(varied.sum()) >= 10
    # The sample variance of n draws of a two-point distribution is n / (n - 1) (hi - lo)^2
    # p^ q^ with p^ the observed frequency: 5 standard errors |p^ - p| <= d = 5 sqrt(pq / n)
    # move p^ q^ by at most |1 - 2p| d + d^2, and the divisor n - 1 adds 1 / (n - 1).
    pv = p[varied]
    pq = pv * (1 - pv)
    d = 5 * (pq / n).sqrt()
    bound = ((1 - 2 * pv).abs() * d + d * d) / pq * n / (n - 1) + 1 / (n - 1)
    assert bool((((spread[varied] / variance[varied]) - 1).abs() <= bound).all())


def test_luq_is_deterministic_for_a_seed():
    x = randn(300, seed=3)
    a = lowbit.luq_quantize(x, seed=11)
    assert torch.equal(a, lowbit.luq_quantize(x, seed=11))
    assert not torch.equal(a, lowbit.luq_quantize(x, seed=12))
    assert torch.equal(lowbit.luq_quantize(torch.zeros(7)), torch.zeros(7))
    assert lowbit.luq_quantize(torch.empty(0, 3)).shape == (0, 3)
    # float64 and a matrix shape are kept
    y = randn(6, 7, seed=4, dtype=torch.float64)
    assert lowbit.luq_quantize(y).dtype == torch.float64 and lowbit.luq_quantize(y).shape == (6, 7)


def test_luq_bad_arguments_raise():
    x = randn(10)
    with pytest.raises(TypeError, match="tensor"):
        lowbit.luq_quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="floating"):
        lowbit.luq_quantize(torch.arange(4))
    with pytest.raises(TypeError, match="bits"):
        lowbit.luq_quantize(x, bits=4.0)
    with pytest.raises(TypeError, match="bits"):
        lowbit.luq_quantize(x, bits=True)
    for bad in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            lowbit.luq_quantize(x, bits=bad)
    with pytest.raises(TypeError, match="seed"):
        lowbit.luq_quantize(x, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        lowbit.luq_quantize(x, seed=-1)
    with pytest.raises(ValueError, match="NaN"):
        lowbit.luq_quantize(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------------------------------
# The forward's uniform 4-bit grid


@pytest.mark.parametrize("signed", [True, False])
def test_uniform4_roundtrip(signed):
    x = randn(7, 5, seed=6)
    if not signed:
        x = x.abs()
    packed, scale, offset = torch.ops.lowbit.uniform_quantize4(x)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(x.numel() / 2) == 18
    absmax = float(x.abs().max())
    assert offset == (7 if signed else 0)
    levels = 7 if signed else 15
    assert scale == absmax / levels  # the same float64 division of the same fp32 absmax
    y = torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, list(x.shape))
    assert y.dtype == torch.float32 and y.shape == x.shape
    # Round to the nearest of k s (s/2), with x / s, fl32(s) and k fl32(s) rounded once each
    # in fp32 (u each, of values <= levels s): s (1/2 + 3 levels u).
    assert float((y - x).abs().max()) <= scale * (0.5 + 3 * levels * U32)
    assert torch.equal(y, grid4_reference(x))  # the same fp32 operations
    if not signed:
        assert float(y.min()) >= 0
    with pytest.raises(RuntimeError):
        torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, [7, 6])


# ---------------------------------------------------------------------------------------
# LUQ-4 layers


def mean_gradients(layer, x, grad_output, calls):
    """The mean over `calls` backward passes (one forward each) of (dx, dW, db)."""
    sums = None
    for _ in range(calls):
        xi = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xi).backward(grad_output)
        grads = (xi.grad, layer.weight.grad, layer.bias.grad)
        sums = [g.clone() for g in grads] if sums is None else [s + g for s, g in zip(sums, grads)]
    return [s / calls for s in sums]


def luq_noise(op, xq, wq, grad_output, calls):
    """Bounds on ||mean dx - dx|| and ||mean dW - dW|| for the mean over `calls` backward
    passes whose neural gradient is LUQ-rounded (unbiased: test_luq_is_unbiased...).
    Element g_i rounds to one of its two levels, variance p (1 - p) (hi - lo)^2, independently
    of the others and of the other calls; dx and dW are linear in g, so their variance is
    that map with squared coefficients applied to the variances (autograd of op(x^2, w^2)),
    over `calls`. E||e||^2 is the sum S of those variances; ||e||^2 exceeds S by 5 of its
    standard deviations (<= sqrt(2) S) with small probability: ||e|| <= sqrt((1 + 5 sqrt 2) S).
    Plus the rounding of summing `calls` fp32 gradients: calls u ||exact||."""
    lo, hi, p, _ = luq_neighbours(grad_output.double(), 4)
    variance = p * (1 - p) * (hi - lo) ** 2
    x2 = (xq.detach().double() ** 2).requires_grad_(True)
    w2 = (wq.detach().double() ** 2).requires_grad_(True)
    op(x2, w2).backward(variance)
    k = 1 + 5 * math.sqrt(2)
    return [math.sqrt(k * t.grad.sum().item() / calls) + calls * U32 * exact.norm().item()
            for t, exact in ((x2, xq.grad), (w2, wq.grad))]


def error_norm(a, b):
    return float((a.double() - b.double()).norm())


def bias_tolerance(grad_output, calls, channels=-1):
    """db sums grad_output over all but its `channels` dimension in fp32 (<= terms u sum|g| away
    from the reference's order), then the mean of `calls` equal values rounds by <= calls u |db|."""
    terms = grad_output.numel() // grad_output.shape[channels]
    return dict(rtol=calls * U32, atol=terms * U32 * float(grad_output.abs().sum().item()))


def test_luq4_linear_forward_backward_and_kept_bytes():
    layer = lowbit.Luq4Linear(12, 5, clip=False, seed=3)  # the absmax grid of grid4_reference
    x = randn(4, 6, 12, seed=7)
    xq = grid4_reference(x).requires_grad_(True)
    wq = grid4_reference(layer.weight).requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    reference = F.linear(xq, wq, b)
    # the reference grid is the library's one
    packed, scale, offset = torch.ops.lowbit.uniform_quantize4(x)
    assert torch.equal(torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, list(x.shape)), xq.detach())
    y = layer(x.requires_grad_(True))
    assert torch.equal(y, reference.detach())
    assert layer.kept_bytes == math.ceil(x.numel() / 2) + 8 and layer.fp32_bytes == x.numel() * 4
    assert lowbit.kept_bytes(layer) == layer.kept_bytes

    grad_output = randn(4, 6, 5, seed=8)
    reference.backward(grad_output)
    dx, dw, db = mean_gradients(layer, x, grad_output, calls=250)
    noise_dx, noise_dw = luq_noise(lambda a, w: F.linear(a, w), xq, wq, grad_output, 250)
    assert error_norm(dx, xq.grad) <= noise_dx
    assert error_norm(dw, wq.grad) <= noise_dw
    torch.testing.assert_close(db, b.grad, **bias_tolerance(grad_output, 250))  # not quantized
    # one call is not the exact gradient (the neural gradient was quantized): it misses by
    # more than the bound on the mean of 250 calls
    layer.zero_grad()
    x1 = x.detach().clone().requires_grad_(True)
    layer(x1).backward(grad_output)
    assert error_norm(x1.grad, xq.grad) > noise_dx
    torch.testing.assert_close(layer.bias.grad, b.grad, **bias_tolerance(grad_output, 1))


def clipped_error_and_candidates(x: torch.Tensor):
    """The squared error of the library's clipped grid; the least squared error over the
    clipping ratios docs/arith.md names (a geometric sweep r = 0.8^k down to 0.01, then
    0.8^(j/4) around the best), computed here in float64; the error of the absmax grid
    (r = 1); the rounding allowance between the library's fp32 grid values k fl32(s) and the
    float64 k s (delta = 2u levels s per value: sum 2 |e| delta + delta^2); and the scales."""
    packed, scale, offset = torch.ops.lowbit.uniform_quantize4(x, True)
    back = torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, list(x.shape)).double()
    xd = x.double()
    levels, low = (15, 0) if bool((x >= 0).all()) else (7, -7)
    absmax = float(xd.abs().max())

    def error_of(r):
        s = absmax * r / levels
        return float(((torch.round(xd / s).clamp(low, levels) * s - xd) ** 2).sum())

    sweep = [0.8 ** k for k in range(1, 40) if 0.8 ** k >= 0.01]
    coarse = min([1.0] + sweep, key=error_of)
    candidates = [1.0] + sweep + [coarse * 0.8 ** (j / 4) for j in (-3, -2, -1, 1, 2, 3) if coarse * 0.8 ** (j / 4) <= 1]
    error = back - xd
    delta = 2 * U32 * levels * scale
    rounding = float((2 * error.abs() * delta + delta ** 2).sum())
    return float((error ** 2).sum()), min(map(error_of, candidates)), error_of(1.0), rounding, scale, absmax / levels


def test_luq4_clipping_is_near_mse_optimal_and_used_by_the_layers():
    x = randn(5000, seed=30)
    x[7] = 30.0  # an outlier stretches the absmax grid
    for t in (x, torch.relu(x)):
        error, best, absmax_error, rounding, scale, absmax_scale = clipped_error_and_candidates(t)
        # The library's grid is the best of its candidates (up to the fp32 rounding of the
        # grid), and so never worse than the absmax grid, which the outlier makes coarse.
        assert error <= best + rounding and best <= absmax_error and scale < absmax_scale
    layer = lowbit.Luq4Linear(10, 4, seed=1)
    assert layer.clip and "clip=True" in repr(layer)
    inputs = randn(6, 10, seed=31)
    inputs[0, 0] = 25.0

    def grid(t):
        packed, scale, offset = torch.ops.lowbit.uniform_quantize4(t.detach(), True)
        return torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, list(t.shape))

    with torch.no_grad():
        assert torch.equal(layer(inputs), F.linear(grid(inputs), grid(layer.weight), layer.bias))
    y = layer(inputs.clone().requires_grad_(True))
    assert torch.equal(y, F.linear(grid(inputs), grid(layer.weight), layer.bias))  # the same fp32 operations
    with pytest.raises(TypeError, match="clip must be bool"):
        lowbit.Luq4Conv2d(2, 2, 3, clip=1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    lowbit.convert(model, "luq4", luq_clip=False)
    assert not model[0].clip


def test_luq4_layers_are_reproducible_and_quantize_without_grad():
    torch.manual_seed(0)
    a, b = lowbit.Luq4Linear(8, 3, clip=False, seed=1), lowbit.Luq4Linear(8, 3, clip=False, seed=1)
    b.load_state_dict(a.state_dict())
    x, g = randn(5, 8, seed=9), randn(5, 3, seed=10)
    grads = []
    for layer in (a, b):
        layer(x).backward(g)
        grads.append(layer.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    c = lowbit.Luq4Linear(8, 3, clip=False, seed=2)
    c.load_state_dict(a.state_dict())
    c(x).backward(g)
    assert not torch.equal(c.weight.grad, grads[0])

    before = a.kept_bytes
    with torch.no_grad():
        y = a(randn(2, 8, seed=11))
    assert torch.equal(y, F.linear(grid4_reference(randn(2, 8, seed=11)), grid4_reference(a.weight), a.bias))
    assert a.kept_bytes == before
    conv = lowbit.Luq4Conv2d(2, 3, 3, padding=1, clip=False)
    z = randn(1, 2, 5, 5, seed=12)
    with torch.inference_mode():
        out = conv(z)
    assert conv.kept_bytes == 0
    assert torch.equal(out, F.conv2d(grid4_reference(z), grid4_reference(conv.weight), conv.bias, padding=1).detach())
    assert conv(z[0]).shape == (3, 5, 5)  # unbatched input


def test_luq4_conv2d_forward_backward_and_kept_bytes():
    layer = lowbit.Luq4Conv2d(3, 4, 3, stride=2, padding=1, clip=False, seed=4)
    x = torch.relu(randn(2, 3, 9, 9, seed=13))  # non-negative: the 16-level grid
    xq = grid4_reference(x).requires_grad_(True)
    wq = grid4_reference(layer.weight).requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    reference = F.conv2d(xq, wq, b, stride=2, padding=1)
    y = layer(x.requires_grad_(True))
    assert torch.equal(y, reference.detach())
    assert layer.kept_bytes == math.ceil(x.numel() / 2) + 8 and layer.fp32_bytes == x.numel() * 4

    grad_output = randn(*reference.shape, seed=14)
    reference.backward(grad_output)
    dx, dw, db = mean_gradients(layer, x, grad_output, calls=250)
    noise_dx, noise_dw = luq_noise(lambda a, w: F.conv2d(a, w, None, stride=2, padding=1), xq, wq, grad_output, 250)
    assert error_norm(dx, xq.grad) <= noise_dx
    assert error_norm(dw, wq.grad) <= noise_dw
    torch.testing.assert_close(db, b.grad, **bias_tolerance(grad_output, 250, channels=1))


def test_luq4_conv2d_rejects_unsupported_options():
    with pytest.raises(ValueError, match="groups"):
        lowbit.Luq4Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="dilation"):
        lowbit.Luq4Conv2d(4, 4, 3, dilation=2)
    with pytest.raises(ValueError, match="padding_mode"):
        lowbit.Luq4Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="groups"):
        lowbit.convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), "luq4")
    with pytest.raises(ValueError, match="seed"):
        lowbit.Luq4Linear(3, 3, seed=-2)
    same = lowbit.Luq4Conv2d(2, 2, 3, padding="same")
    assert same(randn(1, 2, 6, 6)).shape == (1, 2, 6, 6)


# ---------------------------------------------------------------------------------------
# RMM


def test_sketched_linear_gradients_and_variance():
    batch, d_in, d_out, keep = 32, 5, 4, 0.25
    k = math.ceil(keep * batch)
    layer = lowbit.SketchedLinear(d_in, d_out, keep=keep, seed=5)
    x = randn(batch, d_in, seed=15)
    grad_output = randn(batch, d_out, seed=16)
    w = layer.weight.detach()
    # the forward is exact
    xr = x.clone().requires_grad_(True)
    # fp32 dot products of length L differ by at most L u sum |terms| between two orders.
    assert torch.allclose(layer(xr), F.linear(x, w, layer.bias), rtol=0,
                          atol=(d_in + 1) * U32 * float((x.abs() @ w.abs().t() + layer.bias.abs()).max()))
    assert layer.kept_bytes == k * d_in * 4 + 8 and layer.fp32_bytes == batch * d_in * 4

    n = 3000
    draws = torch.empty(n, d_out, d_in, dtype=torch.float64)
    for t in range(n):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xi).backward(grad_output)
        if t < 3:
            # exact (not sketched), up to the order of fp32 sums: L u sum |terms|
            assert torch.allclose(xi.grad, grad_output @ w, rtol=0,
                                  atol=d_out * U32 * float((grad_output.abs() @ w.abs()).max()))
            assert torch.allclose(layer.bias.grad, grad_output.sum(0), rtol=0,
                                  atol=batch * U32 * float(grad_output.abs().sum(0).max()))
        draws[t] = layer.weight.grad.double()
    exact = (grad_output.t() @ x).double()
    a, b = grad_output.double(), x.double()
    variance = ((a.t() @ b) ** 2 + (a * a).sum(0).unsqueeze(1) * (b * b).sum(0).unsqueeze(0)) / k
    mean_error = (draws.mean(0) - exact).abs()
    assert bool((mean_error <= 5 * (variance / n).sqrt()).all())
    # Each entry of dW sums k independent products of two jointly Gaussian numbers (kurtosis
    # <= 15, reached when they are equal), so its kurtosis is <= 3 + 12 / k, and the sample
    # variance of n draws has relative standard error <= sqrt((2 + 12 / k) / n); 5 of them.
    ratio = draws.var(0) / variance
    assert float((ratio - 1).abs().max()) <= 5 * math.sqrt((2 + 12 / k) / n), ratio


def test_sketched_linear_shapes_no_grad_and_bad_keep():
    layer = lowbit.SketchedLinear(6, 3, keep=0.5, seed=0)
    x = randn(3, 5, 6, seed=17).requires_grad_(True)  # rows = 15, k = 8
    y = layer(x)
    assert layer.kept_bytes == 8 * 6 * 4 + 8
    y.sum().backward()
    assert layer.weight.grad.shape == (3, 6) and x.grad.shape == x.shape
    # dx = 1 W, sums of 3 terms in fp32 (order: 3 u sum |W|)
    assert torch.allclose(x.grad, torch.ones(3, 5, 3) @ layer.weight.detach(), rtol=0,
                          atol=3 * U32 * float(layer.weight.detach().abs().sum(0).max()))
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.kept_bytes == 8 * 6 * 4 + 8
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep"):
            lowbit.SketchedLinear(2, 2, keep=bad)
    with pytest.raises(TypeError, match="keep"):
        lowbit.SketchedLinear(2, 2, keep="half")


# ---------------------------------------------------------------------------------------
# convert


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def layer_types(model):
    return [type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("arith_name", ["luq4", "fqt1", "rmm"])
@pytest.mark.parametrize("optimizer", ["shampoo4", "adamw"])
def test_convert_trains_a_small_cnn(arith_name, optimizer):
    torch.manual_seed(0)
    model = SmallCNN()
    params = list(model.parameters())
    if optimizer == "shampoo4":
        opt = lowbit.Shampoo(model.parameters(), lr=0.01, bits=4, stat_interval=1, root_interval=2,
                             min_quant_numel=0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    assert lowbit.convert(model, arith_name, seed=3) is model
    expected = {"luq4": [lowbit.Luq4Conv2d, lowbit.Luq4Conv2d, lowbit.Luq4Linear],
                "fqt1": [arith.Fqt1Conv2d, arith.Fqt1Conv2d, arith.Fqt1Linear],
                "rmm": [nn.Conv2d, nn.Conv2d, lowbit.SketchedLinear]}[arith_name]
    assert layer_types(model) == expected
    assert all(p is q for p, q in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert isinstance(model.features[1], nn.BatchNorm2d)

    x, labels = randn(16, 3, 8, 8, seed=18), torch.arange(16) % 10
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # It trains: the loss fell (measured shampoo4 + fqt1: 2.33 -> 1.89). How far it falls in
    # 12 steps is a property of the run, not of the maths: no fitted factor.
    assert losses[-1] < losses[0], losses
    assert lowbit.kept_bytes(model) > 0
    if arith_name == "luq4":
        assert lowbit.kept_bytes(model) == sum(math.ceil(n / 2) + 8 for n in (16 * 3 * 64, 16 * 8 * 64, 16 * 128))
        assert arith.fp32_bytes(model) == 4 * (16 * 3 * 64 + 16 * 8 * 64 + 16 * 128)
    elif arith_name == "fqt1":  # the first and last layer (edges) keep fp32 inputs, the middle one bits
        assert [m.edge for m in (model.features[0], model.features[3], model.head)] == [True, False, True]
        assert lowbit.kept_bytes(model) == 4 * 16 * 3 * 64 + (16 * 8 * 64 + 7) // 8 + 4 * 16 + 1 + 4 * 16 * 128
    else:
        assert lowbit.kept_bytes(model) == math.ceil(0.25 * 16) * 128 * 4 + 8

    assert lowbit.convert(model, "fp32") is model
    assert layer_types(model) == [nn.Conv2d, nn.Conv2d, nn.Linear]
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert lowbit.kept_bytes(model) == 0
    opt.zero_grad()
    F.cross_entropy(model(x), labels).backward()
    opt.step()  # the optimizer still holds the model's parameters
    assert all(p.grad is not None for p in params)


def test_convert_details():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2, bias=False)))
    model.eval()
    lowbit.convert(model, "luq4", seed=7)
    assert not model[0].training and model[1][0].bias is None
    # layers get different generators; the same seed gives the same ones
    assert model[0].seed != model[1][0].seed
    again = lowbit.convert(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2, bias=False))), "luq4", seed=7)
    assert (again[0].seed, again[1][0].seed) == (model[0].seed, model[1][0].seed)
    # luq4 -> rmm directly
    lowbit.convert(model, "rmm", rmm_keep=0.5)
    assert isinstance(model[0], lowbit.SketchedLinear) and model[0].keep == 0.5
    # a bare layer is returned converted
    single = nn.Linear(3, 3)
    converted = lowbit.convert(single, "luq4")
    assert isinstance(converted, lowbit.Luq4Linear) and converted.weight is single.weight
    # the output projection of nn.MultiheadAttention (a Linear subclass) is left alone
    mha = lowbit.convert(nn.MultiheadAttention(8, 2), "luq4")
    assert not isinstance(mha.out_proj, arith.Luq4Linear)
    with pytest.raises(ValueError, match="'fp32', 'luq4', 'fqt1', 'rmm'"):
        lowbit.convert(model, "int8")
    with pytest.raises(ValueError, match="keep"):
        lowbit.convert(model, "rmm", rmm_keep=0.0)
