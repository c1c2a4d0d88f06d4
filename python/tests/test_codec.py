"""lowbit.quantize / lowbit.dequantize and the torch.ops.lowbit codec ops."""

from __future__ import annotations

import io

import pytest
import torch

import lowbit
from codec_bounds import U32, block_absmax, error_bound, max_rounding_error, per_element

PAPER_LINEAR2_4BIT = [-1, -.7511, -.5378, -.36, -.2178, -.1111, -.04, 0, .0044, .04, .1111, .2178, .36, .5378,
                      .7511, 1]


def test_codebook_is_the_papers():
    # The paper prints four decimals: each printed value is within half a unit of the 4th
    # decimal (5e-5) of the exact one, which fp32 stores within u = 2^-24 (|value| <= 1).
    torch.testing.assert_close(lowbit.codebook("linear2", 4), torch.tensor(PAPER_LINEAR2_4BIT),
                               atol=0.5e-4 + U32, rtol=0)
    for mapping in ("linear2", "dynamic", "linear"):
        for bits in (3, 4, 8):
            t = lowbit.codebook(mapping, bits)
            assert t.numel() == 2 ** bits and bool((t[1:] > t[:-1]).all()) and 0 in t and 1 in t


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("mapping", ["linear2", "dynamic", "linear"])
@pytest.mark.parametrize("shape", [(33, 200), (7, 64)])
def test_error_is_within_the_block_bound(bits, mapping, shape):
    g = torch.Generator().manual_seed(bits)
    m = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])
    q = lowbit.quantize(m, bits, mapping, 64)
    back = lowbit.dequantize(q)
    assert back.shape == m.shape and back.dtype == m.dtype
    # s E per element (s: its block's absmax, E: the table's largest rounding error) plus the
    # fp32 rounding of the thresholds, of fl(code * s) and of the difference: s (E + 4u) + 4 eta
    # (codec_bounds.error_bound has the derivation).
    scale = per_element(block_absmax(m, 64), 64, shape[1])
    bound = error_bound(m, scale, max_rounding_error(lowbit.codebook(mapping, bits)), m.dtype)
    assert bool(((back.double() - m.double()).abs() <= bound).all())
    # Packed at the real width: ceil(cols * bits / 8) bytes per row, one fp32 scale per block.
    assert q.codes.shape == (shape[0], (shape[1] * bits + 7) // 8)
    assert q.nbytes == shape[0] * ((shape[1] * bits + 7) // 8) + 4 * shape[0] * -(-shape[1] // 64)


def test_shapes_dtypes_and_options():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g, dtype=torch.bfloat16)
    q = lowbit.quantize(x)
    assert lowbit.dequantize(q).shape == (4, 5, 6) and lowbit.dequantize(q).dtype == torch.bfloat16
    v = torch.randn(100, generator=g, dtype=torch.float64)
    assert lowbit.dequantize(lowbit.quantize(v), torch.float32).dtype == torch.float32

    sym = torch.randn(70, 70, generator=g)
    sym = sym + sym.T
    qd = lowbit.quantize(sym, keep_diagonal=True)
    assert torch.equal(lowbit.dequantize(qd).diagonal(), sym.diagonal())  # exact fp32 diagonal

    qq = lowbit.quantize(sym, double_quant_scales=True)
    assert qq.scales.dtype == torch.uint8 and qq.scale_group_max is not None
    assert qq.nbytes < lowbit.quantize(sym).nbytes

    a = lowbit.quantize(sym, stochastic=True, seed=3)
    b = lowbit.quantize(sym, stochastic=True, seed=3)
    c = lowbit.quantize(sym, stochastic=True, seed=4)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)


