"""The report header reads as a table of settings: nested records as tables, lists as values, never a Python dict."""

from __future__ import annotations

from loopscope.report.document import meta_html


def test_nested_settings_are_tables_not_python_dicts():
    html = meta_html({"model": "default", "streams": {"states": {"batches": 2, "cached": False}},
                      "layers": [0, 1, 2], "feedforward": None})
    assert "{" not in html and "[" not in html  # no repr of a dict or a list
    assert html.count("<table") == 3  # the header, "streams", and its "states" record
    assert "<th>batches</th><td style='text-align:left'>2</td>" in html and "0, 1, 2" in html and "—" in html
