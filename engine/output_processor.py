"""What users see of a request: stop strings matched in the detokenized text, and RequestOutputs
built from its sequences (cumulative; text that may still start a stop string held back)."""
from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput
from engine.sequence import Request, Sequence


def check_stop_strings(seq: Sequence, old_len: int) -> None:
    """Cut seq.text at the earliest stop string reaching past old_len (the text before this
    token), and mark seq stopped by it."""
    longest = max(len(s) for s in seq.params.stop)
    search_from = max(0, old_len - longest + 1)
    best: tuple[int, str] | None = None
    for stop in seq.params.stop:
        pos = seq.text.find(stop, search_from)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is not None:
        pos, stop = best
        seq.text = seq.text[: pos + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:pos]
        seq.finish_reason, seq.stop_reason = "stop", stop


def make_output(request: Request) -> RequestOutput:
    outputs = []
    for seq in request.seqs:
        text = seq.text
        if not seq.is_finished and seq.params.stop:
            # hold back what could still turn out to be the start of a stop string
            text = text[: max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
        outputs.append(CompletionOutput(
            index=seq.index, text=text, token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=seq.output_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        ))
    return RequestOutput(
        request.request_id, request.prompt, request.prompt_token_ids, outputs, request.finished,
        request.metrics, num_cached_tokens=max(s.num_cached_tokens for s in request.seqs),
        prompt_logprobs=request.prompt_logprobs,
    )


def failed_output(request: Request, error: Exception) -> RequestOutput:
    """The final output of a request that failed inside the engine: plain fields only, so that
    building it cannot fail the way make_output may have."""
    outputs = [CompletionOutput(index=s.index, text=s.text, token_ids=s.output_token_ids, cumulative_logprob=None,
                                logprobs=None, finish_reason=s.finish_reason or "abort") for s in request.seqs]
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, True,
                         request.metrics, error=error)
