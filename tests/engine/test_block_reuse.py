"""Which free KV block comes next (issue 23): one that caches nothing is handed out again before a
never-used one (whose pages the process has not touched: on CPU each adds to the RSS) and before a
cached one (so the prefix cache loses nothing); cached blocks keep their LRU order."""
from __future__ import annotations

from engine.block_manager import BlockManager
from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams
from engine.sequence import Request, Sequence

BLOCK = 4


def _seq(rid: str, prompt: list[int]) -> Sequence:
    sp = SamplingParams(max_tokens=4)
    req = Request(rid, None, list(prompt), sp, RequestMetrics(0.0), 4)
    seq = Sequence(rid, req, 0, list(prompt), len(prompt))
    req.seqs.append(seq)
    return seq


def _admit(bm: BlockManager, seq: Sequence) -> list[int]:
    hits, _ = bm.get_computed_blocks(seq)
    assert bm.allocate(seq, seq.num_tokens - len(hits) * BLOCK, hits)
    return list(seq.block_table)


def test_a_freed_partial_block_is_reused_before_a_never_used_one() -> None:
    bm = BlockManager(16, BLOCK, enable_prefix_caching=True)
    a = _seq("a", list(range(100, 106)))  # one full block (cached) and a partial one
    full, partial = _admit(bm, a)
    bm.free(a)
    b = _seq("b", list(range(200, 203)))  # one partial block
    assert _admit(bm, b) == [partial]  # not block 2, which no request has used
    # a's full block is still cached: the same prompt finds it
    again = _seq("a2", list(range(100, 106)))
    assert bm.get_computed_blocks(again) == ([full], BLOCK)


def test_without_prefix_caching_the_touched_blocks_are_reused() -> None:
    bm = BlockManager(64, BLOCK, enable_prefix_caching=False)
    touched: set[int] = set()
    for i in range(20):  # one request after another, 3 blocks each
        s = _seq(f"r{i}", [7] * 10)
        touched.update(_admit(bm, s))
        bm.free(s)
    assert len(touched) == 3  # LRU order alone went through 60 of the 64 blocks


def test_cached_blocks_keep_lru_order() -> None:
    bm = BlockManager(4, BLOCK, enable_prefix_caching=True)
    first = _seq("x", list(range(10, 15)))  # a full block and a partial one
    x_full, _ = _admit(bm, first)
    bm.free(first)
    second = _seq("y", list(range(30, 35)))
    y_full, _ = _admit(bm, second)
    bm.free(second)
    # two blocks cache x's and y's prefixes; a request needing three takes the uncached and the
    # never-used block first, then evicts the older cached block (x's), keeping y's
    big = _seq("z", list(range(50, 62)))
    blocks = _admit(bm, big)
    assert x_full in blocks and y_full not in blocks
    assert bm.get_computed_blocks(_seq("y2", list(range(30, 35))))[0] == [y_full]
