"""A prompt made into token ids once, the same ids for sampling, training log-probs, evaluation and the reference:
a conversation (or a plain prompt with the chat setting on) through the tokenizer's chat template with the generation
prompt, else the raw text; BOS put in front only when the tokenizer adds one by default and the text does not
already start with it (no double BOS when a template writes its own)."""

from __future__ import annotations

from .table import DataError


def is_conversation(value) -> bool:
    """A list of {role, content} messages."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_template(setting: str, tokenizer, conversational: bool, model: str = "") -> bool:
    """data.chat_template made concrete: true / false as set; auto = on when the tokenizer has a template (a
    conversation column with a template-less tokenizer is refused: it has no text form of its own)."""
    on = setting == "true" or (setting == "auto" and (has_template(tokenizer) or conversational))
    if on and not has_template(tokenizer):
        why = "the prompts are conversations" if setting == "auto" else "data.chat_template=true"
        raise DataError(f"data.chat_template={setting}: {why}, but the tokenizer of model.name={model!r} has no chat "
                        "template; use an instruct model with one, or plain-text prompts with data.chat_template=false")
    return on


def conversation(value, system_prompt: str = "") -> list[dict]:
    """The messages a prompt stands for: a conversation as given, plain text as one user message; the system prompt
    first when it is set and the conversation has none."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in value] if is_conversation(value) else \
        [{"role": "user", "content": str(value)}]
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render(tokenizer, messages: list[dict]) -> str:
    """The templated text the model continues: the conversation, then the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str, bos: list[int]) -> list[int]:
    """Token ids of `text` (no special tokens added by the tokenizer), after BOS when the tokenizer puts one in front
    of a text by default (`bos`, see data.bos_prefix) and the text does not begin with it already."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and ids[:1] != bos:
        ids = bos + ids
    return ids


def display_text(value) -> str:
    """What a report shows as the prompt: the text, or a conversation's last user message."""
    if is_conversation(value):
        users = [m["content"] for m in value if m["role"] == "user"]
        return str(users[-1] if users else value[-1]["content"])
    return str(value)
