"""Decoding a turn that may call tools: what is constrained, when, and how.

Magistral writes calls as ``[TOOL_CALLS]name[ARGS]{json}`` (tokenizer v13), consecutive blocks
for parallel calls, then ``</s>``. A turn with a :class:`~edge_magistral.generation.ToolUse`
reads its own output with :class:`~edge_magistral.toolcalls.ToolCallParser` and constrains it:

- ``[TOOL_CALLS]`` is banned inside ``[THINK]`` (a call is never part of the thought), and in
  every turn that offers no tools (``tool_choice: "none"`` included).
- ``auto``: the thought and any answer text are free. Once the model writes ``[TOOL_CALLS]``, a
  grammar takes over: the name is one of the offered tools, ``[ARGS]`` follows, the arguments
  are JSON valid against that tool's ``parameters`` schema, and after the object only another
  call or ``</s>`` may come (nothing after the calls).
- ``required`` and a named function: the same grammar from the first token of the answer, so
  the answer IS one or more calls (of that function only, when named). The thought stays free,
  and the first token may still open it (``[THINK]``).
- ``parallel_tool_calls: false``: the grammar allows one call.

The grammar enforces a schema's structure: types, ``properties``, ``required``,
``additionalProperties``, ``enum``/``const``, ``anyOf``/``oneOf``, array ``items``, string
lengths and patterns. Some keywords have no grammar form in llama-cpp-python's converter (number
bounds such as ``minimum``/``maximum``, ``multipleOf``, ``uniqueItems``...): every finished call
is therefore validated against its tool's schema (jsonschema), and one that breaks it is never
reported as a call: the turn ends with a ``tool_error`` (``schema_mismatch``).

A grammar on llama.cpp matches a control token by its text when a character rule is on top (a
JSON string would accept ``[TOOL_CALLS]`` as twelve characters), so inside a call every control
token is banned except those the format needs there: ``[ARGS]`` only right after the name,
``[TOOL_CALLS]`` only once the arguments' object has closed, ``</s>`` (which the grammar allows
only at the end of a call).
"""

from __future__ import annotations

import json
from typing import Any

from edge_magistral import tekken as tk
from edge_magistral.errors import BadInputError
from edge_magistral.generation import MAX_TOOL_CALLS, ToolUse
from edge_magistral.toolcalls import State, ToolCallParser

PARSED_CONTROLS = frozenset((tk.THINK, tk.END_THINK, tk.TOOL_CALLS, tk.ARGS, tk.EOS))  # what the parser reads
_CONTROL = frozenset(range(tk.NUM_SPECIAL)) - {tk.TOOL_CALLS, tk.ARGS, tk.EOS}
IN_NAME = _CONTROL
IN_ARGS = _CONTROL | {tk.ARGS, tk.TOOL_CALLS}  # the arguments' object is open
AFTER_ARGS = _CONTROL | {tk.ARGS}  # closed: another call or </s>
IN_THOUGHT = frozenset((tk.TOOL_CALLS,))
NOTHING: frozenset[int] = frozenset()
# llama-cpp-python's converter lets raw control characters into JSON strings, which strict JSON
# (and so the parser) refuses; llama.cpp's own converter excludes them, as this does.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def tools_grammar(use: ToolUse) -> str:
    """The GBNF of the calls a turn may make, from ``root``: ``[TOOL_CALLS]`` (by id), a known
    name, ``[ARGS]`` (by id) and arguments valid against that tool's schema; once, or repeated
    when parallel calls are allowed."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, (name, schema) in enumerate(use.tools):
        if use.choice == "function" and name != use.name:
            continue
        schema = schema if "type" in schema else {**schema, "type": "object"}
        try:
            rule = converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), f"tool-{i}"),
                                   f"tool-{i}-args")
        except Exception as e:  # the converter raises plain exceptions on schemas it cannot express
            raise BadInputError(f"the parameters of tool {name!r} cannot be enforced: {e}") from None
        alternatives.append(f'"{name}" <[{tk.ARGS}]> {rule}')
    if not alternatives:
        raise BadInputError(f"tool_choice names {use.name!r}, which is not one of the tools")
    head = f"root ::= call{'+' if use.parallel else ''}\ncall ::= <[{tk.TOOL_CALLS}]> ( {' | '.join(alternatives)} )\n"
    return head + converter.format_grammar().replace(_LOOSE_CHAR, _STRICT_CHAR)


def _validators(use: ToolUse) -> dict[str, Any]:
    import jsonschema

    return {name: jsonschema.Draft7Validator(schema) for name, schema in use.tools}


def jsonschema_error(validator: Any, value: Any) -> str | None:
    """The first way ``value`` breaks the schema (where, and why), or None."""
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where or 'the object'}: {error.message}"[:300]


class ToolDecoding:
    """One turn's calls: the parser of its output, the grammar, and the bans of the moment."""

    def __init__(self, use: ToolUse, new_id: Any = None):
        self.use = use
        kw = {"new_id": new_id} if new_id is not None else {}
        self._validators = _validators(use)
        self.parser = ToolCallParser(use.names, max_calls=MAX_TOOL_CALLS if use.parallel else 1,
                                     check=self._check, **kw)
        self.grammar = tools_grammar(use)
        self.from_answer = use.choice != "auto"  # the grammar holds from the answer's first token
        self.started = False  # a [TOOL_CALLS] was written: the grammar holds from there

    def _check(self, name: str, arguments: str) -> str | None:
        """Why a finished call's arguments break its tool's schema, or None."""
        error = jsonschema_error(self._validators[name], json.loads(arguments))
        return None if error is None else f"the arguments break the tool's schema: {error}"

    def push(self, token: int, text: str) -> list[Any]:
        """The parser's events for one kept token (control tokens it does not read are skipped,
        as a plain turn skips them: they have no text)."""
        if token < tk.NUM_SPECIAL and token not in PARSED_CONTROLS:
            return []
        if token == tk.TOOL_CALLS:
            self.started = True
        return self.parser.push(token, text)

    def bans(self, thinking: bool) -> frozenset[int]:
        """The ids banned now (one of a few fixed sets, so a sampler is rebuilt only on a change)."""
        if thinking:
            return IN_THOUGHT
        state = self.parser.state
        if state is State.NAME:
            return IN_NAME
        if state is State.ARGS:
            return IN_ARGS if self.parser.args_open else AFTER_ARGS
        return NOTHING
