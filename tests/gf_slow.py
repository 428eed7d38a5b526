"""An independent, deliberately slow GF(2^8) and Cauchy Reed-Solomon encoder for known-answer tests.

Written from the definitions only (carry-less multiply, reduce by 0x11d, inverse by search), sharing
no code with the package."""


def mul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return product


def inv(a: int) -> int:
    return next(x for x in range(1, 256) if mul(a, x) == 1)


def cauchy_parity(data: list[bytes], parity_shards: int) -> list[bytes]:
    k = len(data)
    out = []
    for i in range(k, k + parity_shards):
        coefs = [inv(i ^ j) for j in range(k)]
        out.append(bytes(_dot(coefs, column) for column in zip(*data)))
    return out


def xor_parity(data: list[bytes]) -> bytes:
    return bytes(_dot([1] * len(data), column) for column in zip(*data))


def _dot(coefs: list[int], column: tuple[int, ...]) -> int:
    acc = 0
    for c, x in zip(coefs, column):
        acc ^= mul(c, x)
    return acc
