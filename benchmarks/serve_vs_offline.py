"""The same request set offline and served, in one run: the served peak as a fraction of the engine.

Offline: LLM.generate on the random token-id prompts benchmarks/serve.py would send (same seed,
lengths, ignore_eos), timed from submission to the last token. Served: `python -m engine.serve`
on the same model (under launcher.torchrun for tp > 1), loaded by benchmarks/serve.py at rate inf
(the peak) then at half the peak (TTFT at moderate load). Each part runs in a subprocess of its
own, so GPU memory is released between them. Prints one summary line per part and the ratios.

    python -m benchmarks.serve_vs_offline --shape w1 --num-prompts 256 --input-len 512 --output-len 256
    python -m benchmarks.serve_vs_offline --shape w3 --num-prompts 128 --input-len 1024 --output-len 256 \
        --parts served --tp 1,2      # tp2 vs tp1, served (two GPUs)
    python -m benchmarks.serve_vs_offline --smoke    # CPU, a tiny model: checks the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 500  # the stand-in tokenizer's ids stay below this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_vocab_tokenizer(path: str, vocab_size: int) -> None:
    """A stand-in tokenizer with a word for every id of the model's vocabulary ("w123"), so that
    every token a random-weight model samples has text, and streams carry one chunk per token
    (a small BPE tokenizer decodes most sampled ids to nothing, and the text would come at the end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {("<unk>", "<s>", "</s>")[i] if i < 3 else f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words joined by spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)


def model_dir(shape: str) -> str:
    """A config of the shape (random weights: load_format dummy) with a whole-vocabulary stand-in tokenizer."""
    from benchmarks.throughput import QWEN2_7B, QWEN2_32B, write_config

    if shape == "tiny":
        from tests.conftest import write_tiny_checkpoint

        return write_tiny_checkpoint(tempfile.mkdtemp(prefix="gantry-tiny-"), "LlamaForCausalLM", tie=False)
    config = {"w1": QWEN2_7B, "w3": QWEN2_32B}[shape]
    d = write_config(config, 4096)
    write_vocab_tokenizer(d, config["vocab_size"])
    return d


def engine_flags(args: argparse.Namespace, served: bool = False) -> list[str]:
    flags = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.max_prefill_tokens_while_decoding is not None and served:
        flags += ["--max-prefill-tokens-while-decoding", str(args.max_prefill_tokens_while_decoding)]
    if args.shape != "tiny":
        flags += ["--load-format", "dummy", "--dtype", "bfloat16"]
    if args.smoke:
        flags += ["--device", "cpu"]
    return flags


# ---- offline (a subprocess: `--run-offline MODEL TP`) ----

def run_offline(args: argparse.Namespace, model: str, tp: int) -> dict[str, Any]:
    from benchmarks.serve import sample_random_requests
    from engine import LLM, SamplingParams
    from engine.serve import parse_configs

    engine_config, _, _ = parse_configs(["--model", model, *engine_flags(args), "--tensor-parallel-size", str(tp)])
    fields = {k: v for k, v in vars(engine_config).items() if k != "model"}
    llm = LLM(model, **fields)
    specs = sample_random_requests(args.num_prompts + 8, args.input_len, args.output_len, 0.0, VOCAB, args.seed)
    prompts = [list(s.prompt) for s in specs]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=s.output_len, detokenize=False) for s in specs]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up, as the served run's first request
    t0 = time.perf_counter()
    outputs = llm.generate(prompts[8:], params[8:], use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.shutdown()
    return {"part": f"offline tp{tp}", "output_tok_s": num_out / elapsed, "elapsed_s": elapsed, "output_tokens": num_out}


# ---- served ----

def run_served(args: argparse.Namespace, model: str, tp: int, out_dir: str) -> dict[str, Any]:
    port = free_port()
    serve = ["-m", "engine.serve", "--model", model, *engine_flags(args, served=True), "--host", "127.0.0.1", "--port", str(port),
             "--max-waiting-requests", "100000", "--no-log-requests", "--api-server-count", str(args.api_server_count)]
    if tp > 1:
        cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(tp),
               *serve, "--tensor-parallel-size", str(tp)]
    else:
        cmd = [sys.executable, *serve]
    log_path = os.path.join(out_dir, f"server-tp{tp}.log")
    result_path = os.path.join(out_dir, f"serve-tp{tp}.json")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        bench = [sys.executable, "-m", "benchmarks.serve", "--base-url", f"http://127.0.0.1:{port}",
                 "--ready-timeout", "900", "--find-peak", "--num-prompts", str(args.num_prompts),
                 "--num-warmups", "8", "--random-input-len", str(args.input_len),
                 "--random-output-len", str(args.output_len), "--vocab-size", str(VOCAB), "--seed", str(args.seed),
                 "--client-processes", str(args.client_processes), "--result-json", result_path]
        subprocess.run(bench, cwd=REPO, check=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    with open(result_path) as f:
        runs = json.load(f)["runs"]
    peak, half = runs[0]["metrics"], runs[1]["metrics"]
    return {"part": f"served tp{tp}", "output_tok_s": peak["output_throughput"],
            "itl_p50_ms": peak["itl_ms"]["p50"], "itl_p99_ms": peak["itl_ms"]["p99"],
            "ttft_p50_ms_peak": peak["ttft_ms"]["p50"], "ttft_p50_ms_half_peak": half["ttft_ms"]["p50"],
            "half_peak_output_tok_s": half["output_throughput"], "failed": peak["failed"] + half["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="w1", choices=["w1", "w3", "tiny"])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget per step (default: the engine's)")
    p.add_argument("--max-prefill-tokens-while-decoding", type=int,
                   help="served only (the offline baseline keeps the engine's default)")
    p.add_argument("--tp", default="1", help="comma-separated tensor parallel sizes, e.g. 1,2")
    p.add_argument("--parts", default="offline,served")
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--client-processes", type=int, default=4, help="benchmarks/serve.py's client processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 16 short requests")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--run-offline", nargs=2, metavar=("MODEL", "TP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.num_prompts, args.input_len, args.output_len, args.max_model_len = "tiny", 16, 32, 16, 256
        args.max_num_seqs = 16
    if args.run_offline:  # the child
        print("RESULT " + json.dumps(run_offline(args, args.run_offline[0], int(args.run_offline[1]))), flush=True)
        return 0
    model = model_dir(args.shape)
    out_dir = tempfile.mkdtemp(prefix="gantry-svo-")
    results = []
    for tp in [int(x) for x in args.tp.split(",")]:
        if "offline" in args.parts:
            child = subprocess.run([sys.executable, "-m", "benchmarks.serve_vs_offline", *(argv or sys.argv[1:]),
                                    "--run-offline", model, str(tp)], cwd=REPO, capture_output=True, text=True,
                                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # as engine.serve sets it
            lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"offline tp{tp} failed (exit {child.returncode})")
            results.append(json.loads(lines[-1][7:]))
            print(json.dumps(results[-1]), flush=True)
        if "served" in args.parts:
            results.append(run_served(args, model, tp, out_dir))
            print(json.dumps(results[-1]), flush=True)
    by_part = {r["part"]: r for r in results}
    print(f"\n{args.shape}: {args.num_prompts} x {args.input_len} in / {args.output_len} out")
    for r in results:
        print(f"  {r['part']:<12} {r['output_tok_s']:>10.0f} output tok/s")
    for tp in [int(x) for x in args.tp.split(",")]:
        off, srv = by_part.get(f"offline tp{tp}"), by_part.get(f"served tp{tp}")
        if off and srv:
            print(f"  tp{tp}: served / offline = {srv['output_tok_s'] / off['output_tok_s']:.3f}; at peak ITL p99 / p50 = "
                  f"{srv['itl_p99_ms'] / max(srv['itl_p50_ms'], 1e-9):.2f}; TTFT p50 at half peak "
                  f"{srv['ttft_p50_ms_half_peak']:.0f} ms")
    if "served tp1" in by_part and "served tp2" in by_part:
        print(f"  served tp2 / tp1 = {by_part['served tp2']['output_tok_s'] / by_part['served tp1']['output_tok_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
