"""Validates real /v1 answers of a running llama-orch against OpenAI's published OpenAPI document,
and checks structured output and log-probabilities with the official `openai` client.

Usage: python3 openai_conformance.py URL API_KEY MODEL OPENAPI_JSON_GZ
Prints "conformance ok" on success; any failure raises with the offending answer.
"""
import json
import sys
import urllib.error
import urllib.request

import jsonschema
import openai

from openai_spec import Spec

url, key, model, spec_path = sys.argv[1:5]
spec = Spec(spec_path)
conforms = spec.conforms
checked = spec.checked


def post(path, body):
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + key},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(path):
    req = urllib.request.Request(url + path, headers={"authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def stream(path, body):
    status, text = post(path, dict(body, stream=True))
    assert status == 200, (status, text)
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


question = [{"role": "user", "content": "Name a color."}]

# --- Responses of every kind, validated against the published schemas ----------------------
conforms("ListModelsResponse", get("/v1/models"))

status, text = post("/v1/chat/completions", {"model": model, "messages": question, "max_tokens": 8})
assert status == 200, text
conforms("CreateChatCompletionResponse", json.loads(text))

body = {"model": model, "messages": question, "max_tokens": 8, "temperature": 0,
        "logprobs": True, "top_logprobs": 3}
status, text = post("/v1/chat/completions", body)
assert status == 200, text
whole = json.loads(text)
conforms("CreateChatCompletionResponse", whole)
chunks = stream("/v1/chat/completions", dict(body, stream_options={"include_usage": True}))
for c in chunks:
    conforms("CreateChatCompletionStreamResponse", c)

# Log-probabilities: present for every token, alternatives sorted, and under greedy decoding the
# chosen token is the most likely one; streamed and not agree.
content = whole["choices"][0]["logprobs"]["content"]
assert len(content) == whole["usage"]["completion_tokens"], (len(content), whole["usage"])
assert "".join(t["token"] for t in content) == whole["choices"][0]["message"]["content"], content
for t in content:
    tops = [a["logprob"] for a in t["top_logprobs"]]
    assert len(tops) == 3 and tops == sorted(tops, reverse=True), t
    assert t["logprob"] <= 0 and t["token"] == t["top_logprobs"][0]["token"], t
    assert bytes(t["bytes"]).decode("utf-8", "replace") == t["token"], t
streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
            for t in c["choices"][0]["logprobs"]["content"]]
assert [t["token"] for t in streamed] == [t["token"] for t in content], (streamed, content)

status, text = post("/v1/completions", {"model": model, "prompt": "The sky is", "max_tokens": 5,
                                        "temperature": 0, "logprobs": 2})
assert status == 200, text
comp = json.loads(text)
conforms("CreateCompletionResponse", comp)
lp = comp["choices"][0]["logprobs"]
assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5, lp
assert "".join(lp["tokens"]) == comp["choices"][0]["text"], lp
for c in stream("/v1/completions", {"model": model, "prompt": "The sky is", "max_tokens": 5,
                                    "logprobs": 1}):
    # OpenAI publishes no chunk schema for streamed completions: its chunks are completion
    # objects whose finish_reason is null until the last, as OpenAI's own stream sends them.
    for choice in c["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "stop"
    conforms("CreateCompletionResponse", c)

for bad in ({"model": model, "messages": question, "temperature": 9},
            {"model": model, "messages": question, "response_format": {"type": "yaml"}},
            {"model": "no-such-model", "messages": question}):
    status, text = post("/v1/chat/completions", bad)
    assert status in (400, 404), (status, text)
    conforms("ErrorResponse", json.loads(text))

# n > 1: one choice per index, each validated; the stream's chunks carry their choice's index.
status, text = post("/v1/chat/completions", {"model": model, "messages": question, "max_tokens": 8,
                                             "n": 3, "seed": 5, "temperature": 1})
assert status == 200, text
many = json.loads(text)
conforms("CreateChatCompletionResponse", many)
assert [c["index"] for c in many["choices"]] == [0, 1, 2], many
seen = {}
for c in stream("/v1/chat/completions", {"model": model, "messages": question, "max_tokens": 8,
                                         "n": 3, "seed": 5, "temperature": 1}):
    conforms("CreateChatCompletionStreamResponse", c)
    for choice in c["choices"]:
        seen.setdefault(choice["index"], "")
        seen[choice["index"]] += choice["delta"].get("content") or ""
assert sorted(seen) == [0, 1, 2], seen
assert all(seen[i] for i in range(3)), seen
status, text = post("/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": 6,
                                        "n": 2, "temperature": 1})
assert status == 200, text
conforms("CreateCompletionResponse", json.loads(text))
assert len(json.loads(text)["choices"]) == 2, text

# --- Structured output with the official client --------------------------------------------
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
for seed in range(3):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=120,
        seed=seed,
        temperature=1.0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "strict": True, "schema": person}},
    )
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), person)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "List three fruits."}],
        max_tokens=120,
        seed=seed,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop", r
    assert isinstance(json.loads(r.choices[0].message.content), dict), r

# Streamed structured output parses once reassembled.
parts = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "A person, as JSON."}], max_tokens=120,
    stream=True, seed=7,
    response_format={"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": person}})
jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in parts if c.choices)), person)

