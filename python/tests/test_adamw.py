"""lowbit.AdamW (8- and 4-bit moments): against torch.optim.AdamW and against the rule of its
docstring written here again; the codec ops (tested in test_codec.py) define "encode"."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import lowbit
from codec_bounds import max_rounding_error

_ops = torch.ops.lowbit
F32_EPS = float(torch.finfo(torch.float32).eps)


def least_squares():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(128, 256, generator=g)
    W_true = torch.randn(64, 128, generator=g) * 0.3
    Y = W_true @ X + 0.1 * torch.randn(64, 256, generator=g) + 0.5

    def loss_and_grads(W, b):
        with torch.no_grad():
            r = W @ X + b.unsqueeze(1) - Y
            loss = 0.5 * r.pow(2).mean()
            r = r / Y.numel()
            return float(loss), r @ X.t(), r.sum(1)

    return loss_and_grads


def start():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(64, 128, generator=g) * 0.1, torch.zeros(64)]


def run(opt, params, f, steps):
    for _ in range(steps):
        _, gW, gb = f(*params)
        params[0].grad, params[1].grad = gW, gb
        opt.step()


def reference_step(p, g, m, v, t, lr, b1, b2, eps, wd):
    """The docstring's rule with torch::optim::AdamW's operations (fp32, in place)."""
    p.mul_(1 - lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    p.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(eps), value=-lr / bc1)


# ------------------------------------------------------------------ fp32

def test_bits32_is_the_reference_rule_bit_for_bit_and_torch_adamw_within_rounding():
    lr, wd, steps = 1e-2, 1e-2, 20
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(30, 40, generator=gen)
    grads = [torch.randn(30, 40, generator=gen) for _ in range(steps)]
    ours = p0.clone().requires_grad_(True)
    theirs = p0.clone().requires_grad_(True)
    ref, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    opt = lowbit.AdamW([ours], lr=lr, weight_decay=wd, bits=32)
    topt = torch.optim.AdamW([theirs], lr=lr, weight_decay=wd, foreach=False)
    for t, g in enumerate(grads, 1):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        reference_step(ref, g, m, v, t, lr, 0.9, 0.999, 1e-8, wd)
        assert torch.equal(ours.detach(), ref), t
    # torch.optim.AdamW updates m with lerp_ (m + (1 - b1)(g - m)) where LibTorch's AdamW and
    # lowbit use m b1 + (1 - b1) g: the two differ by about an ulp of m per step, so the
    # updates differ by ~lr eps, which can flip the rounding of p by one ulp of p. The
    # gradients do not depend on p here (nothing amplifies it): over T steps the parameters
    # differ by at most T ulp(max |p|) <= T eps max |p| (measured: 2.4e-7, one ulp at |p| ~ 2).
    diff = (ours.detach() - theirs.detach()).abs().max().item()
    assert diff <= steps * F32_EPS * theirs.detach().abs().max().item(), diff


def test_small_tensors_keep_fp32_moments():
    p = torch.randn(100, requires_grad=True)
    opt = lowbit.AdamW([p], bits=4)
    p.grad = torch.ones(100)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------ quantized state

def table_coded(prefix, table, bits, block, n):
    """What the state holds for a moment coded with `table`, and the value decoded from it."""
    def encode(x):
        codes, scales, _ = _ops.quantize_blockwise(x, table, bits, block)
        state = {prefix + "_codes": codes.reshape(-1), prefix + "_scales": scales.reshape(-1)}
        return state, _ops.dequantize_blockwise(codes, scales, table, None, bits, block, n)
    return encode


def expect_the_codec_encoding_of_the_fp32_update(opt, p, gen, lr, wd, encode_m, encode_v):
    """Three steps of opt on p (50 x 100) against the fp32 rule: after each, the state holds
    encode_m / encode_v of the reference's moments and p is the reference's, bit for bit; the
    reference then goes on from the decoded moments, as the optimizer does."""
    b1, b2, eps, n = 0.9, 0.999, 1e-8, p.numel()
    ref = p.detach().reshape(1, n).clone()
    m, v = torch.zeros(1, n), torch.zeros(1, n)
    for t in (1, 2, 3):
        g = torch.randn(50, 100, generator=gen) * (1e-3 if t == 2 else 1.0)
        p.grad = g
        opt.step()
        reference_step(ref, g.reshape(1, n), m, v, t, lr, b1, b2, eps, wd)
        (m_state, m), (v_state, v) = encode_m(m), encode_v(v)
        s = opt.state[p]
        assert int(s["step"]) == t
        for key, want in {**m_state, **v_state}.items():
            assert torch.equal(s[key], want), (key, t)
        assert torch.equal(p.detach().reshape(1, n), ref), t


@pytest.mark.parametrize("bits,v_mapping,block", [(8, "linear", 256), (4, "auto", 128)])
def test_stored_moments_are_the_codec_encoding_of_the_fp32_update(bits, v_mapping, block):
    lr, wd = 1e-2, 1e-2
    n = 5000  # a partial last block
    v_table = torch.arange(1, 2 ** bits + 1, dtype=torch.float32) / 2 ** bits  # (k + 1) / 2^bits: no zero
    gen = torch.Generator().manual_seed(bits)
    p = torch.randn(50, 100, generator=gen).requires_grad_(True)
    opt = lowbit.AdamW([p], lr=lr, weight_decay=wd, bits=bits, second_moment_mapping=v_mapping)
    expect_the_codec_encoding_of_the_fp32_update(
        opt, p, gen, lr, wd, table_coded("exp_avg", lowbit.codebook("dynamic", bits), bits, block, n),
        table_coded("exp_avg_sq", v_table, bits, block, n))


def test_kashin_first_moment_is_the_codec_encoding_of_the_fp32_update():
    """m coded as the [1, n] Kashin matrix of lowbit.quantize (its own 16 fitted centroids),
    v with the (k + 1) / 16 table: the state and the parameter are the reference's exactly."""
    lr, wd, bits, block = 1e-2, 1e-2, 4, 128
    n = 5000  # a partial last block (8 elements, its own frame)
    v_table = torch.arange(1, 17, dtype=torch.float32) / 16
    gen = torch.Generator().manual_seed(41)
    p = torch.randn(50, 100, generator=gen).requires_grad_(True)
    opt = lowbit.AdamW([p], lr=lr, weight_decay=wd, bits=bits, mapping="kashin")

    def kashin_coded(x):
        q = lowbit.quantize(x, bits=bits, mapping="kashin", block_size=block)
        state = {"exp_avg_codes": q.codes.reshape(-1), "exp_avg_scales": q.scales.reshape(-1),
                 "exp_avg_centroids": q.centroids}
        return state, lowbit.dequantize(q)

    expect_the_codec_encoding_of_the_fp32_update(opt, p, gen, lr, wd, kashin_coded,
                                                 table_coded("exp_avg_sq", v_table, bits, block, n))
    # 4-bit codes and fp32 norms of both moments, plus m's 16 fp32 centroid pairs.
    assert opt.state_bytes().first_order == 2 * (n // 2 + 4 * 40) + 16 * 2 * 4


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128)])
def test_fifty_steps_replay_bit_for_bit(bits, block):
    """50 full-batch steps: a replay of the docstring's algorithm with the codec ops (decode,
    fp32 update, encode; W quantized, the 64-element bias fp32) gives the same parameters
    bit for bit."""
    lr, wd, b1, b2, eps, steps = 1e-2, 1e-2, 0.9, 0.999, 1e-8, 50
    f = least_squares()
    p = [t.clone().requires_grad_(True) for t in start()]
    opt = lowbit.AdamW(p, lr=lr, weight_decay=wd, bits=bits, second_moment_mapping="linear")
    run(opt, p, f, steps)
    assert "exp_avg_codes" in opt.state[p[0]] and "exp_avg" in opt.state[p[1]]

    W, b = start()
    n = W.numel()
    m_table = lowbit.codebook("dynamic", bits)
    v_table = torch.arange(1, 2 ** bits + 1, dtype=torch.float32) / 2 ** bits
    m, v, mb, vb = torch.zeros(1, n), torch.zeros(1, n), torch.zeros(64), torch.zeros(64)
    for t in range(1, steps + 1):
        _, gW, gb = f(W, b)
        reference_step(W.view(1, n), gW.reshape(1, n), m, v, t, lr, b1, b2, eps, wd)
        reference_step(b, gb, mb, vb, t, lr, b1, b2, eps, wd)
        mc, ms, _ = _ops.quantize_blockwise(m, m_table, bits, block)
        vc, vs, _ = _ops.quantize_blockwise(v, v_table, bits, block)
        m = _ops.dequantize_blockwise(mc, ms, m_table, None, bits, block, n)
        v = _ops.dequantize_blockwise(vc, vs, v_table, None, bits, block, n)
    assert torch.equal(p[0].detach(), W) and torch.equal(p[1].detach(), b)


