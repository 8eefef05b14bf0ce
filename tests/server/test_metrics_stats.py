"""freshest_stats: with several API processes, /metrics answers with the freshest copy of the core's
stats any process holds, and every counter at the largest value any copy holds (never lower than what
another process's scrape exported)."""
from __future__ import annotations

import os
from pathlib import Path

import msgspec

from engine.core_messages import SchedulerStats
from engine.server.metrics import STATS_FILE_PREFIX, freshest_stats

COUNTERS = ["prompt_tokens_total", "generation_tokens_total"]


def _sibling(tmp_path: Path, pid: int, stats: SchedulerStats) -> None:
    (tmp_path / f"{STATS_FILE_PREFIX}{pid}.msgpack").write_bytes(msgspec.msgpack.encode(stats))


def test_a_lagging_copy_answers_with_the_freshest(tmp_path: Path) -> None:
    _sibling(tmp_path, 1, SchedulerStats(num_running=3, num_steps=12, prompt_tokens_total=40, generation_tokens_total=90))
    mine = SchedulerStats(num_running=1, num_steps=10, prompt_tokens_total=40, generation_tokens_total=80)
    got = freshest_stats(mine, str(tmp_path), COUNTERS)
    assert (got.num_running, got.generation_tokens_total) == (3, 90)


def test_this_copy_wins_a_tie_and_counters_never_go_back(tmp_path: Path) -> None:
    _sibling(tmp_path, 1, SchedulerStats(num_waiting=2, num_steps=7, generation_tokens_total=50))
    (tmp_path / f"{STATS_FILE_PREFIX}2.msgpack").write_bytes(b"\x00not msgpack")  # ignored
    mine = SchedulerStats(num_waiting=0, num_steps=7, generation_tokens_total=49, prompt_tokens_total=5)
    got = freshest_stats(mine, str(tmp_path), COUNTERS)
    assert (got.num_waiting, got.generation_tokens_total, got.prompt_tokens_total) == (0, 50, 5)
    # this process's copy is left for the others
    assert (tmp_path / f"{STATS_FILE_PREFIX}{os.getpid()}.msgpack").exists()
