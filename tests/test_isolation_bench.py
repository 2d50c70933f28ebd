"""The cheap-query isolation benchmark at a small size: it runs end to end and reports what it claims."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from alignsearch.bench import isolation
from alignsearch.service.admission import work
from alignsearch.service.settings import Settings


def test_the_heavy_request_is_the_most_expensive_valid_one():
    body = isolation.heavy_body()
    image = Image.open(io.BytesIO(base64.b64decode(body["image_base64"], validate=True)))
    assert image.size == (1000, 1000) and image.format == "JPEG"
    settings = Settings()
    assert work(body["candidates"], body["k"]) == settings.max_work > settings.heavy_work and body["explain"]


@pytest.mark.slow
def test_a_small_isolation_run_reports_both_servers():
    report = isolation.run(photos=24, clients=4, queries=6, warm_up_s=1.0, dataset=None, heavy_nice=(0, 10))
    assert [r["server_env"] for r in report["runs"]] == [{"ALIGNSEARCH_HEAVY_NICE": "0"},
                                                         {"ALIGNSEARCH_HEAVY_NICE": "10"}]
    for r in report["runs"]:
        assert r["cheap_alone"]["count"] == r["cheap_under_load"]["count"] == 6
        assert r["p50_ratio"] > 0 and sum(r["heavy_answers"].values()) > 0
        assert not any(code.startswith("5") and code != "503" for code in r["heavy_answers"]), r["heavy_answers"]
