"""Paged KV blocks: allocation, reference counts and prefix caching.

A full block's hash chains its parent's hash with its token ids; a lookup hit is confirmed
on the token ids and parent hash. Blocks are reference-counted so parallel samples and
shared prefixes share pages. Freed blocks keep their hash and stay reusable until evicted:
the free queue is LRU (evict from the front; a freed sequence's tail goes in first, so its
prefix survives longest). A freed block that caches nothing (no hash: a partial last block, or
any block with prefix caching off) goes to the front instead: it is handed out again before a
cached block and before a never-used one, whose pages the process has not touched yet (on CPU
every newly used page adds to the server's RSS). With prefix caching off, hash chains are
rooted in the request id, so only a request's own parallel samples share its prompt pages.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once every token in the block is scheduled
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @staticmethod
    def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent_hash, token_ids))

    def _root_hash(self, seq: Sequence) -> int | None:
        if not self.enable_prefix_caching:
            return hash(("request", seq.request.request_id))
        lora = seq.request.lora_request  # two adapters never share a page: their K/V differ
        return None if lora is None else hash(("lora", lora.lora_int_id))

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Leading full blocks of seq already in the cache: (block ids, tokens they hold).

        At least one token is always left to compute, so the last block of a prompt that is
        a whole number of blocks is never taken from the cache.
        """
        if seq.block_table or (not self.enable_prefix_caching and seq.request.params.n == 1):
            return [], 0
        bs = self.block_size
        num_full = (seq.num_tokens - 1) // bs
        parent = root = self._root_hash(seq)
        hits: list[int] = []
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:
                break
            hits.append(block_id)
            parent = h
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(hits) * bs
        return hits, len(hits) * bs

    def allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Give seq pages for num_new_tokens more tokens (after any computed_blocks, which are
        prepended to its table). False, with nothing changed, when pages run out: preempt."""
        bs = self.block_size
        computed_blocks = computed_blocks or []
        num_computed = seq.num_computed_tokens + len(computed_blocks) * bs
        num_needed = -(-(num_computed + num_new_tokens) // bs) - len(seq.block_table) - len(computed_blocks)
        if computed_blocks or num_needed > 0:  # else its pages hold these tokens already (most decode steps)
            # computed blocks with no users sit in the free queue: touching them uses them up
            num_touched_free = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
            if num_needed > self.num_free_blocks - num_touched_free:
                return False
            for block_id in computed_blocks:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_queue[block_id]
                block.ref_count += 1
            seq.block_table.extend(computed_blocks)
            seq.num_computed_tokens = num_computed
            for _ in range(max(0, num_needed)):
                seq.block_table.append(self._pop_free_block())
        if self.enable_prefix_caching or seq.request.params.n > 1:
            # a placeholder token (async scheduling) is not known yet: its block waits
            self._cache_full_blocks(seq, min(num_computed + num_new_tokens, seq.num_tokens))
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
            del self.cached[block.block_hash]
        block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        block.ref_count = 1
        return block_id

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register every block whose tokens are all scheduled: within a forward pass each
        layer stores all K/V before attending, so a block is readable from this step on."""
        bs = self.block_size
        start = seq.num_hashed_blocks
        if num_tokens // bs <= start:  # no block filled since the last call (most decode steps)
            return
        parent = self.blocks[seq.block_table[start - 1]].block_hash if start else self._root_hash(seq)
        for i in range(start, num_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block.block_hash, block.parent_hash, block.token_ids = self.chain_hash(parent, tokens), parent, tokens
                self.cached.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash
        seq.num_hashed_blocks = max(start, num_tokens // bs)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
