"""Shared fixtures: tiny random checkpoints written to disk, and the embedded SmolLM2 path."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

pytest_plugins = ["tests.xdist_workers"]  # scheduling and `exclusive` tests under pytest-xdist
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pythonpath_with_repo() -> str:
    """PYTHONPATH for a child process importing this checkout: the repository first, then whatever the
    parent's PYTHONPATH already held (packages installed with --target there stay importable)."""
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU, tests/kernels runs the kernels in Triton's interpreter. Triton decides at import
    whether its own library functions (tl.sum...) are interpreted: imported first by anything else
    (a profiler, a benchmark module in the same xdist worker), every kernel test then failed with
    "Cannot call @triton.jit'd outside of the scope of a kernel". So import it here, first, in that
    mode; the environment is left as it was (the engine's CPU path does not use Triton)."""
    if torch.cuda.is_available():
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:  # no Triton here: tests/kernels skip what needs it
        pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_for_the_interpreter()

TINY_ARCHS = {
    "llama-tied": dict(arch="LlamaForCausalLM", tie=True),
    "llama-untied": dict(arch="LlamaForCausalLM", tie=False, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(arch="Qwen2ForCausalLM", tie=False),
    "qwen3": dict(arch="Qwen3ForCausalLM", tie=True),
}


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention splits the KV cache into blocks.",
    "Large language models generate text one token at a time; continuous batching keeps GPUs busy.",
    "大型语言模型一次生成一个词元。 Tensor parallel splits every layer; pipeline parallel splits the stack.",
    "0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-_+=~` abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def write_tiny_tokenizer(path: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, with <s>=1, </s>=2 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)


def write_tiny_checkpoint(path: str, arch: str, tie: bool, rope_scaling: dict | None = None, **overrides) -> str:
    """A random HF checkpoint (config.json + safetensors) small enough for CPU tests."""
    import transformers

    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
                  "Qwen3ForCausalLM": transformers.Qwen3Config}[arch]
    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tie, initializer_range=0.25,
        architectures=[arch], bos_token_id=1, eos_token_id=2,
    )
    if arch == "Qwen3ForCausalLM":
        kwargs["head_dim"] = 16
    if rope_scaling:
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(zlib.crc32(arch.encode()) % 1000 + tie)  # str hash() differs per process
    model = getattr(transformers, arch)(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    write_tiny_tokenizer(path, config.vocab_size)
    return path


def edit_config(path: str, **fields) -> str:
    """Checkpoint `path` with `fields` set in its config.json (written in place); returns path."""
    import json

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, **fields}, f)
    return path


@pytest.fixture(scope="session", params=list(TINY_ARCHS))
def tiny_model(request, tmp_path_factory) -> str:
    spec = dict(TINY_ARCHS[request.param])
    path = str(tmp_path_factory.mktemp(request.param))
    return write_tiny_checkpoint(path, spec.pop("arch"), **spec)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), "LlamaForCausalLM", tie=False)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from engine.model_config import default_model_path

    return default_model_path()


def prompts_of_lengths(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
