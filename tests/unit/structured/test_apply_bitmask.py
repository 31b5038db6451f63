"""apply_bitmask's CPU path for sparse rows (the allowed tokens unpacked from the nonzero words) gives
exactly xgrammar's kernel's result: -inf on every disallowed token, every allowed logit untouched."""
from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from scaleinfer.structured.bitmask import BatchMask, apply_bitmask


def _bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> xgrammar's [B, ceil(V / 32)] int32 bitmask."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, (vocab + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


@pytest.mark.parametrize("vocab", [4096, 4093, 49152])
@pytest.mark.parametrize("density", [0.0, 0.0005, 0.01, 0.3, 0.999])
def test_apply_equals_xgrammars_kernel(vocab, density):
    gen = torch.Generator().manual_seed(vocab + int(density * 1e4))
    allowed = torch.rand(4, vocab, generator=gen) < density
    allowed[1, [0, 31, 32, vocab - 1]] = True          # first / last bit of a word, the last token
    allowed[2] = False
    allowed[2, 31::32] = True                           # only bit 31 (the int32 sign bit) of each word
    bitmask = _bitmask(allowed)
    logits = torch.randn(4, vocab, generator=gen)
    logits[0, 5] = float("nan")
    for rows in ([0, 1, 2, 3], [1, 3]):
        ours, theirs = logits.clone(), logits.clone()
        apply_bitmask(ours, BatchMask(bitmask, rows))
        xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=rows)
        assert torch.equal(ours.nan_to_num(7.0), theirs.nan_to_num(7.0))
        for row in rows:
            assert torch.equal(torch.isfinite(ours[row]) | ours[row].isnan(), allowed[row])
        untouched = [r for r in range(4) if r not in rows]
        assert torch.equal(ours[untouched].nan_to_num(7.0), logits[untouched].nan_to_num(7.0))


def test_a_row_view_of_a_wider_batch_is_masked_in_place():
    logits = torch.randn(3, 64)
    view = logits[:2]                                   # the sampler's rows of a batch with draft rows after
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, 3] = allowed[1, 63] = True
    with torch.inference_mode():
        inference_logits = logits.clone()
        apply_bitmask(inference_logits[:2], BatchMask(_bitmask(allowed), [0, 1]))
    apply_bitmask(view, BatchMask(_bitmask(allowed), [0, 1]))
    for out in (logits, inference_logits):
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [3]
        assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [63]
        assert torch.isfinite(out[2]).all()
