"""The date Date and Received fields carry: the current second, in the local zone."""

import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from submitd_common.received import date_text


def test_the_date_is_the_current_second_and_moves_on():
    first = parsedate_to_datetime(date_text())
    assert abs(first.timestamp() - time.time()) <= 1
    assert first.utcoffset() == datetime.now(timezone.utc).astimezone().utcoffset(), "the local zone"
    time.sleep(1.1)
    assert parsedate_to_datetime(date_text()) > first, "worked out again once the second is over"


def test_a_given_time_is_shown_as_given():
    when = datetime(2026, 12, 7, 12, 0, 5, tzinfo=timezone.utc)
    assert parsedate_to_datetime(date_text(when)) == when
