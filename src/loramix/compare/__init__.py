"""`loramix compare`: finished runs side by side (:mod:`.runs`), and runs that differ only in their seed grouped and
paired (:mod:`.seeds`). It reads what the runs wrote and prints, or writes a report with :mod:`loramix.report`."""
