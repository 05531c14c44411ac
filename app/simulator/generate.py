"""Pure builders of one turn: the response object, its events, its usage, and the chain it leaves.

Nothing here does I/O or reads a clock: the caller passes the time and an id factory, so every
rule below is testable without a socket. The rules are documented in docs/simulator.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.simulator import errors
from app.simulator.errors import Json
from app.simulator.request import CompactRequest, CreateRequest

IdFactory = Callable[[str], str]

NO_INPUT = "(no input)"
ECHO_PREFIX = "echo: "
TOOL_PREFIX = "tool said: "
REASONING_TOKENS = 8  # what a reasoning model "thinks" per generated response
LARGE_CHUNK = 64 * 1024  # characters per delta of the `large` fault's padding
LARGE_FILLER = " lorem"
SENT_AT_BYTES = 32  # room for `,"sim_sent_at":1763900000.123456` that the sender adds
COMPACTION_PREFIX = "simcmp1."  # marks the simulator's own `encrypted_content`

_CALL = re.compile(r"\[\[call:(?P<name>[A-Za-z0-9_.\-]+)(?:\s+(?P<args>\{.*?\}))?\]\]", re.S)
_WORD = re.compile(r"\S+\s*")


def new_id(prefix: str) -> str:
    """An id shaped like OpenAI's: a prefix and 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True)
class Chain:
    """A response a later request may continue: its id and every item of its conversation."""

    response_id: str
    items: tuple[Json, ...]
    words: int


@dataclass(frozen=True)
class Shaping:
    """How the text is cut into deltas: a forced delta count, a padded `response.completed`, or
    a text stopped halfway (`response.incomplete`, reason `max_output_tokens`)."""

    deltas: int | None = None
    large_bytes: int | None = None
    incomplete: bool = False


@dataclass(frozen=True)
class Turn:
    """Everything one successful response sends, and what it leaves for a continuation."""

    response_id: str
    events: list[Json]
    final: Json
    chain: Chain


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str
    namespace: str | None


# -- the turn --------------------------------------------------------------------------------------


def build_turn(
    req: CreateRequest,
    prev: Chain | None,
    *,
    now: float,
    ids: IdFactory = new_id,
    shaping: Shaping = Shaping(),
) -> Turn:
    """The events of one response to `req`, continuing `prev` (raises `SimError` on bad input)."""
    new_items = expand_input(req.input_items)
    prev_items = prev.items if prev else ()
    if prev is not None:
        check_function_call_outputs(prev_items, new_items)
    context_words = (prev.words if prev else 0) + count_words(new_items)
    input_tokens = max(1, instruction_words(req.fields.get("instructions")) + context_words)
    cached = min(prev.words if prev else 0, input_tokens)
    response_id = ids("resp")
    builder = _TurnBuilder(req, response_id, int(now), input_tokens, cached)
    decision = _decide(req, (*prev_items, *new_items))
    if decision is None:
        output: list[Json] = []
        final = builder.warm_up()
    elif isinstance(decision, _Call):
        output, final = builder.function_call(decision, ids)
    else:
        output, final = builder.text(decision, ids, shaping)
    chain = Chain(
        response_id,
        (*prev_items, *new_items, *output),
        context_words + count_words(output),
    )
    return Turn(response_id, builder.events, final, chain)


