"""The top layer: the ``kdfast`` commands and what only they need (the comparison, the sweep, the
merged report, the budget calibration, the teacher-cache build). Nothing below imports from here."""
