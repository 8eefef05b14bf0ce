"""A long prefill chunk's attention through cuDNN's fused attention (one of torch's SDPA backends).

Our Triton kernel reads the pages at ~55% of the H200's matmul rate; cuDNN's flash kernel runs at ~87%
on contiguous K/V. A chunk of CUDNN_MIN_QUERY or more new tokens at least KEY_PIECES[-1] deep splits its
keys in two parts:
- the keys before it, as far as whole pieces of KEY_PIECES' sizes reach (largest first), are gathered out
  of the pages (0.13 ms for 112K tokens of 4 KV heads, against ~22 ms of attention); each piece is one
  unmasked cuDNN call with a KV head's query heads stacked on the rows ([1, num_kv_heads, G * n, D]: each
  K/V tile read once), or PIECE_BATCHES of equal pieces share one call as its batch (the queries repeated);
- the rest (the keys past the last piece, `rem` of them, then the chunk's own) is one causal cuDNN call on a
  square: the queries sit on its last n rows (the first rem rows are zero queries whose outputs are dropped),
  so top-left causal masking gives each new token exactly the keys up to itself. When rem is large against n
  those dropped rows cost more than the Triton kernel's slower rate saves, and the rest goes to the Triton
  kernel as split partials instead (rest_on_cudnn).
One merge by log-sum-exp (gantry_kernels/lse_merge.py) reads cuDNN's outputs where they lie and ends it. cuDNN
builds an execution plan per shape (~75 ms on the H200, a stall mid-serve), so the shapes are few and built
at start (warmup): piece sizes are fixed, a piece's query rows are padded to a ladder of eight sizes per
octave (at most 12.5% more rows) and a causal square's to one of four (the common chunk sizes, powers of
two, sit on it). When the pieces reach the chunk (a long prompt in chunks of 8,192) no key goes through
Triton.
bf16/fp16 pages only (FP8 pages and fp32 take the Triton kernel), head sizes cuDNN supports.
"""
from __future__ import annotations

import functools

import torch
import triton

from gantry_kernels.lse_merge import merge_normalized
from gantry_kernels.prefill_attention import MAX_PREFILL_SPLITS, choose_prefill_splits, prefill_attention

CUDNN_MIN_QUERY = 512  # new tokens of one sequence from which its chunk takes this path
KEY_PIECES = (16384, 8192)  # keys per unmasked cuDNN call, largest first; a chunk less deep than the last stays on Triton
LADDER_STEPS = 8  # padded row counts per octave of a piece's queries (a power of two)
CAUSAL_LADDER_STEPS = 4  # ... and of a causal square's rows: fewer plans, the common sizes are powers of two
# equal pieces per cuDNN call, largest first (a run of 7 with (4, 2, 1): calls of 4, 2 and 1), each a plan per
# row count. A short chunk deep in a long prompt (the mixed steps beside decoding streams: n ~ 650, 4 KV heads
# of 7 query heads, 36 x 4 = 144 tiles of 128 rows) fills 1.09 waves of the H200's 132 SMs in a call of one
# piece, so the second wave runs nearly empty; a batch of pieces fills its waves. (1,): one piece a call.
# Measured on the H200 (a 120K prompt beside 32 decoding streams, budget 4096): TTFT 1.22x alone against
# 1.37x with (1,) in the same run (1.26x in a second run), ITL p99 115 against 132 ms (benchmarks/RESULTS.md).
PIECE_BATCHES = (4, 2, 1)
TRITON_RELATIVE_RATE = 0.6  # the Triton prefill kernel's rate over cuDNN's (H200: 377 against 619 TFLOP/s)
MAX_PARTIAL_BYTES = 3 * 2**30  # a chunk's partials at most (the rest's splits counted at their most)


