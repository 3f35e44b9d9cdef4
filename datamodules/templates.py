"""Conversation templates: a LLaVA conversation turned into token ids and labels.

A conversation is LLaVA's list of turns, ``[{"from": "human" | "gpt", "value": ...}, ...]``, human
first; ``<image>`` in a human turn marks where the image's tokens go. :func:`encode_conversation`
writes it in a template and tokenises it piece by piece: system prompt and role markers, each
human turn (split at ``<image>``, whose place gets
:data:`~lit_vlm.modules.language_model.IMAGE_TOKEN_INDEX`), each answer and its end marker. Labels
copy the ids of the answers and their end markers only (the rest is IGNORE_INDEX), so they line up
with the ids by construction, whatever the tokenizer; the model is asked in the same pieces at
generation (:func:`prompt_ids`).

Templates (``TEMPLATES``):

- ``plain``: LLaVA's stage-1 template: the image, then the answer (the caption) and the end token;
  the instruction text is dropped.
- ``chat``: Vicuna v1, LLaVA-1.5's: a system prompt, then ``USER: ... ASSISTANT: ...</s>`` turns.
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` blocks (Qwen, Hermes), with a system block.

A conversation that cannot be encoded is reported by reason (:class:`ConversationError`), never
turned into a sample without targets: ``bad_roles`` (turns do not alternate human, gpt),
``empty_turn``, ``image_count`` (``<image>`` placeholders other than the sample's images),
``truncated_targets`` (``max_length`` leaves no answer token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lit_vlm.modules.language_model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """How turns are written (see the module docstring). ``{eos}`` stands for the end token."""

    name: str
    system: str  # text before the first turn
    user: str  # a human turn: "{text}" is its value
    assistant: str  # before an answer (no loss)
    end: str  # after an answer (with loss: the model learns to stop)
    image_only: bool = False  # the human turns are reduced to their images (plain)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", user="{text}", assistant="", end="{eos}", image_only=True),
    "chat": Template("chat", system=VICUNA_SYSTEM, user=" USER: {text}", assistant=" ASSISTANT:", end="{eos}"),
    "chatml": Template("chatml", system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                       user="<|im_start|>user\n{text}<|im_end|>\n", assistant="<|im_start|>assistant\n",
                       end="<|im_end|>\n"),
}

REASONS = ("bad_roles", "empty_turn", "image_count", "truncated_targets")


class ConversationError(ValueError):
    """A conversation that cannot be encoded; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        from lit_vlm.errors import UserError

        raise UserError(f"conversation template {name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens added; ``<image>`` becomes IMAGE_TOKEN_INDEX."""
    out: list[int] = []
    for k, piece in enumerate(text.split(IMAGE)):
        if k:
            out.append(IMAGE_TOKEN_INDEX)
        if piece:
            out += tokenizer.backend.encode(piece, add_special_tokens=False).ids
    return out


def _end_ids(template: Template, tokenizer: Any) -> list[int]:
    if template.end == "{eos}":
        return [tokenizer.eos_id]
    return _text_ids(tokenizer, template.end)


def check_turns(turns: Sequence[dict], num_images: int) -> None:
    """Raise :class:`ConversationError` unless ``turns`` alternate human/gpt with text in each and
    hold exactly ``num_images`` ``<image>`` placeholders."""
    if not turns or len(turns) % 2:
        raise ConversationError("bad_roles", f"{len(turns)} turns; want human, gpt pairs")
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            raise ConversationError("bad_roles", f"turn {i} is {turn.get('from') if isinstance(turn, dict) else turn!r}, want {want!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.replace(IMAGE, "").strip():
            if not (want == "human" and isinstance(value, str) and IMAGE in value):
                raise ConversationError("empty_turn", f"turn {i} has no text")
    images = sum(t["value"].count(IMAGE) for t in turns[::2])
    if any(IMAGE in t["value"] for t in turns[1::2]) or images != num_images:
        raise ConversationError("image_count", f"{images} <image> placeholders in the human turns for {num_images} image(s)")


def _user_text(template: Template, value: str) -> str:
    if template.image_only:
        return IMAGE * value.count(IMAGE)
    return template.user.format(text=value)


def encode_conversation(turns: Sequence[dict], tokenizer: Any, template: str | Template, num_images: int = 1,
                        max_length: int | None = None) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation in ``template`` (see the module docstring): the start token
    (if the tokenizer has one), then the turns; labels on the answers and their end markers only.
    ``max_length`` counts ids, an ``<image>`` as one. Raises :class:`ConversationError`."""
    template = get_template(template) if isinstance(template, str) else template
    check_turns(turns, num_images)
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if template.system:
        ids += _text_ids(tokenizer, template.system)
    labels = [IGNORE_INDEX] * len(ids)
    end = _end_ids(template, tokenizer)
    for k in range(0, len(turns), 2):
        prompt = _text_ids(tokenizer, _user_text(template, turns[k]["value"]) + template.assistant)
        answer = _text_ids(tokenizer, (" " if template.name == "chat" else "") + turns[k + 1]["value"].strip()) + end
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    if max_length is not None and len(ids) > max_length:
        if IMAGE_TOKEN_INDEX in ids[max_length:]:
            raise ConversationError("truncated_targets", f"{len(ids)} tokens: max_length {max_length} cuts an <image>")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise ConversationError("truncated_targets", f"no answer token within max_length {max_length}")
    return ids, labels


def prompt_ids(question: str, tokenizer: Any, template: str | Template, history: Sequence[dict] = ()) -> list[int]:
    """Ids that ask ``question`` (after the turns of ``history``) in ``template``, ending where the
    answer starts: what :func:`encode_conversation` puts before an answer, token for token."""
    template = get_template(template) if isinstance(template, str) else template
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if template.system:
        ids += _text_ids(tokenizer, template.system)
    end = _end_ids(template, tokenizer)
    for k in range(0, len(history), 2):
        ids += _text_ids(tokenizer, _user_text(template, history[k]["value"]) + template.assistant)
        ids += _text_ids(tokenizer, (" " if template.name == "chat" else "") + history[k + 1]["value"].strip()) + end
    ids += _text_ids(tokenizer, _user_text(template, question) + template.assistant)
    return ids


def render_text(turns: Sequence[dict], template: str | Template, eos: str) -> str:
    """The conversation as one string in ``template`` (``<image>`` dropped; ``eos`` written for the
    end token): text a language model can be pre-trained on."""
    template = get_template(template) if isinstance(template, str) else template
    out = template.system
    for k in range(0, len(turns), 2):
        user = turns[k]["value"].replace(IMAGE, "").strip()
        out += template.user.format(text=user) + template.assistant
        out += (" " if template.name == "chat" else "") + turns[k + 1]["value"].strip() + template.end.format(eos=eos)
    return out


__all__ = ["IMAGE", "REASONS", "TEMPLATES", "ConversationError", "Template", "check_turns", "encode_conversation",
           "get_template", "prompt_ids", "render_text"]
