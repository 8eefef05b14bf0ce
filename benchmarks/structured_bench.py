"""Structured outputs vs unconstrained on one GPU (issue 16): the W1 shape (Qwen2-7B, 256 x 512 in,
512 out, random weights: load_format dummy), every request under one JSON schema, then the same
requests unconstrained, in one run on one engine: unconstrained, constrained, unconstrained, prefix
caching off (the same prompts again would hit it); prints one JSON line per figure and the ratio of
the constrained speed to the slower unconstrained run, with the CPU time of the bitmask fill per step
(to compare with the step time: with the overlap on, the fill runs while the forward does).

The stand-in tokenizer has a token for every id of the model's vocabulary (single characters, then
strings of JSON-ish characters), so xgrammar's bitmasks cover a real-sized vocabulary; the schema
requires a long array, so no constrained request ends before max_tokens (the same token count).
    python -m benchmarks.structured_bench [--num-requests 256] [--no-async-scheduling] [--no-bitmask-overlap]
                                          [--no-pipelined-step | --ab-pipelined-step]
    python -m benchmarks.structured_bench --smoke   # a tiny random model on CPU: the plumbing, no figure
Beyond torch and transformers (and triton: xgrammar's bitmask kernel for CUDA tensors) it imports
xgrammar, apache-tvm-ffi, pydantic, pydantic-core, annotated-types and typing-inspection (pydantic
wants typing-extensions >= 4.14.1); no nvcc or ninja (xgrammar's CUDA kernel is not used).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import string
import sys
import time
import traceback
import warnings
from collections.abc import Iterator

import torch

from benchmarks.throughput import (
    QWEN2_TINY,
    Workload,
    make_workload,
    random_prompts,
    write_config,
)

SCHEMA = {"type": "object", "properties": {"log": {"type": "array", "minItems": 400, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "level": {"enum": ["info", "warn", "error"]},
                                     "msg": {"type": "string", "maxLength": 24}},
    "required": ["id", "level", "msg"]}}}, "required": ["log"]}
# --smoke: a Qwen2 of a few hundred thousand parameters over a vocabulary still large enough for the bitmask
TINY = {**QWEN2_TINY, "vocab_size": 4096}


def write_json_tokenizer(path: str, vocab_size: int, seed: int) -> None:
    """A WordLevel tokenizer of vocab_size distinct tokens: printable characters, then random 2-8
    character strings of letters, digits and JSON punctuation (EOS is id 2, as in write_config)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + '{}[]",: .-_'
    tokens = ["<unk>", "<s>", "</s>"] + [c for c in string.printable if c not in "\x0b\x0c"]
    seen = set(tokens)
    while len(tokens) < vocab_size:
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def synchronizing_calls() -> Iterator[collections.Counter]:
    """Counts the host stacks of CUDA calls that wait for the device (torch's sync debug mode)."""
    seen: collections.Counter = collections.Counter()
    if not torch.cuda.is_available():
        yield seen
        return

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        seen["".join(traceback.format_stack(limit=8)[:-2])] += 1

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = previous


