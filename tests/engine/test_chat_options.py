"""LLM.chat's vLLM keyword options (chat_template, chat_template_kwargs, add_generation_prompt,
continue_final_message, tools): each renders the prompt transformers' apply_chat_template renders with the
same arguments (token ids compared), a wrong one is a RequestError naming the field, and a batch of
conversations takes them all. Also LLM(trust_remote_code=...), vLLM's, reaching the tokenizer load."""
from __future__ import annotations

from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError

ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick brown fox"}]
OPEN_ANSWER = QUESTION + [{"role": "assistant", "content": "The lazy dog"}]
# Qwen3-style (a newline after each role, unlike the checkpoint's own template): tools listed in a system
# block, enable_thinking=False writes an empty <think></think>
QWEN3_LIKE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}]


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, device="cpu", max_model_len=128)


def chat_ids(llm: LLM, messages: Any, **options: Any) -> list[list[int]]:
    return [o.prompt_token_ids for o in llm.chat(messages, ONE, use_tqdm=False, **options)]


def hf_ids(llm: LLM, conversation: list[dict], **options: Any) -> list[int]:
    """transformers' own rendering and tokenization with the same arguments (vLLM's default: a generation prompt)."""
    options.setdefault("add_generation_prompt", True)
    return llm.get_tokenizer().apply_chat_template(conversation, tokenize=True, return_dict=False, **options)


@pytest.mark.parametrize("options", [
    {},
    {"add_generation_prompt": False},
    {"add_generation_prompt": False, "continue_final_message": True},
    {"chat_template": QWEN3_LIKE},
    {"chat_template": QWEN3_LIKE, "chat_template_kwargs": {"enable_thinking": False}},
    {"chat_template": QWEN3_LIKE, "tools": TOOLS},
    {"chat_template": QWEN3_LIKE, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}},
    {"chat_template": QWEN3_LIKE, "chat_template_kwargs": {"add_generation_prompt": False}},  # vLLM's: kwargs win
], ids=["default", "no-generation-prompt", "continue-final", "template", "kwargs", "tools", "tools-kwargs",
        "kwargs-set-an-option"])
def test_option_renders_as_transformers_does(llm: LLM, options: dict) -> None:
    conversation = OPEN_ANSWER if options.get("continue_final_message") else QUESTION
    expected = hf_ids(llm, conversation, **{k: v for k, v in options.items() if k != "chat_template_kwargs"},
                      **options.get("chat_template_kwargs", {}))
    assert chat_ids(llm, conversation, **options) == [expected]


def test_each_option_changes_the_prompt(llm: LLM) -> None:
    """The comparisons above would pass with an option dropped on both sides: each one must matter."""
    tok = llm.get_tokenizer()
    base = chat_ids(llm, QUESTION)[0]
    assert chat_ids(llm, QUESTION, add_generation_prompt=False)[0] == base[:-len(tok.encode("<|assistant|>"))]
    qwen = chat_ids(llm, QUESTION, chat_template=QWEN3_LIKE)[0]
    assert qwen != base
    no_think = chat_ids(llm, QUESTION, chat_template=QWEN3_LIKE, chat_template_kwargs={"enable_thinking": False})[0]
    assert tok.decode(no_think).endswith("<|assistant|>\n<think></think>") and not tok.decode(qwen).endswith("</think>")
    with_tools = chat_ids(llm, QUESTION, chat_template=QWEN3_LIKE, tools=TOOLS)[0]
    assert tok.decode(with_tools).startswith("<|system|>tools: get_weather</s>")
    continued = tok.decode(chat_ids(llm, OPEN_ANSWER, add_generation_prompt=False, continue_final_message=True)[0])
    assert continued.endswith("<|assistant|>The lazy dog")  # left open: no end of turn, no new header
    closed = tok.decode(chat_ids(llm, OPEN_ANSWER, add_generation_prompt=False)[0])
    assert closed.endswith("The lazy dog</s>")


