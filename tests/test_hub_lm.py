"""Language models and their tokenizers by hub id or local directory; conversations in each LM's own chat layout.

Nothing downloads: tiny models of the real architectures (``LlamaConfig``, ``Qwen2Config``) are saved
with ``save_pretrained`` into ``tmp_path`` (or into an HF cache layout, read with ``HF_HUB_OFFLINE=1``)
and loaded as a downloaded one would be. The tokenizers are small byte-level BPEs trained here with the
published special tokens, pre-tokenizer splits and chat templates of each family:

- ``QWEN25_TEMPLATE``: the ``chat_template`` of Qwen/Qwen2.5-0.5B-Instruct's tokenizer_config.json (the same
  for all Qwen2.5-Instruct sizes), as reproduced verbatim in guidance-ai/guidance ``guidance/chat.py``
  (``qwen2dot5_it_template``, commit 5413339a) and, identical but for the final newline (which
  ``trim_blocks`` drops), in mattt/Jinja ``Tests/JinjaTests/IntegrationTests.swift`` ("Qwen Qwen2.5-0.5B-Instruct").
- ``SMOLLM2_TEMPLATE``: HuggingFaceTB/SmolLM2-135M-Instruct's ``chat_template`` (the same string appears in
  several public projects that read it from the model, e.g. a test asserting the template of
  SmolLM2-135M-Instruct-Q8_0.gguf); bos ``<|im_start|>``, eos and pad ``<|im_end|>``, unk ``<|endoftext|>``.
- ``LLAMA32_TEMPLATE``: meta-llama/Llama-3.2-1B-Instruct's (the Llama-3.1/3.2 template with the dated system
  header), guidance ``guidance/chat.py`` ``llama3dot2_template``; ``LLAMA3_TEMPLATE``: Meta-Llama-3-8B-Instruct's,
  ``llama3_template`` there.

Pre-tokenizers: Qwen2's and Llama-3's regex splits (``\\s*[\\r\\n]+`` keeps a run of newlines one piece), and
SmolLM2's individual digits + GPT-2 byte-level split, as their tokenizer.json files declare them.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mm_lightning.data.chat_tokenizer import ChatTokenizer
from mm_lightning.data.conversations import (
    IGNORE_INDEX,
    ConversationError,
    ConversationPipeline,
    TextPipeline,
    encode_segments,
    parse_conversation,
)
from mm_lightning.models.hub import PretrainedError
from mm_lightning.models.vlm import build_lm
from tests.conftest import REPO, png_bytes

QWEN25_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    'You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)

LLAMA32_TEMPLATE = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    '    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n'
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '        {{- \'"parameters": \' }}\n'
    '        {{- tool_call.arguments | tojson }}\n'
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n"
    '\n'
    "'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n"
    '\n'
    "' }}{% endif %}"
)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["What shape is shown?", "A red ring.", "How many are there?", "There are 3, all small.",
         "Where is the biggest one?", "At the top left:\n\nnear the edge.", "Answer in one short sentence.",
         "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
         "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
         "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "system\nuser\nassistant\n\n"] * 10
PINNED = {"date_string": "26 Jul 2024"}  # the Llama-3.1/3.2 template's own fallback date
#: family -> (template, special tokens, end-of-turn string as published, chat_template_kwargs)
FAMILIES: dict[str, tuple[str, list[str], str, dict[str, str]]] = {
    "qwen2.5": (QWEN25_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", {}),
    "smollm2": (SMOLLM2_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", {}),
    "llama3.2": (LLAMA32_TEMPLATE, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", PINNED),
    "llama3": (LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|eot_id|>"], "<|eot_id|>", {}),
}
SYSTEM_PROMPT = "Answer in one short sentence."
CONVERSATION = [  # three rounds; the image in front of the first question, as the pipelines put it
    {"role": "user", "content": "<image>What shape is shown?"},
    {"role": "assistant", "content": "A red ring."},
    {"role": "user", "content": "How many are there?"},
    {"role": "assistant", "content": "There are 3, all small."},
    {"role": "user", "content": "Where is the biggest one?"},
    {"role": "assistant", "content": "At the top left:\n\nnear the edge."},
]


def save_tokenizer(directory: Path, family: str, template: str | None = "published", gpt2_split: bool = False) -> Path:
    """A small BPE with ``family``'s special tokens, pre-tokenizer and chat template, saved as its hub repo holds it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    published, special, _, _ = FAMILIES[family]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if gpt2_split:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif family == "smollm2":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        split = Regex(QWEN2_SPLIT if family == "qwen2.5" else LLAMA3_SPLIT)
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="isolated", invert=False), byte_level])
    base = Tokenizer(models.BPE())
    if family == "qwen2.5":
        base.normalizer = normalizers.NFC()
    base.pre_tokenizer = pre
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokens: dict[str, Any] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # Qwen2.5-Instruct: no bos
    if family == "smollm2":
        tokens = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}
    elif family.startswith("llama"):
        base.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", base.token_to_id("<|begin_of_text|>"))])
        tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}  # Llama-3.2-Instruct: no pad
    hf = PreTrainedTokenizerFast(tokenizer_object=base, clean_up_tokenization_spaces=False, **tokens)
    if template is not None:
        hf.chat_template = published if template == "published" else template
    hf.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: save_tokenizer(root / family, family) for family in FAMILIES}


