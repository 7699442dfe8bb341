"""The Ray side: run a recipe on an embedded or existing Ray cluster (see issue tracker)."""
