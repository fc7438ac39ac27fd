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
print("ok")
