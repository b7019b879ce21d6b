"""JSON schemas the structured-output tests constrain generation to: nested objects, arrays with
min/max items, enums, bounded integers, optional fields, anyOf, string patterns."""

from __future__ import annotations

from typing import Any

# Strings and numbers are bounded: a small model's free text and digits run on for hundreds of tokens.
_NAME = {"type": "string", "maxLength": 24}
_INT = {"type": "integer", "minimum": -1000, "maximum": 1000}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": _NAME, "age": _INT},
        "required": ["name", "age"],
    },
    "bounded_integer": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["score"],
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"level": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}},
        "required": ["level"],
    },
    "integer_enum": {
        "type": "object",
        "properties": {"size": {"type": "integer", "enum": [1, 5, 10]}},
        "required": ["size"],
    },
    "boolean": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "reason": _NAME},
        "required": ["ok"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "person"}, "name": _NAME},
        "required": ["kind", "name"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _NAME, "minItems": 2, "maxItems": 3}},
        "required": ["tags"],
    },
    "array_of_integers": {
        "type": "object",
        "properties": {
            "values": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["values"],
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "minItems": 1, "maxItems": 3}
        },
        "required": ["days"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"],
            }
        },
        "required": ["person"],
    },
    "deeply_nested": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "label": _NAME},
                    "required": ["id", "label"],
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"title": _NAME, "subtitle": _NAME, "year": _INT},
        "required": ["title"],
    },
    "no_additional_properties": {
        "type": "object",
        "properties": {"x": _INT, "y": _INT},
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [_INT, {"type": "string", "maxLength": 12}]}},
        "required": ["value"],
    },
    "any_of_objects": {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"radius": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["radius"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {"side": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["side"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "nullable": {
        "type": "object",
        "properties": {"nickname": {"type": ["string", "null"], "maxLength": 12}},
        "required": ["nickname"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"],
    },
    "string_pattern_words": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
    },
    "string_lengths": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}},
        "required": ["word"],
    },
    "defs_ref": {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": _INT}, "required": ["x"]}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
}


def _closed(node: Any) -> Any:
    """Every object without its own `additionalProperties` closed: JSON schema leaves objects open,
    and a small model then writes extra properties until it runs out of tokens."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


SCHEMAS = {name: _closed(schema) for name, schema in SCHEMAS.items()}