def test_quantized_runs_stay_near_torch_adamw_in_the_order_of_their_rounding_errors():
    """The same 50 steps against torch.optim.AdamW, as the distance d = ||W - W_torch|| /
    ||W_torch - W_0|| (d = 1: no closer to AdamW's end point than the start). No fitted
    numbers: orderings the codec's maths gives.

    - 8-bit moments err per re-encoding by E_8 <= 1/8 of 4-bit's E_4 (the tables' largest
      rounding errors, both dynamic trees), so the 8-bit run ends closer: d8 < d4.
    - Nearest rounding at 4 bits is biased: an update (1 - b1) g smaller than half a gap
      leaves m on its code every step ("sticky" momentum). Stochastic rounding is unbiased,
      so its errors average out (their sum grows like sqrt(steps), not like steps): for each
      seed, d(stochastic) < d(nearest).
    - Every run follows AdamW: d < 1.
    (Measured, docs/lowbit_adamw.md: 0.055, 0.38, 0.19.)"""
    lr, wd, steps = 1e-2, 1e-2, 50
    f = least_squares()
    ref = [t.clone().requires_grad_(True) for t in start()]
    run(torch.optim.AdamW(ref, lr=lr, weight_decay=wd, foreach=False), ref, f, steps)
    travelled = (ref[0].detach() - start()[0]).norm().item()

    def distance(**options):
        p = [t.clone().requires_grad_(True) for t in start()]
        run(lowbit.AdamW(p, lr=lr, weight_decay=wd, second_moment_mapping="linear", **options), p, f, steps)
        return (p[0].detach() - ref[0].detach()).norm().item() / travelled, p[0].detach()

    e8, e4 = (max_rounding_error(lowbit.codebook("dynamic", b)) for b in (8, 4))
    assert e8 <= e4 / 8
    d8, _ = distance(bits=8)
    d4, _ = distance(bits=4)
    stochastic = [distance(bits=4, rounding="stochastic", seed=seed) for seed in (0, 1)]
    assert 0 < d8 < d4 < 1, (d8, d4)
    for d, _ in stochastic:
        assert 0 < d < d4, (d, d4)
    assert not torch.equal(stochastic[0][1], stochastic[1][1])  # the stream depends on the seed


