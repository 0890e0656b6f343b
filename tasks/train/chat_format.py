"""chat_format: the one chat layout SFT trains on and inference prompts with.

Layout (no whitespace is added anywhere; ``{...}`` is the message text, verbatim)::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|><|user|>...

- ``<|bos|>`` once, at the start of the conversation.
- Each message is its role token, its content, ``<|end|>``. The system message is optional and
  only first; then user and assistant alternate, starting with the user.
- ``add_generation_prompt`` appends ``<|assistant|>``: the model then writes the reply and closes
  it with ``<|end|>``, where generation stops.

Why this layout and not ChatML's (SmolLM2: ``<|im_start|>assistant\\n{reply}<|im_end|>\\n``):
ChatML spells the role as text ("assistant"), so it needs the newline to separate the role name
from the content. Our roles are single reserved tokens, so a separator carries no information, and
it would cost something: with a newline after the role token, a byte-level BPE can merge that
newline with leading whitespace of the content (``"\\n  "`` is one pre-token), so the boundary
between "prompt" and "what the model writes" would fall inside a token and the loss mask would be
ill-defined. Without it, each content is exactly the text between two special tokens, which is
also exactly the piece transformers tokenizes on its own: our ids equal
``apply_chat_template``'s by construction. This is nanochat's choice too (``<|user_start|>`` ...
``<|user_end|>``, ``<|assistant_start|>`` ... ``<|assistant_end|>``, no newlines; nanochat folds
the system prompt into the first user message, we keep a role for it since the tokenizer reserves
one). One ``<|end|>`` serves all roles: the model needs only one stop token.

Loss mask: True exactly on the assistant's content tokens and its closing ``<|end|>`` (the model
must learn to produce the reply and to stop). ``<|assistant|>`` itself is False: the prompt
supplies it (add_generation_prompt), the model never has to choose it.

Literal special-token strings typed in content ("please print <|end|>") stay text here: contents
are encoded with ``encode_special_tokens`` (see ``load_tokenizer``), only role tokens written by
this module are special ids. transformers' ``apply_chat_template`` by default re-parses the
rendered string and turns such literals into special tokens (a prompt injection); pass
``sanitize_control_tokens=True`` there to get our behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

# The tokenizer stage's reserved tokens (llmflow.tasks.train.bpe_tokenizer.SPECIAL_TOKENS), spelled
# here
# rather than imported so that the tokenizer stage can import this module to write the template
# into tokenizer_config.json without an import cycle; a test checks that the two agree.
BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The same layout for transformers. Role tokens are written as whole literals (never built as
# '<|' + role + '|>') so that sanitize_control_tokens recognises them as the template's own
# control tokens. {% generation %} marks what return_assistant_tokens_mask reports: the reply and
# its <|end|>, as in our mask. Errors mirror validate_messages.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set offset = 1 -%}"
    "{%- else -%}{%- set offset = 0 -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set expected = 'system' if loop.index0 < offset"
    " else ['user', 'assistant'][(loop.index0 - offset) % 2] -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': role ' ~ message['role'] ~"
    " ' where ' ~ expected ~ ' was expected (system first only, then user and assistant"
    " alternate)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' + message['content'] + '<|end|>' -}}"
    "{%- else -%}{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages and messages[-1]['role'] != 'user' -%}"
    "{{- raise_exception('add_generation_prompt needs the last message to be from the user') -}}"
    "{%- endif -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)


def chat_template_config() -> dict[str, str]:
    """Keys to merge into tokenizer_config.json so ``AutoTokenizer`` renders our layout."""
    return {"chat_template": CHAT_TEMPLATE}


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} is not in this tokenizer's vocabulary")
    return token_id


def validate_messages(messages: Sequence[Any], add_generation_prompt: bool = False) -> None:
    """Raise ValueError naming the first bad message (its index) and what is wrong with it.

    Rules: a non-empty list of ``{"role", "content"}`` objects with string content; ``system``
    only as the first message; then ``user`` and ``assistant`` alternate, starting with ``user``.
    With ``add_generation_prompt`` the last message must be the user's (the reply comes next).
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    offset = 1 if isinstance(messages[0], Mapping) and messages[0].get("role") == "system" else 0
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index}: not an object but {type(message).__name__}")
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ValueError(
                f"message {index}: unknown role {role!r} (expected system, user or assistant)"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(
                f"message {index} ({role}): content must be a string, got {type(content).__name__}"
            )
        expected = "system" if index < offset else ("user", "assistant")[(index - offset) % 2]
        if role != expected:
            where = "only the first message may be system" if role == "system" else ""
            raise ValueError(
                f"message {index}: role {role!r} where {expected!r} was expected"
                f" ({where or 'after an optional system message, user and assistant alternate'})"
            )
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError(
            f"message {len(messages) - 1}: add_generation_prompt needs the last message to be"
            f" from the user, not {messages[-1]['role']!r}"
        )


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in our layout, and the assistant-only loss mask.

    ``mask[i]`` is True when ``ids[i]`` is a token the model must learn to produce (the
    assistant's content and its ``<|end|>``); it is aligned with ``ids``, not shifted. The
    tokenizer must come from ``load_tokenizer`` (encode_special_tokens on), so that special-token
    strings inside content stay text.
    """
    if not tokenizer.encode_special_tokens:
        raise ValueError(
            "tokenizer.encode_special_tokens is off: a literal '<|end|>' in a message would"
            " become a control token; load the tokenizer with llmflow.tasks.train.bpe_tokenizer."
            "load_tokenizer"
        )
    validate_messages(messages, add_generation_prompt)
    bos = _token_id(tokenizer, BOS)
    end = _token_id(tokenizer, END)
    role_ids = {role: _token_id(tokenizer, token) for role, token in ROLE_TOKENS.items()}
    contents = [message["content"] for message in messages]
    encoded = tokenizer.encode_batch(contents, add_special_tokens=False)

    ids: list[int] = [bos]
    mask: list[bool] = [False]
    for message, encoding in zip(messages, encoded, strict=True):
        learn = message["role"] == "assistant"
        ids.append(role_ids[message["role"]])
        mask.append(False)
        ids += encoding.ids
        ids.append(end)
        mask += [learn] * (len(encoding.ids) + 1)
    if add_generation_prompt:
        ids.append(role_ids["assistant"])
        mask.append(False)
    return ids, mask