# Schemas that cannot be enforced are refused, naming the parameter and the place.
for schema, where in (({"type": "integer", "multipleOf": 3}, "#/multipleOf"),
                      ({"type": "object", "properties": {"a": {"type": "text"}}}, "#/properties/a/type"),
                      ({"$ref": "https://example.com/schema.json"}, "#/$ref")):
    try:
        client.chat.completions.create(
            model=model, messages=question,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "strict": True, "schema": schema}})
        raise SystemExit(f"schema {schema} accepted")
    except openai.BadRequestError as e:
        assert e.param == "response_format.json_schema.schema", e
        assert where in str(e), e
try:
    client.chat.completions.create(model=model, messages=question, logprobs=True, top_logprobs=21)
    raise SystemExit("top_logprobs=21 accepted")
except openai.BadRequestError as e:
    assert e.param == "top_logprobs", e

# --- Tool calls -----------------------------------------------------------------------------
# The default model's template has no tool support: `required` and named calls are enforced by
# a grammar from the tools' parameter schemas; under `auto` the tools are described and a
# grammar allows one whole call or plain text, and the model chooses.
weather = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": weather}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                     "required": ["zone"]}}},
]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                   temperature=0, max_tokens=100)
conforms("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.type == "function" and call.id.startswith("call_"), call
assert call.function.name in ("get_weather", "get_time"), call
params = weather if call.function.name == "get_weather" else tools[1]["function"]["parameters"]
jsonschema.validate(json.loads(call.function.arguments), params)

# Streamed: the deltas reassemble to the same call as the answer above (greedy: same text).
calls = {}
finish = None
for c in client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                        temperature=0, max_tokens=100, stream=True):
    conforms("CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))
    if not c.choices:
        continue
    for d in c.choices[0].delta.tool_calls or []:
        entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        entry["id"] = d.id or entry["id"]
        if d.function:
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    finish = c.choices[0].finish_reason or finish
assert finish == "tool_calls", finish
assert len(calls) == 1 and calls[0]["id"].startswith("call_"), calls
assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == \
    (call.function.name, json.loads(call.function.arguments)), (calls, call)

# A named function is the one called.
r = client.chat.completions.create(model=model, messages=ask, tools=tools, temperature=0, max_tokens=100,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
named = r.choices[0].message.tool_calls
assert [c.function.name for c in named] == ["get_time"], r
jsonschema.validate(json.loads(named[0].function.arguments), tools[1]["function"]["parameters"])

# The follow-up turn with the tool's result is answered in text.
follow = ask + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})},
]
r = client.chat.completions.create(model=model, messages=follow, tools=tools, tool_choice="none",
                                   temperature=0, max_tokens=60)
conforms("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
assert r.choices[0].finish_reason in ("stop", "length"), r
answer = r.choices[0].message.content
assert r.choices[0].message.tool_calls is None, r
# The answer uses the result (greedy; the default model answers "... 18 degrees Celsius ...").
assert "18" in answer or "sun" in answer.lower(), answer

# `auto` (the default with tools), as every agent loop sends it: answered, not refused. The
# default model answers a greeting in text (it opens with `{` on none of the prompts measured,
# docs/API.md), streamed and not.
hello = [{"role": "user", "content": "Say hello to me."}]
r = client.chat.completions.create(model=model, messages=hello, tools=tools, temperature=0, max_tokens=40)
conforms("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
assert r.choices[0].message.tool_calls is None, r
assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length"), r
text = ""
for c in client.chat.completions.create(model=model, messages=hello, tools=tools, tool_choice="auto",
                                        temperature=0, max_tokens=40, stream=True):
    conforms("CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))
    if c.choices:
        assert not c.choices[0].delta.tool_calls, c
        text += c.choices[0].delta.content or ""
# (Greedy, yet not always the same words: a prompt restored from the cache and one computed
# anew differ in the last bits.)
assert text and not text.lstrip().startswith("{"), text
# Shown an earlier call in its history (as the sentence "I will call get_weather({...})."),
# the default model answers the next question the same way, and that is a call.
oslo = [{"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})}}]},
        {"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=oslo, tools=tools, temperature=0, max_tokens=60)
conforms("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
assert r.choices[0].finish_reason == "tool_calls", r
auto_call = r.choices[0].message.tool_calls[0]
assert auto_call.function.name == "get_weather" and auto_call.id.startswith("call_"), auto_call
assert json.loads(auto_call.function.arguments)["city"] == "Paris", auto_call

# Refusals name the parameter.
for kwargs, param in (
    ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True,
                                                   "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
):
    try:
        client.chat.completions.create(model=model, messages=ask, max_tokens=5, **kwargs)
        raise SystemExit(f"{kwargs} accepted")
    except openai.BadRequestError as e:
        assert e.param == param, (kwargs, e)

# The prefix cache shows in usage: the same long prompt twice, the second mostly cached.
long_ask = [{"role": "system", "content": "You answer questions about tides. " * 40},
            {"role": "user", "content": "When is high tide?"}]
first = client.chat.completions.create(model=model, messages=long_ask, max_tokens=4, temperature=0)
again = client.chat.completions.create(model=model, messages=long_ask, max_tokens=4, temperature=0)
assert again.usage.prompt_tokens == first.usage.prompt_tokens, (first.usage, again.usage)
assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 1, again.usage
assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2, first.usage

print("checked", json.dumps(checked, sort_keys=True))
print("conformance ok")
