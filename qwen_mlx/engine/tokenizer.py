"""The checkpoint's tokenizer and chat template.

`tokenizer.json` runs through the `tokenizers` library. The chat template is the checkpoint's own Jinja source,
which comes from a download and is untrusted: it renders in Jinja's immutable sandbox (no attribute tricks, no
mutation of the messages) with a budget on time, output size and the size of anything it builds.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

from qwen_mlx.errors import UserError

MAX_TEMPLATE_SECONDS = 2.0
MAX_TEMPLATE_CHARS = 4_000_000  # rendered prompt, and any string or list the template builds
MAX_ARGUMENT = 1_000_000  # largest integer a template may pass to a method (str.center(10**9) and the like)
# Messages whose text comes from people or tools, not from the model: their text is never a control token.
UNTRUSTED_ROLES = ("user", "system", "tool")


class TokenizerError(UserError):
    """A tokenizer file is missing or malformed."""


class TemplateError(UserError):
    """A chat template failed, broke a sandbox rule or ran past its budget."""


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, eos_ids: tuple[int, ...], source: str = "tokenizer"):
        self._backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.eos_ids = eos_ids
        self.source = source
        self.think_id = backend.token_to_id("<think>")
        self.think_end_id = backend.token_to_id("</think>")
        self._template = None
        self._plain = None  # the backend without added tokens, built when first needed

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: file not found (the checkpoint has no tokenizer.json)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust parser's message says what is wrong
            raise TokenizerError(f"{file}: not a valid tokenizer ({' '.join(str(e).split())})") from None
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template must be a string")
        return cls(backend, template, _eos_ids(path, backend), str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text (e.g. <|im_start|>) become their ids."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def encode_chat(self, messages: list[dict], *, enable_thinking: bool = True,
                    tools: list[dict] | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The token ids of the rendered chat template, where control tokens come from the template alone.

        Text of user, system and tool messages that spells an added token (`<|im_start|>`, `<|im_end|>`,
        `<think>`, ...) is encoded as its plain characters, so a pasted prompt cannot open a turn of its own or a
        think block. Each such spelling is swapped for a private-use character while the template renders, and
        put back after the template's own tokens have been found; the text between two of those is encoded as the
        tokenizer encodes any text between added tokens. Messages without such text encode exactly as `encode`
        of the rendered template (as transformers does)."""
        marks = self._marks(messages)
        options = dict(enable_thinking=enable_thinking, tools=tools, add_generation_prompt=add_generation_prompt)
        if not marks:
            return self.encode(self.apply_chat_template(messages, **options))
        hidden = [{**m, "content": _swap(m["content"], marks)} if _untrusted_text(m) else m for m in messages]
        text = self.apply_chat_template(hidden, **options)
        back = {mark: token for token, mark in marks.items()}
        added = self._backend.get_added_tokens_decoder()
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids, start = [], 0
        for token, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token in added:  # one of the template's own
                ids += self._encode_plain(_swap(text[start:begin], back))
                ids.append(token)
                start = end
        return ids + self._encode_plain(_swap(text[start:], back))

    def _marks(self, messages: list[dict]) -> dict[str, str]:
        """Added-token spelling -> a private-use character for those that untrusted messages contain."""
        texts = [m["content"] for m in messages if _untrusted_text(m)]
        found = sorted({t.content for t in self._backend.get_added_tokens_decoder().values()
                        if any(t.content in text for text in texts)}, key=len, reverse=True)
        if not found:
            return {}
        joined = "".join(str(m.get("content")) for m in messages)
        base = next(b for b in range(0x100000, 0x10FFFE - len(found), len(found))  # not already in the text
                    if not any(chr(b + i) in joined for i in range(len(found))))
        return {token: chr(base + i) for i, token in enumerate(found)}

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain is None:
            from tokenizers import Tokenizer as Backend

            spec = json.loads(self._backend.to_str())
            spec["added_tokens"] = []
            self._plain = Backend.from_str(json.dumps(spec))
        return self._plain.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether the two map every token (added tokens included) to the same id."""
        return self._backend.get_vocab(with_added_tokens=True) == other._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = True, tools: list[dict] | None = None) -> str:
        """Render messages ({"role", "content"} dicts) with the checkpoint's template, as transformers does."""
        if self.chat_template is None:
            raise TemplateError(f"{self.source}: the checkpoint has no chat template (tokenizer_config.json "
                                "has no chat_template)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        return _render(self._template, messages=messages, add_generation_prompt=add_generation_prompt,
                       enable_thinking=enable_thinking, tools=tools)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns token ids into text as soon as the text is complete UTF-8.

    Byte-level BPE can split one character over several tokens; those tokens are held until the character is
    whole. Only the held tokens are decoded at each step (at most `max_pending`), so work per token is constant.
    """

    max_pending = 8  # a longer run of incomplete bytes is invalid UTF-8: emit it (with U+FFFD) and move on

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []
        self.tokens_decoded = 0  # total ids passed to decode: the work done, for tests

    def add(self, token: int) -> str:
        """Add one token; return the text it completes (often empty while a character is incomplete)."""
        self._pending.append(token)
        self.tokens_decoded += len(self._pending)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self.max_pending:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Text of any held tokens (an incomplete character at the end of a generation)."""
        text = self._tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


