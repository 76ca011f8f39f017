"""The project's exception types.

Every error a user can cause is one of these: the message says what went wrong *and what to do*,
and the CLI prints it on one line with the class's exit code. They also subclass the matching
standard exception so callers that catch ``ValueError``/``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class EdgeMagistralError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInputError(EdgeMagistralError, ValueError):
    """The user gave something unusable (bad option, unknown quant name, malformed file)."""

    exit_code = 2


class PromptTooLongError(BadInputError):
    """A prompt that does not fit the context the model was loaded with (HTTP: 400,
    ``context_length_exceeded``)."""


class ModelNotFoundError(EdgeMagistralError, FileNotFoundError):
    """A model file or checkpoint is missing."""

    exit_code = 3


class CorruptModelError(BadInputError):
    """A GGUF or safetensors file is truncated, malformed or fails its checksum."""

    exit_code = 4


class DoesNotFitError(EdgeMagistralError):
    """The model (or a requested override) cannot fit in this box's memory."""

    exit_code = 5


class WatchdogStopError(EdgeMagistralError):
    """The answer was cut: the [THINK] watchdog or the token limit ended the turn (the CLI's exit code)."""

    exit_code = 6


class StorageError(EdgeMagistralError, OSError):
    """Not enough disk, an unwritable directory, or a failed atomic write."""

    exit_code = 7


class BackendError(EdgeMagistralError, RuntimeError):
    """llama.cpp is missing, failed, or lacks the backend needed for this box."""

    exit_code = 8


class ToolCallError(EdgeMagistralError):
    """The model began a tool call it could not complete as one (its output left the call format,
    or the arguments broke the tool's schema): no call was made and there is no answer to use."""

    exit_code = 9


# Not an error: ``run`` exits with this when the model called tools (stdout holds the assistant
# message with its tool_calls). Kept beside the errors' codes so that no error takes it.
TOOL_CALLS_EXIT = 10
