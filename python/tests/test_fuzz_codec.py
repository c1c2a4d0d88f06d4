"""Property-based tests of the codec (lowbit.quantize / lowbit.dequantize and the
torch.ops.lowbit codec ops) with hypothesis: random shapes (empty, one element, odd
orders, views), dtypes, bit widths, mappings, block sizes, options, and values with NaN,
+-Inf, subnormals, huge and tiny numbers; corrupted or mismatched buffers given to
dequantize. Each case either raises a clear error (ValueError / TypeError / RuntimeError
naming the offending argument) or gives a correct result: the documented layout, the error
bound of codec_bounds.error_bound for every element, exact diagonals and zeros where
promised. A crash, a hang or a silently wrong result fails."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import lowbit
from codec_bounds import (as_matrix, block_absmax, decode_reference, error_bound, max_gap, max_rounding_error,
                          packed_row_bytes, per_element)
from fuzz_support import assert_names_one_of, count, fuzz_settings

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MAPPINGS = ["linear2", "dynamic", "linear"]
BLOCKS = [16, 32, 64, 128, 256, 1024, 4096]
FLT_MAX = torch.finfo(torch.float32).max
SPECIALS = [float("nan"), float("inf"), float("-inf"), 1.4e-45, -1.4e-45, 1e-40, -3e-39, 1.17e-38, 3e38, -3e38,
            FLT_MAX, -FLT_MAX, 0.0, -0.0, 1e-300, 1e300, 5e-324, 65504.0, 1e5, 6e-8]
INTERESTING_SHAPES = [(), (1,), (0,), (1, 1), (2, 2), (3, 0), (0, 4), (7,), (5, 5), (17, 17), (33, 33), (1, 70, 1),
                      (2, 3, 4), (65,), (3, 130), (4, 4, 4, 4), (1, 4097), (16, 16), (9, 31)]


@st.composite
def shapes(draw):
    if draw(st.booleans()):
        return draw(st.sampled_from(INTERESTING_SHAPES))
    ndim = draw(st.integers(0, 4))
    dims, budget = [], 3000
    for _ in range(ndim):
        d = draw(st.integers(0, min(70, budget)))
        dims.append(d)
        budget = max(1, budget // max(d, 1))
    return tuple(dims)


@st.composite
def tensors(draw):
    """A floating tensor: normal values over a drawn range of magnitudes (subnormal to huge),
    some special values at drawn positions, possibly a non-contiguous view."""
    shape = draw(shapes())
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    exponent = draw(st.sampled_from([-44, -40, -38, -20, -5, 0, 3, 20, 36, 38]))
    spread = draw(st.sampled_from([0.0, 0.5, 3.0]))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    magnitude = torch.pow(10.0, exponent + spread * torch.randn(shape, generator=g, dtype=torch.float64))
    x = base * magnitude
    if draw(st.booleans()):  # whole zero rows / blocks
        flat = x.view(-1)
        if flat.numel():
            start = draw(st.integers(0, flat.numel() - 1))
            flat[start:start + draw(st.integers(1, 200))] = 0.0
    for _ in range(draw(st.integers(0, 3))):
        if x.numel():
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    x = x.to(dtype)
    if x.dim() >= 2 and draw(st.booleans()):
        x = x.transpose(0, -1)  # a non-contiguous view
    return x


def expected_errors(x, bits, mapping, block_size, keep_diagonal, seed):
    """Substrings one of which the error must contain; empty: the call must succeed."""
    names = []
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (3, 4, 8):
        names.append("bits")
    if not isinstance(mapping, str) or mapping not in MAPPINGS + ["linear-2", "dt"]:
        names.append("mapping")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCKS + [512, 2048]:
        names.append("block_size")
    if seed < 0:
        names.append("seed")
    if keep_diagonal and (x.dim() != 2 or x.shape[0] != x.shape[1]):
        names.append("keep_diagonal")
    if x.numel() == 0:
        names.append("empty")
    elif not bool(torch.isfinite(x.float()).all()):
        names.append("NaN or Inf")
    return names


@given(x=tensors(),
       bits=st.one_of(st.sampled_from([3, 4, 8]), st.sampled_from([0, 2, 5, 16, -4, 4.0, True])),
       mapping=st.one_of(st.sampled_from(MAPPINGS), st.sampled_from(["nf4", "", "Linear2"])),
       block_size=st.one_of(st.sampled_from(BLOCKS), st.sampled_from([0, 8, 48, 8192, -64])),
       keep_diagonal=st.booleans(), double_quant_scales=st.booleans(), stochastic=st.booleans(),
       seed=st.one_of(st.integers(0, 2 ** 40), st.just(-1)))
@fuzz_settings(max_examples=1500)
@example(x=torch.zeros(1, 1), bits=4, mapping="linear2", block_size=64, keep_diagonal=True,
         double_quant_scales=True, stochastic=False, seed=0)
def test_quantize_is_an_error_or_within_the_bound(x, bits, mapping, block_size, keep_diagonal,
                                                   double_quant_scales, stochastic, seed):
    count("codec")
    names = expected_errors(x, bits, mapping, block_size, keep_diagonal, seed)
    try:
        q = lowbit.quantize(x, bits, mapping, block_size, keep_diagonal=keep_diagonal,
                            double_quant_scales=double_quant_scales, stochastic=stochastic, seed=seed)
    except (ValueError, TypeError) as e:
        assert names, f"unexpected {type(e).__name__}: {e}"
        assert_names_one_of(e, names)
        return
    assert not names, f"expected an error naming one of {names}"

    m = as_matrix(x)
    rows, cols = m.shape
    blocks = math.ceil(cols / block_size)
    # The documented layout.
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (rows, packed_row_bytes(cols, bits))
    assert q.meta.dtype == torch.int64 and q.meta.shape == (7,)
    if double_quant_scales:
        assert q.scales.dtype == torch.uint8 and q.scales.shape == (rows, blocks)
        assert q.scale_group_max is not None and q.scale_group_max.shape == (math.ceil(rows * blocks / 256),)
    else:
        assert q.scales.dtype == torch.float32 and q.scales.shape == (rows, blocks)
        assert q.scale_group_max is None
    assert (q.diagonal is not None) == keep_diagonal
    if keep_diagonal:
        assert q.diagonal.dtype == torch.float32 and q.diagonal.shape == (rows,)

    back = lowbit.dequantize(q)
    assert back.shape == x.shape and back.dtype == x.dtype
    bm = as_matrix(back).double()
    m32 = m.float()
    absmax = block_absmax(m32, block_size, skip_diagonal=keep_diagonal)
    if double_quant_scales:
        # The stored scale is rounded up to a code of the scale table times the group's
        # maximum M: absmax <= scale <= M, with M the group's largest absmax. The scale each
        # block decodes with is read off by setting every code to the table's last value, 1.
        group_max = torch.zeros(q.scale_group_max.numel(), dtype=torch.float64)
        flat = absmax.reshape(-1)
        for gi in range(group_max.numel()):
            group_max[gi] = flat[gi * 256:(gi + 1) * 256].max()
        assert torch.equal(q.scale_group_max.double(), group_max)
        ones = dict(q.state(), codes=torch.full_like(q.codes, 255))
        ones.pop("diagonal", None)
        ones["meta"] = q.meta.clone()
        ones["meta"][5] = 0  # no diagonal: every element shows its block's scale
        decoded = torch.ops.lowbit.dequantize_matrix(ones, torch.float32).double()
        scale = decoded[:, ::block_size] if cols else decoded
        assert bool((scale >= absmax).all()) and bool((scale <= per_group(group_max, rows, blocks)).all())
        assert bool((scale[absmax == 0] == 0).all())
    else:
        scale = q.scales.double()
        assert torch.equal(scale, absmax)  # one fp32 scale per block: the block's absmax
    table = lowbit.codebook(mapping, bits)
    budget = max_gap(table) if stochastic else max_rounding_error(table)
    s = per_element(scale, block_size, cols)
    bound = error_bound(m, s, budget, x.dtype)
    error = (bm - m.double()).abs()
    off = torch.ones_like(error, dtype=torch.bool)
    if keep_diagonal:
        off.fill_diagonal_(False)
        # The diagonal is kept in fp32 exactly (fp32 rounding of a float64 input).
        assert torch.equal(bm.diagonal(), m32.diagonal().double())
    worst = (error - bound)[off].max().item() if bool(off.any()) else -1.0
    assert worst <= 0, f"error exceeds the bound by {worst}"
    # All-zero blocks decode to exact zeros; so does a 0 wherever the threshold below the
    # table's 0 does not underflow (|m_{z-1}| s > 2^-149), or with stochastic rounding.
    zero_index = int((table == 0).nonzero())
    below = abs((table[zero_index - 1].double() + table[zero_index].double()) / 2)
    exact_zero = (s == 0) | (stochastic | (below * s > 2.0 ** -149))
    zeros = off & (m.double() == 0) & exact_zero
    assert bool((bm[zeros] == 0).all())
    if stochastic:
        again = lowbit.quantize(x, bits, mapping, block_size, keep_diagonal=keep_diagonal,
                                double_quant_scales=double_quant_scales, stochastic=True, seed=seed)
        assert torch.equal(again.codes, q.codes)  # a pure function of (seed, element index)


def per_group(group_max: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    return group_max.repeat_interleave(256)[:rows * blocks].reshape(rows, blocks)


# ---------------------------------------------------------------- dequantize of corrupted parts

@st.composite
def quantized(draw):
    shape = draw(st.sampled_from([(5, 5), (17, 17), (3, 70), (40,), (2, 3, 9), (1, 1), (66, 66)]))
    bits = draw(st.sampled_from([3, 4, 8]))
    mapping = draw(st.sampled_from(MAPPINGS))
    block = draw(st.sampled_from([16, 32, 64]))
    square = len(shape) == 2 and shape[0] == shape[1]
    options = dict(keep_diagonal=square and draw(st.booleans()), double_quant_scales=draw(st.booleans()),
                   stochastic=draw(st.booleans()), seed=draw(st.integers(0, 100)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 1000))))
    return lowbit.quantize(x, bits, mapping, block, **options)


def retyped(t, dtype):
    return t.to(dtype) if dtype != torch.bool else t != 0


TENSOR_EDITS = {
    "dtype": lambda t, d: retyped(t, d.draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.float32,
                                                             torch.float64, torch.float16, torch.uint8,
                                                             torch.bool]).filter(lambda x: x != t.dtype))),
    "drop last column": lambda t, d: t[..., :-1] if t.dim() else t.reshape(1)[:0],
    "extra column": lambda t, d: torch.cat([t, t[..., -1:]], -1) if t.dim() else t.reshape(1).repeat(2),
    "drop a row": lambda t, d: t[1:],
    "flattened": lambda t, d: t.reshape(-1),
    "unsqueezed": lambda t, d: t.unsqueeze(0),
    "empty": lambda t, d: t.reshape(-1)[:0],
    "non-contiguous": lambda t, d: torch.stack([t, t], -1)[..., 0],  # same values: must decode the same
}
VALUE_EDITS = ["nan", "inf", "-inf", "negative"]  # a negative diagonal entry is a value, not an error


def poisoned(t, how, d):
    t = t.clone()
    i = d.draw(st.integers(0, t.numel() - 1))
    t.view(-1)[i] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}.get(how, -1.0)
    return t


META_FIELDS = ["rows", "cols", "bits", "mapping", "block_size", "keep_diagonal", "double_quant"]
META_NAMES = {"rows": ["meta", "codes", "shape"], "cols": ["meta", "codes", "shape"],
              "bits": ["bits", "meta", "codes"], "mapping": ["mapping", "meta"],
              "block_size": ["block_size", "meta", "scales"], "keep_diagonal": ["keep_diagonal", "diagonal", "meta"],
              "double_quant": ["double_quant", "scale_group_max", "scales", "meta"]}


@given(q=quantized(), data=st.data(), raw=st.booleans())
@fuzz_settings(max_examples=900)
def test_dequantize_of_corrupted_parts_is_an_error_or_exact(q, data, raw):
    """A QuantizedTensor (lowbit.dequantize) or its state dict (torch.ops.lowbit.
    dequantize_matrix) with one part replaced: the result equals the untouched one (an edit
    that changes nothing, like a non-contiguous copy) or the call raises naming the part."""
    count("codec")
    good = lowbit.dequantize(q)
    state = q.state()
    kind = data.draw(st.sampled_from(["codes", "scales", "meta", "diagonal", "scale_group_max", "shape",
                                      "dtype", "fields"]))
    names = [kind]
    extra = {}
    form = None
    if kind in ("codes", "scales", "diagonal", "scale_group_max"):
        present = state.get(kind)
        how = data.draw(st.sampled_from(["remove", "add", "edit", "value"]))
        if present is None:
            if how in ("remove", "edit", "value"):
                how = "add"
            like = q.scales.float() if kind == "scale_group_max" else torch.zeros(q.codes.shape[0])
            state[kind] = like.reshape(-1)[:max(1, like.numel())].clone()
            names = [kind, "keep_diagonal", "double_quant"]
        elif how in ("remove", "add"):
            del state[kind]
            names = [kind, "keep_diagonal", "double_quant"]
        elif how == "value" and present.is_floating_point():
            edits = VALUE_EDITS[:3] if kind == "diagonal" else VALUE_EDITS
            state[kind] = poisoned(present, data.draw(st.sampled_from(edits)), data)
        else:
            edit = data.draw(st.sampled_from(sorted(TENSOR_EDITS)))
            state[kind] = TENSOR_EDITS[edit](present, data)
    elif kind == "meta":
        meta = q.meta.clone()
        form = data.draw(st.sampled_from(["value", "dtype", "length"]))
        if form == "value":
            field = data.draw(st.sampled_from(META_FIELDS))
            meta[META_FIELDS.index(field)] = data.draw(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 8, 16, 48, 64, 4096,
                                                                         2 ** 40, 2 ** 61, -2 ** 62]))
            names = META_NAMES[field]
        elif form == "dtype":
            meta = meta.to(data.draw(st.sampled_from([torch.int32, torch.float64, torch.uint8])))
        else:
            meta = meta[:6] if data.draw(st.booleans()) else torch.cat([meta, meta[:1]])
        state["meta"] = meta
        names = names + ["meta"]
    elif kind == "shape":
        extra["shape"] = data.draw(st.sampled_from([(q.codes.shape[0] + 1, 1), tuple(reversed(q.shape)),
                                                    (math.prod(q.shape),), (1, math.prod(q.shape))]))
    elif kind == "dtype":
        extra["dtype"] = data.draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64,
                                                    torch.uint8]))
    else:
        field = data.draw(st.sampled_from(["bits", "mapping", "block_size"]))
        extra[field] = {"bits": 8 if q.bits != 8 else 4, "mapping": "linear" if q.mapping != "linear" else "dynamic",
                        "block_size": q.block_size * 2}[field]
        names = [field]
    if raw:
        if kind in ("shape", "fields"):
            return  # no such parts in a state dict
        count("codec")
        try:
            out = torch.ops.lowbit.dequantize_matrix(state, extra.get("dtype", q.dtype))
        except RuntimeError as e:
            assert_names_one_of(e, names)
            return
        if kind == "meta" and form == "value":
            return  # a state dict has nothing to check its meta against: another valid layout decodes
        assert torch.equal(out.reshape(q.shape), good), f"{kind}: decoded silently to other values"
        return
    parts = dict(codes=state.get("codes"), scales=state.get("scales"), meta=state.get("meta"),
                 diagonal=state.get("diagonal"), scale_group_max=state.get("scale_group_max"))
    edited = dataclasses.replace(q, **parts, **extra)
    try:
        out = lowbit.dequantize(edited)
    except (ValueError, TypeError) as e:
        assert_names_one_of(e, names)
        return
    # An edit that leaves a consistent tensor (a shape with the same matrix view): same values.
    assert out.shape == edited.shape and torch.equal(out.reshape(-1), good.reshape(-1)), \
        f"{kind}: decoded silently to other values"


# ---------------------------------------------------------------- the block ops

@given(rows=st.integers(0, 9), cols=st.integers(0, 300), bits=st.sampled_from([3, 4, 8]),
       mapping=st.sampled_from(MAPPINGS), block=st.sampled_from([16, 32, 64, 256]),
       diagonal=st.booleans(), dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2 ** 31 - 1),
       scale_exponent=st.sampled_from([-45, -40, -20, 0, 20, 38]))
@fuzz_settings(max_examples=500)
def test_dequantize_blockwise_of_any_codes_is_the_table_times_the_scale(rows, cols, bits, mapping, block, diagonal,
                                                                       dtype, seed, scale_exponent):
    """Every byte pattern is a valid code row: the op decodes it as the reference decoder
    written from docs/codec.md does, bit for bit (one fp32 product per element)."""
    count("codec")
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, packed_row_bytes(cols, bits)), generator=g, dtype=torch.uint8)
    scales = (torch.rand(rows, math.ceil(cols / block), generator=g, dtype=torch.float64)
              * 10.0 ** scale_exponent).float().clamp_max(FLT_MAX)
    table = lowbit.codebook(mapping, bits)
    diag = torch.randn(rows, generator=g) if diagonal and rows == cols else None
    out = torch.ops.lowbit.dequantize_blockwise(codes, scales, table, diag, bits, block, cols, dtype)
    assert out.dtype == dtype and out.shape == (rows, cols)
    assert torch.equal(out, decode_reference(codes, scales, table, diag, bits, block, cols, dtype))


BAD_BLOCK_ARGS = {
    "codes dtype": (lambda a: dict(a, codes=a["codes"].to(torch.int32)), "codes"),
    "codes shape": (lambda a: dict(a, codes=a["codes"][:, :-1]), "codes"),
    "codes rows": (lambda a: dict(a, codes=a["codes"][1:]), ("codes", "scales")),  # rows come from codes
    "scales dtype": (lambda a: dict(a, scales=a["scales"].double()), "scales"),
    "scales shape": (lambda a: dict(a, scales=a["scales"][:, :-1]), "scales"),
    "codebook size": (lambda a: dict(a, codebook=a["codebook"][:-1]), "codebook"),
    "codebook order": (lambda a: dict(a, codebook=a["codebook"].flip(0)), "codebook"),
    "codebook dtype": (lambda a: dict(a, codebook=a["codebook"].double()), "codebook"),
    "diagonal shape": (lambda a: dict(a, diagonal=torch.zeros(a["codes"].shape[0] + 1)), "diagonal"),
    "diagonal dtype": (lambda a: dict(a, diagonal=torch.zeros(a["codes"].shape[0], dtype=torch.float64)), "diagonal"),
    "bits": (lambda a: dict(a, bits=5), "bits"),
    # Both the codebook and the packed codes disagree with the other width: either is named.
    "other bits": (lambda a: dict(a, bits=8 if a["bits"] != 8 else 4), ("codebook", "codes")),
    "block_size": (lambda a: dict(a, block_size=48), "block_size"),
    "cols": (lambda a: dict(a, cols=-3), "cols"),
    "dtype": (lambda a: dict(a, dtype=torch.int32), "dtype"),
}


@given(n=st.integers(1, 70), bits=st.sampled_from([3, 4, 8]), block=st.sampled_from([16, 64]),
       bad=st.sampled_from(sorted(BAD_BLOCK_ARGS)), seed=st.integers(0, 1000))
@fuzz_settings(max_examples=300)
def test_block_ops_name_a_bad_argument(n, bits, block, bad, seed):
    count("codec")
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    table = lowbit.codebook("linear2", bits)
    codes, scales, diag = torch.ops.lowbit.quantize_blockwise(m, table, bits, block, True)
    args = dict(codes=codes, scales=scales, codebook=table, diagonal=diag, bits=bits, block_size=block, cols=n,
                dtype=torch.float32)
    edit, name = BAD_BLOCK_ARGS[bad]
    args = edit(args)
    assume(not (bad == "codes shape" and args["codes"].shape[1] == codes.shape[1]))
    with pytest.raises(RuntimeError) as raised:
        torch.ops.lowbit.dequantize_blockwise(args["codes"], args["scales"], args["codebook"], args["diagonal"],
                                              args["bits"], args["block_size"], args["cols"], args["dtype"])
    assert_names_one_of(raised.value, [name] if isinstance(name, str) else name)


# ---------------------------------------------------------------- regressions
# Minimal cases of what the properties above found; before the fixes each one decoded
# silently (to NaN, to flipped signs, to another matrix) or named the wrong argument.

def _q(**options):
    return lowbit.quantize(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)), **options)


def _with_scale(value):
    q = _q()
    scales = q.scales.clone()
    scales[0, 0] = value
    return dataclasses.replace(q, scales=scales)


@pytest.mark.parametrize("edit, match", [
    (lambda: _with_scale(float("nan")), '"scales" holds NaN or Inf'),
    (lambda: _with_scale(-1.0), '"scales" holds a negative value'),
    (lambda: dataclasses.replace(_q(), shape=(1, 25)), "meta holds a 5 x 5 matrix"),
    (lambda: dataclasses.replace(_q(), mapping="dynamic"), "meta says mapping=0"),
    (lambda: dataclasses.replace(_q(), dtype=torch.int32), "dtype must be float32"),
    (lambda: dataclasses.replace(_q(keep_diagonal=True), diagonal=None), "meta says keep_diagonal=1"),
])
def test_regressions_of_dequantize(edit, match):
    with pytest.raises(ValueError, match=match):
        lowbit.dequantize(edit())


def test_regressions_of_dequantize_matrix():
    state = _q().state()
    # A stray diagonal was written over the decoded one.
    with pytest.raises(RuntimeError, match='"diagonal" entry but "meta" says keep_diagonal is off'):
        torch.ops.lowbit.dequantize_matrix(dict(state, diagonal=torch.zeros(5)))
    with pytest.raises(RuntimeError, match="dequantize_matrix: dtype must be float32"):
        torch.ops.lowbit.dequantize_matrix(state, torch.int64)
    huge = state["meta"].clone()
    huge[1] = 2 ** 61  # cols * bits overflowed int64 in the packed size
    with pytest.raises(RuntimeError, match=r"orders in \[0, 2\^40\]"):
        torch.ops.lowbit.dequantize_matrix(dict(state, meta=huge))