def _untrusted_text(message: dict) -> bool:
    return message.get("role") in UNTRUSTED_ROLES and isinstance(message.get("content"), str)


def _swap(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():  # longest spelling first (the order of _marks)
        text = text.replace(old, new)
    return text


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object")
    return data


def _eos_ids(path: Path, backend) -> tuple[int, ...]:
    """generation_config.json's eos_token_id, else config.json's, else Qwen's <|im_end|> and <|endoftext|>."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(path / name).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else eos
        if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return tuple(ids)
    return tuple(i for i in (backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>"))
                 if i is not None)


# --- the sandbox -----------------------------------------------------------------------------------------------

def _compile(source: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateError("chat template: exponent too large")
            if operator == "*" and _built_size(left, right) > MAX_TEMPLATE_CHARS:
                raise TemplateError("chat template: a string or list it builds is too large")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARGUMENT:
                    raise TemplateError("chat template: an argument is too large")
            return super().call(__context, __obj, *args, **kwargs)

        def is_safe_attribute(self, obj, attr, value):
            # str.format / format_map: the sandbox keeps them from reaching internals, not from padding a string
            # to gigabytes ("{:>9999999999}"); Qwen templates never use them.
            if isinstance(obj, str) and attr in ("format", "format_map"):
                return False
            return super().is_safe_attribute(obj, attr, value)

    env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.pop("format", None)  # printf-style padding has the same problem as str.format
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:64])
    return env


def _built_size(left, right) -> int:
    if isinstance(left, (str, list, tuple)) and isinstance(right, int):
        return len(left) * right
    if isinstance(right, (str, list, tuple)) and isinstance(left, int):
        return len(right) * left
    return 0


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps, no HTML escaping (Jinja's own escapes <, >, &, ').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _render(template, **context) -> str:
    """Render under a time budget: a trace function on the template's own frames (its loops and macros) stops it
    once the deadline passes, and the output is cut off past MAX_TEMPLATE_CHARS."""
    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateError(f"chat template: rendering took longer than {MAX_TEMPLATE_SECONDS:g} s")
        return local

    def trace(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace)
    pieces, size = [], 0
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_TEMPLATE_CHARS:
                raise TemplateError(f"chat template: output longer than {MAX_TEMPLATE_CHARS} characters")
            pieces.append(piece)
    except TemplateError:
        raise
    except RecursionError:
        raise TemplateError("chat template: recursion too deep") from None
    except Exception as e:  # SecurityError, UndefinedError, TypeError ... from the template's own code
        raise TemplateError(f"chat template: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
