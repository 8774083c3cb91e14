"""Spec numbers for the FP4 element formats and their scale formats, in one place.

Bit numbering: bit 0 is the least significant bit of a code. A 4-bit code is
``s e1 e0 m0`` (bit 3 = sign, bits 2..1 = exponent, bit 0 = mantissa) for E2M1.
"""

# --- E2M1 (OCP Microscaling Formats v1.0, section 5.3.3) -------------------------
E2M1_EXP_BITS = 2
E2M1_MAN_BITS = 1
E2M1_EXP_BIAS = 1
E2M1_MAX = 6.0  # 0b0111: exponent 11, mantissa 1 -> 2^(3-1) * 1.5
E2M1_MIN_NORMAL = 1.0  # 0b0010
E2M1_MIN_SUBNORMAL = 0.5  # 0b0001: exponent 00, mantissa 1 -> 2^(1-1) * 0.5
E2M1_EMAX = 2  # unbiased exponent of the largest value: 6 = 1.5 * 2^2
SIGN_MASK = 0b1000  # bit 3
EXP_MASK = 0b0110  # bits 2..1
MAN_MASK = 0b0001  # bit 0
MAGNITUDE_MASK = 0b0111

# --- E4M3 (OCP 8-bit floating point, "fn" variant: no Inf, one NaN pattern) -------
E4M3_MAX = 448.0  # 0b0_1111_110
E4M3_MIN_NORMAL = 2.0**-6  # 0b0_0001_000
E4M3_MIN_SUBNORMAL = 2.0**-9  # 0b0_0000_001
NVFP4_4OVER6_SCALE_MAX = 256.0  # 4/6: block scales sized for a maximum of 256, so amax/4 still fits in E4M3
NVFP4_4OVER6_TARGET = 4.0  # 4/6's second candidate maps the block maximum to 4 instead of 6
NVFP4_4OVER6_EXPAND = 1.5  # Transformer Engine (2026) makes 4/6's second candidate as the first's ideal scale times 6/4
E2M1_MAX_RCP = 0.1666666716337204  # 1/6 rounded to float32 (0x3E2AAAAB): Transformer Engine (2026) multiplies by it

# --- E5M2 (OCP 8-bit floating point, IEEE-like: Inf and NaN) -----------------------
E5M2_MAX = 57344.0  # 0b0_11110_11

# --- E8M0 (OCP MX shared scale: unsigned, exponent only) ---------------------------
E8M0_EXP_BIAS = 127
E8M0_MIN_EXP = -127  # 0b0000_0000 -> 2^-127
E8M0_MAX_EXP = 127  # 0b1111_1110 -> 2^127
E8M0_NAN = 0xFF  # 0b1111_1111

# --- Block sizes ---------------------------------------------------------------
MX_BLOCK_SIZE = 32  # OCP MX v1.0: k = 32 elements share one scale
NVFP4_BLOCK_SIZE = 16  # NVFP4: 16 elements share one E4M3 scale
NVFP4_TILE = 16  # optional 16x16 tile of a weight matrix sharing one scale
BNB_DEFAULT_BLOCK_SIZE = 64
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_NESTED_BLOCK_SIZE = 256  # bitsandbytes quantizes absmax in blocks of 256

# --- Storage widths in bits ----------------------------------------------------
FP4_BITS = 4
FP32_BITS = 32
SCALE8_BITS = 8

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_EXP_BIAS = 127  # float32: 1 sign, 8 exponent (bias 127), 23 mantissa bits
FLOAT32_MAN_BITS = 23
BNB_ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps a block's absmax to at least this before dividing
