"""Prompts and chat rendering, against transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from tatar_jax.data import prompts

# The chat template shipped in Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct checkpoints
# (chat_template.json), written out here because transformers does not ship it offline.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A differently written Qwen2.5-VL-style template (whitespace control, a default system turn,
# a "Picture 1:" prefix) to show that checkpoint templates are rendered as transformers does.
CUSTOM_TEMPLATE = """
{%- for message in messages -%}
  {%- if loop.first and message.role != 'system' -%}
<|im_start|>system
Default system.<|im_end|>
{% endif -%}
<|im_start|>{{ message.role }}
{% if message.content is string -%}
{{ message.content }}
{%- else -%}
{%- for part in message.content -%}
{%- if part.type == 'image' -%}Picture {{ loop.index }}: <|vision_start|><|image_pad|><|vision_end|>
{%- else -%}{{ part.text }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}
"""


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tatar_jax.data import tokenizer as tk

    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk.load_tokenizer().tok)


def _conversations():
    out = []
    for task in prompts.TASKS:
        for variant in prompts.PROMPT_VARIANTS:
            out.append((prompts.build_messages(task, variant), True))
            target = "<think>\nSharp, well exposed.\n</think>\n<answer>73.42</answer>"
            out.append((prompts.build_messages(task, variant, assistant=target), False))
    # No system turn: the template inserts its default one.
    out.append((prompts.build_messages("iqa")[1:], True))
    return out


@pytest.mark.parametrize(
    "template", [QWEN2_VL_TEMPLATE, CUSTOM_TEMPLATE], ids=["qwen2_vl", "custom"]
)
def test_render_equals_apply_chat_template(hf_tokenizer, template):
    for msgs, gen in _conversations():
        ref = hf_tokenizer.apply_chat_template(
            msgs, chat_template=template, add_generation_prompt=gen, tokenize=False
        )
        assert prompts.render_chat(msgs, chat_template=template, add_generation_prompt=gen) == ref
        if template is QWEN2_VL_TEMPLATE:
            # The built-in renderer is a transcription of the Qwen2.5-VL template.
            assert prompts.render_chat(msgs, add_generation_prompt=gen) == ref


def test_prompt_intent():
    p = prompts.get_prompts("train")
    assert p.iqa.startswith("TASK: Image Quality Assessment (IQA).\n")
    assert p.iaa.startswith("TASK: Image Aesthetic Assessment (IAA).\n")
    for text in (p.iqa, p.iaa):
        assert "0 and 100" in text and "two decimal places" in text and "73.42" in text
    assert "briefly" in p.iqa and "briefly" not in p.iaa and "directly" not in p.iaa
    assert "composition" in p.iaa and "lighting" in p.iaa and "emotional impact" in p.iaa
    assert "<think>" in p.system and "<answer>" in p.system and "brief or detailed" in p.system


def test_reference_eval_variant_differs_only_where_d7_says():
    tr, ev = prompts.get_prompts("train"), prompts.get_prompts("reference_eval")
    assert ev.system == tr.system.replace("brief or detailed", "brief or empty")
    assert ev.iqa == tr.iqa.replace("answer briefly", "answer directly")
    assert ev.iaa == tr.iaa
    with pytest.raises(ValueError, match="variant"):
        prompts.get_prompts("eval")
    with pytest.raises(ValueError, match="task"):
        prompts.build_messages("vqa")


def test_user_turn_has_image_first_then_text():
    text = prompts.render_chat(prompts.build_messages("iaa"), add_generation_prompt=True)
    user = text.split("<|im_start|>user\n")[1]
    assert user.startswith("<|vision_start|><|image_pad|><|vision_end|>TASK: Image Aesthetic")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_image_pad_expansion():
    assert prompts.num_image_tokens((1, 4, 6)) == 6
    assert prompts.num_image_tokens((1, 2, 2)) == 1
    with pytest.raises(ValueError, match="merge_size"):
        prompts.num_image_tokens((1, 3, 4))
    text = "a<|vision_start|><|image_pad|><|vision_end|>b"
    assert prompts.expand_image_pads(text, [3]) == (
        "a<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>b"
    )
    with pytest.raises(ValueError, match="placeholders"):
        prompts.expand_image_pads(text, [1, 2])
