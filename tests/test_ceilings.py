"""The ceilings benchmark's parts: the instant text encoder gives the model's own output without computing, the
bare endpoint answers the given bytes, and the load client counts what it is answered."""

from __future__ import annotations

import torch

from alignsearch.bench.ceilings import InstantTexts, Server, load, targets
from alignsearch.models.model import EncoderOutput


class CountingModel:
    def __init__(self) -> None:
        self.calls = 0

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> EncoderOutput:
        self.calls += 1
        n = len(texts)  # each text's own vectors, wherever it stands in the batch
        local = torch.stack([torch.arange(12, dtype=torch.float32).view(3, 4) + sum(map(ord, t)) for t in texts])
        return EncoderOutput(local.mean(1), local, torch.ones(n, 3, dtype=torch.bool), [t.split() for t in texts],
                             [False] * n)


def test_instant_texts_look_up_the_models_output_without_computing():
    model = CountingModel()
    instant = InstantTexts(model, ["a dog", "two cats run"])
    want = model.encode_texts(["two cats run", "a dog", "two cats run"])
    model.calls = 0
    got = instant(["two cats run", "a dog", "two cats run"])
    assert model.calls == 0
    assert torch.equal(got.global_emb, want.global_emb) and torch.equal(got.local, want.local)
    assert torch.equal(got.mask, want.mask) and got.words == want.words and got.truncated == want.truncated
    assert torch.equal(instant(["never seen"]).local, instant(["a dog"]).local)  # an unknown text: the first's


def test_the_bare_endpoint_answers_the_bytes_and_the_client_counts_them(tmp_path):
    body = b'{"results": [' + b'"x", ' * 100 + b'"y"]}'
    (tmp_path / "body.json").write_bytes(body)
    server = Server("bare", "--body", str(tmp_path / "body.json"), ready_timeout=120)
    try:
        figures = load(server.port, ["a dog", "a cat"], seconds=1.0, concurrency=3)
    finally:
        server.stop()
    assert figures["requests"] > 0 and figures["errors"] == 0
    assert figures["response_bytes"] == len(body)
    assert figures["throughput_rps"] > 0 and figures["p50_ms"] <= figures["p99_ms"]


def test_targets_are_judged_on_the_ratios():
    results = {"server": {"instant_over_bare": 0.61, "phases": {"bare": [{"errors": 0}], "instant": [{"errors": 2}]}},
               "rerank": {"chosen_fraction_of_copy_bandwidth": 0.2, "chosen": "float32", "fastest_here": "float32"}}
    out = targets(results)
    assert out["served /search/text with instant encoders >= 50% of the bare endpoint"] == [0.61, True]
    assert out["zero errors"] == [2, False]
    assert out["16-query rerank >= 25% of memcpy in the kernel chosen"] == [0.2, False]
    assert out["the kernel chosen at start-up is the fastest here"] == ["float32", True]
