"""Tokenizer (`tokenizers`) and chat templates (Jinja2, rendered the way Hugging Face does)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# Used when a model ships no chat template: one "role: content" line per message, then the
# assistant's turn, so a base model simply continues a transcript.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks in
    transformers; for inference it renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja2 environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if model_dir.suffix == ".gguf":   # built from the file's vocabulary, with its chat template
            from appliance.models.gguf_model import GGUF
            gguf = GGUF(model_dir)
            self.hf, self.config = gguf.tokenizer(), gguf.tokenizer_config()
        else:
            path = model_dir / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
            self.hf = HFTokenizer.from_file(str(path))
            config_path = model_dir / "tokenizer_config.json"
            self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        # The special tokens a template sees by name, as transformers passes its special_tokens_map.
        self.special_tokens = {name: _token_text(self.config[name]) for name in SPECIAL_TOKENS
                               if self.config.get(name) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        jinja_path = model_dir / "chat_template.jinja"  # where transformers now saves it
        template = jinja_path.read_text() if jinja_path.exists() else self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.has_chat_template = bool(template)
        self.template = _environment().from_string(template or FALLBACK_TEMPLATE)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works and encode does not: a long prompt would
        # hold every other thread (the MQTT client's keepalive among them) for seconds.
        return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text, as transformers' `apply_chat_template(..., tokenize=False)` renders it."""
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens, **extra})

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """`extra` reaches the template as variables (Qwen3's `enable_thinking`)."""
        text = self.render_chat(messages, add_generation_prompt, **extra)
        # A template writes the special tokens itself; the fallback leaves BOS to the tokenizer.
        return self.encode(text, add_special_tokens=not self.has_chat_template)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back a piece that ends in the
    middle of a multi-byte character (the tokenizer shows those as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
