"""Streamed tool calls as OpenAI streams them: a call's first delta carries index, id, type, function.name
and arguments ""; the arguments follow in fragments while the model writes them. They are re-serialized
on the fly into json.dumps(json.loads(text), ensure_ascii=False), the non-streamed answer's form, so the
fragments joined equal it. hermes bodies, `required` arrays and a named function's object stream this way;
llama3_json and mistral outputs are parsed whole at the end (only then is it known that they are calls).
"""
from __future__ import annotations

import json
from typing import Any

from engine.server.tools import (
    HERMES_END,
    HERMES_START,
    ToolsRequest,
    calls_from_constrained,
    new_call_id,
    parse_tool_calls,
)
from engine.structured.reasoning import held_prefix

WHITESPACE = " \t\n\r"


def _dump_char(ch: str) -> str:
    return json.dumps(ch, ensure_ascii=False)[1:-1]


class CanonicalJSON:
    """One JSON value's text in, a character at a time; its json.dumps(..., ensure_ascii=False) text out."""

    def __init__(self) -> None:
        self.depth = 0  # open objects and arrays
        self.done = False  # the value is complete
        self.in_string = False
        self.escape = ""  # a backslash sequence being read
        self.high = ""  # an escaped high surrogate waiting for its pair
        self.scalar = ""  # a number or literal being read

    def _scalar_out(self) -> str:
        text, self.scalar = self.scalar, ""
        try:
            return json.dumps(json.loads(text), ensure_ascii=False)
        except ValueError:  # not JSON after all: the whole answer will not parse either
            return text

    def _string_char(self, ch: str) -> str:
        if self.escape:
            self.escape += ch
            if self.escape[1] == "u" and len(self.escape) < 6:
                return ""
            text, self.escape = self.escape, ""
            if text[1] == "u" and 0xD800 <= int(text.removeprefix("\\u"), 16) <= 0xDBFF and not self.high:
                self.high = text  # its low half comes next
                return ""
            text, self.high = self.high + text, ""
            return "".join(_dump_char(c) for c in json.loads(f'"{text}"'))
        if ch == "\\":  # an escape, maybe the low half of a pending high surrogate
            self.escape = ch
            return ""
        out = "".join(_dump_char(c) for c in json.loads(f'"{self.high}"')) if self.high else ""
        self.high = ""
        if ch == '"':
            self.in_string = False
            self.done = self.depth == 0
            return out + ch
        return out + _dump_char(ch)

    def feed(self, ch: str) -> tuple[str, bool]:
        """(text out, whether ch was consumed): a top-level number or literal ends at the outer ',' or '}'."""
        if self.in_string:
            return self._string_char(ch), True
        if ch in WHITESPACE or ch in ",}]":
            out = self._scalar_out() if self.scalar else ""
            if self.depth == 0 and out:  # the character after a top-level scalar is the outer value's
                self.done = True
                return out, False
            if ch in WHITESPACE:
                return out, True
            if ch == ",":
                return out + ", ", True
            self.depth -= 1
            self.done = self.depth == 0
            return out + ch, True
        if ch == '"':
            self.in_string = True
            return ch, True
        if ch in "{[":
            self.depth += 1
            return ch, True
        if ch == ":":
            return ": ", True
        self.scalar += ch
        return "", True

    def finish(self) -> str:
        """At the end of the text: a top-level number or literal is complete."""
        self.done = True
        return self._scalar_out() if self.scalar else ""