def failed_event(turn: Turn, sequence_number: int, stream_id: str | None) -> Json:
    """`response.failed` ending `turn` early (fault `response_failed`)."""
    usage = turn.final["usage"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    response = {
        **turn.final,
        "status": "failed",
        "completed_at": None,
        "incomplete_details": None,
        "output": [],
        "error": {
            "code": "server_error",
            "message": "The model failed to generate a response. (simulated)",
            "param": None,
            "type": "server_error",
        },
        "usage": usage_object(usage["input_tokens"], cached, 0, 0),
    }
    return _event("response.failed", sequence_number, stream_id, response=response)


def error_without_status(sequence_number: int, stream_id: str | None) -> Json:
    """An `error` frame lacking `status`, as some upstreams send (fault `error_no_status`)."""
    frame = errors.simulated_server_error().ws_frame(stream_id, with_status=False)
    return {"type": "error", "sequence_number": sequence_number, **frame}


def usage_object(input_tokens: int, cached: int, output_tokens: int, reasoning: int) -> Json:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def is_reasoning_model(model: str) -> bool:
    name = model.rsplit("/", 1)[-1]
    return "reason" in name or name.startswith(("o", "gpt-5"))


class _TurnBuilder:
    """Numbers the events of one response and builds its response objects."""

    def __init__(
        self, req: CreateRequest, response_id: str, created_at: int, input_tokens: int, cached: int
    ) -> None:
        self.req = req
        self.response_id = response_id
        self.created_at = created_at
        self.input_tokens = input_tokens
        self.cached = cached
        self.events: list[Json] = []
        self.reasoning = REASONING_TOKENS if is_reasoning_model(req.model) else 0
        self._add("response.created", response=self._response("in_progress"))
        self._add("response.in_progress", response=self._response("in_progress"))

    def warm_up(self) -> Json:
        final = self._response("completed", output=[], usage=self._usage(0, reasoning=0))
        self._add("response.completed", response=final)
        return final

    def text(self, text: str, ids: IdFactory, shaping: Shaping) -> tuple[list[Json], Json]:
        item_id = ids("msg")
        text, deltas = text_deltas(text, shaping.deltas)
        incomplete = shaping.incomplete
        if incomplete:
            deltas = deltas[: (len(deltas) + 1) // 2]
            text = "".join(deltas)
        elif shaping.large_bytes:
            text, deltas = self._pad(item_id, text, deltas, shaping.large_bytes)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        self._add(
            "response.output_item.added", output_index=0, item=_message(item_id, "in_progress")
        )
        self._add("response.content_part.added", **where, part=_text_part(""))
        for delta in deltas:
            self._add("response.output_text.delta", **where, delta=delta, logprobs=[])
        self._add("response.output_text.done", **where, text=text, logprobs=[])
        part = _text_part(text)
        self._add("response.content_part.done", **where, part=part)
        done = _message(item_id, "incomplete" if incomplete else "completed", part)
        self._add("response.output_item.done", output_index=0, item=done)
        return [done], self._finish([done], len(text.split()), incomplete)

    def function_call(self, call: _Call, ids: IdFactory) -> tuple[list[Json], Json]:
        item_id = ids("fc")
        digest = hashlib.sha256(f"{self.response_id}:{call.name}".encode()).hexdigest()
        item: Json = {
            "id": item_id,
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": "call_" + digest[:24],
            "name": call.name,
        }
        if call.namespace is not None:
            item["namespace"] = call.namespace
        where = {"item_id": item_id, "output_index": 0}
        self._add("response.output_item.added", output_index=0, item=item)
        self._add("response.function_call_arguments.delta", **where, delta=call.arguments)
        self._add("response.function_call_arguments.done", **where, arguments=call.arguments)
        done = {**item, "status": "completed", "arguments": call.arguments}
        self._add("response.output_item.done", output_index=0, item=done)
        return [done], self._finish([done], count_words([done]), incomplete=False)

    def _finish(self, output: list[Json], words: int, incomplete: bool) -> Json:
        status = "incomplete" if incomplete else "completed"
        final = self._response(status, output=output, usage=self._usage(words))
        if incomplete:
            final["incomplete_details"] = {"reason": "max_output_tokens"}
        self._add(f"response.{status}", response=final)
        return final

    def _pad(
        self, item_id: str, text: str, deltas: list[str], target: int
    ) -> tuple[str, list[str]]:
        """Pad the text so that the `response.completed` frame is about `target` bytes."""
        padding = ""
        for _ in range(2):  # the second pass absorbs the change of width of the usage figures
            padded = text + padding
            usage = self._usage(len(padded.split()))
            message = _message(item_id, "completed", _text_part(padded))
            final = self._response("completed", output=[message], usage=usage)
            frame = _event(
                "response.completed", len(deltas) + 7, self.req.stream_id, response=final
            )
            missing = len(padding) + target - len(orjson.dumps(frame)) - SENT_AT_BYTES
            padding = (LARGE_FILLER * (missing // len(LARGE_FILLER) + 1))[: max(0, missing)]
        chunks = [padding[i : i + LARGE_CHUNK] for i in range(0, len(padding), LARGE_CHUNK)]
        return text + padding, [*deltas, *chunks]

    def _usage(self, words: int, reasoning: int | None = None) -> Json:
        reasoning = self.reasoning if reasoning is None else reasoning
        return usage_object(self.input_tokens, self.cached, words + reasoning, reasoning)

    def _response(
        self, status: str, *, output: list[Json] | None = None, usage: Json | None = None
    ) -> Json:
        obj = response_object(self.req, self.response_id, self.created_at, status)
        obj["output"] = output or []
        obj["usage"] = usage
        if status == "completed":
            obj["completed_at"] = self.created_at
        return obj

    def _add(self, type_: str, **fields: Any) -> None:
        self.events.append(_event(type_, len(self.events), self.req.stream_id, **fields))


def _event(type_: str, sequence_number: int, stream_id: str | None, **fields: Any) -> Json:
    event: Json = {"type": type_, "sequence_number": sequence_number, **fields}
    if stream_id is not None:
        event["stream_id"] = stream_id
    return event


def _text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, status: str, *parts: Json) -> Json:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": list(parts),
    }


def response_object(req: CreateRequest, response_id: str, created_at: int, status: str) -> Json:
    """The `response` object: every field of openai-python's `Response`, echoing the request."""
    f = req.fields
    tier = f.get("service_tier", "default")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": None,
        "conversation": None,
        "error": None,
        "incomplete_details": None,
        "instructions": f.get("instructions"),
        "max_output_tokens": f.get("max_output_tokens"),
        "max_tool_calls": f.get("max_tool_calls"),
        "metadata": req.metadata,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": f.get("parallel_tool_calls", True),
        "previous_response_id": req.previous_response_id,
        "prompt": f.get("prompt"),
        "prompt_cache_key": f.get("prompt_cache_key"),
        "prompt_cache_retention": f.get("prompt_cache_retention"),
        "reasoning": f.get("reasoning", {"effort": None, "summary": None}),
        "safety_identifier": f.get("safety_identifier"),
        "service_tier": "default" if tier == "auto" else tier,
        "store": req.store,
        "temperature": f.get("temperature", 1.0),
        "text": f.get("text", {"format": {"type": "text"}, "verbosity": "medium"}),
        "tool_choice": f.get("tool_choice", "auto"),
        "tools": list(req.tools),
        "top_logprobs": f.get("top_logprobs", 0),
        "top_p": f.get("top_p", 1.0),
        "truncation": f.get("truncation", "disabled"),
        "usage": None,
        "user": f.get("user"),
        "frequency_penalty": f.get("frequency_penalty", 0.0),
        "presence_penalty": f.get("presence_penalty", 0.0),
        # Fields OpenAI fills only for features the simulator does not model.
        "access_programs": None,
        "image": None,
        "input_transformations": None,
        "moderation": None,
        "prompt_cache_diagnostics": None,
        "prompt_cache_options": None,
        "tool_usage": None,
    }


# -- what the "model" says -------------------------------------------------------------------------


def _decide(req: CreateRequest, context: Sequence[Json]) -> str | _Call | None:
    """The output of a turn: None (warm-up), a function call, or a text."""
    if not req.generate:
        return None
    if context and context[-1].get("type") == "function_call_output":
        return TOOL_PREFIX + tool_output_text(context[-1].get("output"))
    user_text = last_user_text(context)
    if user_text is None:
        return ECHO_PREFIX + NO_INPUT
    call = _requested_call(user_text, req.tools)
    return call if call is not None else ECHO_PREFIX + user_text


def _requested_call(text: str, tools: Iterable[Json]) -> _Call | None:
    functions = dict(function_tools(tools))
    match = _CALL.search(text)
    if match is None or not functions:
        return None
    name = match["name"]
    return _Call(name, match["args"] or "{}", functions.get(name))


def function_tools(tools: Iterable[Any]) -> list[tuple[str, str | None]]:
    """(name, namespace) of every function tool, namespaced ones included."""
    found: list[tuple[str, str | None]] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "function" and isinstance(tool.get("name"), str):
            found.append((tool["name"], None))
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            found.extend((name, tool.get("name")) for name, _ in function_tools(tool["tools"]))
    return found


def text_deltas(text: str, forced: int | None) -> tuple[str, list[str]]:
    """The text and its deltas: one per word (with its following whitespace), or `forced` words.

    With `forced`, the text becomes exactly that many words: the words of `text` repeated (or cut)
    in order, joined by single spaces.
    """
    if forced is None:
        words = _WORD.findall(text)
        if not words:
            return text, [text] if text else []
        lead = text[: len(text) - len(text.lstrip())]
        return text, [lead + words[0], *words[1:]]
    base = text.split() or [text]
    picked = [base[i % len(base)] for i in range(forced)]
    deltas = [word + " " for word in picked[:-1]] + picked[-1:]
    return "".join(deltas), deltas


# -- reading items ---------------------------------------------------------------------------------


def is_user_message(item: Json) -> bool:
    return item.get("type") == "message" and item.get("role") == "user"


def last_user_text(items: Sequence[Json]) -> str | None:
    """The text of the last user message: a string content, or its `input_text` parts joined."""
    for item in reversed(items):
        if is_user_message(item):
            return _content_text(item.get("content"), ("input_text",))
    return None


def tool_output_text(output: object) -> str:
    return _content_text(output, ("input_text", "output_text", "text"))


def _content_text(content: object, part_types: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") in part_types
        and isinstance(part.get("text"), str)
    ]
    return " ".join(texts)


def item_text(item: Json) -> str:
    """The words an item counts for in usage."""
    kind = item.get("type")
    if kind == "message":
        return _content_text(item.get("content"), ("input_text", "output_text", "text", "refusal"))
    if kind == "function_call":
        return f"{item.get('name', '')} {item.get('arguments', '')}"
    if kind in ("function_call_output", "custom_tool_call_output"):
        return tool_output_text(item.get("output"))
    return ""


def count_words(items: Iterable[Json]) -> int:
    return sum(len(item_text(item).split()) for item in items)


def instruction_words(instructions: object) -> int:
    if isinstance(instructions, str):
        return len(instructions.split())
    if isinstance(instructions, list):
        return count_words(i for i in instructions if isinstance(i, dict))
    return 0


def check_function_call_outputs(prev_items: Sequence[Json], new_items: Sequence[Json]) -> None:
    """Every `function_call_output` of a continuation must answer a call made earlier in its chain.

    Only continuations are checked: an unchained request may carry an output whose call the
    client elided (real clients' captured frames do), and the simulator cannot know better.
    """
    known = {item.get("call_id") for item in prev_items if item.get("type") == "function_call"}
    for item in new_items:
        if item.get("type") == "function_call":
            known.add(item.get("call_id"))
        elif item.get("type") == "function_call_output" and item.get("call_id") not in known:
            raise errors.invalid_function_call_output(item.get("call_id"))


# -- compaction ------------------------------------------------------------------------------------


def encode_compaction(items: Sequence[Json]) -> str:
    return COMPACTION_PREFIX + base64.urlsafe_b64encode(orjson.dumps(list(items))).decode()


def decode_compaction(content: object) -> list[Json]:
    if not isinstance(content, str) or not content.startswith(COMPACTION_PREFIX):
        raise errors.invalid_encrypted_content()
    try:
        items = orjson.loads(base64.urlsafe_b64decode(content[len(COMPACTION_PREFIX) :]))
    except (binascii.Error, ValueError) as exc:
        raise errors.invalid_encrypted_content() from exc
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise errors.invalid_encrypted_content()
    return items


def expand_input(items: Iterable[Json]) -> list[Json]:
    """The input with every `compaction` item replaced by the items it folded."""
    expanded: list[Json] = []
    for item in items:
        if item.get("type") == "compaction":
            expanded.extend(expand_input(decode_compaction(item.get("encrypted_content"))))
        else:
            expanded.append(item)
    return expanded


def build_compaction(
    req: CompactRequest, prev: Chain | None, *, now: float, ids: IdFactory = new_id
) -> Json:
    """`POST /v1/responses/compact`: the whole context folded into one `compaction` item.

    Only output items may appear in `output` (openai-python's `CompactedResponse`: a `message`
    there is an assistant's), so the user's messages are folded too, not kept beside it.
    """
    context = [*(prev.items if prev else ()), *expand_input(req.input_items)]
    folded = context
    input_tokens = max(1, instruction_words(req.instructions) + count_words(context))
    cached = min(prev.words if prev else 0, input_tokens)
    compaction = {
        "type": "compaction",
        "id": ids("cmp"),
        "encrypted_content": encode_compaction(folded),
    }
    return {
        "id": ids("cmp"),
        "object": "response.compaction",
        "created_at": int(now),
        "output": [compaction],
        "usage": usage_object(input_tokens, cached, count_words(folded), 0),
    }
