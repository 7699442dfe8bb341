"""The results recipes' library: cells run once per settings (``cells``), the stages a results cell
runs (``stages``: poison, victim and defense fine-tunes, the disp chain, reference rows) and the
tables and goals written from their rows (``table``)."""
