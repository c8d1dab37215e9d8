"""The conservation rule judged in ranges of keys gives the count of the whole."""

import duckdb
import pytest

from pipeline_project.checks.conservation import count_not_placed_exactly_once


@pytest.mark.parametrize("range_size", [None, 1, 2, 3, 100])
def test_judged_in_ranges_it_counts_what_the_whole_counts(range_size):
    conn = duckdb.connect()
    conn.execute("CREATE TABLE raw AS SELECT range AS line_no FROM range(1, 11)")
    # line 4 lost, line 7 in both places, line 9 twice in one place, the rest once
    conn.execute("CREATE TABLE good AS SELECT * FROM (VALUES (1), (2), (3), (5), (7), (9), (9))"
                 " AS t(line_no)")  # fmt: skip
    conn.execute("CREATE TABLE bad AS SELECT * FROM (VALUES (6), (7), (8), (10)) AS t(line_no)")
    misplaced = count_not_placed_exactly_once(
        conn, source="SELECT line_no FROM raw", key="line_no",
        destinations=["SELECT line_no FROM good", "SELECT line_no FROM bad"], params={},
        range_size=range_size,
    )  # fmt: skip
    assert misplaced == 3  # 4, 7 and 9
