"""Constants of the study design, shared by the cohort runner and the stats service."""

#: Visits (infant age in months) the analyses compare.
VISITS = (6, 12)
#: A session is one participant at one visit.
KEYS = ["participant_id", "visit_month"]
