"""The date Date and Received fields carry: the current second, in the local zone."""

import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from submitd_devkit.testing.waiting import eventually
from submitd_common.received import date_text


def test_the_date_is_the_current_second_and_moves_on():
    first = parsedate_to_datetime(date_text())
    assert abs(first.timestamp() - time.time()) <= 1
    assert first.utcoffset() == datetime.now(timezone.utc).astimezone().utcoffset(), "the local zone"
    # Worked out again once the second is over (the next one comes within a second).
    eventually(lambda: parsedate_to_datetime(date_text()) > first, 3, 0.01)


def test_a_given_time_is_shown_as_given():
    when = datetime(2026, 12, 7, 12, 0, 5, tzinfo=timezone.utc)
    assert parsedate_to_datetime(date_text(when)) == when
