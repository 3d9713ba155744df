"""A two-file template in the graph layout, as templates built before the payload layout
were: the graph's weights end to end in its data file, nothing else. Data dirs keep such
templates, so releases made with them must still copy, verify and pull."""

from __future__ import annotations

import dataclasses
import hashlib

import onnx

from sluice.gateway.export.template import OnnxTemplate, WeightRange


def graph_layout(t: OnnxTemplate) -> OnnxTemplate:
    assert t.data_file is not None and t.payload_bytes is not None
    model = onnx.load_from_string(bytes(t.data))
    inits = {init.name: init for init in model.graph.initializer}
    ranges, pos = [], 0
    for r in t.ranges:  # in payload order, which is schema order
        entries = {e.key: e for e in inits[r.name].external_data}
        entries["offset"].value = str(pos)
        ranges.append(WeightRange(r.name, pos, pos + r.end - r.start))
        pos += r.end - r.start
    data = model.SerializeToString(deterministic=True)
    return dataclasses.replace(
        t,
        data=data,
        ranges=tuple(ranges),
        structure_hash=hashlib.sha256(data).hexdigest(),
        payload_bytes=None,
        outside_graph=b"",
    )
