"""The five JSON schemas of issue 19's structured-output acceptance, each with one valid instance.

Shared by tests/test_structured*.py and benchmarks/structured.py, so the library choice is measured on the schemas
the acceptance runs. Strings and arrays are bounded so that a sampled answer fits a modest ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "location": {
                    "type": "object",
                    "properties": {"lat": {"type": "integer"}, "lon": {"type": "integer"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["city", "location"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "address"],
    "additionalProperties": False,
}

ENUMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "sentiment": {"enum": ["positive", "negative", "neutral", None]},
    },
    "required": ["color", "size", "sentiment"],
    "additionalProperties": False,
}

ARRAYS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 1,
            "maxItems": 4,
        },
        "matrix": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "maxItems": 2,
        },
    },
    "required": ["tags", "matrix"],
    "additionalProperties": False,
}

BOUNDS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "temperature": {"type": "number", "minimum": -40, "maximum": 50},
        "discount": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.25},
    },
    "required": ["age", "rating", "temperature", "discount"],
    "additionalProperties": False,
}

CHINESE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "城市": {"type": "string", "pattern": "^[\u4e00-\u9fff]{1,6}$"},
        "诗句": {"type": "string", "pattern": "^[\u4e00-\u9fff，。]{1,16}$"},
        "季节": {"enum": ["春", "夏", "秋", "冬"]},
    },
    "required": ["城市", "诗句", "季节"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": NESTED,
    "enums": ENUMS,
    "arrays": ARRAYS,
    "bounds": BOUNDS,
    "chinese": CHINESE,
}

# One valid instance per schema (jsonschema-checked in tests/test_structured.py): the token path along which the
# benchmark times masks, and the text the unit tests feed through a constraint.
EXAMPLES: dict[str, Any] = {
    "nested": {"name": "Ada", "address": {"city": "London", "location": {"lat": 51, "lon": 0}}},
    "enums": {"color": "blue", "size": "XL", "sentiment": None},
    "arrays": {"tags": ["a", "bc"], "matrix": [[True, False], []]},
    "bounds": {"age": 36, "rating": 5, "temperature": -3.5, "discount": 0.25},
    "chinese": {"城市": "北京", "诗句": "床前明月光，疑是地上霜。", "季节": "秋"},
}