@pytest.mark.parametrize("options,field", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt defaults to True
    ({"chat_template_kwargs": {"continue_final_message": True}}, "chat_template_kwargs.continue_final_message"),
    ({"chat_template": 5}, "chat_template"),
    ({"chat_template": "{% for m in messages %}no endfor"}, "chat_template"),
    ({"chat_template": "{{ raise_exception('no system messages') }}"}, "messages"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"chat_template_kwargs": {"conversation": []}}, "chat_template_kwargs.conversation"),
    ({"chat_template_kwargs": {"chat_template": QWEN3_LIKE}}, "chat_template_kwargs.chat_template"),
    ({"tools": TOOLS[0]}, "tools"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"chat_template_kwargs": {"tools": "get_weather"}}, "chat_template_kwargs.tools"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_option_names_the_field(llm: LLM, options: dict, field: str) -> None:
    with pytest.raises(RequestError) as err:
        llm.chat(QUESTION, ONE, use_tqdm=False, **options)
    assert err.value.param == field
    assert str(err.value).startswith(f"{field}: ")
    assert not llm.llm_engine.has_unfinished_requests()


def test_batch_of_conversations_takes_the_options(llm: LLM) -> None:
    conversations = [QUESTION, [{"role": "user", "content": "jumps over"}], OPEN_ANSWER]
    options = {"chat_template": QWEN3_LIKE, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    expected = [hf_ids(llm, c, chat_template=QWEN3_LIKE, tools=TOOLS, enable_thinking=False) for c in conversations]
    assert chat_ids(llm, conversations, **options) == expected
    continued = chat_ids(llm, [OPEN_ANSWER, OPEN_ANSWER[:2] + [{"role": "assistant", "content": "A"}]],
                         add_generation_prompt=False, continue_final_message=True)
    assert continued == [hf_ids(llm, c, add_generation_prompt=False, continue_final_message=True)
                         for c in (OPEN_ANSWER, OPEN_ANSWER[:2] + [{"role": "assistant", "content": "A"}])]


def test_batch_error_names_the_conversation(llm: LLM) -> None:
    with pytest.raises(RequestError) as err:
        llm.chat([QUESTION, [{"role": "robot", "content": "x"}]], ONE, use_tqdm=False, tools=TOOLS)
    assert err.value.param == "messages[0].role" and "(messages[1])" in str(err.value)
    with pytest.raises(RequestError) as err:  # an option's error is no one conversation's
        llm.chat([QUESTION, QUESTION], ONE, use_tqdm=False, tools="get_weather")
    assert str(err.value) == "tools: must be a list of tool dicts, got str"


def test_trust_remote_code_reaches_the_tokenizer_load(tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's LLM(..., trust_remote_code=True) was a TypeError; it is an EngineConfig field handed to
    transformers when it loads the model directory's tokenizer."""
    import transformers

    from engine.tokenizer import load_tokenizer

    seen: list[Any] = []
    real = transformers.AutoTokenizer.from_pretrained

    def recording(path: str, **kwargs: Any) -> Any:
        seen.append(kwargs.get("trust_remote_code"))
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    llm = LLM(tiny_llama, device="cpu", max_model_len=32, trust_remote_code=True)
    assert llm.llm_engine.config.trust_remote_code is True and seen == [True]
    assert load_tokenizer(tiny_llama, is_gguf=False) is not None and seen[-1] is False  # the default
    assert EngineConfig().trust_remote_code is False
    with pytest.raises(ConfigError) as err:
        EngineConfig(trust_remote_code="yes")  # type: ignore[arg-type]
    assert err.value.param == "trust_remote_code"


def test_content_parts_render_as_their_text(llm: LLM) -> None:
    """OpenAI content parts ([{"type": "text", "text": ...}]), which vLLM's LLM.chat takes: the template got the
    list itself and the call failed ("the chat template rejected the messages: can only concatenate str");
    the parts' texts are joined with newlines, as vLLM and the API server render them."""
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "the quick"}, {"type": "text", "text": "brown fox"}]}]
    joined = [QUESTION[0], {"role": "user", "content": "the quick\nbrown fox"}]
    assert chat_ids(llm, parts) == chat_ids(llm, joined)
    assert parts[1]["content"][0] == {"type": "text", "text": "the quick"}  # the caller's messages unchanged
    with pytest.raises(RequestError) as err:
        chat_ids(llm, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert err.value.param == "messages[0].content[0]" and "image_url" in str(err.value)
