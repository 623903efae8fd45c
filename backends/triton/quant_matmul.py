"""Triton weight-only int4 / int8 matmul that dequantises inside the kernel.

Implements ``surgery::int4_linear`` and ``surgery::int8_linear`` (defined with their reference in
backends/ops/quant.py) for CUDA. Weight layout, per output row n and input column k::

    int4: qweight (N, ceil(K/2)) uint8, element 2j in the low nibble, 2j+1 in the high nibble;
          signed two's-complement nibbles when there are no zero points, unsigned otherwise
    int8: qweight (N, K) int8 (symmetric) or uint8 (with zero points)
    w[n, k] = (q[n, k] - z[n, k // group]) * s[n, k // group],  scales (N, G) fp32, zeros uint8

Two paths (the weight bytes dominate traffic at decode, the FLOPs at prefill):

- GEMV (few rows of x): each program owns BLOCK_N output channels of one row of x and streams
  the weight once. When K and the group size are multiples of the codes per 32-bit word (8 for
  int4, 4 for int8; every real layer), the weight is read as int32 words: 16-byte loads, codes cut
  out with a shift and a mask and turned into floats exactly with the 2^23 "magic number" trick
  (OR the code into the mantissa of 8388608.0 and subtract it, no int-to-float conversion), and
  the group scale applied once per word: acc += s * (sum q*x - z * sum x). Otherwise a byte path
  splits each byte into its two nibbles against the even / odd x.
- GEMM (prefill), fp16/bf16 x and word-aligned shapes: ``_dequant_words`` writes the weight once
  in x's dtype and cuBLAS multiplies, exactly the reference's "cast the dequantised weight to x's
  dtype, then F.linear" (H100, 4096 x 4096: 0.31 ms at 256 rows against 2.0 ms for the tiled
  kernel; its strided 2-byte stores are the known bottleneck, docs/bench/kernels.md).
  Otherwise (fp32, odd shapes) BLOCK_M x BLOCK_N tiles: a BLOCK_K slab of the weight is
  dequantised in registers and fed to ``tl.dot`` (fp32 accumulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surgery.backends.triton.common import fp32_dots

GEMV_MAX_ROWS = 4  # at most this many rows of x take the GEMV path
# word path of the GEMV, chosen on an H100 with benchmarks/kernels_tune.py: block_k by bits
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS = 4, {4: 2048, 8: 1024}, 2
# prefill on fp16/bf16: dequantise + cuBLAS (1.7-63x faster than _gemm on an H100)
GEMM_VIA_DEQUANT = True


@triton.jit
def _nibble(byte, high, SIGNED: tl.constexpr):
    code = ((byte >> (high * 4)) & 0xF).to(tl.int32)
    if SIGNED:
        code = tl.where(code >= 8, code - 16, code)
    return code.to(tl.float32)


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, n_ok, col, col_ok, G, GROUP, HAS_ZEROS: tl.constexpr):
    gi = col // GROUP
    m = n_ok[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * G + gi[None, :], mask=m, other=0.0)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs_n[:, None] * G + gi[None, :], mask=m, other=0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    return s, z


@triton.jit
def _gemv_int4(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, G, GROUP, sx_m, sq_n, sy_m,
               SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, (K + 1) // 2, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)  # byte index along K
        k_even = 2 * offs_b
        k_odd = k_even + 1
        ok_e = k_even < K
        ok_o = k_odd < K
        byte = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * sq_n + offs_b[None, :],
                       mask=n_ok[:, None] & ok_e[None, :], other=0)
        xe = tl.load(x_ptr + row * sx_m + k_even, mask=ok_e, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + row * sx_m + k_odd, mask=ok_o, other=0.0).to(tl.float32)
        se, ze = _group_params(s_ptr, z_ptr, offs_n, n_ok, k_even, ok_e, G, GROUP, HAS_ZEROS)
        so, zo = _group_params(s_ptr, z_ptr, offs_n, n_ok, k_odd, ok_o, G, GROUP, HAS_ZEROS)
        we = (_nibble(byte, 0, SIGNED) - ze) * se
        wo = (_nibble(byte, 1, SIGNED) - zo) * so
        acc += tl.sum(we * xe[None, :] + wo * xo[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy_m + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _word_codes(qw_ptr, offs_n, offs_w, m2, sq_n, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """A (BLOCK_N, BLOCK_W) tile of int32 words; signed codes flipped to offset binary, so every
    code is unsigned and a signed layer's zero point is 2^(BITS-1) (see _word_group_params)."""
    words = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * sq_n + offs_w[None, :], mask=m2,
                    other=0)
    if SIGNED:
        if BITS == 4:
            words = words ^ -2004318072  # 0x88888888
        else:
            words = words ^ -2139062144  # 0x80808080
    return words