def timed_run(llm, prompts: list[list[int]], params: list) -> tuple[float, int, list[str]]:
    _sync()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs), [o.outputs[0].finish_reason for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, help="default 256 (8 with --smoke)")
    parser.add_argument("--output-len", type=int, help="default 512 (16 with --smoke)")
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--no-bitmask-overlap", action="store_true",
                        help="fill each bitmask before queuing its step's forward (the old path), to compare")
    parser.add_argument("--no-pipelined-step", action="store_true",
                        help="fill the bitmask on the loop's thread, then schedule the next step at the next call "
                        "(the path before the pipelined step; GANTRY_PIPELINED_STEP=0 does the same)")
    parser.add_argument("--ab-pipelined-step", action="store_true",
                        help="a second constrained run without the pipelined step, in the same call (A/B on one "
                        "engine: runs of separate calls differed by 20%%)")
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to use instead of the random "
                        "stand-in vocabulary (e.g. a real BPE one; ids past its size are never allowed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grammar-threads", type=int, help="threads of xgrammar's batch fill (its default: "
                        "half the hardware threads)")
    parser.add_argument("--profile", action="store_true", help="print the constrained run's host ops (torch.profiler)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model (8 requests x 16 tokens by default), CPU too")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("structured_bench needs a GPU (--smoke runs on CPU)")
    from engine import LLM, SamplingParams
    from engine.structured import StructuredOutputsParams

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = TINY if tokenizer is None else {**TINY, "vocab_size": max(TINY["vocab_size"], len(tokenizer))}
    k = args.num_requests or (8 if args.smoke else 256)
    w = Workload("smoke", shape, [32] * k, [16] * k) if args.smoke else make_workload("w1", args.seed)
    prompts = random_prompts(w, w.shape["vocab_size"], args.seed)[:k]
    model_dir = write_config(w.shape, 2048)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    else:
        write_json_tokenizer(model_dir, w.shape["vocab_size"], args.seed)
    llm = LLM(model_dir, load_format="dummy", dtype="float32" if args.smoke else "bfloat16", max_model_len=2048,
              max_num_seqs=256, async_scheduling=not args.no_async_scheduling, enable_prefix_caching=False)
    core = llm.llm_engine.engine_core
    if args.no_bitmask_overlap:
        core.overlap_bitmask = False
    if args.no_pipelined_step:
        core.pipelined = False
    n = w.output_lens[0] if args.smoke and args.output_len is None else args.output_len or 512
    free = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, detokenize=False)] * len(prompts)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    constrained = [SamplingParams(temperature=1.0, max_tokens=n, detokenize=False,
                                  structured_outputs=so)] * len(prompts)
    t0 = time.perf_counter()
    llm.generate(prompts[:8], constrained[:8], use_tqdm=False)  # tokenizer info, grammar compile, warm-up
    if args.grammar_threads:
        import xgrammar as xgr

        core.structured_output_manager._batch = xgr.BatchGrammarMatcher(args.grammar_threads)
    llm.generate(prompts[:8], free[:8], use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    results = {}
    runs = [("unconstrained", free), ("json_schema", constrained), ("unconstrained_again", free)]
    if args.ab_pipelined_step:
        runs.insert(2, ("json_schema_no_pipelined_step", constrained))
    pipelined = core.pipelined
    for name, params in runs:
        core.pipelined = pipelined and name != "json_schema_no_pipelined_step"
        core.bitmask_fill_steps = 0
        if core.structured_output_manager is not None:
            core.structured_output_manager.fill_s = 0.0
        core.phases.seconds.clear()
        steps_before = core.scheduler.num_steps
        if args.profile and name == "json_schema":  # torch.profiler over the constrained run: host ops
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof, synchronizing_calls() as syncs:
                elapsed, num_out, reasons = timed_run(llm, prompts, params)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
            for stack, count in syncs.most_common(8):
                print(f"synchronizing CUDA call x{count}:\n{stack}", flush=True)
        else:
            elapsed, num_out, reasons = timed_run(llm, prompts, params)
        results[name] = num_out / elapsed
        num_steps = core.scheduler.num_steps - steps_before
        fill = {}
        if core.bitmask_fill_steps:  # CPU ms per step filling bitmasks, vs the whole step's wall ms
            fill_s = core.structured_output_manager.fill_s
            fill = {"bitmask_fill_ms_per_step": round(1e3 * fill_s / core.bitmask_fill_steps, 3),
                    "bitmask_fill_steps": core.bitmask_fill_steps,
                    "host_ms_per_step": {k: round(1e3 * v / core.bitmask_fill_steps, 3)
                                         for k, v in core.phases.seconds.items()}}
        print(json.dumps({"figure": f"structured_bench_{name}", "requests": len(prompts), "output_tokens": num_out,
                          "elapsed_s": round(elapsed, 2), "output_tok_s": round(num_out / elapsed, 1),
                          "steps": num_steps, "step_ms": round(1e3 * elapsed / max(num_steps, 1), 3), **fill,
                          "finished_by_length": reasons.count("length")}), flush=True)
        if name.startswith("json_schema") and reasons.count("length") != len(prompts):
            print(json.dumps({"warning": "some constrained requests ended before max_tokens",
                              "finish_reasons": {r: reasons.count(r) for r in set(reasons)}}), flush=True)
    base = min(results["unconstrained"], results["unconstrained_again"])  # the slower: no flattering warm-up
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"figure": "structured_vs_unconstrained", "shape": w.name, "device": device,
                      "tokenizer": args.tokenizer or "random stand-in",
                      "async_scheduling": not args.no_async_scheduling, "warmup_s": round(warmup_s, 1),
                      "bitmask_overlap": core.overlap_bitmask and core.use_batch_queue,
                      "pipelined_step": core.overlap_bitmask and core.use_batch_queue and pipelined,
                      "json_schema_tok_s": round(results["json_schema"], 1), "unconstrained_tok_s": round(base, 1),
                      "ratio": round(results["json_schema"] / base, 3),
                      **({"ratio_no_pipelined_step": round(results["json_schema_no_pipelined_step"] / base, 3)}
                         if args.ab_pipelined_step else {})}), flush=True)
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
