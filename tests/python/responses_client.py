"""Drives llama-orch's Responses API with the official `openai` client, and validates the raw
answers and stream events against OpenAI's published OpenAPI document: plain and streamed
answers, structured output, a forced tool call and the turn after its result (by
`previous_response_id` and by resent items), `auto` turns that answer in text and that call,
stored responses (retrieve, delete, `store: false`), and the error shapes.

Usage: python3 responses_client.py URL API_KEY MODEL OPENAPI_JSON_GZ
Prints "responses ok" on success; any failure raises with the offending answer.
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
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
SHORT = "You answer in one short sentence."


def post(body, stream=False):
    """The raw answer (status, text) of POST /v1/responses."""
    req = urllib.request.Request(
        url + "/v1/responses",
        data=json.dumps(dict(body, stream=stream)).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + key},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def raw_events(body):
    """A streamed answer's events, each checked against the schema of its type."""
    status, text = post(body, stream=True)
    assert status == 200, (status, text)
    events = []
    for block in text.split("\n\n"):
        lines = [l for l in block.split("\n") if l and not l.startswith(":")]
        if not lines:
            continue
        name = [l[7:] for l in lines if l.startswith("event: ")][0]
        data = json.loads([l[6:] for l in lines if l.startswith("data: ")][0])
        assert data["type"] == name, (name, data)
        spec.conforms_event(data)
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events))), events
    return events


# --- Plain ------------------------------------------------------------------------------------
ask = {"model": model, "instructions": SHORT, "input": "What is the capital of France?",
       "max_output_tokens": 24, "temperature": 0}
status, text = post(ask)
assert status == 200, text
whole = json.loads(text)
spec.conforms("Response", whole)
assert whole["id"].startswith("resp_") and whole["object"] == "response", whole
assert whole["status"] in ("completed", "incomplete"), whole

r = client.responses.create(**ask)
assert r.model == model and r.output[0].type == "message", r
assert "Paris" in r.output_text, r
assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r.usage
assert r.instructions == SHORT and r.store is True, r

# max_output_tokens ends the answer incomplete, as OpenAI says it.
cut = client.responses.create(model=model, input="Tell me a long story.", max_output_tokens=3,
                              temperature=0)
assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens", cut
assert cut.usage.output_tokens == 3, cut.usage

# --- Streamed ---------------------------------------------------------------------------------
events = raw_events(ask)
kinds = [e["type"] for e in events]
assert kinds[:2] == ["response.created", "response.in_progress"], kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta"), kinds
deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
done = [e for e in events if e["type"] == "response.output_text.done"][0]
assert deltas == done["text"] == events[-1]["response"]["output"][0]["content"][0]["text"], events[-3:]
# Greedy: the same words streamed and not (compare the start: the cache may change the tail).
assert deltas.split()[:3] == r.output_text.split()[:3], (deltas, r.output_text)

# The SDK's streaming helper gets the same final response.
with client.responses.stream(**ask) as s:
    seen = [e.type for e in s]
    final = s.get_final_response()
assert "response.output_text.delta" in seen and final.output_text.split()[:3] == deltas.split()[:3], final
assert final.usage.input_tokens_details.cached_tokens > 0, final.usage

# --- Structured output (text.format) ----------------------------------------------------------
city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                          "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}
structured = dict(ask, max_output_tokens=60,
                  text={"format": {"type": "json_schema", "name": "place", "schema": city, "strict": True}})
r = client.responses.create(**structured)
jsonschema.validate(json.loads(r.output_text), city)
assert r.text.format.type == "json_schema", r.text
status, text = post(structured)
spec.conforms("Response", json.loads(text))
r = client.responses.create(**dict(ask, max_output_tokens=60, text={"format": {"type": "json_object"}}))
assert isinstance(json.loads(r.output_text), dict), r.output_text

