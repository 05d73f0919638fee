"""The engine's own measure of its pace: seconds per tick at each row count, from the ticks it has run.

A request with a deadline (`timeout_s`) is refused at once where the work ahead of it, at this pace, leaves it no
time to finish (app/engine/engine.py). The pace is measured, not modelled: each tick's wall time (forward, sampler
steps, decode of the finished) updates an exponentially weighted mean at its row count, so it follows the machine
as its load changes (a shared CPU's pace moves by tens of per cent within seconds). Only ticks whose rows all ran
in full are measured: a row that reuses cached features (a request's `cache`) costs a fraction of one, so such
ticks would pull the pace below what full rows take and let through deadlines that full work cannot meet; a
cached request is judged at the pace of full rows, which errs towards refusing. Row counts not run yet are
read from the nearest measured count above (a forward of fewer rows takes no longer), else scaled from the largest
below in proportion to the rows (a compute-bound forward's time grows with them). Before any tick there is no
measure, and no request is refused for its deadline.
"""

from __future__ import annotations

import numpy as np

# Weight of the newest tick in the mean: the last ten or so ticks at a row count make most of it.
ALPHA = 0.2


class TickTimes:
    def __init__(self, max_rows: int, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self.measured = np.full(max_rows + 1, np.nan)

    def observe(self, rows: int, seconds: float) -> None:
        """One tick of `rows` rows took `seconds`."""
        if not 0 < rows < len(self.measured):
            return
        old = self.measured[rows]
        self.measured[rows] = seconds if np.isnan(old) else old + self.alpha * (seconds - old)

    def table(self) -> np.ndarray | None:
        """Seconds per tick at every row count 0..max_rows (0 rows: no tick, no time); None before any tick."""
        known = np.flatnonzero(~np.isnan(self.measured))
        if len(known) == 0:
            return None
        table = np.zeros(len(self.measured))
        for rows in range(1, len(table)):
            above = known[known >= rows]
            if len(above):
                table[rows] = self.measured[above[0]]
            else:
                largest = known[-1]
                table[rows] = self.measured[largest] * rows / largest
        return table