class CallScanner:
    """A call object ({"name": ..., "arguments" or "parameters": ...}) or an array of them, streamed: events
    ("call", name) once its name is known and its arguments begin (or it ends without them), then ("args",
    fragment) while its arguments are written."""

    def __init__(self) -> None:
        self.state = "start"  # start | item | key | keytext | colon | value | name | args | skip | invalid
        self.events: list[tuple[str, str]] = []
        self.key = ""  # a key's raw text, then its value's name
        self.value: CanonicalJSON | None = None
        self.name: str | None = None
        self.announced = False  # its ("call", name) event went out
        self.args: str | None = None  # None: no arguments yet; else their canonical text not sent yet
        self.args_is_string = False  # "arguments": "<JSON text>": sent as the string itself, at its end
        self.num_calls = 0

    def feed(self, text: str) -> list[tuple[str, str]]:
        for ch in text:
            self._char(ch)
        events, self.events = self.events, []
        return events

    def finish(self) -> list[tuple[str, str]]:
        """At the end of the output: a number or literal still being read is complete."""
        value = self.value
        if self.state in ("name", "args", "skip") and value is not None and value.depth == 0 and value.scalar:
            self._value_text(self.value.finish())
            self._value_done()
        return self.feed("")

    def _begin_call(self) -> None:
        self.name, self.announced, self.args, self.args_is_string, self.state = None, False, None, False, "key"

    def _end_call(self) -> None:
        if self.name is not None:
            if self.args is None:  # no arguments given: {} (as the whole answer)
                self.args = "{}"
            self._announce()
            self.num_calls += 1
        self.state = "item"

    def _announce(self) -> None:
        """The call's first event, once its name is known and its arguments have begun; then what they held."""
        if self.name is None or self.args is None:
            return
        if not self.announced:
            self.announced = True
            self.events.append(("call", self.name))
        if self.args:
            self.events.append(("args", self.args))
            self.args = ""

    def _args(self, fragment: str) -> None:
        self.args = (self.args or "") + fragment
        self._announce()

    def _char(self, ch: str) -> None:
        state = self.state
        if state == "invalid":  # not calls: the rest is ignored (hermes gives the text back as content)
            return
        if state in ("start", "item"):
            if ch == "{":
                self._begin_call()
            elif ch == "[" and state == "start":
                self.state = "item"
            elif ch not in WHITESPACE + ",]":
                self.state = "invalid"
        elif state == "key":
            if ch == '"':
                self.state, self.key = "keytext", ""
            elif ch == "}":
                self._end_call()
            elif ch not in WHITESPACE + ",":
                self.state = "invalid"
        elif state == "keytext":
            if ch == '"' and (len(self.key) - len(self.key.rstrip("\\"))) % 2 == 0:  # not an escaped quote
                self.key, self.state = json.loads(f'"{self.key}"'), "colon"
            else:
                self.key += ch
        elif state == "colon":
            if ch == ":":
                self.state = "value"
            elif ch not in WHITESPACE:
                self.state = "invalid"
        elif state == "value":
            if ch in WHITESPACE:
                return
            self.value = CanonicalJSON()
            if self.key in ("arguments", "parameters") and self.args is None:
                self.state, self.args_is_string = "args", ch == '"'
                self._args("")
            else:
                self.state = "name" if self.key == "name" else "skip"
            self.key = ""  # now the text of a name or of string arguments
            self._char(ch)
        else:  # name, args or skip: a value's characters
            assert self.value is not None
            out, consumed = self.value.feed(ch)
            self._value_text(out)
            if self.value.done:
                self._value_done()
                if not consumed:
                    self._char(ch)

    def _value_text(self, out: str) -> None:
        if self.state == "name":
            self.key += out
        elif self.state == "args":
            if self.args_is_string:
                self.key += out
            else:
                self._args(out)

    def _value_done(self) -> None:
        if self.state == "name":
            value = json.loads(self.key)
            if isinstance(value, str) and self.name is None:
                self.name = value
                self._announce()
        elif self.state == "args" and self.args_is_string:
            self._args(json.loads(self.key))
        self.key, self.state = "", "key"


