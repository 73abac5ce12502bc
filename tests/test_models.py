"""Model folders: config, generation defaults, chat templates, shard-only weight mapping, and the
stories260K model writing its story across any number of chained shards."""
import json
import mmap
from pathlib import Path

import jinja2
import numpy as np
import pytest

from appliance.engines.base import Shard, Step
from appliance.engines.numpy_engine import NumpyEngine
from appliance.models.config import ModelConfig, generation_defaults
from appliance.models.tokenizer import StreamDecoder, Tokenizer
from appliance.models.weights import load_tensors, shard_tensor_names, weight_map

STORIES = Path(__file__).resolve().parent.parent / ".." / "shared" / "models" / "stories260K" / "hf"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball.")
needs_stories = pytest.mark.skipif(not (STORIES / "config.json").exists(), reason="shared/models/stories260K is absent")


# --- config.json and generation_config.json -------------------------------------------------

LLAMA31 = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=100, eos_token_id=[7, 8])
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def test_rope_spelled_before_and_since_transformers_5():
    legacy = ModelConfig.from_dict({**LLAMA31, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE})
    modern = ModelConfig.from_dict({**LLAMA31, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}})
    assert legacy == modern
    assert modern.rope_theta == 500000.0 and modern.rope_scaling == LLAMA3_ROPE
    assert modern.eos_token_ids == (7, 8)
    plain = ModelConfig.from_dict({**LLAMA31, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig.from_dict({**LLAMA31, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_dict({**LLAMA31, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64})


def test_sliding_window_is_mistral_only():
    assert ModelConfig.from_dict({**LLAMA31, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert ModelConfig.from_dict({**LLAMA31, "model_type": "qwen2", "sliding_window": 4096}).sliding_window is None


def test_generation_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31, "eos_token_id": 7}))
    assert generation_defaults(tmp_path).eos_token_ids == (7,)  # no generation_config.json: config's ids
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [7, 8, 9], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    d = generation_defaults(tmp_path)
    assert d.eos_token_ids == (7, 8, 9) and d.do_sample and d.temperature == 0.6 and d.top_p == 0.9 and d.top_k == 0
    assert d.sampling() == {"temperature": 0.6, "top_p": 0.9, "top_k": 0}   # what a request leaves out
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9, "temperature": 0.6}))
    d = generation_defaults(tmp_path)
    assert d.eos_token_ids == (9, 7)                                         # both files' stop ids
    assert d.sampling() == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}   # no do_sample: the API's own


def test_qwen3_and_gemma3_stop_on_each_of_their_eos_ids(tmp_path):
    from appliance.models.synth import GENERATION, SHAPES

    for shape, ids in (("qwen3-0.6b", (151645, 151643)), ("gemma3-1b", (1, 106))):
        (tmp_path / "config.json").write_text(json.dumps(SHAPES[shape]))
        (tmp_path / "generation_config.json").write_text(json.dumps(GENERATION[shape]))
        assert set(generation_defaults(tmp_path).eos_token_ids) == set(ids)


@needs_stories
def test_stories_generation_defaults():
    d = generation_defaults(STORIES)
    assert d.eos_token_ids == (2,) and not d.do_sample


# --- chat templates ------------------------------------------------------------------------

CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")

# Mistral-style: alternation enforced with raise_exception; plus tojson, namespace and a generation block.
MISTRAL = ("{{ bos_token }}{% set ns = namespace(turns=0) %}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% set ns.turns = ns.turns + 1 %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% else %}{% generation %}{{ message['content'] | tojson }}{% endgeneration %}{{ eos_token }}{% endif %}"
           "{% endfor %}{{ '<!-- ' ~ ns.turns ~ ' -->' }}")

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "[INST]", "[/INST]"]

SYSTEM_CHAT = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "  Tell me about Lily and the red ball  "},
    {"role": "assistant", "content": "Once upon a time, Lily found a ball — \"red\" & <round> 🌍."},
    {"role": "user", "content": "And then?"},
]
USER_CHAT = SYSTEM_CHAT[1:]