# --- Tools ------------------------------------------------------------------------------------
weather = {"type": "object",
           "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": weather, "strict": True},
         {"type": "function", "name": "get_time", "description": "Current time in a time zone",
          "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}]
paris = "What is the weather in Paris?"

# Forced: one function_call item whose arguments validate against its schema.
forced = {"model": model, "input": paris, "tools": tools, "temperature": 0, "max_output_tokens": 100,
          "tool_choice": {"type": "function", "name": "get_weather"}}
r = client.responses.create(**forced)
calls = [o for o in r.output if o.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather", r
call = calls[0]
jsonschema.validate(json.loads(call.arguments), weather)
status, text = post(forced)
spec.conforms("Response", json.loads(text))
# Streamed, the same call arrives as function_call_arguments events.
events = raw_events(forced)
args = [e for e in events if e["type"] == "response.function_call_arguments.done"]
assert len(args) == 1 and json.loads(args[0]["arguments"]) == json.loads(call.arguments), events
# `required` calls a tool of the model's choosing.
r = client.responses.create(**dict(forced, tool_choice="required"))
assert [o.type for o in r.output] == ["function_call"], r

# The turn after the result, by previous_response_id: the stored conversation plus the output.
first = client.responses.create(**forced)
follow = client.responses.create(
    model=model, previous_response_id=first.id, tools=tools, tool_choice="none", temperature=0,
    max_output_tokens=60,
    input=[{"type": "function_call_output", "call_id": first.output[0].call_id,
            "output": json.dumps({"temperature": 18, "sky": "sunny"})}])
assert follow.previous_response_id == first.id, follow
assert "18" in follow.output_text or "sun" in follow.output_text.lower(), follow.output_text
# The same turn with its history resent as items (store: false keeps nothing) answers alike.
resent = client.responses.create(
    model=model, tools=tools, tool_choice="none", temperature=0, max_output_tokens=60, store=False,
    input=[{"role": "user", "content": paris},
           {"type": "function_call", "call_id": first.output[0].call_id, "name": "get_weather",
            "arguments": first.output[0].arguments},
           {"type": "function_call_output", "call_id": first.output[0].call_id,
            "output": json.dumps({"temperature": 18, "sky": "sunny"})}])
assert resent.output_text == follow.output_text, (resent.output_text, follow.output_text)
assert resent.store is False, resent
try:
    client.responses.retrieve(resent.id)
    raise SystemExit("a response made with store: false was kept")
except openai.NotFoundError:
    pass

# `auto` on the default model (its template has no tool support): a greeting is text ...
r = client.responses.create(model=model, input="Say hello to me.", tools=tools, temperature=0,
                            max_output_tokens=40)
assert r.output[0].type == "message" and r.output_text and not r.output_text.lstrip().startswith("{"), r
# ... and, shown an earlier call in its history, the next question is a call.
r = client.responses.create(
    model=model, tools=tools, temperature=0, max_output_tokens=60,
    input=[{"role": "user", "content": "What is the weather in Oslo?"},
           {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": json.dumps({"city": "Oslo", "unit": "celsius"})},
           {"role": "user", "content": paris}])
auto_calls = [o for o in r.output if o.type == "function_call"]
assert auto_calls and auto_calls[0].name == "get_weather", r
assert json.loads(auto_calls[0].arguments)["city"] == "Paris", auto_calls

# --- Stored responses -------------------------------------------------------------------------
got = client.responses.retrieve(first.id)
assert got.id == first.id and got.output[0].call_id == first.output[0].call_id, got
client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    raise SystemExit("a deleted response was found")
except openai.NotFoundError as e:
    spec.conforms("ErrorResponse", e.body if "error" in (e.body or {}) else {"error": e.body})

# Another key (the stack's second client) finds nothing of this key's, by id or as a previous turn.
neighbour = openai.OpenAI(base_url=url + "/v1", api_key="other-key-0123456789abcdef", max_retries=0,
                          timeout=60)
try:
    neighbour.responses.retrieve(follow.id)
    raise SystemExit("another key read a stored response")
except openai.NotFoundError:
    pass
try:
    neighbour.responses.create(model=model, input="Go on.", previous_response_id=follow.id)
    raise SystemExit("another key continued a stored conversation")
except openai.BadRequestError as e:
    assert e.param == "previous_response_id", e.body
try:
    neighbour.responses.delete(follow.id)
    raise SystemExit("another key deleted a stored response")
except openai.NotFoundError:
    pass
assert client.responses.retrieve(follow.id).id == follow.id

# --- Errors in OpenAI's envelope --------------------------------------------------------------
def refused(exc, param, **kwargs):
    try:
        client.responses.create(**kwargs)
    except exc as e:
        assert e.param == param if param else True, (e.param, e.body)
        return e
    raise SystemExit(f"{kwargs} accepted")


refused(openai.BadRequestError, "input[0].content[0].type", model=model,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}])
refused(openai.BadRequestError, "temperature", model=model, input="x", extra_body={"temperature": "hot"})
refused(openai.BadRequestError, "tools[0].type", model=model, input="x", tools=[{"type": "web_search"}])
refused(openai.BadRequestError, "previous_response_id", model=model, input="x",
        previous_response_id=first.id)
refused(openai.NotFoundError, None, model="no-such-model", input="x")
status, text = post({"model": model, "input": "x", "modalities": ["text"]})
assert status == 400, text
spec.conforms("ErrorResponse", json.loads(text))
other = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
for call_it in (lambda: other.responses.create(model=model, input="x"),
                lambda: other.responses.retrieve(follow.id)):
    try:
        call_it()
        raise SystemExit("a wrong key was accepted")
    except openai.AuthenticationError:
        pass

print("checked", json.dumps(spec.checked, sort_keys=True))
print("responses ok")
