#!/usr/bin/env python3
"""Renders the gpt-oss chat template (tests/fixtures/chat/gpt_oss.jinja: OpenAI's harmony
template as the gpt-oss checkpoints ship it, copied from llama.cpp's models/templates) with
transformers' own renderer for a few conversations, into tests/fixtures/chat/gpt_oss_cases.json.
The date the template prints (strftime_now) is replaced by @TODAY@ (format %Y-%m-%d).

  /work/moe-venv/bin/python scripts/make_gpt_oss_chat_fixture.py
"""
import datetime
import json
import os

from transformers.utils.chat_template_utils import render_jinja_template

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "chat")
CASES = [
    ("user_gen", [{"role": "user", "content": "Name three colors."}], True),
    ("system_multi_turn", [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ], True),
    ("developer_no_gen", [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ], False),
]


def main():
    with open(os.path.join(FIX, "gpt_oss.jinja")) as f:
        template = f.read()
    today = datetime.date.today().strftime("%Y-%m-%d")
    out = []
    for name, messages, gen in CASES:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=gen, bos_token="", eos_token="")
        out.append({"template": "gpt_oss", "case": name, "messages": messages, "add_generation_prompt": gen,
                    "bos_token": "", "eos_token": "", "tools": None, "enable_thinking": None,
                    "expected": rendered[0].replace(today, "@TODAY@"), "today_format": "%Y-%m-%d"})
    with open(os.path.join(FIX, "gpt_oss_cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