def tiny_lm(kind: str, vocab_size: int, hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama or Qwen2 causal LM at width ``hidden`` (random weights, fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))


def saved_lm(directory: Path, kind: str = "qwen2", vocab_size: int = 420, tokenizer: Path | None = None) -> Path:
    tiny_lm(kind, vocab_size).save_pretrained(str(directory))
    if tokenizer is not None:  # a hub repo holds the model and its tokenizer side by side
        for f in tokenizer.iterdir():
            shutil.copy(f, directory / f.name)
    return directory


def direct_logits(directory: Path | str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(directory)).eval()(ids).logits


# ----------------------------------------------------------------------------------------------- the LM itself
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lm_from_a_saved_directory_gives_the_logits_of_from_pretrained(kind: str, tmp_path: Path) -> None:
    directory = saved_lm(tmp_path / kind, kind)
    ids = torch.randint(0, 420, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = build_lm(str(directory)).eval()
    with torch.no_grad():
        logits = ours(ids).logits
    diff = (logits - direct_logits(directory, ids)).abs().max().item()
    print(f"{kind}: max |logits(build_lm(dir)) - logits(from_pretrained(dir))| = {diff}")
    assert diff == 0.0
    assert next(ours.parameters()).dtype == torch.float32


def test_task_lm_from_a_directory_with_its_own_tokenizer(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The task's LM is the saved one (logits equal on the LM's own vocabulary) plus one row for ``<image>``."""
    from tests.vlm_fixtures import TINY_VISION
    from mm_lightning.tasks.vlm import VisionLanguageTask

    tok_dir = tokenizer_dirs["qwen2.5"]
    directory = saved_lm(tmp_path / "qwen", "qwen2", vocab_size=420, tokenizer=tok_dir)
    tok = ChatTokenizer(directory)  # the LM's own tokenizer, from the same directory
    task = VisionLanguageTask(tok, vision_kwargs=TINY_VISION, lm=str(directory)).eval()
    assert tok.vocab_size == 421 and task.model.lm.get_input_embeddings().weight.shape[0] == 421  # <image> added
    ids = torch.tensor([tok.prefix_ids + tok.user_ids + tok.encode("What shape is shown?")])
    with torch.no_grad():
        logits = task.model.lm(ids).logits
    diff = (logits[..., :420] - direct_logits(directory, ids)).abs().max().item()
    print(f"task LM vs from_pretrained: max |diff| = {diff}")
    assert diff == 0.0
    assert task.model.lm.config.eos_token_id == tok.end_of_turn_id == tok.hf.convert_tokens_to_ids("<|im_end|>")


def populate_cache(cache: Path, repo_id: str, files: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``files`` laid out as ``huggingface_hub`` leaves a download: models--org--name/snapshots/<commit>/ + refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache at ``tmp_path/hub`` with ``HF_HUB_OFFLINE=1`` (the environment, and huggingface_hub's
    constants, which it reads once at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_lm_and_tokenizer_by_hub_id_from_the_hf_cache_offline(tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                                              offline_cache: Path) -> None:
    saved = saved_lm(tmp_path / "saved", "qwen2", tokenizer=tokenizer_dirs["qwen2.5"])
    snapshot = populate_cache(offline_cache, "tiny-org/tiny-qwen2", saved)
    ids = torch.randint(0, 420, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = build_lm("tiny-org/tiny-qwen2").eval()(ids).logits
    diff = (logits - direct_logits(snapshot, ids)).abs().max().item()
    print(f"hub id from the offline cache: max |diff| = {diff}")
    assert diff == 0.0
    by_id, by_dir = ChatTokenizer("tiny-org/tiny-qwen2"), ChatTokenizer(snapshot)
    assert (by_id.prefix_ids, by_id.user_ids, by_id.end_of_turn_id) == (by_dir.prefix_ids, by_dir.user_ids,
                                                                        by_dir.end_of_turn_id)
    # random_init needs the config alone: a cached repo whose weights were never downloaded
    (tmp_path / "config-only").mkdir()
    shutil.copy(saved / "config.json", tmp_path / "config-only" / "config.json")
    populate_cache(offline_cache, "tiny-org/config-only", tmp_path / "config-only")
    model = build_lm("tiny-org/config-only", random_init=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_lm("qwen2", 420).parameters())
    with pytest.raises(PretrainedError, match=r"^model\.lm 'tiny-org/config-only' could not be loaded"):
        build_lm("tiny-org/config-only")


def test_text_tower_and_its_tokenizer_by_hub_id_offline(tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                                        offline_cache: Path) -> None:
    """The CLIP text side loads by hub id under the same rules (HFTextEncoder, TextTokenizer)."""
    from mm_lightning.data.tokenizer import TextTokenizer
    from mm_lightning.models.text import HFTextEncoder

    populate_cache(offline_cache, "tiny-org/tiny-llama", saved_lm(tmp_path / "saved", "llama",
                                                                   tokenizer=tokenizer_dirs["llama3"]))
    encoder = HFTextEncoder("tiny-org/tiny-llama", embed_dim=8)
    assert encoder.vocab_size == 420 and encoder(torch.tensor([[1, 2, 3]])).shape == (1, 8)
    text = TextTokenizer("tiny-org/tiny-llama", context_length=8)
    assert text.vocab_size == 420 and text(["A red ring."])["input_ids"].shape == (1, 8)
    with pytest.raises(PretrainedError, match=r"^model\.text_model 'nobody/not-cached' is not in the Hugging Face cache"):
        HFTextEncoder("nobody/not-cached")


def test_random_init_opens_no_weight_file(tmp_path: Path) -> None:
    directory = saved_lm(tmp_path / "lm", "llama")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail
    model = build_lm(str(directory), random_init=True)
    assert model.config.hidden_size == 32 and len(model.model.layers) == 2
    with pytest.raises(PretrainedError, match=r"^model\.lm '.*lm' could not be loaded"):
        build_lm(str(directory))


def test_bf16_weights_load_as_float32_master_weights(tmp_path: Path) -> None:
    """Hub checkpoints are mostly bf16; the trainer's precision setting casts, so both paths give float32."""
    directory = tmp_path / "bf16"
    tiny_lm("llama", 420).to(torch.bfloat16).save_pretrained(str(directory))
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    for random_init in (False, True):
        assert {p.dtype for p in build_lm(str(directory), random_init=random_init).parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------ conversation layouts
def template_labels(hf: Any, messages: list[dict[str, str]], end_of_turn: str, **kwargs: Any) -> tuple[list, list]:
    """An oracle independent of encode_segments: the template's rendered text tokenised at once, each token labelled
    when its characters lie inside an assistant message's content or the end-of-turn token right after it."""
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for message in messages:
        start = text.index(message["content"], cursor)
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            assert text.startswith(end_of_turn, cursor)
            spans.append((start, cursor + len(end_of_turn)))
    labels = [i if any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


def raw_sample(messages: list[dict[str, str]]) -> dict[str, Any]:
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return {"__key__": "k", "png": image, "json": json.dumps({"conversations": messages}).encode()}


@pytest.mark.parametrize("system", [False, True], ids=["default-system", "own-system"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ids_equal_apply_chat_template_and_labels_are_exactly_the_answers(
        tokenizer_dirs: dict[str, Path], family: str, system: bool) -> None:
    _, _, end_of_turn, kwargs = FAMILIES[family]
    tok = ChatTokenizer(tokenizer_dirs[family], chat_template_kwargs=kwargs)
    messages = ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + CONVERSATION
    expected_ids, expected_labels = template_labels(tok.hf, messages, end_of_turn, **kwargs)
    assert expected_ids == tok.hf.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]
    pipeline = ConversationPipeline(tok, num_image_tokens=1, max_length=256, image_size=16)
    out = pipeline.decode(raw_sample(messages), training=False)
    assert out["input_ids"] == expected_ids
    assert out["labels"] == expected_labels
    # the generation prompt of the last question, and of every earlier one
    prompt = tok.hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, **kwargs)["input_ids"]
    assert out["prompt_ids"] == prompt
    turns = parse_conversation(messages, image=True)
    enc = encode_segments(tok, [(t.role, t.text, t.role == "assistant") for t in turns], 1)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            history = tok.hf.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True, **kwargs)
            assert enc.input_ids[:enc.starts[k]] == history["input_ids"], k
    supervised = [tok.hf.decode([i for i in out["labels"] if i != IGNORE_INDEX])]
    print(f"{family} {'own' if system else 'default'} system: {len(out['input_ids'])} ids, "
          f"{sum(i != IGNORE_INDEX for i in out['labels'])} supervised: {supervised[0]!r}")


@pytest.mark.parametrize("family", ["qwen2.5", "smollm2"])
def test_chatml_newline_after_im_end_is_in_the_ids_and_not_supervised(tokenizer_dirs: dict[str, Path],
                                                                      family: str) -> None:
    tok = ChatTokenizer(tokenizer_dirs[family])
    newline = tok.hf.encode("\n", add_special_tokens=False)
    assert tok.separator_ids == newline and len(newline) == 1
    out = ConversationPipeline(tok, num_image_tokens=1, max_length=256, image_size=16).decode(
        raw_sample(CONVERSATION), training=True)
    ends = [k for k, i in enumerate(out["input_ids"]) if i == tok.end_of_turn_id]
    assert len(ends) == 6 + 1  # the default system prompt's turn and six turns, each closed ...
    for k in ends:  # ... and followed by the newline, which is never a label; an answer's end of turn is
        assert out["input_ids"][k + 1] == newline[0] and out["labels"][k + 1] == IGNORE_INDEX
    # supervised: the end of turn of each answer, not of the system prompt or the questions
    assert [out["labels"][k] == tok.end_of_turn_id for k in ends] == [False, False, True, False, True, False, True]


def test_default_system_prompts_and_bos_as_published(tokenizer_dirs: dict[str, Path]) -> None:
    qwen, smol = ChatTokenizer(tokenizer_dirs["qwen2.5"]), ChatTokenizer(tokenizer_dirs["smollm2"])
    assert qwen.hf.decode(qwen.prefix_ids) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                               "helpful assistant.<|im_end|>\n")
    assert smol.hf.decode(smol.prefix_ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                                               "trained by Hugging Face<|im_end|>\n")
    assert qwen.bos_token_id is None
    # SmolLM2's bos is <|im_start|>, which its template never writes first: the sequence opens with the prefix only
    assert smol.bos_token_id == smol.hf.convert_tokens_to_ids("<|im_start|>") and smol.prefix_ids[1] != smol.prefix_ids[0]
    llama = ChatTokenizer(tokenizer_dirs["llama3"])
    assert llama.prefix_ids == [llama.bos_token_id] and llama.separator_ids == []


def test_llama32_dated_system_header(tokenizer_dirs: dict[str, Path]) -> None:
    """Llama-3.1/3.2 templates write a system header with the date even without a system message: it is the
    prefix. ``chat_template_kwargs`` pins the date; unpinned, it is today's, as apply_chat_template writes it."""
    pinned = ChatTokenizer(tokenizer_dirs["llama3.2"], chat_template_kwargs=PINNED)
    assert pinned.hf.decode(pinned.prefix_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|>")
    assert pinned.hf.decode(pinned.system_open_ids).endswith("Today Date: 26 Jul 2024\n\n")
    assert pinned.system_close_ids == [pinned.end_of_turn_id] and pinned.separator_ids == []
    today = ChatTokenizer(tokenizer_dirs["llama3.2"])
    turns = parse_conversation(CONVERSATION, image=True)
    enc = encode_segments(today, [(t.role, t.text, t.role == "assistant") for t in turns], 1)
    assert enc.input_ids == today.hf.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    # the layout travels with the pickled tokenizer: a DataLoader worker does not derive another date
    copy = pickle.loads(pickle.dumps(pinned))
    assert copy._tok is None and copy._ids["prefix"] == pinned.prefix_ids


def test_preference_pair_with_a_system_prompt_in_the_template_layout(tokenizer_dirs: dict[str, Path]) -> None:
    from mm_lightning.data.preferences import PreferencePipeline

    tok = ChatTokenizer(tokenizer_dirs["qwen2.5"])
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What shape is shown?"}]
    out = PreferencePipeline(tok, num_image_tokens=1, max_length=256, image_size=16).encode_pair(
        {"prompt": prompt, "chosen": "A red ring.", "rejected": "There are 3, all small."})
    messages = [prompt[0], {"role": "user", "content": "<image>What shape is shown?"}]  # the image goes to the user
    for side, text in (("chosen", "A red ring."), ("rejected", "There are 3, all small.")):
        ids, labels = template_labels(tok.hf, messages + [{"role": "assistant", "content": text}], "<|im_end|>")
        assert (out[f"{side}_ids"], out[f"{side}_labels"]) == (ids, labels), side
    assert out["prompt_ids"] == tok.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_text_pipeline_supervises_after_the_prefix(tokenizer_dirs: dict[str, Path]) -> None:
    tok = ChatTokenizer(tokenizer_dirs["qwen2.5"])
    sample = {"__key__": "t", "txt": b"A red ring.", "json": json.dumps({"conversations": [
        {"role": "system", "content": SYSTEM_PROMPT}, *CONVERSATION]}).encode()}
    out = TextPipeline(tok, max_length=256, supervise="all", caption_prompt="Describe it.").decode(sample, training=True)
    system = tok.hf.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n", add_special_tokens=False)
    assert out["input_ids"][:len(system)] == system  # the conversation's system prompt opens the sequence
    assert out["labels"] == [IGNORE_INDEX] * len(system) + out["input_ids"][len(system):]


def test_a_system_turn_without_a_template_slot_is_refused(tmp_path: Path) -> None:
    from mm_lightning.data.chat_tokenizer import train_chat_tokenizer

    tok = ChatTokenizer(train_chat_tokenizer(TEXTS, tmp_path / "chat_tokenizer"))  # ours: no system turn
    assert tok.system_open_ids is None
    with pytest.raises(ConversationError, match="has no system turn"):
        encode_segments(tok, [("system", SYSTEM_PROMPT, False), ("user", "Hi?", False), ("assistant", "Yes.", True)])


def test_a_tokenizer_that_merges_across_turn_boundaries_is_refused(tmp_path: Path) -> None:
    """Llama-3's template with GPT-2's split: the header's "\\n\\n" is one token alone but two before a word."""
    directory = save_tokenizer(tmp_path / "gpt2-split", "llama3", gpt2_split=True)
    with pytest.raises(ValueError, match=r"ids built turn by turn differ from its chat template's .* give user_marker"):
        ChatTokenizer(directory).end_of_turn_id


# ------------------------------------------------------------------------------------------------ bad input
def test_hub_id_not_cached_offline_is_named(offline_cache: Path) -> None:
    with pytest.raises(PretrainedError) as err:
        build_lm("nobody/not-cached")
    assert str(err.value) == ("model.lm 'nobody/not-cached' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                              "download it first (hf download nobody/not-cached) or unset HF_HUB_OFFLINE")
    with pytest.raises(PretrainedError, match=r"^tokenizer 'nobody/not-cached' is not in the Hugging Face cache"):
        ChatTokenizer("nobody/not-cached").vocab_size


def bad_lm(case: str, root: Path) -> str:
    """A model.lm that must be refused: its one-line message is in BAD_CASES."""
    directory = root / case
    if case == "no-config":
        directory.mkdir()
        tiny_lm("llama", 420).save_pretrained(str(root / "tmp"))
        shutil.copy(root / "tmp" / "model.safetensors", directory / "model.safetensors")
    elif case == "other-width":  # weights saved at width 32, config.json of width 64
        saved_lm(directory, "llama")
        config = json.loads((directory / "config.json").read_text())
        config.update(hidden_size=64, intermediate_size=128)
        (directory / "config.json").write_text(json.dumps(config))
    elif case == "pickled":
        model = tiny_lm("llama", 420)
        model.config.save_pretrained(str(directory))
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    elif case == "not-cached":
        return "nobody/not-cached"
    return str(directory)


BAD_CASES = {
    "not-cached": r"model\.lm 'nobody/not-cached' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                  r"download it first \(hf download nobody/not-cached\) or unset HF_HUB_OFFLINE",
    "no-config": r"model\.lm '\S+no-config': the directory holds no config\.json \(is it a model saved with "
                 r"save_pretrained\?\)",
    "other-width": r"model\.lm '\S+other-width': its weights do not fit its config\.json: \S+ is \([\d, ]+\) in the "
                   r"weights but \([\d, ]+\) by the config \(\d+ tensors differ; saved at another width\?\): give the "
                   r"config\.json the weights were saved with",
    "pickled": r"model\.lm '\S+pickled': its weights are only in pytorch_model\.bin \(a pickle, which is never "
               r"unpickled here\): convert them to safetensors",
    "no-template": r"chat tokenizer '\S+no-template' has no chat template and no <\|user\|>/<\|assistant\|>/<\|end\|> "
                   r"tokens: give user_marker, assistant_marker and end_of_turn \(tokenizer\.init_args\)",
}


@pytest.mark.parametrize("case", [c for c in BAD_CASES if c not in ("not-cached", "no-template")])
def test_bad_lm_directory_is_one_line_naming_it(case: str, tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="^" + BAD_CASES[case]):
        build_lm(bad_lm(case, tmp_path))


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_through_experiments_run_writing_nothing(
        case: str, tokenizer_dirs: dict[str, Path], tmp_path: Path, offline_cache: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.run import main

    tokenizer = str(tokenizer_dirs["qwen2.5"])
    lm = str(saved_lm(tmp_path / "good", "qwen2", vocab_size=420))
    if case == "no-template":
        tokenizer = str(save_tokenizer(tmp_path / "no-template", "qwen2.5", template=None))
    else:
        lm = bad_lm(case, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "experiments" / "configs" / "mllm_mlp_shapes.yaml"),
              f"--tokenizer.init_args.path={tokenizer}", f"--model.init_args.lm={lm}",
              f"--trainer.default_root_dir={run}", f"--data.train={tmp_path}/none-*.tar"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    print(f"{case}: exit {exit_.value.code}: {errors}")
    assert exit_.value.code == 2
    assert len(errors) == 1 and re.search(BAD_CASES[case], errors[0]), errors
    assert not run.exists()
