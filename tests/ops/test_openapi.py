"""The OpenAPI document kept in the repository is the one made from the routes table."""

from __future__ import annotations

import json

from twisted.trial import unittest

from gateway.ops import openapi
from gateway.ops.routes import ROUTES


class DocumentTests(unittest.TestCase):
    def test_the_committed_file_is_the_generated_document(self):
        with open(openapi.PATH, encoding="utf-8") as f:
            committed = json.load(f)
        self.assertEqual(committed, openapi.document(),
                         "gateway/ops/openapi.json is out of date: run python -m gateway.ops.openapi")

    def test_every_route_is_in_it_with_its_parameters(self):
        with open(openapi.PATH, encoding="utf-8") as f:
            paths = json.load(f)["paths"]
        for route in ROUTES:
            self.assertIn(route.path, paths)
            op = paths[route.path].get(route.method.lower())
            self.assertIsNotNone(op, f"{route.method} {route.path} is missing from openapi.json")
            names = {(p["in"], p["name"]) for p in op.get("parameters", ())}
            self.assertEqual(names, {("query", n) for n in route.params} | {("path", n) for n in route.path_params},
                             route.path)
            for segment in route.segments:
                if segment.startswith("{"):
                    self.assertIn(segment[1:-1], route.path_params, route.path)
        self.assertEqual(sum(len(ops) for ops in paths.values()), len(ROUTES))

    def test_every_list_answers_a_page(self):
        document = openapi.document()
        schemas = document["components"]["schemas"]
        for route in ROUTES:
            if "limit" in route.params:
                name = route.responses[200][1]
                self.assertEqual(schemas[name]["required"], ["items", "total", "limit", "offset"], route.path)

    def test_references_resolve(self):
        document = openapi.document()
        text = json.dumps(document)
        import re

        for name in set(re.findall(r'"#/components/schemas/([A-Za-z]+)"', text)):
            self.assertIn(name, document["components"]["schemas"])
