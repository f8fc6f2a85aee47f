"""Skipped-record accounting without Ray: local counts, strict mode, the summary line."""

import pickle

import pytest

from ssl_platform.data.skips import BadRecordError, SkipReporter, _Ledger, format_summary


def test_reporter_counts_locally_and_flush_clears_the_pending_counts():
    reporter = SkipReporter(ledger=None)
    reporter.skip("a.png", "corrupt image")
    reporter.skip("b.png", "corrupt image")
    reporter.skip("doc 3", "empty text")
    assert reporter.counts == {"corrupt image": 2, "empty text": 1}
    reporter.flush()
    assert not reporter.counts and reporter.total == {"corrupt image": 2, "empty text": 1}


def test_strict_reporter_names_the_record_and_the_key_to_change():
    with pytest.raises(BadRecordError, match=r"shard-3\.tar: unreadable shard .*data\.strict=false"):
        SkipReporter(strict=True).skip("shard-3.tar", "unreadable shard")


def test_reporter_pickles_its_configuration_only():
    reporter = SkipReporter("sslp-skips-run", strict=True)
    clone = pickle.loads(pickle.dumps(reporter))
    assert (clone.ledger, clone.strict, dict(clone.counts)) == ("sslp-skips-run", True, {})


def test_ledger_totals_and_summary_line():
    ledger = _Ledger()
    ledger.record({"corrupt image": 2}, {"corrupt image": ["a.png", "b.png"]})
    ledger.record({"corrupt image": 1, "empty text": 4}, {"corrupt image": ["c.png"], "empty text": ["d1"]})
    summary = ledger.summary()
    assert summary["total"] == 7 and summary["by_reason"] == {"corrupt image": 3, "empty text": 4}
    assert summary["examples"]["corrupt image"] == ["a.png", "b.png", "c.png"]
    assert format_summary(summary) == ("skipped 7 records: empty text 4 (e.g. d1); "
                                       "corrupt image 3 (e.g. a.png, b.png, c.png)")
    assert format_summary({"total": 0}) == "skipped 0 records"