def tokenizer_folder(path: Path, template: str | None, bos="<s>", eos="</s>", as_jinja_file=False) -> Path:
    """stories260K's tokenizer with chat special tokens added, and the given template."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(STORIES / "tokenizer.json"))
    hf.add_special_tokens(SPECIAL)
    hf.save(str(path / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template and as_jinja_file:
        (path / "chat_template.jinja").write_text(template)
    elif template:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@needs_stories
@pytest.mark.reference
@pytest.mark.parametrize("name, template, bos, eos, chat, as_jinja_file", [
    ("chatml-system", CHATML, None, "<|im_end|>", SYSTEM_CHAT, False),
    ("chatml-default-system", CHATML, None, "<|im_end|>", USER_CHAT, True),
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", SYSTEM_CHAT, False),
    ("mistral", MISTRAL, "<s>", "</s>", USER_CHAT, False),
])
def test_chat_template_renders_like_transformers(tmp_path, name, template, bos, eos, chat, as_jinja_file):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path, template, bos, eos, as_jinja_file)
    ours = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.render_chat(chat, add_generation_prompt) == expected
    expected_ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ours.apply_chat_template(chat) == list(expected_ids["input_ids"])


THINKING_CHAT = USER_CHAT[:1] + [{"role": "assistant", "content": "<think>\nA ball.\n</think>\n\nLily kicked it."},
                                 {"role": "user", "content": "And then?"}]


@pytest.mark.reference
@pytest.mark.parametrize("shape", ["qwen3-0.6b", "gemma3-1b", "smollm3-3b", "phi4-mini"])
def test_the_families_templates_render_like_transformers(tmp_path, shape):
    """Qwen3's, Gemma 3's, SmolLM3's and Phi-4-mini's templates (as synth writes them into a model's
    tokenizer_config.json), with the thinking switch on, off and unset."""
    transformers = pytest.importorskip("transformers")
    from appliance.models.synth import SHAPES, write_tokenizer

    write_tokenizer(shape, SHAPES[shape]["vocab_size"], tmp_path)
    ours, theirs = Tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for chat in (SYSTEM_CHAT, USER_CHAT, THINKING_CHAT):
        for switch in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            for add_generation_prompt in (True, False):
                expected = theirs.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False,
                                                      **switch)
                assert ours.render_chat(chat, add_generation_prompt, **switch) == expected, (chat, switch)
            expected_ids = theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, **switch)
            assert ours.apply_chat_template(chat, **switch) == list(expected_ids["input_ids"])
    if shape == "qwen3-0.6b":
        assert ours.render_chat(USER_CHAT, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


@needs_stories
def test_template_errors_reach_the_caller(tmp_path):
    ours = Tokenizer(tokenizer_folder(tmp_path, MISTRAL))
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ours.render_chat(SYSTEM_CHAT)


@needs_stories
def test_fallback_without_a_template():
    tokenizer = Tokenizer(STORIES)  # stories260K ships no chat template
    assert not tokenizer.has_chat_template
    chat = [{"role": "user", "content": "Tell me a story."}]
    text = tokenizer.render_chat(chat)
    assert text == "user: Tell me a story.\nassistant:"
    ids = tokenizer.apply_chat_template(chat)
    assert ids[0] == tokenizer.token_id("<s>") and ids == tokenizer.encode(text)


# --- weights: a shard maps only its own tensors --------------------------------------------

def backed_by_mmap(array: np.ndarray) -> bool:
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(array, mmap.mmap)


@needs_stories
def test_a_shard_maps_only_its_own_tensors():
    names = shard_tensor_names(weight_map(STORIES), 1, 3, first=False, last=False, tied=True)
    tensors = load_tensors(STORIES, names)
    assert tensors and set(tensors) == set(names)
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in tensors)
    for t in tensors.values():
        assert backed_by_mmap(t) and not t.flags.writeable and not t.flags.owndata

    middle, first, last = (NumpyEngine(Shard(STORIES, a, b, 5)) for a, b in ((1, 3), (0, 2), (3, 5)))
    assert set(middle.w) == set(names) and middle.embed is None
    assert all(backed_by_mmap(t) for t in middle.w.values())  # float32: used in place, never copied
    assert backed_by_mmap(first.embed) and "model.norm.weight" not in first.w
    assert "model.norm.weight" in last.w and last.head.shape == (512, 64)  # tied: the embedding
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.")) for n in last.w)


def test_many_file_checkpoint_with_an_index(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    parts = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": rng.random((8, 4), np.float32),
                                             "model.layers.0.mlp.up_proj.weight": rng.random((6, 4), np.float32)},
        "model-00002-of-00002.safetensors": {"model.layers.1.mlp.up_proj.weight": rng.random((6, 4)).astype(np.float16),
                                             "model.norm.weight": rng.random(4, np.float32),
                                             "lm_head.weight": rng.random((8, 4), np.float32)},
    }
    for file, tensors in parts.items():
        save_file(tensors, str(tmp_path / file))
    index = {"weight_map": {name: file for file, tensors in parts.items() for name in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_map(tmp_path) == index["weight_map"]
    names = shard_tensor_names(weight_map(tmp_path), 1, 2, first=False, last=True, tied=False)
    assert sorted(names) == ["lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    tensors = load_tensors(tmp_path, names)
    for name in names:
        np.testing.assert_array_equal(tensors[name], parts["model-00002-of-00002.safetensors"][name])
        assert backed_by_mmap(tensors[name])
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == np.float16


# --- stories260K: the same story, however the model is split ------------------------------

def generate(model_dir: Path, bounds: tuple[int, ...], prompt: str, max_tokens: int = 80) -> str:
    layers = bounds[-1]
    engines = [NumpyEngine(Shard(model_dir, a, b, layers)) for a, b in zip(bounds, bounds[1:])]
    tokenizer = Tokenizer(model_dir)
    eos = set(generation_defaults(model_dir).eos_token_ids)
    ids, pos, text = tokenizer.encode(prompt), 0, prompt
    stream = StreamDecoder(tokenizer)
    for _ in range(max_tokens):
        x = np.asarray(ids, np.int32)
        for engine in engines:
            (x,) = engine.forward([Step("story", pos, x)])
        pos += len(ids)
        token = int(np.argmax(x))
        if token in eos or len(text) >= len(STORY):
            break
        ids = [token]
        text += stream.push(token)
    return text


@needs_stories
@pytest.mark.parametrize("bounds", [(0, 5), (0, 2, 5), (0, 2, 4, 5), (0, 1, 2, 3, 4, 5)],
                         ids=["1-shard", "2-shards", "3-shards", "5-shards"])
def test_stories_writes_the_story_in_any_split(bounds):
    assert generate(STORIES, bounds, "Once upon a time").startswith(STORY)


def test_enable_thinking_reaches_the_template(tmp_path):
    """The API's switch (top level or chat_template_kwargs) renders Qwen3's empty think block."""
    from appliance.models.synth import SHAPES, write_tokenizer
    from appliance.panel.api import _template_switches as switches
    from appliance.panel.schema import ChatCompletionRequest

    def _template_switches(body: dict) -> dict:
        return switches(ChatCompletionRequest.model_validate({"model": "m", "messages": chat, **body}))

    write_tokenizer("qwen3-0.6b", SHAPES["qwen3-0.6b"]["vocab_size"], tmp_path)
    tokenizer, chat = Tokenizer(tmp_path), [{"role": "user", "content": "hi"}]
    for body in ({"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}}):
        assert tokenizer.render_chat(chat, **_template_switches(body)).endswith("<think>\n\n</think>\n\n")
    assert "<think>" not in tokenizer.render_chat(chat, **_template_switches({}))
    assert "<think>" not in tokenizer.render_chat(chat, **_template_switches({"enable_thinking": True}))
