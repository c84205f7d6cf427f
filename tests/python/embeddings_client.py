"""Drives llama-orch's embeddings with the official `openai` and `ollama` clients, and
validates the raw answers against OpenAI's published OpenAPI document: three sentences (the
two alike closer than the third), the SDK's default base64 and plain floats alike, token-id
inputs, Ollama's `/api/embed` and `/api/embeddings` giving the same vectors, `truncate`, and
the error shapes.

Usage: python3 embeddings_client.py URL API_KEY MODEL OPENAPI_JSON_GZ
Prints "embeddings ok" on success; any failure raises with the offending answer.
"""
import base64
import json
import math
import struct
import sys
import urllib.error
import urllib.request

import ollama
import openai

from openai_spec import Spec

url, key, model, spec_path = sys.argv[1:5]
spec = Spec(spec_path)
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
sentences = ["The cat sat on the mat.", "A cat is sitting on a mat.",
             "Stock markets fell sharply after the bank's report."]


def post(path, body):
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + key})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# --- The official client (it asks for base64 unless told otherwise) ---------------------------
r = client.embeddings.create(model=model, input=sentences)
vectors = [d.embedding for d in r.data]
assert [d.index for d in r.data] == [0, 1, 2], r
assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100, [len(v) for v in vectors]
for v in vectors:
    assert abs(math.sqrt(dot(v, v)) - 1) < 1e-3, "vectors are normalised"
alike, unlike = dot(vectors[0], vectors[1]), dot(vectors[0], vectors[2])
assert alike > unlike, (alike, unlike)
assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens, r.usage
assert r.model == model, r

# Raw answers in both encodings conform, and say the same numbers.
status, floats = post("/v1/embeddings", {"model": model, "input": sentences, "encoding_format": "float"})
assert status == 200, floats
spec.conforms("CreateEmbeddingResponse", floats)
status, b64 = post("/v1/embeddings", {"model": model, "input": sentences, "encoding_format": "base64"})
assert status == 200, b64
raw = base64.b64decode(b64["data"][1]["embedding"])
decoded = struct.unpack("<%df" % (len(raw) // 4), raw)
assert list(decoded) == floats["data"][1]["embedding"], "base64 holds the same float32 values"
assert max(abs(a - b) for a, b in zip(floats["data"][0]["embedding"], vectors[0])) < 1e-6

# One string; token ids; the model's own dimensions.
one = client.embeddings.create(model=model, input=sentences[0], encoding_format="float")
assert max(abs(a - b) for a, b in zip(one.data[0].embedding, vectors[0])) < 1e-4, "batched or not"
ids = client.embeddings.create(model=model, input=[[1, 2, 3], [4, 5]], encoding_format="float")
assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5, ids.usage
same = client.embeddings.create(model=model, input=sentences[0], dimensions=len(vectors[0]))
assert len(same.data[0].embedding) == len(vectors[0])

# --- Ollama's client ----------------------------------------------------------------------------
oc = ollama.Client(host=url, headers={"Authorization": "Bearer " + key})
e = oc.embed(model=model, input=sentences)
assert len(e.embeddings) == 3 and e.prompt_eval_count == r.usage.prompt_tokens, e
assert max(abs(a - b) for a, b in zip(e.embeddings[2], vectors[2])) < 1e-6, "the same vectors"
legacy = oc.embeddings(model=model, prompt=sentences[1])
assert max(abs(a - b) for a, b in zip(legacy.embedding, vectors[1])) < 1e-4, legacy
# Ollama truncates a long input by default; with truncate: false it refuses.
long_text = "word " * 1500
assert len(oc.embed(model=model, input=long_text).embeddings[0]) == len(vectors[0])
try:
    oc.embed(model=model, input=long_text, truncate=False)
    raise SystemExit("an input longer than the context was embedded without truncation")
except ollama.ResponseError as err:
    assert err.status_code == 400 and "input[0]" in err.error, err
try:
    oc.embed(model="no-such-model", input="x")
    raise SystemExit("an unknown model embedded")
except ollama.ResponseError as err:
    assert err.status_code == 404 and "not found" in err.error, err

# --- Errors in OpenAI's envelope ----------------------------------------------------------------
def refused(exc, param, **kwargs):
    try:
        client.embeddings.create(**kwargs)
    except exc as err:
        assert err.param == param, (err.param, err.body)
        spec.conforms("ErrorResponse", {"error": err.body})
        return err
    raise SystemExit(f"{kwargs} accepted")


refused(openai.BadRequestError, "input[0]", model=model, input=long_text)
refused(openai.BadRequestError, "dimensions", model=model, input="x", dimensions=7)
refused(openai.BadRequestError, "input", model=model, input=[])
refused(openai.BadRequestError, "encoding_format", model=model, input="x",
        extra_body={"encoding_format": "int8"})
refused(openai.BadRequestError, "input[0]", model=model, input=[[10**9]])
refused(openai.NotFoundError, "model", model="no-such-model", input="x")
other = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
try:
    other.embeddings.create(model=model, input="x")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass

print("checked", json.dumps(spec.checked, sort_keys=True))
print("embeddings ok")