class ToolDeltas:
    """Streamed chat deltas with tool calls, per choice: content passes through (hermes holds back a
    possible tag); calls go out as OpenAI's tool_calls deltas."""

    def __init__(self, tr: ToolsRequest):
        self.tr = tr
        self.scanners: dict[int, CallScanner] = {}  # choice -> the call (or hermes call body) being read
        self.in_call: dict[int, bool] = {}  # hermes: inside <tool_call>
        self.held: dict[int, str] = {}  # hermes: a possible tag; else the whole text (a fallback, or to parse)
        self.bodies: dict[int, str] = {}  # hermes: the open call's text, content again if it is no call
        self.num_calls: dict[int, int] = {}
        self.spaces: dict[int, str] = {}  # hermes: content's trailing whitespace, held back (see _hold_spaces)
        self.said: set[int] = set()  # hermes: the choices that have sent content other than whitespace

    def _entries(self, choice: int, events: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """OpenAI tool_calls delta entries; a call's fragments in one step go out as one entry. With
        parallel_tool_calls false only the first call goes out (as vLLM drops the others)."""
        out: list[dict[str, Any]] = []
        single = not self.tr.parallel_tool_calls
        for kind, value in events:
            if kind == "call":
                index = self.num_calls.get(choice, 0)
                self.num_calls[choice] = index + 1
                if not (single and index):
                    out.append({"index": index, "id": new_call_id(), "type": "function",
                                "function": {"name": value, "arguments": ""}})
            elif not value or (single and self.num_calls[choice] > 1):
                continue
            elif out and "id" not in out[-1]:
                out[-1]["function"]["arguments"] += value
            else:
                out.append({"index": self.num_calls[choice] - 1, "function": {"arguments": value}})
        return out

    def _whole(self, choice: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Calls parsed at the end: each as its first delta and its arguments."""
        events = [e for c in calls for e in (("call", c["function"]["name"]), ("args", c["function"]["arguments"]))]
        return self._entries(choice, events)

    def _hermes(self, choice: int, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        text, content, entries = self.held.pop(choice, "") + text, "", []
        while text:
            if not self.in_call.get(choice):
                at = text.find(HERMES_START)
                if at < 0:
                    keep = 0 if finished else held_prefix(text, HERMES_START)
                    content += text[: len(text) - keep]
                    self.held[choice] = text[len(text) - keep:]
                    break
                content += text[:at]
                text, self.in_call[choice] = text[at + len(HERMES_START):], True
                self.scanners[choice], self.bodies[choice] = CallScanner(), ""
                continue
            end = text.find(HERMES_END)
            keep = held_prefix(text, HERMES_END) if end < 0 and not finished else 0
            body = text[: len(text) - keep] if end < 0 else text[:end]
            scanner = self.scanners[choice]
            entries += self._entries(choice, scanner.feed(body))
            self.bodies[choice] += body
            if end < 0:
                self.held[choice] = text[len(text) - keep:]
                if finished:  # an unclosed call: its text is content unless a call came out of it
                    content += "" if scanner.num_calls or scanner.announced else HERMES_START + self.bodies[choice]
                break
            self.in_call[choice], text = False, text[end + len(HERMES_END):]
            if not (scanner.num_calls or scanner.announced):  # not a call after all: the text stays content
                content += HERMES_START + self.bodies[choice] + HERMES_END
        return content, entries

    def _hold_spaces(self, choice: int, content: str, finished: bool) -> str:
        """Content's trailing whitespace waits for more text, and content that begins after a call is sent without
        its leading whitespace: an answer with calls has its content stripped (as tools.parse_tool_calls strips it),
        so the newline between two calls, or after the last, is not content."""
        text = self.spaces.pop(choice, "") + content
        if self.num_calls.get(choice) and choice not in self.said:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            self.said.add(choice)
        if not finished:
            self.spaces[choice] = text[len(body):]
        elif not self.num_calls.get(choice):  # no calls: the whole answer keeps its text as it is
            body = text
        return body

    def delta(self, choice: int, d: dict[str, Any], finished: bool) -> dict[str, Any]:
        """d: the delta so far ({"content"} and maybe reasoning fields); returns it with tool calls."""
        text = d.pop("content", "") or ""
        content, entries = "", []
        if self.tr.tool_choice == "auto" and self.tr.parser == "hermes":
            content, entries = self._hermes(choice, text, finished)
            content = self._hold_spaces(choice, content, finished)
        elif self.tr.tool_choice == "auto":  # llama3_json, mistral: the whole text decides
            self.held[choice] = self.held.get(choice, "") + text
            if finished:
                parsed, calls = parse_tool_calls(self.tr.parser or "hermes", self.held.pop(choice))
                content, entries = parsed or "", self._whole(choice, calls)
        else:  # required (an array of calls) or a named function (its arguments object)
            self.held[choice] = self.held.get(choice, "") + text
            scanner, events = self.scanners.get(choice), []
            if scanner is None and text:  # not before content: a reasoning model may never get there
                scanner = self.scanners[choice] = CallScanner()
                if self.tr.tool_choice == "named":  # the output is the arguments: as if after its name
                    events = scanner.feed('{"name": ' + json.dumps(self.tr.named) + ', "arguments": ')
            if scanner is not None:
                events += scanner.feed(text) + (scanner.finish() if finished else [])
            entries = self._entries(choice, events)
            if finished:
                whole = self.held.pop(choice)
                if not self.num_calls.get(choice) and not calls_from_constrained(self.tr, whole):
                    content = whole  # no call came out of it (cut by max_tokens): the text, as the whole answer
        if content:
            d["content"] = content
        if entries:
            d["tool_calls"] = entries
        return d

    def finish_reason(self, choice: int, reason: str | None) -> str | None:
        """"tool_calls" once calls went out, as OpenAI; "length" when max_tokens cut the answer (a call may be
        cut too), as the same answer not streamed reports (streamed_calls)."""
        if reason in (None, "length") or not self.num_calls.get(choice) or self.tr.tool_choice == "named":
            return reason
        return "tool_calls"


def streamed_calls(tr: ToolsRequest, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a whole answer as ToolDeltas streams them, so that a streamed and a plain response
    agree: for one cut by max_tokens (any tool_choice) the last call's arguments possibly cut, as OpenAI returns
    them, or a hermes call begun but not closed; the text as content when no call had begun."""
    stream = ToolDeltas(tr)
    d = stream.delta(0, {"content": text}, True)
    calls: list[dict[str, Any]] = []
    for entry in d.get("tool_calls", []):
        if "id" in entry:
            calls.append({"id": entry["id"], "type": "function", "function": dict(entry["function"])})
        else:
            calls[entry["index"]]["function"]["arguments"] += entry["function"]["arguments"]
    return d.get("content") or None, calls