@pytest.mark.parametrize("bits", [8, 4])
def test_underflowing_second_moments_give_finite_bounded_steps(bits):
    """Constant gradients with subnormal, underflowing and all-zero parts. v is stored with
    the zero-free table (k + 1) / 2^bits (second_moment_mapping "linear"; C++ tests cover the
    dynamic one), so a positive v never decodes to 0 and the step stays bounded.

    The bound, per block whose largest |g| is G > 0: that element's m and v are their blocks'
    absmax, stored exactly (code 1 times itself), so they follow fp32 AdamW: m = bc1 G,
    v = bc2 G^2. Every other element has |m| <= bc1_t G (|decoded m| <= its block's absmax),
    and v >= b2 v_stored >= b2 c_min bc2_(t-1) G^2 (c_min = 2^-bits, the table's smallest
    code). So step / lr = |m| / bc1 / (sqrt(v / bc2) + eps) <= sqrt(bc2_t / (b2 c_min bc2_(t-1))):
    4.0 at 4 bits, 16.0 at 8 bits (the zero-point problem reaches 1 / sqrt(1 - b2) = 31.6 as t
    grows). A block whose G^2 underflows has v = 0 and steps G / eps = 1e-22 lr. Plus the
    rounding of the measurement: (p - p') / lr of values |p| <= P is off by <= 2 ulp(P) / lr."""
    lr, b2, steps = 1e-3, 0.999, 200
    B = 256 if bits == 8 else 128
    g = torch.zeros(4096)  # min_quant_numel: quantized
    gen = torch.Generator().manual_seed(5)
    g[:B] = torch.randn(B, generator=gen) * 1e-2
    g[0] = 1.0
    g[1:11] = 1e-20      # v subnormal
    g[11:21] = -1e-30    # v underflows to 0
    g[B:2 * B] = 1e-30   # a block of only tiny gradients
    g[2 * B:3 * B] = torch.randn(B, generator=gen)
    # the block [3B, 4B) and the rest: all zero
    p = torch.zeros_like(g).requires_grad_(True)
    opt = lowbit.AdamW([p], lr=lr, weight_decay=0.0, bits=bits, second_moment_mapping="linear")
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
    step = (p.detach() - before).abs() / lr
    assert torch.isfinite(p).all()
    bc2_t, bc2_prev = 1 - b2 ** steps, 1 - b2 ** (steps - 1)
    bound = math.sqrt(bc2_t / (b2 * 2.0 ** -bits * bc2_prev))
    ulp = F32_EPS * p.detach().abs().max().item()
    assert step.max().item() <= bound * (1 + 8 * F32_EPS) + 2 * ulp / lr, (bits, step.max().item(), bound)
    assert torch.equal(p.detach()[3 * B:], torch.zeros_like(g[3 * B:]))
    s = opt.state[p]
    assert torch.equal(s["exp_avg_sq_scales"][3:], torch.zeros_like(s["exp_avg_sq_scales"][3:]))
    # No zero point: wherever a block's scale is > 0, every stored v decodes to > 0.
    v_table = torch.arange(1, 2 ** bits + 1, dtype=torch.float32) / 2 ** bits
    v = _ops.dequantize_blockwise(s["exp_avg_sq_codes"].view(1, -1), s["exp_avg_sq_scales"].view(1, -1), v_table,
                                  None, bits, B, g.numel()).view(-1)
    positive_block = s["exp_avg_sq_scales"].repeat_interleave(B)[:g.numel()] > 0
    assert bool(positive_block[:3 * B].any()) and bool((v[positive_block] > 0).all())