def test_state_round_trips_through_torch_save():
    m = torch.randn(40, 90)
    q = lowbit.quantize(m, 4, "dynamic", 32, double_quant_scales=True)
    buffer = io.BytesIO()
    torch.save(q.state(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert torch.equal(torch.ops.lowbit.dequantize_matrix(state), lowbit.dequantize(q))


def test_torch_ops_are_reachable_and_agree():
    m = torch.randn(16, 100)
    table = torch.ops.lowbit.codebook("linear2", 4)
    codes, scales, _ = torch.ops.lowbit.quantize_blockwise(m, table, 4, 64)
    q = lowbit.quantize(m)
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales)
    back = torch.ops.lowbit.dequantize_blockwise(codes, scales, table, None, 4, 64, m.shape[1])
    assert torch.equal(back, lowbit.dequantize(q))
    assert torch.equal(torch.ops.lowbit.block_absmax(m, 64, False), scales)
    for op in ("quantize_scales", "dequantize_scales", "quantize_matrix", "dequantize_matrix",
               "shampoo_step", "first_nonfinite"):
        assert hasattr(torch.ops.lowbit, op)


def test_check_finite_false_changes_no_code_and_the_cpu_still_checks():
    # check_finite=False lets the CUDA kernels skip the host read that reports a NaN/Inf; the
    # CPU kernels check as they load each block, so they raise either way (ops_schema.cpp).
    m = torch.randn(16, 100)
    table = torch.ops.lowbit.codebook("linear2", 4)
    checked = torch.ops.lowbit.quantize_blockwise(m, table, 4, 64)
    trusted = torch.ops.lowbit.quantize_blockwise(m, table, 4, 64, check_finite=False)
    assert all(torch.equal(a, b) for a, b in zip(checked, trusted))
    assert torch.equal(torch.ops.lowbit.block_absmax(m, 64, False, check_finite=False),
                       torch.ops.lowbit.block_absmax(m, 64, False))
    scales = torch.ops.lowbit.block_absmax(m, 16, False)
    scale_table = torch.linspace(0, 1, 256)
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.lowbit.quantize_scales(scales, scale_table),
                                                 torch.ops.lowbit.quantize_scales(scales, scale_table, False)))
    bad = m.clone()
    bad[3, 7] = float("nan")
    for check_finite in (True, False):
        with pytest.raises(RuntimeError, match=r"NaN or Inf.*first at \[3, 7\]"):
            torch.ops.lowbit.quantize_blockwise(bad, table, 4, 64, check_finite=check_finite)


def test_bad_arguments_are_named():
    m = torch.randn(8, 8)
    with pytest.raises(ValueError, match="bits must be 3, 4 or 8; got 5"):
        lowbit.quantize(m, bits=5)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        lowbit.quantize(m, block_size=48)
    with pytest.raises(ValueError, match="mapping"):
        lowbit.quantize(m, mapping="nf4")
    with pytest.raises(TypeError, match="bits must be int"):
        lowbit.quantize(m, bits=4.0)
    with pytest.raises(ValueError, match="keep_diagonal needs a square matrix"):
        lowbit.quantize(torch.randn(4, 5), keep_diagonal=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="must be float32, bfloat16, float16 or float64; got Int"):
        lowbit.quantize(torch.ones(4, 4, dtype=torch.int32))
    q = lowbit.quantize(m)
    bad = lowbit.QuantizedTensor(q.codes[:, :3], q.scales, q.meta, None, None, q.shape, q.dtype, 4, "linear2", 64)
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        lowbit.dequantize(bad)


def test_kashin_mapping_round_trips_through_a_weights_only_checkpoint():
    # The Kashin state is plain tensors too (codes, block norms, centroids, meta).
    torch.manual_seed(0)
    m = torch.randn(33, 1057)
    q = lowbit.quantize(m, bits=4, mapping="kashin", block_size=64)
    assert set(q.state()) == {"codes", "scales", "meta", "centroids"}
    assert q.centroids.shape == (16, 2)
    assert q.nbytes == 33 * ((1057 * 4 + 7) // 8) + 4 * 33 * 17 + 4 * 32  # codes, block norms, centroids
    buffer = io.BytesIO()
    torch.save(q.state(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    back = torch.ops.lowbit.dequantize_matrix(state, torch.float32)
    assert torch.equal(back, lowbit.dequantize(q))


def test_kashin_mapping_rejects_what_it_cannot_do():
    m = torch.randn(8, 64)
    with pytest.raises(ValueError, match="bits must be 3 or 4 with mapping \"kashin\""):
        lowbit.quantize(m, bits=8, mapping="kashin")
    with pytest.raises(ValueError, match="rounding must be \"nearest\""):
        lowbit.quantize(m, mapping="kashin", stochastic=True)
    q = lowbit.quantize(m, mapping="kashin")
    import dataclasses
    with pytest.raises(ValueError, match="centroids"):
        lowbit.dequantize(dataclasses.replace(q, centroids=None))
