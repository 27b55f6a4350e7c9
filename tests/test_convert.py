"""Bit-exactness of the raw <-> float32 conversions (npmerge.dtypes.decode / encode).

References: ml_dtypes for BF16 and FP8 (test-only dependency), NumPy for F16/F32/F64.
Everything is compared as bit patterns; NaNs too, except where a reference's NaN
payload is not a contract (FP8 tables, differences with a base).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npmerge import dtypes
from npmerge.dtypes import DECODABLE, ENCODABLE, decode, encode

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - test extra
    ml_dtypes = None

needs_ml = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes not installed")

REPO = Path(__file__).resolve().parents[1]
ALL16 = np.arange(65536, dtype=np.uint16)
ALL8 = np.arange(256, dtype=np.uint8)


# ------------------------------------------------------------------ helpers


def _cast(a, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return a.astype(dtype)


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits(got, ref, inputs=None):
    g, r = _bits(np.asarray(got)), _bits(np.asarray(ref))
    bad = np.flatnonzero(g != r)
    if bad.size:
        show = [
            (hex(int(_bits(inputs)[i])) if inputs is not None else int(i), hex(int(r[i])), hex(int(g[i])))
            for i in bad[:8]
        ]
        pytest.fail(f"{bad.size} mismatches (input, expected, got): {show}")


def assert_same_floats(got, ref):
    """NaN where the reference is NaN, identical bits (so also the sign of 0) elsewhere."""
    got, ref = np.asarray(got), np.asarray(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    keep = ~np.isnan(ref)
    assert_bits(got[keep], ref[keep])


def dec(raw, code, base=None):
    out = np.empty(raw.size, np.float32)
    decode(raw, code, out, base)
    return out


def enc(src, code):
    out = np.empty(src.size, dtypes.DTYPES[code].storage)
    encode(src, code, out)
    return out


def f32_from_bits(bits):
    return np.asarray(bits, dtype=np.uint64).astype(np.uint32).view(np.float32)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240607)


@pytest.fixture(scope="module")
def random_f32_bits(rng):
    """~2M float32 patterns: uniform bits, plus every exponent (incl. 0 and 255)."""
    uniform = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    exp = rng.integers(0, 256, 1 << 20, dtype=np.uint32)
    man = rng.integers(0, 1 << 23, 1 << 20, dtype=np.uint32)
    sign = rng.integers(0, 2, 1 << 20, dtype=np.uint32)
    strat = (sign << 31) | (exp << 23) | man
    return np.concatenate([uniform, strat])


def _child(code: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in env_update.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"child failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------ BF16


@needs_ml
def test_bf16_decode_all_patterns():
    ref = ALL16.view(ml_dtypes.bfloat16).astype(np.float32)
    assert_bits(dec(ALL16, "BF16"), ref, ALL16)


@needs_ml
def test_bf16_encode_all_representable():
    values = ALL16.view(ml_dtypes.bfloat16).astype(np.float32)
    got = enc(values, "BF16")
    assert_bits(got, _cast(values, ml_dtypes.bfloat16), values)
    # non-NaN values round-trip to themselves; every NaN becomes sign | 0x7FC0
    nan = np.isnan(values)
    assert_bits(got[~nan], ALL16[~nan])
    assert set(np.unique(got[nan]).tolist()) == {0x7FC0, 0xFFC0}


@needs_ml
def test_bf16_encode_random_patterns(random_f32_bits):
    x = random_f32_bits.view(np.float32)
    assert_bits(enc(x, "BF16"), _cast(x, ml_dtypes.bfloat16), x)


@needs_ml
def test_bf16_encode_ties_overflow_and_specials(rng):
    b = rng.integers(0, 65536, 200_000, dtype=np.uint64).astype(np.uint32)
    hi = b << 16
    cases = [
        hi | 0x8000,  # exact halfway: odd b rounds up, even b stays
        hi | 0x7FFF,  # just below halfway
        hi | 0x8001,  # just above halfway
        hi,
        np.array(
            [
                0x7F7F7FFF, 0x7F7F8000, 0x7F7F0000, 0x7F7FFFFF,  # largest finite bf16 0x7F7F, halfway to Inf
                0xFF7F7FFF, 0xFF7F8000, 0xFF7FFFFF,
                0x7F800000, 0xFF800000, 0x80000000, 0x00000000,
                0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,  # subnormals
                0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF,  # NaNs
            ],
            dtype=np.uint32,
        ),
    ]
    bits = np.concatenate(cases)
    x = bits.view(np.float32)
    got = enc(x, "BF16")
    assert_bits(got, _cast(x, ml_dtypes.bfloat16), x)
    # explicit expectations, independent of the reference
    even = (b & 1) == 0
    tie = got[: b.size]
    finite = (b & 0x7F80) != 0x7F80
    np.testing.assert_array_equal(tie[even & finite], b[even & finite])
    odd_fin = ~even & finite & (b != 0x7F7F) & (b != 0xFF7F)
    np.testing.assert_array_equal(tie[odd_fin], (b[odd_fin] + 1))
    special = enc(np.array([3.3961776e38, -3.3961776e38, 3.3895314e38, -0.0, np.inf, -np.inf], np.float32), "BF16")
    assert special.tolist() == [0x7F80, 0xFF80, 0x7F7F, 0x8000, 0x7F80, 0xFF80]
    nans = enc(f32_from_bits([0x7F800001, 0xFF800001, 0x7FBFFFFF, 0xFFC00001]), "BF16")
    assert nans.tolist() == [0x7FC0, 0xFFC0, 0x7FC0, 0xFFC0]


# ------------------------------------------------------------------ F16


def test_f16_decode_all_patterns():
    assert_bits(dec(ALL16, "F16"), _cast(ALL16.view(np.float16), np.float32), ALL16)


def test_f16_encode_random_patterns(random_f32_bits):
    x = random_f32_bits.view(np.float32)
    assert_bits(enc(x, "F16"), _cast(x, np.float16), x)


def test_f16_encode_ties_subnormals_overflow(rng):
    # every half value h, and the float32 values around each midpoint h + ulp/2
    h = ALL16.view(np.float16).astype(np.float32)
    finite = np.isfinite(h) & (ALL16 != 0x7BFF) & (ALL16 != 0xFBFF)
    lo = h[finite]
    hi = ALL16[finite]
    nxt = (hi + np.uint16(1)).view(np.float16).astype(np.float32)  # same sign, next magnitude
    mid = ((lo.astype(np.float64) + nxt.astype(np.float64)) / 2).astype(np.float32)  # exact in f32
    below = np.nextafter(mid, np.float32(0))
    above = np.nextafter(mid, np.float32(np.inf) * np.sign(mid))
    specials = np.array(
        [
            65504.0, 65519.99, 65520.0, 65536.0, -65520.0, -65519.99, 3.4e38, -3.4e38,
            2.0**-24, 2.0**-25, -(2.0**-25), 2.0**-26, 1.5 * 2.0**-24, 2.5 * 2.0**-24,
            2.0**-14, 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-24, 1e-45, -0.0, 0.0, np.inf, -np.inf,
        ],
        dtype=np.float32,
    )
    specials = np.concatenate([specials, np.nextafter(specials, np.float32(0)), np.nextafter(specials, np.float32(np.inf))])
    nans = f32_from_bits([0x7FC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7F80FFFF, 0xFFABCDEF, 0x7F802000, 0x7F801FFF])
    x = np.concatenate([lo, mid, below, above, specials, nans])
    got = enc(x, "F16")
    assert_bits(got, _cast(x, np.float16), x)
    # the scalar cast agrees too
    for v in np.concatenate([specials, nans, rng.choice(mid, 200)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.float32(v).astype(np.float16).view(np.uint16)
        assert enc(np.array([v], np.float32), "F16")[0] == ref, hex(int(np.float32(v).view(np.uint32)))
    fixed = enc(np.array([65520.0, 65519.99, -65520.0, 2.0**-25, 2.0**-24], np.float32), "F16")
    assert fixed.tolist() == [0x7C00, 0x7BFF, 0xFC00, 0x0000, 0x0001]
    # NumPy's NaN convention: sign | 0x7C00 | top payload bits, 0x7C01 if those are 0
    assert enc(nans, "F16").tolist() == [0x7E00, 0x7C01, 0xFC01, 0x7FFF, 0x7C07, 0xFD5E, 0x7C01, 0x7C01]


@needs_ml
@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1, max_size=40))
def test_encode_property(values):
    x = np.array(values, dtype=np.float32)
    assert_bits(enc(x, "F16"), _cast(x, np.float16), x)
    assert_bits(enc(x, "BF16"), _cast(x, ml_dtypes.bfloat16), x)
    assert_bits(enc(x, "F64"), _cast(x, np.float64), x)


# ------------------------------------------------------------------ FP8


@needs_ml
@pytest.mark.parametrize(
    "code, ml_name, builder",
    [("F8_E4M3", "float8_e4m3fn", dtypes.lut_f8_e4m3), ("F8_E5M2", "float8_e5m2", dtypes.lut_f8_e5m2)],
)
def test_f8_tables_and_decode(code, ml_name, builder):
    ref = ALL8.view(getattr(ml_dtypes, ml_name)).astype(np.float32)
    assert_same_floats(builder(), ref)
    assert_same_floats(dec(ALL8, code), ref)


def test_f8_table_shape():
    e4 = dtypes.lut_f8_e4m3()
    assert np.isnan(e4[[0x7F, 0xFF]]).all() and np.isnan(e4).sum() == 2 and not np.isinf(e4).any()
    assert e4[0x7E] == 448 and e4[0x01] == 2.0**-9 and e4[0x80] == 0 and np.signbit(e4[0x80])
    e5 = dtypes.lut_f8_e5m2()
    assert e5[0x7C] == np.inf and e5[0xFC] == -np.inf and np.isnan(e5).sum() == 6
    assert e5[0x7B] == 57344 and e5[0x01] == 2.0**-16


# ------------------------------------------------------------------ F32 / F64


def test_f64_decode_matches_astype(rng):
    n = 1 << 19
    bits = rng.integers(0, 2**64, n, dtype=np.uint64)
    # concentrate exponents around float32's range: overflow, subnormal, underflow
    exp = rng.integers(1023 - 160, 1023 + 132, n, dtype=np.uint64)
    near = (bits & np.uint64(0x800FFFFFFFFFFFFF)) | (exp << np.uint64(52))
    # exact float32 ties: 29 dropped bits = 1 followed by zeros
    ties = (near & ~np.uint64((1 << 29) - 1)) | np.uint64(1 << 28)
    extra = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4028235677973366e38, 3.4028235e38 * 1.0000001,
                      1e-46, 7e-46, 2.0**-149, 2.0**-150, 2.0**-150 * 1.0000001], dtype=np.float64)
    x = np.concatenate([bits.view(np.float64), near.view(np.float64), ties.view(np.float64), extra])
    x = np.concatenate([x, np.frombuffer(np.array([0x7FF0000000000001, 0xFFF8000000000123], np.uint64).tobytes(), np.float64)])
    assert_bits(dec(x, "F64"), _cast(x, np.float32), x)


def test_f32_and_f64_encode_exact(random_f32_bits):
    x = random_f32_bits.view(np.float32)
    assert_bits(enc(x, "F32"), x)
    assert_bits(dec(x, "F32"), x)
    assert_bits(enc(x, "F64"), _cast(x, np.float64))
    finite = x[np.isfinite(x)]
    assert_bits(dec(enc(finite, "F64"), "F64"), finite)  # widening then rounding is the identity


# ------------------------------------------------------------------ base / task vectors


@needs_ml
@pytest.mark.parametrize("code", DECODABLE)
def test_decode_with_base(code, rng):
    n = 100_003
    f = (rng.standard_normal(n) * 3).astype(np.float32)
    f[:4] = [np.inf, -np.inf, np.nan, 0.0]
    raw = {
        "BF16": lambda: f.astype(ml_dtypes.bfloat16).view(np.uint16),
        "F16": lambda: f.astype(np.float16).view(np.uint16),
        "F8_E4M3": lambda: rng.integers(0, 256, n, dtype=np.uint8),
        "F8_E5M2": lambda: rng.integers(0, 256, n, dtype=np.uint8),
        "F32": lambda: f.copy(),
        "F64": lambda: f.astype(np.float64) * (1 + 1e-9),
    }[code]()
    base = rng.standard_normal(n).astype(np.float32)
    base[4:8] = [np.inf, 0.0, -0.0, np.nan]
    plain = dec(raw, code)
    with np.errstate(invalid="ignore"):
        expected = plain - base
    assert_same_floats(dec(raw, code, base), expected)
    # in place: out is base
    work = base.copy()
    decode(raw, code, work, work)
    assert_same_floats(work, expected)


# ------------------------------------------------------------------ memory layout


@pytest.mark.parametrize("code, storage", [("BF16", np.uint16), ("F16", np.uint16), ("F8_E5M2", np.uint8),
                                           ("F32", np.float32), ("F64", np.float64)])
def test_unaligned_readonly_input(code, storage, rng, tmp_path):
    n = 10_001
    payload = rng.integers(0, 256, n * np.dtype(storage).itemsize, dtype=np.uint8).tobytes()
    aligned = np.frombuffer(payload, dtype=storage)
    blob = b"\x00" + payload  # odd byte offset
    view = np.frombuffer(blob, dtype=storage, offset=1, count=n)
    assert not view.flags.writeable and (storage == np.uint8 or not view.flags.aligned)
    base = rng.standard_normal(n).astype(np.float32)
    ref = dec(aligned, code)
    assert_bits(dec(view, code), ref)
    with np.errstate(invalid="ignore"):
        assert_same_floats(dec(view, code, base), ref - base)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    mm = np.memmap(path, dtype=storage, mode="r", offset=1, shape=(n,))
    assert_bits(dec(mm, code), ref)
    del mm


def test_unaligned_encode_output_and_source():
    x = np.linspace(-70000, 70000, 5001, dtype=np.float32)
    for code in ENCODABLE:
        storage = dtypes.DTYPES[code].storage
        buf = np.zeros(x.size * storage.itemsize + 1, np.uint8)
        out = buf[1:].view(storage)
        encode(x, code, out)
        assert_bits(out, enc(x, code))
        sbuf = np.zeros(x.size * 4 + 1, np.uint8)
        src = sbuf[1:].view(np.float32)
        src[:] = x
        assert_bits(enc(src, code), enc(x, code))


def test_one_signature_per_kernel_and_dtype():
    k = dtypes._kernels()
    x = np.arange(64, dtype=np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    raw = x.astype(np.float16).view(np.uint16)
    for src in (raw, raw[1:-1], np.frombuffer(b"\x00" + raw.tobytes(), np.uint16, offset=1), raw.reshape(8, 8)):
        dec(src, "BF16"), dec(src, "F16"), dec(src, "BF16", np.ones(src.size, np.float32))
        dec(src.view(np.float16), "F16")
    dec(x, "F32"), dec(ro, "F32", ro), enc(x, "BF16"), enc(ro, "BF16"), enc(ro, "F16"), enc(ro, "F32"), enc(ro, "F64")
    dec(_cast(x, np.float64), "F64"), dec(np.zeros(8, np.uint8), "F8_E4M3"), dec(np.zeros(8, np.uint8), "F8_E5M2")
    counts = {name: len(getattr(k, name).signatures) for name in
              ("decode_bf16", "decode_f32", "decode_f64", "encode_bf16", "encode_f16", "encode_f32", "encode_f64")}
    assert counts == dict.fromkeys(counts, 1)
    assert len(k.decode_lut.signatures) == 2  # uint16 and uint8 sources
    for sig in k.decode_bf16.signatures:
        assert not sig[0].mutable and not sig[1].mutable and sig[2].mutable


# ------------------------------------------------------------------ errors


def test_errors():
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="cannot decode"):
        decode(np.zeros(4, np.int32), "I32", x)
    with pytest.raises(ValueError, match="cannot decode"):
        decode(np.zeros(4, np.uint8), "F8_E8M0", x)
    with pytest.raises(ValueError, match="cannot encode"):
        encode(x, "F8_E4M3", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        decode(np.zeros(4, np.float32), "BF16", x)
    with pytest.raises(ValueError, match="elements"):
        decode(np.zeros(5, np.uint16), "BF16", x)
    with pytest.raises(ValueError, match="elements"):
        decode(np.zeros(4, np.uint16), "BF16", x, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="float32"):
        decode(np.zeros(4, np.uint16), "BF16", np.zeros(4, np.float64))
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        decode(np.zeros(4, np.uint16), "BF16", ro)
    with pytest.raises(ValueError, match="contiguous"):
        decode(np.zeros(8, np.uint16)[::2], "BF16", x)
    with pytest.raises(ValueError, match="overlaps"):
        big = np.zeros(8, np.float32)
        decode(big[:4], "F32", big[2:6])
    with pytest.raises(ValueError, match="overlaps"):
        buf = np.zeros(8, np.float32)
        encode(buf, "BF16", buf.view(np.uint16)[:8])
    decode(np.zeros(0, np.uint16), "BF16", np.zeros(0, np.float32))  # empty is a no-op
    encode(np.zeros(0, np.float32), "F16", np.zeros(0, np.uint16))


# ------------------------------------------------------------------ processes


def test_import_does_not_import_numba():
    _child("import npmerge, npmerge.dtypes, sys; assert 'numba' not in sys.modules, 'numba imported'", {})


def test_thread_counts_give_identical_results():
    code = """
        import hashlib, numba, numpy as np, os
        from npmerge.dtypes import decode, encode
        assert numba.config.NUMBA_NUM_THREADS == int(os.environ["NUMBA_NUM_THREADS"])
        rng = np.random.default_rng(7)
        n = 1_000_003
        x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        base = rng.standard_normal(n).astype(np.float32)
        h = hashlib.sha256()
        for code in ("BF16", "F16"):
            o = np.empty(n, np.uint16); encode(x, code, o); h.update(o.tobytes())
            f = np.empty(n, np.float32); decode(o, code, f, base); h.update(f.tobytes())
        f = np.empty(n, np.float32); decode(x.astype(np.float64), "F64", f); h.update(f.tobytes())
        print(h.hexdigest())
    """
    one = _child(code, {"NUMBA_NUM_THREADS": "1"}).stdout.strip()
    two = _child(code, {"NUMBA_NUM_THREADS": "2"}).stdout.strip()
    assert one == two and len(one) == 64


def test_cache_falls_back_to_writable_dir(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = """
        import os, sys
        from pathlib import Path
        import numpy as np
        import npmerge.kernels as K

        home_cache = Path.home() / ".cache" / "npmerge" / "numba"
        refused = {K._PACKAGE_DIR / "__pycache__", home_cache}
        real = K._writable
        K._writable = lambda p: False if Path(p) in refused else real(Path(p))

        chosen = K.ensure_cache_dir()
        assert chosen is not None
        assert Path(chosen) == K.cache_dir_candidates()[2], chosen
        assert Path(chosen).is_relative_to(os.environ["TMPDIR"]), chosen
        assert os.environ["NUMBA_CACHE_DIR"] == chosen
        assert os.access(chosen, os.W_OK)
        assert "numba" not in sys.modules

        from npmerge.dtypes import decode
        raw = np.array([0x3F80, 0xC000, 0x7F80], np.uint16)
        out = np.empty(3, np.float32)
        decode(raw, "BF16", out)
        assert out.tolist() == [1.0, -2.0, float("inf")], out
        import numba
        assert numba.config.CACHE_DIR == chosen
        files = [p.name for p in Path(chosen).rglob("*") if p.is_file()]
        assert any(f.endswith(".nbi") for f in files), files
        print(chosen)
    """
    try:
        proc = _child(code, {"HOME": str(home), "XDG_CACHE_HOME": None, "NUMBA_CACHE_DIR": None, "TMPDIR": str(tmp)})
    finally:
        home.chmod(0o755)
    assert proc.stdout.strip().startswith(str(tmp))
