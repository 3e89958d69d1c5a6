"""Chat messages to token ids: the checkpoint's own Jinja template, or one of the SFT data's templates.

`own` reads `chat_template` from `tokenizer_config.json` (a string, or a list of {name, template} whose
"default" is used) or `chat_template.jinja`, and renders it as transformers' `apply_chat_template` does
(sandboxed Jinja, trim_blocks, lstrip_blocks, `add_generation_prompt`, `bos_token`/`eos_token`, `raise_exception`),
then tokenizes without adding specials. The built-in ones (`me-llama`, `llama2-chat`, `raw`, data/sft.TEMPLATES)
encode the finished user/assistant pairs exactly as SFT training encoded them, then the last user turn wrapped
as a prompt: one user message gives the ids `mellama generate --chat-template NAME` gives for its text. A
system message is put before the first user turn (inside [INST] as <<SYS>> for llama2-chat).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from mellama_jax.config_file import read_json_object
from mellama_jax.data.sft import TEMPLATES, encode
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.errors import UserError
from mellama_jax.inference.protocol import bad

CHOICES = ("auto", "own", *TEMPLATES)  # auto: own if the checkpoint has one, else me-llama

Template = Callable[[list[dict]], list[int]]


def own_template(ckpt_dir: pathlib.Path) -> str | None:
    """The checkpoint's Jinja chat template, or None."""
    jinja_file = ckpt_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = ckpt_dir / "tokenizer_config.json"
    template = read_json_object(config_file).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config_file}: chat_template must be a string or a list of {{name, template}}")
    return template


def load(ckpt_dir: pathlib.Path, choice: str, tokenizer: Tokenizer) -> tuple[str, Template]:
    """(the template's name, messages -> token ids)."""
    if choice not in CHOICES:
        raise UserError(f"--chat-template must be one of {', '.join(CHOICES)}, got {choice!r}")
    source = own_template(ckpt_dir) if choice in ("auto", "own") else None
    if choice == "own" and source is None:
        raise UserError(f"{ckpt_dir}: no chat template (chat_template in tokenizer_config.json or chat_template.jinja)")
    if source is not None:
        return "own", _jinja(source, tokenizer)
    name = "me-llama" if choice == "auto" else choice
    return name, lambda messages: _builtin(messages, name, tokenizer)


def _jinja(source: str, tokenizer: Tokenizer) -> Template:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template: {e.message} (line {e.lineno})") from None
    specials = {
        "bos_token": "" if tokenizer.bos_id is None else tokenizer.token_text(tokenizer.bos_id),
        "eos_token": "" if tokenizer.eos_id is None else tokenizer.token_text(tokenizer.eos_id),
    }

    def apply(messages: list[dict]) -> list[int]:
        try:
            text = template.render(messages=messages, add_generation_prompt=True, **specials)
        except jinja2.exceptions.TemplateError as e:
            raise bad("messages", f"the chat template refused them: {e}") from None
        return tokenizer.encode_with_specials(text)

    return apply


def _builtin(messages: list[dict], name: str, tokenizer: Tokenizer) -> list[int]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in turns]
    if (
        not turns
        or roles != ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2)
        or len(turns) % 2 == 0
    ):
        raise bad("messages", "after any system messages, turns must alternate user/assistant and end with a user turn")
    contents = [m["content"] for m in turns]
    if system:
        prefix = "\n\n".join(system)
        first = (
            f"<<SYS>>\n{prefix}\n<</SYS>>\n\n{contents[0]}" if name == "llama2-chat" else f"{prefix}\n\n{contents[0]}"
        )
        contents[0] = first
    pairs = list(zip(contents[:-1:2], contents[1::2], strict=True))
    wrapper, bos_every_turn = TEMPLATES[name]
    last = wrapper.format(prompt=contents[-1])
    if not pairs:  # as `mellama generate` encodes a prompt
        return tokenizer.encode(last)
    bos = [tokenizer.bos_id] if bos_every_turn and tokenizer.bos_id is not None else []
    return encode(pairs, name, tokenizer)[0] + bos + tokenizer.encode(last, add_special=False)
