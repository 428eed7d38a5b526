"""Vectorised torch reference of the GF(2^8) matrix product; runs on any device torch supports.

Bytes are processed eight at a time as int64 words: multiplying every byte of a word by x (``xtime``)
is a shift, a mask and a multiply by the reduction constant, with no carries between bytes. A product
with a coefficient c is the XOR of the xtime powers selected by c's bits.
"""

from __future__ import annotations

import torch

from ..gf256 import POLYNOMIAL, Matrix

_LOW7 = 0x7F7F7F7F7F7F7F7F
_LSBS = 0x0101010101010101
_REDUCE = POLYNOMIAL & 0xFF


def _xtime_(words: torch.Tensor, scratch: torch.Tensor) -> None:
    torch.bitwise_right_shift(words, 7, out=scratch)
    scratch.bitwise_and_(_LSBS).mul_(_REDUCE)
    words.bitwise_and_(_LOW7).bitwise_left_shift_(1).bitwise_xor_(scratch)


def _as_words(buf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """An int64 view of a 1-D uint8 tensor, or a zero-padded int64 copy when a view is impossible."""
    n = buf.numel()
    if n % 8 == 0 and buf.storage_offset() % 8 == 0:
        return buf.view(torch.int64), False
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=buf.device)
    padded[:n] = buf
    return padded.view(torch.int64), True


class TorchBackend:
    name = "torch"

    def apply(self, matrix: Matrix, sources: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """outputs[i] = XOR over j of matrix[i][j] * sources[j] in GF(2^8), on 1-D uint8 tensors."""
        if outputs[0].numel() == 0:
            return
        out_words = [_as_words(o) for o in outputs]
        acc: list[torch.Tensor | None] = [None] * len(outputs)

        def add(i: int, term: torch.Tensor) -> None:
            if acc[i] is None:
                acc[i] = out_words[i][0]
                acc[i].copy_(term)
            else:
                acc[i].bitwise_xor_(term)

        scratch = None
        for j, source in enumerate(sources):
            coefs = [row[j] for row in matrix]
            words, _ = _as_words(source)
            if max(coefs) > 1:
                words = words.clone()
                scratch = torch.empty_like(words) if scratch is None else scratch
            for bit in range(8):
                for i, coef in enumerate(coefs):
                    if coef >> bit & 1:
                        add(i, words)
                if not any(coef >> (bit + 1) for coef in coefs):
                    break
                _xtime_(words, scratch)
        for i, (words, padded) in enumerate(out_words):
            if acc[i] is None:
                words.zero_()
            if padded:
                outputs[i].copy_(words.view(torch.uint8)[: outputs[i].numel()])
