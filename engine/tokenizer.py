"""The tokenizer the engine and service use: a thin wrapper over a HF tokenizer.

Prompt ids equal ``hf_tokenizer(text).input_ids`` (the model's own BOS
policy), and chat prompts are the rendered template encoded without extra
special tokens, as ``hf_tokenizer.apply_chat_template(..., tokenize=True)``
does. Nothing here downloads: every load is ``local_files_only``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class Tokenizer:
    """Encode, decode and chat-format for one model."""

    def __init__(self, hf, extra_eos_token_ids: Iterable[int] = (), bos_token_id: int | None = None):
        """Wrap ``hf`` (a ``PreTrainedTokenizerBase``).

        ``extra_eos_token_ids`` are the model config's end ids, added to the
        tokenizer's own; ``bos_token_id`` is a fallback when the tokenizer has none.
        """
        self.hf = hf
        ids = [hf.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
        self.bos_token_id: int | None = hf.bos_token_id if hf.bos_token_id is not None else bos_token_id
        self.vocab_size: int = len(hf)  # includes added tokens
        self.all_special_ids: tuple[int, ...] = tuple(hf.all_special_ids)

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike,
        extra_eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        auto_class: bool = True,
    ) -> "Tokenizer":
        """Load the tokenizer files saved in directory ``path`` (see ``load_hf_tokenizer``)."""
        return cls(load_hf_tokenizer(Path(path), auto_class), extra_eos_token_ids, bos_token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS policy applies."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The chat template applied to ``messages``, as text.

        ``tools`` (OpenAI function tools, ``{"type": "function", "function":
        {...}}``) are handed to the template as transformers does; a template
        that does not use them renders as without. Assistant turns may carry
        ``tool_calls`` (``function.arguments`` as a dict) and ``tool`` turns
        a ``tool_call_id``, as transformers' templates expect.
        """
        if not self.has_chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; send a plain prompt instead of messages"
            )
        _check_messages(messages)
        return self.hf.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered chat (the template carries its own special tokens)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token_ids}, bos={self.bos_token_id})"


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] lacks a 'role' (a non-empty string such as 'user')")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) lacks a 'content' string")
        calls = message.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and c["function"].get("name")
                for c in calls)):
            raise ValueError(f"messages[{i}].tool_calls must be a list of "
                             "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}")


def load_hf_tokenizer(path: Path, auto_class: bool = True):
    """The HF tokenizer saved in directory ``path``, offline.

    ``auto_class`` picks the class the files ask for (``AutoTokenizer``, which
    also imports torch); without it a plain ``PreTrainedTokenizerFast`` reads
    tokenizer.json, which is quicker and enough for files pagedgen wrote.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            f"save the model's tokenizer there with tokenizer.save_pretrained()"
        )
    if auto_class:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def hf_tokenizer_from_gguf(gguf_path: Path):
    """The HF tokenizer transformers builds from a GGUF's ``tokenizer.ggml.*`` metadata."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    hf.init_kwargs.pop("local_files_only", None)  # a load option, not something to save with the files
    return hf
