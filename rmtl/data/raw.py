"""RawEvents: what every raw-file reader hands to the common SessionLog builder.

A reader (retailrocket.py, kuairand.py, census.py) validates its files and returns one
row per impression, i.e. per logged (user, item) event that becomes a step of an
episode. The builder (build.py) then cuts sessions (unless the reader already did),
drops unusable sessions, orders sessions by start time, splits 6:2:2, fits the
vocabularies on the train split only, encodes, and returns a SessionLog.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class RawEvents:
    # Columns: 'user', 'item' (raw ids, any hashable dtype), 'time' (int64 milliseconds),
    # optionally 'session' (int64, when the reader had to cut sessions itself, e.g. to
    # define RetailRocket's "later in the same session" labels), then the columns named
    # in `sparse` (raw categorical values, any dtype; NaN/None = unknown), `dense`
    # (numeric; NaN = missing, filled by the builder) and `tasks` (0/1).
    frame: pd.DataFrame
    sparse: list[str]
    dense: list[str]
    tasks: list[str]
    source: str
    events_read: int  # rows read from the raw event file(s), before any filtering
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped by the reader
    user_field: str | None = None  # which sparse column is the user id, if any
    item_field: str | None = None
    author_field: str | None = None
    # Sources without sessions (Census) keep every row as a one-event session.
    min_session_events: int = 2
    # Counts of rows KEPT but worth reporting (e.g. a video with no side features).
    notes: dict[str, int] = field(default_factory=dict)
    # Lines for the prepare summary about data that was read but may mislead (a release file
    # missing, a feature that tracks the calendar date); prepare prints them as warnings.
    warnings: list[str] = field(default_factory=list)
    # Name of a 0/1 column marking rows that form the test split as given (Census: the rows of
    # census-income.test); train and val are then cut from the other rows. None = split all.
    test_column: str | None = None
