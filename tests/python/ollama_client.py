"""Drives llama-orch's Ollama API with the official `ollama` client: the model listings, chat
and generate (streamed, the default, and not), structured output, `auto` tool turns that answer
in text and that call, the turn after a tool's result, a load request, and the error shapes.

Usage: python3 ollama_client.py URL API_KEY MODEL
Prints "ollama ok" on success; any failure raises with the offending answer.
"""
import json
import sys

import jsonschema
import ollama

url, key, model = sys.argv[1:4]
client = ollama.Client(host=url, headers={"Authorization": "Bearer " + key}, timeout=120)
greedy = {"temperature": 0, "num_predict": 24}

# --- Listings ---------------------------------------------------------------------------------
assert [m.model for m in client.list().models] == [model], client.list()
assert model in [m.model for m in client.ps().models], client.ps()
shown = client.show(model)
assert "completion" in shown.capabilities, shown

# --- Chat: whole, streamed (the server's default; the client asks for it), a load request -----
ask = [{"role": "system", "content": "You answer in one short sentence."},
       {"role": "user", "content": "What is the capital of France?"}]
r = client.chat(model=model, messages=ask, stream=False, options=greedy)
assert r.done and r.done_reason in ("stop", "length"), r
assert "Paris" in r.message.content and r.message.role == "assistant", r
assert r.prompt_eval_count > 0 and r.eval_count > 0 and r.total_duration > 0, r
parts = list(client.chat(model=model, messages=ask, options=greedy, stream=True))
assert all(not p.done for p in parts[:-1]) and parts[-1].done, parts
text = "".join(p.message.content or "" for p in parts)
assert len(parts) > 2 and text.split()[:3] == r.message.content.split()[:3], (text, r)
assert parts[-1].eval_count == r.eval_count, (parts[-1], r)
load = client.chat(model=model, messages=[], stream=False)
assert load.done and load.done_reason == "load", load

# --- Generate ---------------------------------------------------------------------------------
g = client.generate(model=model, prompt="What is the capital of France?", options=greedy,
                    system="You answer in one short sentence.")
assert g.done and "Paris" in g.response, g
raw = "".join(p.response for p in client.generate(model=model, prompt="The sky is", raw=True, stream=True,
                                                     options={"temperature": 0, "num_predict": 5}))
assert raw, raw

# --- Structured output ------------------------------------------------------------------------
city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                          "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}
r = client.chat(model=model, messages=ask, format=city, stream=False,
                options={"temperature": 0, "num_predict": 60})
jsonschema.validate(json.loads(r.message.content), city)
r = client.chat(model=model, messages=ask, format="json", stream=False,
                options={"temperature": 0, "num_predict": 60})
assert isinstance(json.loads(r.message.content), dict), r

# --- Tools (Ollama has no tool_choice: always auto) -------------------------------------------
weather = {"type": "object",
           "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": weather}}]
r = client.chat(model=model, messages=[{"role": "user", "content": "Say hello to me."}], tools=tools,
                stream=False, options={"temperature": 0, "num_predict": 40})
assert not r.message.tool_calls and r.message.content, r
oslo = [{"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "user", "content": "What is the weather in Paris?"}]
for streamed in (False, True):
    if streamed:
        calls = [c for p in client.chat(model=model, messages=oslo, tools=tools, stream=True,
                                        options={"temperature": 0, "num_predict": 60})
                 for c in (p.message.tool_calls or [])]
    else:
        calls = client.chat(model=model, messages=oslo, tools=tools, stream=False,
                            options={"temperature": 0, "num_predict": 60}).message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather", calls
    assert calls[0].function.arguments["city"] == "Paris", calls
    jsonschema.validate(dict(calls[0].function.arguments), weather)
# The turn after the result (the tool message names its tool) is answered from it.
follow = oslo[:2] + [{"role": "tool", "tool_name": "get_weather",
                      "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
r = client.chat(model=model, messages=follow, stream=False, options={"temperature": 0, "num_predict": 60})
assert "18" in r.message.content or "sun" in r.message.content.lower(), r

# --- Errors: {"error": "..."} with the status ---------------------------------------------------
def refused(status, call):
    try:
        call()
    except ollama.ResponseError as e:
        assert e.status_code == status, (status, e.status_code, e.error)
        return e.error
    raise SystemExit("accepted")


assert "not found" in refused(404, lambda: client.chat(model="no-such-model", messages=ask, stream=False))
assert "options.nope" in refused(400, lambda: client.chat(model=model, messages=ask, stream=False,
                                                          options={"nope": 1}))
assert "images" in refused(400, lambda: client.chat(
    model=model, stream=False, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]))
nokey = ollama.Client(host=url, timeout=30)
assert "API key" in refused(401, lambda: nokey.chat(model=model, messages=ask, stream=False))
assert "API key" in refused(401, lambda: nokey.list())

print("ollama ok")
