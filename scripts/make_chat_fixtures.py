#!/usr/bin/env python3
"""Writes the chat-template fixtures for crates/ffai/tests/chat_template.rs.

For every template in tests/fixtures/chat/<name>.jinja (SmolLM2's is first extracted from
the GGUF's `tokenizer.chat_template`), renders a set of conversations with Hugging Face
transformers' own chat-template machinery (`render_jinja_template`, the function behind
`tokenizer.apply_chat_template(..., tokenize=False)`) and writes tests/fixtures/chat/cases.json.

    pip install transformers jinja2 gguf      # torch is not needed
    python scripts/make_chat_fixtures.py [--gguf PATH]

A template that calls strftime_now renders today's date; the expected string then has that
date replaced by "@TODAY@" and the case records the format in "today_format".
"""
import argparse
import json
import os
from datetime import datetime

from transformers.utils.chat_template_utils import render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "chat")
DEFAULT_GGUF = os.path.expanduser("~/.cache/ffai/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# Per template: special tokens as the model's tokenizer_config.json declares them.
TOKENS = {
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": ("", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral_v0.3": ("<s>", "</s>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "gemma3": ("<bos>", "<eos>"),
}

SYS = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "Hello! What is 2+2?"}
A1 = {"role": "assistant", "content": "  2+2 is 4.  "}
U2 = {"role": "user", "content": "And 3+3?\nAnswer in one word."}
UNI = {"role": "user", "content": "Ünïcödé: 日本語 — “quotes” & <tags>"}
PARTS = {"role": "user", "content": [{"type": "text", "text": " Describe this. "}, {"type": "text", "text": "Briefly."}]}
SYS_PARTS = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
THINK = {"role": "assistant", "content": "<think>\nLet me add.\n</think>\n\n6."}

# Keys already in sorted order: serde_json (without "preserve_order") sorts object keys,
# so a tool schema whose keys are not sorted would render differently (see chat.rs docs).
TOOL = {
    "function": {
        "description": "Get the weather for a city.",
        "name": "get_weather",
        "parameters": {
            "properties": {"city": {"description": "City name", "type": "string"}},
            "required": ["city"],
            "type": "object",
        },
    },
    "type": "function",
}

COMMON = [
    ("single_gen", [U1], True, {}),
    ("single_nogen", [U1], False, {}),
    ("system_gen", [SYS, U1], True, {}),
    ("multi_gen", [U1, A1, U2], True, {}),
    ("multi_nogen", [U1, A1, U2], False, {}),
    ("system_multi_gen", [SYS, U1, A1, U2], True, {}),
    ("unicode", [UNI], True, {}),
]

EXTRA = {
    "gemma3": [
        ("parts_gen", [PARTS], True, {}),
        ("system_parts_gen", [SYS_PARTS, PARTS], True, {}),
        ("bad_alternation", [U1, U2], True, {}),
    ],
    "qwen3": [
        ("thinking_off", [U1], True, {"enable_thinking": False}),
        ("thinking_on", [U1], True, {"enable_thinking": True}),
        ("think_history", [U1, THINK, U2], True, {"enable_thinking": False}),
        ("think_last", [U1, THINK], False, {}),
        ("tools", [SYS, U1], True, {"tools": [TOOL]}),
    ],
    "qwen2.5": [("tools", [SYS, U1], True, {"tools": [TOOL]})],
    "llama3": [("tools", [SYS, U1], True, {"tools": [TOOL]})],
    "mistral_v0.3": [
        ("tools", [U1], True, {"tools": [TOOL]}),
        ("bad_alternation", [U1, U2], True, {}),
    ],
}


def extract_smollm2(gguf_path):
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields["tokenizer.chat_template"]
    text = bytes(field.parts[field.data[0]]).decode("utf-8")
    with open(os.path.join(FIX, "smollm2.jinja"), "w", encoding="utf-8", newline="") as f:
        f.write(text)


def render(template, messages, add_generation_prompt, bos, eos, extra):
    kwargs = {"bos_token": bos, "eos_token": eos}
    if "enable_thinking" in extra:
        kwargs["enable_thinking"] = extra["enable_thinking"]
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=extra.get("tools"),
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    args = ap.parse_args()
    if os.path.exists(args.gguf):
        extract_smollm2(args.gguf)
    cases = []
    for name, (bos, eos) in TOKENS.items():
        with open(os.path.join(FIX, f"{name}.jinja"), encoding="utf-8", newline="") as f:
            template = f.read()
        for case, messages, gen, extra in COMMON + EXTRA.get(name, []):
            entry = {
                "template": name,
                "case": case,
                "messages": messages,
                "add_generation_prompt": gen,
                "bos_token": bos,
                "eos_token": eos,
                "tools": extra.get("tools"),
                "enable_thinking": extra.get("enable_thinking"),
            }
            try:
                out = render(template, messages, gen, bos, eos, extra)
                if "strftime_now" in template:
                    fmt = "%d %b %Y"
                    today = datetime.now().strftime(fmt)
                    assert today in out
                    out = out.replace(today, "@TODAY@")
                    entry["today_format"] = fmt
                entry["expected"] = out
            except Exception as e:  # raise_exception in the template
                entry["error"] = str(e)
            cases.append(entry)
    with open(os.path.join(FIX, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
