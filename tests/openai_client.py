"""The official `openai` Python client against a running `ffai serve` (started by
crates/ffai-cli/tests/openai_client.rs, which passes the base URL). Exits non-zero with
the failed check's message; prints "ok" at the end."""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="test-key", timeout=60, max_retries=0)

models = client.models.list()
ids = [m.id for m in models.data]
assert ids == ["smol"], ids

# Chat, whole.
chat = client.chat.completions.create(
    model="smol",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
)
text = chat.choices[0].message.content
assert chat.object == "chat.completion", chat.object
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].finish_reason in ("stop", "length"), chat.choices[0].finish_reason
assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 5, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Chat, streamed with usage: the same text.
stream = client.chat.completions.create(
    model="smol",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage, roles = [], None, []
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            parts.append(c.delta.content)
assert "".join(parts) == text, ("".join(parts), text)
assert roles[:1] == ["assistant"], roles
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Completions: a raw prompt, greedy, deterministic; a stop string.
c1 = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=10, temperature=0)
c2 = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=10, temperature=0)
assert c1.choices[0].text == c2.choices[0].text and c1.choices[0].text, (c1, c2)
assert c1.object == "text_completion"

# Log-probabilities: the chosen token is the greedy top one.
lp = client.chat.completions.create(
    model="smol",
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=4,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, content
for e in content:
    assert e.logprob <= 0 and len(e.top_logprobs) == 2, e
    assert e.top_logprobs[0].token == e.token, e
cl = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2)
assert len(cl.choices[0].logprobs.tokens) == cl.usage.completion_tokens, cl.choices[0].logprobs

# Errors come back as the client's exception types.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model="smol", prompt="hi", max_tokens=-3)
    raise AssertionError("max_tokens -3 was accepted")
except openai.BadRequestError:
    pass
bad_key = openai.OpenAI(base_url=base, api_key="wrong", timeout=60, max_retries=0)
try:
    bad_key.models.list()
    raise AssertionError("a wrong API key was accepted")
except openai.AuthenticationError:
    pass
# Tools: a forced call parses into tool_calls with JSON arguments; streamed the same; the
# tool's answer goes back and the conversation continues.
import json

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = {"type": "function", "function": {"name": "get_weather"}}
tc = client.chat.completions.create(model="smol", messages=ask, tools=tools, tool_choice=forced, max_tokens=100, temperature=0)
choice = tc.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), call
args = json.loads(call.function.arguments)
assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
streamed = {}
finish = None
for chunk in client.chat.completions.create(
    model="smol", messages=ask, tools=tools, tool_choice=forced, max_tokens=100, temperature=0, stream=True
):
    for c in chunk.choices:
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function and d.function.name:
                entry["name"] += d.function.name
            if d.function and d.function.arguments:
                entry["arguments"] += d.function.arguments
assert finish == "tool_calls", finish
# A named function is called once.
assert len(choice.message.tool_calls) == 1, choice.message.tool_calls
assert streamed == {0: {"name": "get_weather", "arguments": call.function.arguments}}, streamed
follow = client.chat.completions.create(
    model="smol",
    messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ],
    tools=tools,
    max_tokens=16,
    temperature=0,
)
assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls"), follow
try:
    client.chat.completions.create(model="smol", messages=ask, tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    raise AssertionError("a tool_choice naming no tool was accepted")
except openai.BadRequestError:
    pass
print("ok")
