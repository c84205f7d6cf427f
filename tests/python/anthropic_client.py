"""Drives llama-orch's Anthropic Messages API with the official `anthropic` client: plain and
streamed answers, structured output, forced tool calls and the turn after their result, `auto`
turns that answer in text and that call, count_tokens, and the error shapes.

Usage: python3 anthropic_client.py URL API_KEY MODEL
Prints "anthropic ok" on success; any failure raises with the offending answer.
"""
import json
import sys
import urllib.error
import urllib.request

import anthropic
import jsonschema

url, key, model = sys.argv[1:4]
client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)
# The newest client no longer declares the sampling parameters (newer Claude models dropped
# them); other clients send them, and so may this one, in the body.
GREEDY = {"temperature": 0}

# --- Plain and streamed -----------------------------------------------------------------------
ask = [{"role": "user", "content": "What is the capital of France?"}]
m = client.messages.create(model=model, max_tokens=24, messages=ask, extra_body=GREEDY,
                           system="You answer in one short sentence.")
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
assert m.model == model, m
assert m.content[0].type == "text" and "Paris" in m.content[0].text, m
assert m.stop_reason in ("end_turn", "max_tokens"), m
assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage

# Streamed with the SDK's helper: the events come in Anthropic's order, the text deltas make up
# the final message, and the usage arrives with message_delta.
kinds = []
with client.messages.stream(model=model, max_tokens=24, messages=ask, extra_body=GREEDY,
                            system="You answer in one short sentence.") as s:
    for event in s:
        kinds.append(event.type)
    final = s.get_final_message()
text = final.content[0].text
assert "Paris" in text, final
assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
assert "content_block_start" in kinds and "content_block_stop" in kinds, kinds
assert kinds.index("message_delta") > kinds.index("content_block_stop"), kinds
assert final.stop_reason in ("end_turn", "max_tokens"), final
assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0, final.usage
# Greedy: the same words streamed and not (the prompt may come from the cache: compare the
# start only, see the OpenAI test's note).
assert text.split()[:3] == m.content[0].text.split()[:3], (text, m.content[0].text)
# The cache shows in usage: the second identical prompt was mostly read from it.
assert final.usage.cache_read_input_tokens > 0, final.usage
assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
    m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0), (final.usage, m.usage)

# max_tokens ends the answer with stop_reason max_tokens.
m = client.messages.create(model=model, max_tokens=3, extra_body=GREEDY,
                           messages=[{"role": "user", "content": "Tell me a long story."}])
assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3, m

# A stop sequence ends the answer before it, and is named.
for streamed in (False, True):
    kwargs = dict(model=model, max_tokens=24, messages=ask, extra_body=GREEDY, stop_sequences=["Paris"],
                  system="You answer in one short sentence.")
    if streamed:
        with client.messages.stream(**kwargs) as s:
            m = s.get_final_message()
    else:
        m = client.messages.create(**kwargs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris", m
    assert "Paris" not in m.content[0].text, m

# --- Structured output (output_config.format) -------------------------------------------------
city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                          "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}
m = client.messages.create(model=model, max_tokens=60, extra_body=GREEDY, messages=ask,
                           output_config={"format": {"type": "json_schema", "schema": city}})
jsonschema.validate(json.loads(m.content[0].text), city)

# --- Tools ------------------------------------------------------------------------------------
weather = {"type": "object",
           "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
tools = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": weather},
         {"name": "get_time", "description": "Current time in a time zone",
          "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}]
paris = [{"role": "user", "content": "What is the weather in Paris?"}]

# Forced (any): one tool_use block whose input validates against its schema.
m = client.messages.create(model=model, max_tokens=100, extra_body=GREEDY, messages=paris, tools=tools,
                           tool_choice={"type": "any"})
assert m.stop_reason == "tool_use", m
uses = [b for b in m.content if b.type == "tool_use"]
assert len(uses) == 1 and uses[0].id.startswith("toolu_"), m
call = uses[0]
jsonschema.validate(call.input, weather if call.name == "get_weather" else tools[1]["input_schema"])

# Streamed, the same call arrives as content_block_start and input_json_delta.
with client.messages.stream(model=model, max_tokens=100, extra_body=GREEDY, messages=paris, tools=tools,
                            tool_choice={"type": "any"}) as s:
    deltas = [e.delta.type for e in s if e.type == "content_block_delta"]
    streamed = s.get_final_message()
assert "input_json_delta" in deltas, deltas
suse = [b for b in streamed.content if b.type == "tool_use"]
assert [(b.name, b.input) for b in suse] == [(call.name, call.input)], (streamed, m)
assert streamed.stop_reason == "tool_use", streamed

# A named tool is the one called.
m = client.messages.create(model=model, max_tokens=100, extra_body=GREEDY, messages=paris, tools=tools,
                           tool_choice={"type": "tool", "name": "get_time"})
assert [b.name for b in m.content if b.type == "tool_use"] == ["get_time"], m

# The turn after the result: answered in text that uses it.
follow = paris + [
    {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                  "content": json.dumps({"temperature": 18, "sky": "sunny"})}]},
]
m = client.messages.create(model=model, max_tokens=60, extra_body=GREEDY, messages=follow, tools=tools,
                           tool_choice={"type": "none"})
assert m.stop_reason in ("end_turn", "max_tokens"), m
answer = "".join(b.text for b in m.content if b.type == "text")
assert "18" in answer or "sun" in answer.lower(), answer

# `auto` (the default with tools) on the default model, whose template has no tool support: a
# greeting is answered in text ...
m = client.messages.create(model=model, max_tokens=40, extra_body=GREEDY, tools=tools,
                           messages=[{"role": "user", "content": "Say hello to me."}])
assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].type == "text", m
assert m.content[0].text and not m.content[0].text.lstrip().startswith("{"), m
# ... and, shown an earlier call in its history, the next question is a call.
oslo = [{"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Oslo", "unit": "celsius"}}]},
        {"role": "user", "content": "What is the weather in Paris?"}]
