"""OpenAI's published OpenAPI document as JSON Schema: `Spec(path).conforms(name, instance)`
validates an answer against `#/components/schemas/<name>` and raises with the offending answer.
"""
import gzip
import json

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def openapi_nullable(node):
    """The document is OpenAPI 3.1 but still marks optional values with OpenAPI 3.0's
    `nullable: true`, which JSON Schema ignores: give such a schema null as an alternative."""
    if isinstance(node, list):
        return [openapi_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: openapi_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


class Spec:
    def __init__(self, path):
        with gzip.open(path, "rt") as f:
            spec = openapi_nullable(json.load(f))
        self.registry = Registry().with_resource(
            "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        self.checked = {}
        # Each event of a streamed response by its `type`, so a failure names the event's own
        # schema rather than "not valid under any of" the union.
        schemas = spec["components"]["schemas"]
        self.events = {}
        for ref in schemas["ResponseStreamEvent"]["anyOf"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            kind = schemas[name].get("properties", {}).get("type", {}).get("enum", [None])[0]
            if kind:
                self.events[kind] = name

    def conforms_event(self, event):
        """A stream event of the Responses API, against the schema of its type."""
        name = self.events.get(event.get("type"))
        if name is None:
            raise SystemExit(f"no event of type {event.get('type')!r} in ResponseStreamEvent")
        self.conforms(name, event)
        self.conforms("ResponseStreamEvent", event)

    def conforms(self, schema_name, instance):
        schema = {"$ref": "urn:openai#/components/schemas/" + schema_name}
        validator = jsonschema.Draft202012Validator(schema, registry=self.registry)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        if errors:
            best = jsonschema.exceptions.best_match(errors)
            raise SystemExit(
                f"{schema_name} violated: {best.message} at {list(best.path)}\n"
                + json.dumps(instance, indent=1)[:3000]
            )
        self.checked[schema_name] = self.checked.get(schema_name, 0) + 1