@triton.jit
def _code_as_float(words, j: tl.constexpr, BITS: tl.constexpr):
    """Code j of every word as fp32, exactly: OR it into the mantissa of 2^23, subtract 2^23."""
    code = ((words >> (BITS * j)) & ((1 << BITS) - 1)) | 0x4B000000
    return code.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _word_group_params(s_ptr, z_ptr, offs_n, n_ok, offs_w, w_ok, G, GROUP, BITS: tl.constexpr,
                       HAS_ZEROS: tl.constexpr):
    """Scale and zero point of each word's group (a group holds whole words)."""
    s, z = _group_params(s_ptr, z_ptr, offs_n, n_ok, offs_w * (32 // BITS), w_ok, G, GROUP,
                         HAS_ZEROS)
    if not HAS_ZEROS:
        z += 1 << (BITS - 1)  # offset binary (_word_codes)
    return s, z


@triton.jit
def _gemv_words(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, G, GROUP, sx_m, sq_n, sy_m,
                BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # qw_ptr: the weight as int32 words, PER_WORD codes each, code j of word w = column PER_WORD*w+j.
    # Partial sums stay per (row, word) until the end: one cross-thread reduction per program.
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n_words = K // PER_WORD
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    for start in range(0, n_words, BLOCK_W):
        offs_w = start + tl.arange(0, BLOCK_W)
        w_ok = offs_w < n_words
        m2 = n_ok[:, None] & w_ok[None, :]
        words = _word_codes(qw_ptr, offs_n, offs_w, m2, sq_n, BITS, SIGNED)
        dot = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_W], dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            xj = tl.load(x_ptr + row * sx_m + offs_w * PER_WORD + j, mask=w_ok,
                         other=0.0).to(tl.float32)
            dot += _code_as_float(words, j, BITS) * xj[None, :]
            xsum += xj
        s, z = _word_group_params(s_ptr, z_ptr, offs_n, n_ok, offs_w, w_ok, G, GROUP, BITS,
                                  HAS_ZEROS)
        acc += s * (dot - z * xsum[None, :])
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy_m + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_words(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, GROUP, sq_n, sw_n,
                   BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # w[n, k] = (q - z) * s in w's dtype, from the int32-word view of the codes (see _gemv_words)
    PER_WORD: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    n_ok = offs_n < N
    w_ok = offs_w < K // PER_WORD
    m2 = n_ok[:, None] & w_ok[None, :]
    words = _word_codes(qw_ptr, offs_n, offs_w, m2, sq_n, BITS, SIGNED)
    s, z = _word_group_params(s_ptr, z_ptr, offs_n, n_ok, offs_w, w_ok, G, GROUP, BITS, HAS_ZEROS)
    rows = offs_n[:, None].to(tl.int64)
    for j in tl.static_range(PER_WORD):
        tl.store(w_ptr + rows * sw_n + offs_w[None, :] * PER_WORD + j,
                 ((_code_as_float(words, j, BITS) - z) * s).to(w_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gemv_int8(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, G, GROUP, sx_m, sq_n, sy_m,
               HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        q = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * sq_n + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        x = tl.load(x_ptr + row * sx_m + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        s, z = _group_params(s_ptr, z_ptr, offs_n, n_ok, offs_k, k_ok, G, GROUP, HAS_ZEROS)
        acc += tl.sum((q - z) * s * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy_m + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, GROUP, sx_m, sq_n, sy_m,
          BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZEROS: tl.constexpr,
          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * sx_m + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = n_ok[:, None] & k_ok[None, :]
        if BITS == 4:
            byte = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * sq_n + offs_k[None, :] // 2,
                           mask=wmask, other=0)
            q = _nibble(byte, (offs_k % 2)[None, :], SIGNED)
        else:
            q = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * sq_n + offs_k[None, :],
                        mask=wmask, other=0).to(tl.float32)
        s, z = _group_params(s_ptr, z_ptr, offs_n, n_ok, offs_k, k_ok, G, GROUP, HAS_ZEROS)
        w = (q - z) * s  # (BLOCK_N, BLOCK_K) fp32
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * sy_m + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                 in_features: int | None = None, gemv_max_rows: int = GEMV_MAX_ROWS,
                 block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None,
                 gemm_via_dequant: bool | None = None) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` with in-kernel dequantisation; GEMV or GEMM by rows.

    Block sizes default per path (GEMV: narrow in N so that a 4096-wide layer still spreads
    over every SM, long in K; GEMM: 32 x 64 x 64 tiles); given ones apply to both paths.
    """
    if gemm_via_dequant is None:
        gemm_via_dequant = GEMM_VIA_DEQUANT
    n = qweight.shape[0]
    k = in_features if bits == 4 else qweight.shape[1]
    g = scales.shape[1]
    if k % g:
        raise ValueError(f"{g} groups do not divide in_features {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    qweight = qweight.contiguous()
    scales = scales.to(torch.float32).contiguous()
    zeros_t = zeros.contiguous() if zeros is not None else scales  # placeholder, never read
    bias_t = bias.contiguous() if bias is not None else scales  # placeholder, never read
    common = (x2, qweight, scales, zeros_t, bias_t, y)
    flags = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    per_word = 32 // bits
    if m <= gemv_max_rows and k % per_word == 0 and (k // g) % per_word == 0:
        block_n, block_k = block_n or GEMV_BLOCK_N, block_k or GEMV_BLOCK_K[bits]
        words = qweight.view(torch.int32)  # rows of K / per_word little-endian words
        _gemv_words[(triton.cdiv(n, block_n), m)](
            x2, words, scales, zeros_t, bias_t, y, n, k, g, k // g, x2.stride(0),
            words.stride(0), y.stride(0), BITS=bits, SIGNED=zeros is None, BLOCK_N=block_n,
            BLOCK_W=max(1, block_k // per_word), num_warps=GEMV_WARPS, **flags)
    elif m <= gemv_max_rows:
        block_n, block_k = block_n or 16, block_k or 256
        if bits == 4:
            _gemv_int4[(triton.cdiv(n, block_n), m)](
                *common, n, k, g, k // g, x2.stride(0), qweight.stride(0), y.stride(0),
                SIGNED=zeros is None, BLOCK_N=block_n, BLOCK_B=block_k // 2, **flags)
        else:
            _gemv_int8[(triton.cdiv(n, block_n), m)](
                *common, n, k, g, k // g, x2.stride(0), qweight.stride(0), y.stride(0),
                BLOCK_N=block_n, BLOCK_K=block_k, **flags)
    elif (m > gemv_max_rows and gemm_via_dequant and k % per_word == 0
          and (k // g) % per_word == 0 and not fp32_dots(x.dtype)):
        # prefill: dequantise once into x's dtype (one read of the codes, one write) and let
        # cuBLAS do the GEMM; the weight bytes are a small share of the traffic at this size
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        words = qweight.view(torch.int32)
        bw = 32
        _dequant_words[(triton.cdiv(n, 32), triton.cdiv(k // per_word, bw))](
            words, scales, zeros_t, w, n, k, g, k // g, words.stride(0), w.stride(0), BITS=bits,
            SIGNED=zeros is None, HAS_ZEROS=zeros is not None, BLOCK_N=32, BLOCK_W=bw,
            num_warps=4)
        torch.matmul(x2, w.T, out=y)
        if bias is not None:
            y += bias
    else:
        block_m, block_n, block_k = block_m or 32, block_n or 64, block_k or 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _gemm[grid](*common, m, n, k, g, k // g, x2.stride(0), qweight.stride(0), y.stride(0),
                    BITS=bits, SIGNED=zeros is None, IEEE=fp32_dots(x.dtype), BLOCK_M=block_m,
                    BLOCK_N=block_n, BLOCK_K=block_k, **flags)
    return y.reshape(*lead, n)


def int4_linear(x, qweight, scales, zeros, bias, in_features, **kw):
    return quant_linear(x, qweight, scales, zeros, bias, 4, in_features, **kw)


def int8_linear(x, qweight, scales, zeros, bias, **kw):
    return quant_linear(x, qweight, scales, zeros, bias, 8, **kw)