def test_state_bytes_follow_the_formula():
    def quantized(n, bits, block):
        return 2 * (-(-n * bits // 8) + 4 * -(-n // block))

    for bits in (32, 8, 4):
        params = [torch.randn(64, 128, requires_grad=True), torch.randn(70, 73, requires_grad=True),
                  torch.randn(100, requires_grad=True)]
        opt = lowbit.AdamW(params, bits=bits)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        block = 256 if bits == 8 else 128
        expected = (8 * (8192 + 5110 + 100) if bits == 32
                    else quantized(8192, bits, block) + quantized(5110, bits, block) + 8 * 100)
        assert opt.state_bytes() == lowbit.StateBytes(0, expected), bits
    p = torch.randn(1024, 1024, requires_grad=True)
    opt = lowbit.AdamW([p], bits=4)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_bytes().first_order / (8 * 1024 * 1024) == 1 / 8 + 1 / 128


# ------------------------------------------------------------------ state dicts and errors

@pytest.mark.parametrize("bits,rounding,mapping", [(32, "nearest", "dynamic"), (8, "nearest", "dynamic"),
                                                   (4, "nearest", "dynamic"), (4, "stochastic", "dynamic"),
                                                   (4, "nearest", "kashin")])
def test_state_dict_round_trip_continues_bit_identically(bits, rounding, mapping):
    f = least_squares()
    a = [t.clone().requires_grad_(True) for t in start()]
    opt = lowbit.AdamW(a, lr=1e-2, bits=bits, rounding=rounding, seed=3, mapping=mapping)
    run(opt, a, f, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    b = [t.detach().clone().requires_grad_(True) for t in a]
    run(opt, a, f, 5)
    resumed = lowbit.AdamW(b, lr=1e-2, bits=bits, rounding=rounding, seed=3, mapping=mapping)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    run(resumed, b, f, 5)
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
    for key in opt.state[a[0]]:
        assert torch.equal(opt.state[a[0]][key], resumed.state[b[0]][key]), key
    assert ("exp_avg_centroids" in opt.state[a[0]]) == (mapping == "kashin")


def test_mismatched_state_dicts_are_value_errors_that_change_nothing():
    f = least_squares()
    a = [t.clone().requires_grad_(True) for t in start()]
    opt = lowbit.AdamW(a, lr=1e-2, bits=4)
    run(opt, a, f, 3)
    sd = copy.deepcopy(opt.state_dict())

    t = [torch.randn(128, 64, requires_grad=True), torch.zeros(64, requires_grad=True)]
    target = lowbit.AdamW(t, lr=1e-2, bits=4)
    for x in t:
        x.grad = torch.ones_like(x)
    target.step()
    before = copy.deepcopy(target.state_dict())

    def unchanged():
        now = target.state_dict()
        assert now["param_groups"] == before["param_groups"]
        for k, entries in before["state"].items():
            for name, value in entries.items():
                assert torch.equal(now["state"][k][name], value), name

    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(sd)  # same element count, another shape
    unchanged()
    with pytest.raises(ValueError, match="different bits"):
        lowbit.AdamW(a, bits=8).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg_scales"] = bad["state"][0]["exp_avg_scales"][:-1]
    with pytest.raises(ValueError, match="exp_avg_scales"):
        target.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown state extra"):
        target.load_state_dict(bad)
    unchanged()


def test_nan_gradients_and_invalid_options_are_errors_that_change_nothing():
    f = least_squares()
    p = [t.clone().requires_grad_(True) for t in start()]
    opt = lowbit.AdamW(p, lr=1e-2, bits=4)
    run(opt, p, f, 2)
    params = [x.detach().clone() for x in p]
    state = [(k, {name: t.clone() for name, t in v.items()}) for k, v in opt.state.items()]
    _, gW, gb = f(*p)
    gW[3, 4] = float("nan")
    p[0].grad, p[1].grad = gW, gb
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        opt.step()
    for x, y in zip(p, params):
        assert torch.equal(x.detach(), y)
    for k, v in state:
        for name, value in v.items():
            assert torch.equal(opt.state[k][name], value), name
    opt.param_groups[0]["bits"] = 8
    with pytest.raises(ValueError, match="cannot change bits"):
        opt.step()

    x = [torch.zeros(3, requires_grad=True)]
    for kwargs, fragment in [(dict(lr=-1.0), "lr"), (dict(bits=5), "bits must be 32, 8 or 4"),
                             (dict(mapping="linear"), "mapping"), (dict(second_moment_mapping="signed"),
                                                                   "second_moment_mapping"),
                             (dict(block_size=100), "block_size"), (dict(betas=(0.9, 1.0)), "betas"),
                             (dict(eps=0.0), "eps"), (dict(min_quant_numel=-1), "min_quant_numel"),
                             (dict(rounding="up"), "rounding"), (dict(seed=-1), "seed"),
                             (dict(mapping="kashin"), 'bits must be 3 or 4 with mapping "kashin"; got 8'),
                             (dict(bits=4, mapping="kashin", rounding="stochastic"),
                              'rounding must be "nearest" with mapping "kashin"'),
                             (dict(bits=4, second_moment_mapping="kashin"),
                              'second_moment_mapping cannot be "kashin"')]:
        with pytest.raises(ValueError, match=fragment):
            lowbit.AdamW(x, **kwargs)
    with pytest.raises(TypeError, match="bits"):
        lowbit.AdamW(x, bits="8")


def test_exported_and_documented():
    assert "AdamW" in lowbit.__all__
    assert "second_moment_mapping" in lowbit.AdamW.__doc__
