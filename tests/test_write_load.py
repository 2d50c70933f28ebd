"""The write-load benchmark at a small size: photos posted by concurrent clients while others search, the server
SIGKILLed midway and restarted on the same index. Every acknowledged photo is in the index afterwards, none is
half there, no answer is a 5xx, and ``index verify`` passes."""

from __future__ import annotations

import pytest

from alignsearch.bench import write_load


def test_the_marked_photos_are_distinct():
    photos = write_load.make_photos(30, [])
    assert len({p.image_id for p in photos}) == 30
    assert all(p.image_id.startswith("uploads/") and p.caption for p in photos)


@pytest.mark.slow
def test_uploads_survive_a_kill_mid_stream(tmp_path):
    report = write_load.run(photos=40, clients=4, searchers=2, kill_at=0.5, work=tmp_path, dataset=None,
                            sample_every=5)
    seen = {k: report[k] for k in ("statuses", "refusal_samples", "kill", "cut_by_kill", "never_sent",
                                   "server_tracebacks", "commits_failed_and_retried")}
    assert report["kill"]["acked_before"] >= 20  # the kill happened midway
    assert report["server_errors_5xx"] == 0, (report["server_error_samples"], seen, report["server_log_tail"])
    assert report["server_failed_after_writes"] is None
    assert report["lost_acknowledged"] == 0 and report["acknowledged_not_served"] == 0
    assert report["half_there_any"] == 0, report["half_there_sample"]
    cut = report["cut_by_kill"]
    assert cut["fully_present"] + cut["fully_absent"] == cut["count"]
    assert report["acknowledged"] + cut["count"] == 40 and report["never_sent"] == 0, (seen, report["server_log_tail"])
    assert report["index_verify"]["rc"] == 0, report["index_verify"]["out"]
    assert report["search_under_write_load"]["count"] > 0
