"""Header amplification (issue 16 item 3): counts read from DICOM headers are checked
against what the bytes hold and the config caps; buffers grow with what arrived; alerts
and messages stay small whatever a header claims."""

from __future__ import annotations

import json

from rtsc.ranges import index_ranges, missing_ranges, ranges_text


def test_missing_ranges_cost_what_arrived_not_what_was_claimed():
    assert index_ranges([9, 3, 7, 8, 3]) == [[3, 3], [7, 9]]
    assert missing_ranges([0, 1, 4], 8) == (5, [[2, 3], [5, 7]])
    assert missing_ranges([], 0) == (0, [])
    # a claimed run of 2**31 - 1 volumes: one range, at once
    count, ranges = missing_ranges([0, 1, 2], 2**31 - 1)
    assert count == 2**31 - 4 and ranges == [[3, 2**31 - 2]]
    # every other volume missing: the count stays exact, the ranges listed are capped
    count, ranges = missing_ranges(range(0, 100000, 2), 100000)
    assert count == 50000 and len(ranges) == 100 and len(json.dumps(ranges)) < 2000
    assert ranges_text([[3, 3], [7, 9]]) == "3, 7-9"
    assert ranges_text(ranges, count) == \
        "1, 3, 5, 7, 9, 11, 13, 15 and 92 more ranges (50000 in all)"