@functools.cache
def _cudnn_supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """torch's own check of cuDNN attention for this dtype, head size and GPU (cached: shapes only)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not torch.backends.cudnn.is_available():
        return False
    q = torch.empty(1, 1, 128, head_dim, dtype=dtype, device=device)
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False, False)
    return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))


def can_use_cudnn(dtype: torch.dtype, k_cache: torch.Tensor, k_scale: float, v_scale: float) -> bool:
    """Queries of dtype over these pages can take this path: unscaled pages of the same dtype, a head size
    and GPU cuDNN supports."""
    return (k_cache.dtype == dtype and k_scale == 1.0 and v_scale == 1.0
            and _cudnn_supports(dtype, k_cache.shape[-1], k_cache.device))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, h, n, D], k/v [1, h, m, D] (any strides, last dim contiguous), unmasked or top-left causal ->
    (o [1, h, n, D], lse [1, h, n, 1] natural-log float32)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def piece_sizes(prefix: int) -> list[int]:
    """The pieces [0, prefix) is cut into: KEY_PIECES' sizes, largest first, as far as whole ones reach."""
    sizes = []
    for size in KEY_PIECES:
        sizes += [size] * ((prefix - sum(sizes)) // size)
    return sizes


def piece_calls(sizes: list[int], batches: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """(piece size, pieces in the call) per cuDNN call over `sizes` (piece_sizes' list, equal sizes adjacent):
    each run of equal pieces in batches of PIECE_BATCHES, largest first."""
    calls = []
    i = 0
    while i < len(sizes):
        run = 1
        while i + run < len(sizes) and sizes[i + run] == sizes[i]:
            run += 1
        left = run
        for batch in sorted(batches or PIECE_BATCHES, reverse=True):
            while left >= batch:
                calls.append((sizes[i], batch))
                left -= batch
        assert left == 0, "PIECE_BATCHES must include 1"
        i += run
    return calls


def rest_on_cudnn(n: int, rem: int) -> bool:
    """Whether the causal square of rem + n rows (rem of them dropped, padded up its ladder) costs less than
    the Triton kernel's n x (rem + n / 2) at its rate."""
    return padded_rows(rem + n, CAUSAL_LADDER_STEPS) ** 2 / 2 <= n * (rem + n / 2) / TRITON_RELATIVE_RATE


def is_long_chunk(q_len: int, seq_len: int, num_heads: int, head_dim: int) -> bool:
    """Whether a chunk takes this path: CUDNN_MIN_QUERY new tokens or more, at least KEY_PIECES[-1] deep,
    and its partials (each cuDNN output, the rest's float32 splits at their most) within MAX_PARTIAL_BYTES
    (2.3 GB for 8,192 new tokens 112K deep at Qwen2-7B's 28 heads; contexts far past 128K fall back to the
    Triton kernel)."""
    per_row = len(piece_sizes(seq_len - q_len)) * (head_dim * 2 + 4) + MAX_PREFILL_SPLITS * (head_dim + 2) * 4
    return (q_len >= CUDNN_MIN_QUERY and seq_len - q_len >= KEY_PIECES[-1]
            and q_len * num_heads * per_row <= MAX_PARTIAL_BYTES)


def may_hold_long_chunk(max_query_len: int, max_seq_len: int) -> bool:
    """A step's host-side bounds allow a long chunk in it (each sequence is then checked)."""
    return max_query_len >= CUDNN_MIN_QUERY and max_seq_len >= CUDNN_MIN_QUERY + KEY_PIECES[-1]


def padded_rows(n: int, steps: int = LADDER_STEPS) -> int:
    """n rounded up to the ladder steps, steps + 1, ..., 2 * steps - 1 x 2^k (8: at most 12.5% more rows),
    so that cuDNN sees few shapes."""
    step = max(1, 2 ** max(0, n.bit_length() - steps.bit_length()))  # 1 / steps of n's octave
    return -(-n // step) * step


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[rows, heads, D] -> [1, heads, rows, D], strided."""
    return x.transpose(0, 1)[None]


def _keys(kv: torch.Tensor, start: int, size: int, batch: int = 1) -> torch.Tensor:
    """[tokens, num_kv_heads, D] -> `batch` pieces of `size` tokens from start as [batch, num_kv_heads, size, D],
    strided: the layout (strides included) that warmup builds plans for."""
    if batch == 1:
        return _heads_first(kv[start : start + size])
    return kv[start : start + batch * size].unflatten(0, (batch, size)).transpose(1, 2)


def _causal_rest(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor, rem: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's attention over the rem keys before it (from its pages' start) and its own, causal, as one
    square of rem + n rows padded up the ladder -> (o [num_heads, n, D], lse [num_heads, n] natural log), views
    of cuDNN's outputs."""
    n, num_heads, head_dim = query.shape
    _, _, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    size = rem + n
    rows = padded_rows(size, CAUSAL_LADDER_STEPS)
    q = query.new_empty(rows, num_heads, head_dim)
    q[:rem].zero_()
    q[rem:size] = query
    q[size:].zero_()
    kv = []
    for cache in (k_cache, v_cache):
        src = cache.index_select(0, pages).flatten(0, 1)[:size]  # [size, num_kv_heads, D]
        x = query.new_empty(rows, num_heads, head_dim)  # each KV head repeated for its query heads
        x[:size].view(size, num_kv_heads, group, head_dim).copy_(src[:, :, None].expand(size, num_kv_heads, group, head_dim))
        x[size:].zero_()
        kv.append(x)
    o, lse = _sdpa(_heads_first(q), _heads_first(kv[0]), _heads_first(kv[1]), scale, causal=True)
    return o[0, :, rem:size], lse[0, :, rem:size, 0]


def chunk_attention(
    query: torch.Tensor,  # [n, num_heads, D]: one sequence's new tokens
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, D], the chunk already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [1, >= blocks of seq_len] int32: this sequence's pages
    query_start_loc: torch.Tensor,  # [2] int32: [0, n] (device)
    seq_lens: torch.Tensor,  # [1] int32: its context including the chunk (device)
    seq_len: int,  # the same on the host, at least KEY_PIECES[-1] + n
    scale: float,
    out: torch.Tensor,  # [n, num_heads, D], written
) -> None:
    n, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    sizes = piece_sizes(seq_len - n)
    assert sizes, "a chunk less than KEY_PIECES[-1] deep stays on the Triton kernel"
    base = sum(sizes)  # keys [0, base) in pieces; [base, seq_len) the rest
    assert base % block_size == 0, "pieces end on a page boundary"
    first_page = base // block_size
    rem = seq_len - n - base
    sources = []  # (o [num_heads, n, D], lse [num_heads, n]) per cuDNN call
    partials = None
    if rest_on_cudnn(n, rem):
        sources.append(_causal_rest(query, k_cache, v_cache, block_tables[0, first_page : triton.cdiv(seq_len, block_size)],
                                    rem, scale))
    else:
        splits = choose_prefill_splits(triton.cdiv(n, 128) * num_heads, seq_len - base, n * num_heads * (head_dim + 2) * 4,
                                       query.device)
        partials = tuple(torch.empty(shape, dtype=torch.float32, device=query.device)
                         for shape in ((n, num_heads, splits), (n, num_heads, splits), (n, num_heads, splits, head_dim)))
        # the table's rest copied: a row past the first is seldom 16-byte aligned, and Triton compiles per alignment
        prefill_attention(query, k_cache, v_cache, block_tables[:, first_page:].clone(), query_start_loc,
                          seq_lens - base, scale, max_query_len=n, max_seq_len=seq_len - base,
                          num_splits=splits, partials=(*partials, 0))
    k = k_cache.index_select(0, block_tables[0, :first_page]).flatten(0, 1)  # [base, num_kv_heads, D]
    v = v_cache.index_select(0, block_tables[0, :first_page]).flatten(0, 1)
    rows = padded_rows(n)
    q = query.new_zeros(num_kv_heads, group, rows, head_dim)  # rows: (head in group, token), padded
    q[:, :, :n] = query.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.view(1, num_kv_heads, group * rows, head_dim)
    start = 0
    calls = piece_calls(sizes)
    most = max((batch for _, batch in calls), default=1)
    q_rep = q.expand(most, -1, -1, -1).contiguous() if most > 1 else q  # the queries once per piece of a call
    for size, batch in calls:
        qb = q if batch == 1 else q_rep[:batch]  # the largest call's copy serves the smaller ones
        o, lse = _sdpa(qb, _keys(k, start, size, batch), _keys(v, start, size, batch), scale)
        start += batch * size
        # [num_heads, rows, ...] per piece once viewed: head = kv_head * group + head in group
        sources += [(o[b].view(num_heads, rows, head_dim), lse[b].view(num_heads, rows)) for b in range(batch)]
    merge_normalized(out, sources, partials)


def ladder(low: int, high: int, steps: int = LADDER_STEPS) -> list[int]:
    """Every padded row count of n in [low, high]."""
    sizes, n = [], low
    while n <= high:
        sizes.append(padded_rows(n, steps))
        n = sizes[-1] + 1
    return sizes


def warmup(k_cache: torch.Tensor, num_heads: int, dtype: torch.dtype, k_scale: float, v_scale: float,
           max_query_len: int, max_model_len: int) -> None:
    """Build cuDNN's plans for every shape a chunk up to max_query_len may take over these pages (~75 ms
    each; cuDNN keys its plans by shapes and strides, so the layouts are chunk_attention's): each piece size
    at each padded row count, and each causal square (up to max_query_len + KEY_PIECES[-1] - 1 rows);
    nothing when no chunk can take the path."""
    if not can_use_cudnn(dtype, k_cache, k_scale, v_scale) or not may_hold_long_chunk(max_query_len, max_model_len):
        return
    _, _, num_kv_heads, head_dim = k_cache.shape
    device, group, scale = k_cache.device, num_heads // num_kv_heads, head_dim**-0.5
    max_query_len = min(max_query_len, max_model_len - KEY_PIECES[-1])
    for i, size in enumerate(KEY_PIECES):
        longest_run = KEY_PIECES[i - 1] // size - 1 if i else max_model_len // size  # a larger piece takes more
        for batch in PIECE_BATCHES:
            if batch * size + CUDNN_MIN_QUERY > max_model_len or batch > longest_run:
                continue
            k = _keys(torch.zeros(batch * size, num_kv_heads, head_dim, dtype=dtype, device=device), 0, size, batch)
            for rows in ladder(CUDNN_MIN_QUERY, max_query_len):
                _sdpa(torch.zeros(batch, num_kv_heads, group * rows, head_dim, dtype=dtype, device=device), k, k, scale)
    for rows in ladder(CUDNN_MIN_QUERY, max_query_len + KEY_PIECES[-1] - 1, CAUSAL_LADDER_STEPS):
        x = _heads_first(torch.zeros(rows, num_heads, head_dim, dtype=dtype, device=device))
        o, lse = _sdpa(x, x, x, scale, causal=True)
    merge_normalized(torch.empty(rows, num_heads, head_dim, dtype=dtype, device=device), [(o[0], lse[0, ..., 0])])
