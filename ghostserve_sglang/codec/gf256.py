"""Arithmetic in GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d).

Only small matrices (at most 256 x 256 coefficients) are handled here, in plain Python; bulk data goes
through a backend. The parity matrix is the systematic Cauchy matrix that Intel ISA-L's
``gf_gen_cauchy1_matrix`` produces, so our parity bytes equal ISA-L's for the same input.
"""

from __future__ import annotations

POLYNOMIAL = 0x11D

Matrix = list[list[int]]


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for power in range(255):
        exp[power] = x
        log[x] = power
        x <<= 1
        if x & 0x100:
            x ^= POLYNOMIAL
    for power in range(255, 512):
        exp[power] = exp[power - 255]
    return exp, log


EXP, LOG = _tables()


def mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return EXP[LOG[a] + LOG[b]]


def inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return EXP[255 - LOG[a]]


def cauchy_parity_rows(data_shards: int, parity_shards: int) -> Matrix:
    """The parity rows of ISA-L's ``gf_gen_cauchy1_matrix``: row i, column j holds 1 / (i XOR j) for
    i in [k, k + m) and j in [0, k). The identity rows above them are implicit (systematic code)."""
    total = data_shards + parity_shards
    return [[inv(i ^ j) for j in range(data_shards)] for i in range(data_shards, total)]


def invert(matrix: Matrix) -> Matrix:
    """Gauss-Jordan inverse of a square matrix; raises ValueError if it is singular."""
    n = len(matrix)
    work = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if work[r][col]), None)
        if pivot is None:
            raise ValueError("matrix is singular")
        work[col], work[pivot] = work[pivot], work[col]
        scale = inv(work[col][col])
        work[col] = [mul(scale, v) for v in work[col]]
        for r in range(n):
            factor = work[r][col]
            if r != col and factor:
                work[r] = [v ^ mul(factor, p) for v, p in zip(work[r], work[col])]
    return [row[n:] for row in work]


def matmul(a: Matrix, b: Matrix) -> Matrix:
    out = []
    for row in a:
        acc = [0] * len(b[0])
        for coef, brow in zip(row, b):
            if coef:
                acc = [x ^ mul(coef, y) for x, y in zip(acc, brow)]
        out.append(acc)
    return out