m = client.messages.create(model=model, max_tokens=60, extra_body=GREEDY, tools=tools, messages=oslo)
assert m.stop_reason == "tool_use", m
auto_call = [b for b in m.content if b.type == "tool_use"][0]
assert auto_call.name == "get_weather" and auto_call.input["city"] == "Paris", auto_call

# --- count_tokens -----------------------------------------------------------------------------
plain = client.messages.create(model=model, max_tokens=2, extra_body=GREEDY, messages=ask)
count = client.messages.count_tokens(model=model, messages=ask)
assert count.input_tokens == plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0), \
    (count, plain.usage)
with_tools = client.messages.count_tokens(model=model, messages=ask, tools=tools)
assert with_tools.input_tokens > count.input_tokens, (with_tools, count)

# --- Errors in Anthropic's envelope -----------------------------------------------------------
def refused(exc, **kwargs):
    try:
        client.messages.create(**kwargs)
    except exc as e:
        assert e.body["type"] == "error", e.body
        return e
    raise SystemExit(f"{kwargs} accepted")


e = refused(anthropic.BadRequestError, model=model, max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}])
assert e.body["error"]["type"] == "invalid_request_error", e.body
assert "messages[0].content[0].type" in e.body["error"]["message"], e.body
e = refused(anthropic.BadRequestError, model=model, max_tokens=10, messages=ask,
            extra_body={"temperature": "hot"})
assert "temperature" in e.body["error"]["message"], e.body
e = refused(anthropic.BadRequestError, model=model, max_tokens=10, messages=ask, tools=tools,
            tool_choice={"type": "tool", "name": "nope"})
assert "tool_choice" in e.body["error"]["message"], e.body
e = refused(anthropic.NotFoundError, model="no-such-model", max_tokens=10, messages=ask)
assert e.body["error"]["type"] == "not_found_error", e.body
other = anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0, timeout=30)
try:
    other.messages.create(model=model, max_tokens=5, messages=ask)
    raise SystemExit("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
# No key at all (the client refuses to send without one, so by hand).
req = urllib.request.Request(url + "/v1/messages", method="POST",
                             data=json.dumps({"model": model, "max_tokens": 5, "messages": ask}).encode(),
                             headers={"content-type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=30)
    raise SystemExit("no key was accepted")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    assert e.code == 401 and body["type"] == "error", body
    assert body["error"]["type"] == "authentication_error", body
# The key is taken from Authorization: Bearer too (auth_token), as from x-api-key.
bearer = anthropic.Anthropic(base_url=url, auth_token=key, api_key=None, max_retries=0, timeout=60)
assert bearer.messages.create(model=model, max_tokens=2, messages=ask).content

print("anthropic ok")
