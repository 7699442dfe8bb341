"""The results recipes' library: the stages a results cell runs (``stages``: poison, victim and defense
fine-tunes, the disp chain, reference rows; each run once per settings by defend/stage_cache.py) and the
tables, goals and plots written from their rows (``table``, ``plots``)."""
